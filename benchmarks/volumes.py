"""The 3-D case of the LoMix benchmark (issue #16): a MONAI DynUNet on ``(B, C, D, H, W)`` volumes.

Deep supervision against LoMix (all four operators, learned weights), with each CE + Dice engine (the native CPU
kernels and the PyTorch engine, chosen by ``LOMIX_NATIVE``): the loss forward + backward on the network's four
maps at their native resolutions, one whole training step (network forward, loss, backward, AdamW) and its peak
memory (one fresh subprocess per configuration, as in ``run.py``). ``run.py`` calls :func:`bench_volumes`; alone:

    python benchmarks/volumes.py --size 64 --batch 2 --classes 14
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _memory import cpu_peak_bytes

from lomix_lightning import LoMixLoss
from lomix_lightning.models import MonaiDynUNet
from lomix_lightning.resize import resize_logits

CONFIGS = {  # label: (scheme, LOMIX_NATIVE, memory_efficient)
    "deep_supervision native": ("deep_supervision", "1", False),
    "lomix native": ("lomix", "1", False),
    "deep_supervision pytorch": ("deep_supervision", "0", False),
    "lomix pytorch": ("lomix", "0", False),
    "lomix pytorch memory_efficient": ("lomix", "0", True),
}
FACTORS = (8, 4, 2, 1)  # the four maps' downsampling factors, coarse to fine (DynUNet, 5 levels, 3 heads)


def build(args: argparse.Namespace, scheme: str, memory_efficient: bool) -> tuple[MonaiDynUNet, LoMixLoss]:
    """A 5-level 3-D DynUNet with 3 deep-supervision heads (4 maps) and its loss."""
    torch.manual_seed(0)
    net = MonaiDynUNet(1, args.classes, 3, strides=(1, 2, 2, 2, 2), filters=(8, 16, 32, 64, 128), deep_supr_num=3)
    return net, LoMixLoss(4, args.classes, scheme, check_target=False, memory_efficient=memory_efficient)


def _engine(flag: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            os.environ["LOMIX_NATIVE"] = flag  # read at every loss call
            fn()

        return run

    return wrap


def loss_call(args: argparse.Namespace, scheme: str, memory_efficient: bool) -> Callable[[], None]:
    """Loss forward + backward on four random maps at their native resolutions (resized inside, as the module)."""
    gen = torch.Generator().manual_seed(0)
    b, c, s = args.batch, args.classes, args.size
    maps = [torch.randn(b, c, *[s // f] * 3, generator=gen).requires_grad_() for f in FACTORS]
    target = torch.randint(0, c, (b, s, s, s), generator=gen)
    loss = build(args, scheme, memory_efficient)[1]

    def fn() -> None:
        loss([resize_logits(m, target.shape[1:]) for m in maps], target).total.backward()
        for m in maps:
            m.grad = None

    return fn


def step_call(args: argparse.Namespace, scheme: str, memory_efficient: bool) -> Callable[[], None]:
    """One training step: network forward, maps resized to the labels, loss, backward, AdamW."""
    net, loss = build(args, scheme, memory_efficient)
    optimizer = torch.optim.AdamW([*net.parameters(), *loss.parameters()], lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(args.batch, 1, *[args.size] * 3, generator=gen)
    target = torch.randint(0, args.classes, (args.batch, *[args.size] * 3), generator=gen)

    def fn() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss([resize_logits(o, target.shape[1:]) for o in net(image)], target).total.backward()
        optimizer.step()

    return fn


def probe(args: argparse.Namespace) -> dict:
    """Peak resident memory of the second call above the resident set before the first (a fresh process)."""
    scheme, flag, memory_efficient = CONFIGS[args.probe]
    os.environ["LOMIX_NATIVE"] = flag
    fn = (loss_call if args.what == "loss" else step_call)(args, scheme, memory_efficient)
    return {"peak_bytes": cpu_peak_bytes(fn)}


def bench_volumes(args: argparse.Namespace, interleaved: Callable, rounds: int) -> dict:
    """Median seconds (interleaved) and peak memory of loss and step for every configuration, with the ratios."""
    device = torch.device("cpu")
    saved = os.environ.get("LOMIX_NATIVE")
    result: dict = {"config": {"batch": args.batch, "classes": args.classes, "size": args.size}}
    try:
        for what, make in (("loss", loss_call), ("step", step_call)):
            fns = {label: _engine(flag)(make(args, scheme, me)) for label, (scheme, flag, me) in CONFIGS.items()}
            times = interleaved(fns, rounds, device)
            result[f"{what}_s"] = {label: statistics.median(t) for label, t in times.items()}
            peaks = {}
            for label in CONFIGS:
                flags = ["--probe", label, "--what", what, "--batch", str(args.batch), "--classes", str(args.classes)]
                command = [sys.executable, __file__, *flags, "--size", str(args.size), "--threads", str(args.threads)]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                peaks[label] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
            result[f"{what}_peak_bytes"] = peaks
    finally:
        if saved is None:
            os.environ.pop("LOMIX_NATIVE", None)
        else:
            os.environ["LOMIX_NATIVE"] = saved
    result["ratios"] = {
        f"{what}_{kind}_lomix_over_deep_supervision_{engine}": result[f"{what}_{key}"][f"lomix {engine}"]
        / result[f"{what}_{key}"][f"deep_supervision {engine.split()[0]}"]
        for what in ("loss", "step")
        for kind, key in (("time", "s"), ("memory", "peak_bytes"))
        for engine in ("native", "pytorch", "pytorch memory_efficient")
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory probe
    parser.add_argument("--what", default="step", choices=["loss", "step"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe is not None:
        print(json.dumps(probe(args)))
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run import interleaved

    result = bench_volumes(args, interleaved, args.rounds)
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
