"""Gradient-aligned weighting: toy behaviour against the paper's learned weights, the probe's exactness and purity."""

import math
import warnings

import pytest
import torch
from torch import nn

from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning.cli import LoMixCLI
from lomix_lightning.losses.aligned import AlignedWeighting
from lomix_lightning.losses.weighting import SoftplusWeighting, build_weighting
from lomix_lightning.models import UNet
from lomix_lightning.probing import probe_losses

LN2 = math.log(2.0)


class SharedVector(nn.Module):
    """The toy 'network': one shared parameter vector ``theta = (x, y)``, returned whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(4))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.theta


A, B = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])


def toy_losses(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Main ``|x - a|^2``; aligned (same optimum, other curvature); orthogonal (only ``y``); conflicting (``-a``)."""
    x, y = theta[:2], theta[2:]
    main = (x - A).pow(2).sum()
    aligned = ((x - A).pow(2) * torch.tensor([2.0, 0.5])).sum()
    orthogonal = (y - B).pow(2).sum() + 1.0
    conflicting = (x + A).pow(2).sum()
    return main, torch.stack([main, aligned, orthogonal, conflicting])


def test_toy_aligned_weights_separate_maps_that_learned_weights_treat_alike():
    steps = 60
    # aligned: SGD on theta with the current weights, one probe per step
    net, weighting = SharedVector(), AlignedWeighting(4, every=1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        (weighting() * toy_losses(net(None))[1]).sum().backward()
        optimizer.step()
        assert weighting.maybe_probe(net, None, toy_losses)
    w = weighting()
    aligned, orthogonal, conflicting = w[1].item(), w[2].item(), w[3].item()
    assert aligned > LN2 * 1.5  # above its start, towards 2 ln 2
    assert conflicting < 0.02  # near 0
    assert conflicting < orthogonal < aligned
    assert orthogonal == pytest.approx(LN2, abs=0.05)  # no agreement, no conflict: stays at the start
    assert w[0].item() > LN2 * 1.5  # the main map agrees with itself

    # the paper's learned weights: the three auxiliaries move identically (every alpha only shrinks)
    net, learned = SharedVector(), SoftplusWeighting(4)
    optimizer = torch.optim.Adam([*net.parameters(), *learned.parameters()], lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        (learned() * toy_losses(net(None))[1]).sum().backward()
        optimizer.step()
    moved = learned().detach()[1:] - LN2
    assert (moved < 0).all()  # all shrink, under Adam by about lr per step in alpha
    spread = (moved.max() - moved.min()).item()  # measured: 0.08 against a common shrink of 0.35-0.43
    assert spread < 0.25 * moved.abs().min().item()
    assert spread < 0.1 * (aligned - conflicting)  # aligned separates them over 10x more


def _tiny_criterion_and_net(seed: int = 0):
    torch.manual_seed(seed)
    net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
    criterion = LoMixLoss(num_outputs=2, num_classes=3)
    image, mask = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))

    def losses(raw):
        outputs = [nn.functional.interpolate(o, size=(16, 16), mode="bilinear") for o in raw]
        per_map = criterion(outputs, mask).per_map
        return per_map[1], per_map  # main: P2, the last map

    return net, criterion, image, losses


def test_directional_derivative_equals_explicit_inner_products():
    net, criterion, image, losses = _tiny_criterion_and_net()
    params = [p for p in net.parameters() if p.requires_grad]
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    main, per_map = losses(net(image))  # the independent check: one autograd gradient per map
    g_main = torch.autograd.grad(main, params, retain_graph=True)
    explicit = []
    for u in range(criterion.num_maps):
        g_u = torch.autograd.grad(per_map[u], params, retain_graph=True, allow_unused=True)
        explicit.append(sum((a * b).sum() for a, b in zip(g_main, g_u) if b is not None).item())
    explicit = torch.tensor(explicit, dtype=torch.float64)
    main_sq = sum(g.pow(2).sum() for g in g_main).item()
    with torch.no_grad():  # undo the BatchNorm updates of that forward
        for name, b in net.named_buffers():
            b.copy_(buffers[name])

    inner, probed_sq = AlignedWeighting(criterion.num_maps).probe(net, image, losses)
    assert probed_sq.item() == pytest.approx(main_sq, rel=1e-5)
    torch.testing.assert_close(inner, explicit, rtol=0.01, atol=0.01 * explicit.abs().max().item())
    assert inner[1].item() == pytest.approx(main_sq, rel=0.01)  # the main map's own: |g_main|^2


def test_probe_leaves_buffers_grads_and_rng_bitwise_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))
    net.train()
    image, target = torch.randn(3, 1, 8, 8), torch.randint(0, 2, (3, 8, 8))

    def losses(logits):
        per_pixel = nn.functional.cross_entropy(logits, target, reduction="none")
        return per_pixel.mean(), torch.stack([per_pixel.mean(), per_pixel[:, :4].mean()])

    net(image).sum().backward()  # some .grad and BatchNorm statistics already there
    grads = [p.grad.clone() for p in net.parameters()]
    params = [p.detach().clone() for p in net.parameters()]
    buffers = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    weighting = AlignedWeighting(2)
    assert weighting.maybe_probe(net, image, losses)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), params))
    assert all(torch.equal(b, c) for b, c in zip(net.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(weighting.alignment, torch.zeros(2))


def test_state_dict_round_trip_resumes_weights_and_schedule():
    net, weighting = SharedVector(), AlignedWeighting(4, every=2)
    for _ in range(3):  # probes at calls 0 and 2
        weighting.maybe_probe(net, None, toy_losses)
    resumed = AlignedWeighting(4, every=2)
    resumed.load_state_dict(weighting.state_dict())
    assert torch.equal(resumed(), weighting()) and int(resumed.steps) == 3 and int(resumed.probes) == 2
    assert not resumed.maybe_probe(net, None, toy_losses)  # call 3: no probe, as the original would
    assert resumed.maybe_probe(net, None, toy_losses)


def test_reduce_over_ranks_gives_every_rank_the_same_weights():
    """Two identical ranks: the summed numbers give the single-process weights."""
    net = SharedVector()
    single, ranks = AlignedWeighting(4), AlignedWeighting(4)
    single.maybe_probe(net, None, toy_losses)
    ranks.maybe_probe(net, None, toy_losses, reduce=lambda t: 2 * t)
    torch.testing.assert_close(ranks(), single())


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="every"):
        AlignedWeighting(3, every=0)
    with pytest.raises(ValueError, match="momentum"):
        AlignedWeighting(3, momentum=1.0)
    with pytest.raises(ValueError, match="probe_step"):
        AlignedWeighting(3, probe_step=0.0)
    assert isinstance(build_weighting("aligned", 3), AlignedWeighting)


def _ce_dice_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0.3 CE + 0.7 (1 - mean over classes of the batch Dice), from the paper's formula."""
    probs = logits.softmax(1)
    onehot = nn.functional.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).float()
    dice = (2 * (probs * onehot).sum((0, 2, 3)) + 1e-5) / ((probs**2).sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1e-5)
    return 0.3 * nn.functional.cross_entropy(logits, target) + 0.7 * (1 - dice.mean())


@pytest.mark.parametrize("inference_output", ["last", "sum"])
def test_module_probe_main_loss_is_the_inference_maps(inference_output):
    torch.manual_seed(0)
    net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
    module = LoMixSegmentationModule(net, 3, weighting="aligned", inference_output=inference_output)
    image, mask = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    raw = net(image)
    main, per_map = probe_losses(module, raw, mask)
    outputs = [nn.functional.interpolate(o, size=(16, 16), mode="bilinear") for o in raw]
    expected = _ce_dice_by_hand(outputs[-1] if inference_output == "last" else sum(outputs), mask)
    assert main.item() == pytest.approx(expected.item(), rel=1e-5)
    assert per_map.shape == (module.criterion.num_maps,)


def test_module_probe_runs_on_volumes():
    """3-D maps: the probe resizes to the (D, H, W) of the mask, as training does, and its main loss is PL's."""
    torch.manual_seed(0)

    class TwoMaps3d(nn.Module):
        num_outputs = 2

        def __init__(self) -> None:
            super().__init__()
            self.coarse, self.fine = nn.Conv3d(1, 3, 3, stride=2, padding=1), nn.Conv3d(1, 3, 3, padding=1)

        def forward(self, x):
            return [self.coarse(x), self.fine(x)]

    net = TwoMaps3d()
    module = LoMixSegmentationModule(net, 3, weighting="aligned")
    image, mask = torch.randn(2, 1, 4, 8, 8), torch.randint(0, 3, (2, 4, 8, 8))
    raw = net(image)
    main, per_map = probe_losses(module, raw, mask)
    assert per_map.shape == (module.criterion.num_maps,)
    expected = module.criterion([nn.functional.interpolate(raw[0], size=(4, 8, 8), mode="trilinear"), raw[1]], mask)
    torch.testing.assert_close(per_map, expected.per_map)
    assert main.item() == pytest.approx(expected.per_map[1].item())


def test_one_cli_fit_step_with_aligned_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [
        "fit",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=1",
        "--trainer.limit_val_batches=1",
        "--data.init_args.num_train=4",
        "--data.init_args.num_val=2",
        "--data.init_args.image_size=32",
        "--model.init_args.network.init_args.base_channels=4",
        "--model.init_args.network.init_args.depth=3",
        "--model.init_args.weighting=aligned",
        "--model.init_args.hd95=false",
    ]
    cli = LoMixCLI(args=args)
    weighting = cli.model.criterion.weighting
    assert isinstance(weighting, AlignedWeighting)
    assert int(weighting.steps) == 1 and int(weighting.probes) == 1  # the first step probes
    assert not torch.equal(weighting.alignment, torch.zeros_like(weighting.alignment))
    assert ((weighting() >= 0) & (weighting() <= 2 * LN2)).all()


def test_training_step_probe_under_bf16_autocast_changes_no_gradient():
    """A step that probes and one that does not give bitwise the same .grad (accumulation is unaffected)."""
    image, mask = torch.randn(2, 1, 16, 16), torch.randint(0, 3, (2, 16, 16))
    grads = {}
    for probing in (True, False):
        torch.manual_seed(0)
        net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
        module = LoMixSegmentationModule(net, 3, weighting="aligned", hd95=False)
        weighting = module.criterion.weighting
        weighting.steps.fill_(0 if probing else 1)  # the first call probes; from 1 the next probe is at 10
        with torch.autocast("cpu", dtype=torch.bfloat16), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log")  # no Trainer here
            module.training_step({"image": image, "mask": mask}, 0).backward()
        assert int(weighting.probes) == int(probing)
        grads[probing] = [p.grad.clone() for p in module.parameters() if p.grad is not None]
        if probing:
            assert torch.isfinite(weighting.alignment).all() and weighting.alignment.abs().sum() > 0
    assert len(grads[True]) == len(grads[False]) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


def test_aligned_is_refused_under_fsdp_with_one_line():
    """The probe runs the network on its full parameters: FSDP (sharded) is refused at fit start, DDP is not."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from lomix_lightning.errors import LomixUserError
    from lomix_lightning.probing import check_probe_strategy

    aligned = LoMixLoss(2, 3, weighting="aligned")
    with pytest.raises(LomixUserError, match="weighting='aligned' cannot run under strategy=fsdp"):
        check_probe_strategy(aligned, FSDPStrategy())
    check_probe_strategy(aligned, DDPStrategy())
    check_probe_strategy(LoMixLoss(2, 3, weighting="learned"), FSDPStrategy())
