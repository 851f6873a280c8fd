"""LoMix performance benchmark: loss, training step, peak memory and export, as ratios (issue #8).

Run from the repository root:

    python benchmarks/run.py --output benchmarks/results/cpu.json
    python benchmarks/run.py --device cuda --bf16 --output benchmarks/results/cuda.json   # a GPU, a few minutes

Besides the loss and a bare step, it times the module's own ``training_step`` (with its label check on the host, as
under a Trainer, and its non-finite check: the host reads a user gets) and counts its operators and host reads
(``lomix_lightning.profiling``); on CUDA also its kernel launches, CUDA's own report of synchronising calls, and
``torch.cuda.max_memory_allocated``.

Everything runs in this process except the memory probes (one subprocess per configuration, so peak resident memory
on the CPU is measured from a clean process). Timings interleave the variants (one call of each per round) and report
medians, so a load change on the machine affects every variant alike. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _memory import cpu_peak_bytes  # noqa: E402
from reference_loop import ReferenceLoopLoss  # noqa: E402
from volumes import bench_volumes  # noqa: E402  (the 3-D case, issue #16)

from lomix_lightning import LoMixLoss, LoMixSegmentationModule  # noqa: E402
from lomix_lightning._engine.native import library  # noqa: E402
from lomix_lightning.inference import as_output_list, resize_logits  # noqa: E402
from lomix_lightning.losses.aligned import AlignedWeighting  # noqa: E402
from lomix_lightning.models import MultiScaleSMP  # noqa: E402
from lomix_lightning.profiling import OpCounter  # noqa: E402

SCHEMES = ("last_layer", "deep_supervision", "mutation", "lomix")
NATIVE = (8, 4, 2, 1)  # the L=4 maps' downsampling factors (coarse to fine), as MultiScaleSMP's Unet returns them


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function: one warm-up call each, then ``rounds`` rounds of one call each."""
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def loss_inputs(args: argparse.Namespace, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Four logit maps at their native resolutions (requiring grad) and a label map."""
    gen = torch.Generator().manual_seed(0)
    b, c, s = args.batch, args.classes, args.size
    maps = [torch.randn(b, c, s // f, s // f, generator=gen).to(device).requires_grad_() for f in NATIVE]
    return maps, torch.randint(0, c, (b, s, s), generator=gen).to(device)


def bench_loss(args: argparse.Namespace, device: torch.device) -> dict:
    """Loss forward + backward, maps resized to the label size inside the timed call (as the module does)."""
    maps, target = loss_inputs(args, device)
    size = target.shape[-2:]
    losses = {
        "reference loop (authors' structure)": ReferenceLoopLoss(4, args.classes),
        "LoMixLoss": LoMixLoss(4, args.classes, check_target=False),
        "LoMixLoss memory_efficient=True": LoMixLoss(4, args.classes, check_target=False, memory_efficient=True),
        "deep supervision (LoMixLoss)": LoMixLoss(4, args.classes, "deep_supervision", check_target=False),
    }

    def call(loss: torch.nn.Module) -> Callable[[], None]:
        def fn() -> None:
            with _autocast(device, args.bf16):
                resized = [resize_logits(m, size) for m in maps]
                out = loss(resized, target)
            (out if isinstance(out, torch.Tensor) else out.total).backward()
            for m in maps:
                m.grad = None

        return fn

    times = interleaved({name: call(loss.to(device)) for name, loss in losses.items()}, args.rounds_loss, device)
    return {name: statistics.median(t) for name, t in times.items()} | {"_raw": times}


def build_module(
    scheme: str, args: argparse.Namespace, memory_efficient: bool = False, weighting: str | None = None
) -> LoMixSegmentationModule:
    """The module under test: MultiScaleSMP Unet-resnet18 (random weights) with one supervision scheme."""
    torch.manual_seed(0)
    net = MultiScaleSMP("Unet", "resnet18", None, num_classes=args.classes, in_channels=1, num_outputs=4)
    module = LoMixSegmentationModule(
        net, args.classes, supervision=scheme, weighting=weighting, hd95=False, memory_efficient=memory_efficient
    )
    module.criterion.check_target = False
    return module


def make_step(module: LoMixSegmentationModule, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    """One training step as ``LoMixSegmentationModule.training_step`` + the optimizer: forward, loss, backward, step."""
    module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(args.batch, 1, args.size, args.size, generator=gen).to(device)
    mask = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=gen).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, args.bf16):
            outputs = [resize_logits(o, mask.shape[-2:]) for o in as_output_list(module.network(image))]
            result = module.criterion(outputs, mask)
        result.total.backward()
        optimizer.step()

    return step


def make_module_step(
    module: LoMixSegmentationModule, args: argparse.Namespace, device: torch.device, counter: OpCounter | None = None
) -> Callable[[], None]:
    """One step through the module's own ``training_step`` (its host reads, label check and logging included; no
    Trainer, so ``self.log`` does nothing) + backward + the optimizer step; ``counter`` counts all but the last."""
    module.to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(args.batch, 1, args.size, args.size, generator=gen).to(device)
    mask = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=gen).to(device)
    batch = {"image": image, "mask": mask}
    host_mask = mask.cpu()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # under a Trainer, on_before_batch_transfer checks the labels on the host before they reach the device
        module._check_labels(host_mask, "training")
        module._host_checked = True
        with counter if counter is not None else contextlib.nullcontext(), _autocast(device, args.bf16):
            loss = module.training_step(batch, 0)
            loss.backward()
        optimizer.step()

    return step


def count_step(scheme: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Operators (about one kernel each), host reads and, on CUDA, kernel launches of one module training step."""
    module = build_module(scheme, args)
    counter = OpCounter()
    step = make_module_step(module, args, device, counter)
    step()  # warm-up: lazy state, cuDNN choice
    _sync(device)
    counter.ops.clear()
    counter.syncs.clear()
    step()
    result = {"ops": counter.total, "host_reads": dict(counter.syncs)}  # training_step + backward
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            _sync(device)
        result["cuda_kernels"] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        torch.cuda.set_sync_debug_mode("warn")  # CUDA itself reports each synchronising call
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
                _sync(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        result["cuda_sync_warnings"] = sum("synchroniz" in str(w.message) for w in caught)
    return result


def bench_module_steps(args: argparse.Namespace, device: torch.device) -> dict:
    """Median seconds of the module's real ``training_step`` (+ backward + optimizer) per scheme, and its counts."""
    schemes = ("deep_supervision", "lomix")
    steps = {}
    for scheme in schemes:
        module = build_module(scheme, args)
        steps[scheme] = make_module_step(module, args, device)
    times = interleaved(steps, args.rounds_step, device)
    result: dict = {"seconds": {name: statistics.median(t) for name, t in times.items()}, "_raw": times}
    result["lomix_over_deep_supervision"] = result["seconds"]["lomix"] / result["seconds"]["deep_supervision"]
    result["counts"] = {scheme: count_step(scheme, args, device) for scheme in schemes}
    if device.type == "cuda":
        peaks = {}
        for scheme in schemes:
            module = build_module(scheme, args)
            step = make_module_step(module, args, device)
            step()
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            peaks[scheme] = torch.cuda.max_memory_allocated(device)
            del module, step
            torch.cuda.empty_cache()
        result["cuda_max_memory_allocated"] = peaks
    return result


def bench_weightings(args: argparse.Namespace, device: torch.device) -> dict:
    """Mean seconds per module training step (+ backward + optimizer) of ``lomix`` with ``learned`` and ``aligned``.

    The ``aligned`` step probes once every ``every`` steps (its default), so the two are timed step by step,
    alternating (a change of the machine's load hits both alike), over ``rounds_weighting`` whole probe periods, and
    compared by their means (the probe steps included). The probe steps alone are reported too.
    """
    every = AlignedWeighting(1).every
    modules = {name: build_module("lomix", args, weighting=name) for name in ("learned", "aligned")}
    steps = {name: make_module_step(module, args, device) for name, module in modules.items()}
    # one warm-up call each (the aligned one probes there: its first call always does), then alternating steps
    times = interleaved(steps, args.rounds_weighting * every, device)
    seconds = {name: statistics.fmean(t) for name, t in times.items()}
    probe_steps = times["aligned"][every - 1 :: every]  # calls every, 2 every, ... (call 0 was the warm-up)
    aligned = modules["aligned"].criterion.weighting
    return {
        "every": every,
        "seconds_per_step": seconds,
        "aligned_probe_step_s": statistics.median(probe_steps),
        "learned_step_median_s": statistics.median(times["learned"]),
        "aligned_over_learned": seconds["aligned"] / seconds["learned"],
        "spread_of_aligned_weights": float(aligned().max() - aligned().min()),
        "_raw": times,
    }


def step_configs() -> list[tuple[str, str, bool]]:
    """``(label, scheme, memory_efficient)`` of the measured training steps."""
    configs = [(scheme, scheme, False) for scheme in SCHEMES]
    return configs + [("lomix memory_efficient=True", "lomix", True)]


def bench_steps(args: argparse.Namespace, device: torch.device) -> dict:
    """Median seconds per training step of each configuration (interleaved)."""
    steps = {label: make_step(build_module(scheme, args, me), args, device) for label, scheme, me in step_configs()}
    times = interleaved(steps, args.rounds_step, device)
    return {name: statistics.median(t) for name, t in times.items()} | {"_raw": times}


def memory_probe(args: argparse.Namespace, device: torch.device) -> dict:
    """Peak memory of one training step above the memory before the first step (run in a fresh process).

    CPU: peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the measured second step)
    minus the resident set before the first step. CUDA: ``max_memory_allocated`` of the second step minus the
    allocated memory before the first step. Both include the optimizer state and anything kept across steps.
    """
    label, scheme, me = next(c for c in step_configs() if c[0] == args.probe)
    module = build_module(scheme, args, me)
    step = make_step(module, args, device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = cpu_peak_bytes(step)
    return {"label": label, "peak_bytes": peak}


def bench_memory(args: argparse.Namespace) -> dict:
    """Run :func:`memory_probe` in a subprocess per configuration."""
    results = {}
    for label, _, _ in step_configs():
        command = [sys.executable, __file__, "--probe", label, *_shared_flags(args)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
    return results


def bench_export(args: argparse.Namespace, device: torch.device) -> dict:
    """Latency and parameter count of the exported prediction network against the bare smp model."""
    module = build_module("lomix", args).to(device)
    exported, bare = module.export_network().to(device), module.network.model.eval()
    image = torch.randn(args.batch, 1, args.size, args.size, device=device)

    def infer(net: torch.nn.Module) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad(), _autocast(device, args.bf16):
                net(image)

        return fn

    times = interleaved({"exported": infer(exported), "bare": infer(bare)}, args.rounds_export, device)
    with torch.no_grad():
        same = torch.equal(exported(image), bare(image))
    return {
        "exported_s": statistics.median(times["exported"]),
        "bare_s": statistics.median(times["bare"]),
        "exported_params": sum(p.numel() for p in exported.parameters()),
        "bare_params": sum(p.numel() for p in bare.parameters()),
        "outputs_equal": same,
    }


def wait_quiet(threshold: float | None, timeout: float = 600.0) -> None:
    """Wait (at most ``timeout`` seconds) until the 1-minute load average is below ``threshold``."""
    if threshold is None or not hasattr(os, "getloadavg"):
        return
    start = time.perf_counter()
    while os.getloadavg()[0] > threshold and time.perf_counter() - start < timeout:
        time.sleep(5.0)


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    info["cpu_count"] = os.cpu_count()
    info["native_kernels"] = device.type == "cpu" and library() is not None  # LOMIX_NATIVE=0 switches them off
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--device", args.device, "--threads", str(args.threads), "--batch", str(args.batch)]
    flags += ["--classes", str(args.classes), "--size", str(args.size)]
    return flags + (["--bf16"] if args.bf16 else [])


def summarize(result: dict) -> dict:
    """The ratios the issue's targets are stated in."""
    loss, steps, memory, export = result["loss_s"], result["step_s"], result["peak_memory_bytes"], result["export"]
    return {
        "loss_speedup_vs_loop": loss["reference loop (authors' structure)"] / loss["LoMixLoss"],
        "loss_speedup_vs_loop_memory_efficient": loss["reference loop (authors' structure)"]
        / loss["LoMixLoss memory_efficient=True"],
        "step_lomix_over_deep_supervision": steps["lomix"] / steps["deep_supervision"],
        "step_lomix_memory_efficient_over_deep_supervision": steps["lomix memory_efficient=True"]
        / steps["deep_supervision"],
        "memory_lomix_over_deep_supervision": memory["lomix"] / memory["deep_supervision"],
        "memory_lomix_memory_efficient_over_deep_supervision": memory["lomix memory_efficient=True"]
        / memory["deep_supervision"],
        "module_step_lomix_over_deep_supervision": result["module_step"]["lomix_over_deep_supervision"],
        "module_step_aligned_over_learned": result["weighting_step"]["aligned_over_learned"],
        "export_latency_ratio": export["exported_s"] / export["bare_s"],
        "export_params_ratio": export["exported_params"] / export["bare_params"],
    }


def print_table(result: dict) -> None:
    """A rich table of the measurements and ratios."""
    from rich.console import Console
    from rich.table import Table

    loss, steps, memory, ratios = result["loss_s"], result["step_s"], result["peak_memory_bytes"], result["ratios"]
    kernels = ", native kernels" if result["machine"].get("native_kernels") else ""
    table = Table(title=f"LoMix benchmark ({result['machine']['cpu']}, {result['machine']['device']}{kernels})")
    for column in ("measurement", "value", "ratio"):
        table.add_column(column, justify="left" if column == "measurement" else "right")
    ref = loss["reference loop (authors' structure)"]
    for name, seconds in loss.items():
        if not name.startswith("_"):
            table.add_row(f"loss fwd+bwd: {name}", f"{seconds:.3f} s", f"{ref / seconds:.2f}x faster than loop")
    ds_step, ds_mem = steps["deep_supervision"], memory["deep_supervision"]
    for name, seconds in steps.items():
        if not name.startswith("_"):
            table.add_row(f"train step: {name}", f"{seconds:.3f} s", f"{seconds / ds_step:.2f}x deep supervision")
    module = result["module_step"]
    for name, seconds in module["seconds"].items():
        counts = module["counts"][name]
        reads = sum(counts["host_reads"].values())
        extra = f", {counts['cuda_kernels']} CUDA kernels" if "cuda_kernels" in counts else ""
        table.add_row(
            f"module training_step: {name} ({counts['ops']} ops, {reads} host reads{extra})",
            f"{seconds:.3f} s",
            f"{seconds / module['seconds']['deep_supervision']:.2f}x deep supervision",
        )
    weighting = result["weighting_step"]
    for name, seconds in weighting["seconds_per_step"].items():
        every = f", probe every {weighting['every']} steps" if name == "aligned" else ""
        table.add_row(
            f"module training_step: lomix, weighting={name}{every}",
            f"{seconds:.3f} s",
            f"{seconds / weighting['seconds_per_step']['learned']:.2f}x learned",
        )
    for name, peak in memory.items():
        table.add_row(f"peak memory: {name}", f"{peak / 2**20:.0f} MiB", f"{peak / ds_mem:.2f}x deep supervision")
    export = result["export"]
    table.add_row(
        "export: latency exported / bare", f"{export['exported_s']:.3f} s", f"{ratios['export_latency_ratio']:.2f}x"
    )
    table.add_row(
        "export: parameters exported / bare", f"{export['exported_params']:,}", f"{ratios['export_params_ratio']:.2f}x"
    )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=None, help="where to write the JSON results")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--bf16", action="store_true", help="run the network under bfloat16 autocast")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--classes", type=int, default=9)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds-loss", type=int, default=5)
    parser.add_argument("--rounds-step", type=int, default=5)
    parser.add_argument("--rounds-export", type=int, default=10)
    parser.add_argument("--rounds-weighting", type=int, default=3, help="whole aligned probe periods to time")
    parser.add_argument("--only-weighting", action="store_true", help="measure only the learned vs aligned step")
    parser.add_argument("--wait-quiet", type=float, default=None, help="wait for a 1-min load average below this")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory probe
    parser.add_argument("--quick", action="store_true", help="3 rounds of everything (a first run on a new machine)")
    parser.add_argument("--volume-size", type=int, default=64, help="3-D case: B=2, C=14, side^3 (CPU; 0: skip)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds_loss = args.rounds_step = args.rounds_export = 3
        args.rounds_weighting = 1
        args.volume_size = min(args.volume_size, 32)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.probe is not None:
        print(json.dumps(memory_probe(args, device)))
        return 0
    started = time.perf_counter()
    result: dict = {"machine": machine(device), "config": vars(args) | {"output": str(args.output)}}
    if args.only_weighting:
        result["weighting_step"] = bench_weightings(args, device)
        print(json.dumps({k: v for k, v in result["weighting_step"].items() if k != "_raw"}, indent=2))
        if args.output is not None:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(result, indent=2))
        return 0
    wait_quiet(args.wait_quiet)
    result["loss_s"] = bench_loss(args, device)
    wait_quiet(args.wait_quiet)
    result["step_s"] = bench_steps(args, device)
    wait_quiet(args.wait_quiet)
    result["module_step"] = bench_module_steps(args, device)
    wait_quiet(args.wait_quiet)
    result["weighting_step"] = bench_weightings(args, device)
    result["peak_memory_bytes"] = bench_memory(args)
    wait_quiet(args.wait_quiet)
    result["export"] = bench_export(args, device)
    if args.volume_size and device.type == "cpu":  # the 3-D case (benchmarks/volumes.py)
        volume_args = argparse.Namespace(batch=2, classes=14, size=args.volume_size, threads=args.threads)
        result["volumes_3d"] = bench_volumes(volume_args, interleaved, min(args.rounds_step, 3))
    result["ratios"] = summarize(result)
    result["seconds"] = time.perf_counter() - started
    with contextlib.suppress(OSError):
        result["machine"]["load_average_end"] = os.getloadavg()
    print_table(result)
    print(json.dumps(result["ratios"] | {"volumes_3d": result.get("volumes_3d", {}).get("ratios")}, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
