"""The compiled CPU kernels (lomix_lightning/native) against the PyTorch implementation they replace."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import lomix_lightning.losses.engine as engine
import lomix_lightning.native as native
import lomix_lightning.native._build as native_build
from lomix_lightning import LoMixLoss
from lomix_lightning.losses.ce_dice import ce_dice_backward, ce_dice_forward, ce_dice_target

needs_native = pytest.mark.skipif(native.library() is None, reason="no C compiler: the kernels are not built")


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """An empty library state and cache directory; the original state comes back afterwards."""
    saved = dict(native_build._STATE)
    native_build._STATE.clear()
    monkeypatch.setenv("LOMIX_CACHE_DIR", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    native_build._STATE.clear()
    native_build._STATE.update(saved)


def _run(loss, maps, target, use_native, monkeypatch):
    monkeypatch.setattr(engine, "usable", native.usable if use_native else lambda _: False)
    maps = [m.detach().clone().requires_grad_() for m in maps]
    loss.zero_grad()
    out = loss(maps, target)
    out.total.backward()
    params = [p.grad.clone() for p in loss.parameters() if p.grad is not None]
    return out.per_map.detach(), [m.grad for m in maps], params


CASES = [  # (num_outputs, classes, scheme, operators, ignore_index, memory_efficient, size)
    (4, 5, "lomix", None, None, False, 70),  # 4900 pixels: 5 tiles of 1024, the last partial
    (4, 5, "lomix", None, 2, False, 70),
    (3, 2, "lomix", None, None, True, 33),
    (2, 9, "lomix", ["awf"], None, False, 17),
    (4, 3, "mutation", None, None, False, 20),
    (3, 4, "deep_supervision", None, 0, False, 16),
    (1, 3, "lomix", None, None, False, 16),  # one map: nothing to fuse
    (4, 3, "last_layer", None, None, False, 16),
]


@needs_native
@pytest.mark.parametrize(("num_outputs", "classes", "scheme", "operators", "ignore", "memory", "size"), CASES)
def test_native_engine_equals_the_tensor_engine(
    monkeypatch, num_outputs, classes, scheme, operators, ignore, memory, size
):
    gen = torch.Generator().manual_seed(num_outputs * 100 + classes)
    loss = LoMixLoss(num_outputs, classes, scheme, operators, ignore_index=ignore, memory_efficient=memory)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sizes = [max(1, size >> (num_outputs - 1 - i)) for i in range(num_outputs)]
    maps = [2 * torch.randn(3, classes, s, s, generator=gen) for s in sizes]
    target = torch.randint(0, classes, (3, size, size), generator=gen)
    if ignore is not None:
        target[:, :3] = ignore  # a band of ignored pixels
    fast = _run(loss, maps, target, True, monkeypatch)
    slow = _run(loss, maps, target, False, monkeypatch)
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fast[1] + fast[2], slow[1] + slow[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert len(fast[2]) == len(slow[2])


@needs_native
def test_kernels_match_the_tensor_functions_with_and_without_ignored_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(2, 3, 6, 9, 11, generator=gen)
    labels = torch.randint(0, 6, (2, 9, 11), generator=gen)
    labels[0, 0] = 255
    grad = torch.randn(3, 13, generator=gen)
    for ignore in (None, 255):
        prepared = ce_dice_target(labels if ignore else labels.clamp(max=5), 6, torch.float32, ignore)
        p, stats = ce_dice_forward(logits, prepared.target, prepared.valid, prepared.onehot)
        torch.testing.assert_close(native.native_stats(logits, prepared.target, prepared.valid), stats)
        expected = ce_dice_backward(p, grad, prepared.target, prepared.valid)
        got = native.native_grad(logits, grad, prepared.target, prepared.valid, torch.empty_like(logits))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@needs_native
def test_results_do_not_depend_on_the_thread_count(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    loss = LoMixLoss(4, 4)
    maps = [torch.randn(2, 4, s, s, generator=gen) for s in (9, 18, 36, 72)]
    target = torch.randint(0, 4, (2, 72, 72), generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(loss, maps, target, True, monkeypatch)
        torch.set_num_threads(max(2, threads))
        many = _run(loss, maps, target, True, monkeypatch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1] + one[2], many[1] + many[2]))


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_logit_gives_a_nan_loss(bad):
    maps = [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8)]
    maps[1][0, 1, 2, 3] = bad
    out = LoMixLoss(2, 3)(maps, torch.zeros(1, 8, 8, dtype=torch.long))
    assert torch.isnan(out.total)


def test_more_classes_than_the_kernels_take_use_the_tensor_path():
    logits = torch.zeros(1, 2, native.MAX_CLASSES + 1, 2, 2)
    assert not native.usable(logits)
    assert native.native_stats(logits, torch.zeros(1, 2, 2, dtype=torch.long), None) is None
    out = LoMixLoss(2, native.MAX_CLASSES + 1)([logits[:, 0], logits[:, 1]], torch.zeros(1, 2, 2, dtype=torch.long))
    assert torch.isfinite(out.total)
    assert not native.usable(logits[:, :, :3].double())  # float64 (gradcheck) stays on the tensor path


def test_switched_off_by_environment(fresh_state, monkeypatch):
    monkeypatch.setenv("LOMIX_NATIVE", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert not native.usable(torch.zeros(1, 1, 2, 2, 2))


def test_a_failing_compiler_warns_once_and_falls_back(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="could not build the native CPU kernels"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None  # decided once per process
    maps = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
    out = LoMixLoss(2, 3)(maps, torch.zeros(2, 8, 8, dtype=torch.long))
    assert torch.isfinite(out.total)


@needs_native
def test_the_build_is_cached(fresh_state):
    first = native.library()
    assert first is not None
    built = sorted(fresh_state.glob("*.so"))
    assert len(built) == 1
    native_build._STATE.clear()
    mtime = built[0].stat().st_mtime_ns
    assert native.library() is not None
    assert sorted(fresh_state.glob("*.so")) == built and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_an_unwritable_cache_falls_back_to_a_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("LOMIX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    assert native_build._cache_dir() == tmp_path / "home-cache" / "lomix_lightning"
    monkeypatch.setattr(native_build.os, "access", lambda *args: False)
    fallback = native_build._cache_dir()
    assert fallback.parent == Path(tempfile.gettempdir()) and fallback.name.startswith("lomix_lightning-")
