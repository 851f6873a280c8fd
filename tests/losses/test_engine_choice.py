"""``LoMixLoss(engine=...)``: the explicit engine choice, its errors, and the name the module logs."""

import pytest
import torch

import lomix_lightning._engine as engine
from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning._engine.native import library
from lomix_lightning.models import UNet

needs_native = pytest.mark.skipif(library() is None, reason="no C compiler: the kernels are not built")


def _maps(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 4, 4, generator=gen, dtype=dtype), torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype)]
    return [m.requires_grad_() for m in maps], torch.randint(0, 3, (2, 8, 8), generator=gen)


def _run(loss):
    maps, target = _maps()
    result = loss(maps, target)
    grads = torch.autograd.grad(result.total, [*maps, *loss.parameters()])
    return result.per_map.detach(), grads


@needs_native
def test_native_and_torch_engines_give_the_same_losses_and_gradients(monkeypatch):
    monkeypatch.delenv("LOMIX_NATIVE", raising=False)
    torch.manual_seed(0)
    native = LoMixLoss(2, 3, engine="native")
    torch.manual_seed(0)
    pytorch = LoMixLoss(2, 3, engine="torch")
    assert native.engine_for(torch.device("cpu")) == "native"
    assert pytorch.engine_for(torch.device("cpu")) == "pytorch: engine='torch'"
    (got, got_grads), (want, want_grads) = _run(native), _run(pytorch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_torch_engine_never_calls_the_kernels_even_when_forced(monkeypatch):
    monkeypatch.setenv("LOMIX_NATIVE", "1" if library() is not None else "0")

    def refuse(*args, **kwargs):
        raise AssertionError("the kernels ran")

    monkeypatch.setattr(engine, "groups_stats", refuse)
    maps, target = _maps()
    LoMixLoss(2, 3, engine="torch")(maps, target).total.backward()


def test_native_where_it_cannot_run_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LOMIX_NATIVE", "0")
    with pytest.raises(ValueError, match=r"^engine='native' cannot run here: LOMIX_NATIVE=0; use engine='auto' or"):
        LoMixLoss(2, 3, engine="native")
    monkeypatch.delenv("LOMIX_NATIVE")
    if library() is None:
        return
    maps, target = _maps(torch.float64)
    with pytest.raises(ValueError, match=r"cannot score these maps: float64 maps \(the kernels take float32\)"):
        LoMixLoss(2, 3, engine="native")(maps, target)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(engine="cuda"), r"unknown engine 'cuda'; allowed engines are \['auto', 'native', 'torch'\]"),
        (dict(engine="native", memory_efficient=True), r"engine='native' with memory_efficient=True: .*"),
        (dict(engine="native", loss="structure"), r"engine='native' computes loss='ce_dice' only"),
    ],
)
def test_bad_engine_options_are_refused(kwargs, message):
    num_classes = 1 if kwargs.get("loss") == "structure" else 3
    with pytest.raises(ValueError, match=message):
        LoMixLoss(2, num_classes, **kwargs)


def test_auto_with_memory_efficient_is_accepted_and_the_module_reports_the_criterions_engine(monkeypatch):
    monkeypatch.delenv("LOMIX_NATIVE", raising=False)
    LoMixLoss(2, 3, memory_efficient=True)  # auto: the kernels where they run (they keep no map), else PyTorch
    model = LoMixSegmentationModule(UNet(in_channels=1, num_classes=3, base_channels=2, depth=2), 3)
    model.criterion.engine = "torch"
    model.on_fit_start()
    assert model.engine == "pytorch: engine='torch'"
