"""Uncertainty weighting (Kendall et al. 2018) against a hand-written loop of ``sum_u exp(-s_u) L_u + s_u``."""

import torch

from lomix_lightning import LoMixLoss, LoMixSegmentationModule
from lomix_lightning.losses.uncertainty import UncertaintyWeighting
from lomix_lightning.models import UNet


def test_total_and_gradients_match_the_formula_by_hand():
    torch.manual_seed(0)
    loss = LoMixLoss(num_outputs=2, num_classes=3, weighting="uncertainty")
    assert isinstance(loss.weighting, UncertaintyWeighting)
    s = loss.weighting.log_variance
    with torch.no_grad():
        s.copy_(torch.linspace(-0.5, 0.5, loss.num_maps))
    outputs = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 8, 8, requires_grad=True)]
    result = loss(outputs, torch.randint(0, 3, (2, 8, 8)))
    result.total.backward()

    s_ref = s.detach().clone().requires_grad_()
    per_map = result.per_map.detach()
    total_ref = torch.zeros(())
    for u in range(loss.num_maps):  # the formula, one map at a time
        total_ref = total_ref + torch.exp(-s_ref[u]) * per_map[u] + s_ref[u]
    total_ref.backward()
    torch.testing.assert_close(result.total.detach(), total_ref.detach())
    torch.testing.assert_close(s.grad, s_ref.grad)
    torch.testing.assert_close(s.grad, 1 - torch.exp(-s.detach()) * per_map)  # d/ds_u, in closed form
    torch.testing.assert_close(result.weights.detach(), torch.exp(-s.detach()))


def test_weights_move_towards_inverse_losses():
    """Minimising over s alone with fixed losses: s_u -> ln L_u, so w_u -> 1 / L_u (the formula's optimum)."""
    weighting = UncertaintyWeighting(3)
    losses = torch.tensor([0.5, 1.0, 4.0])
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        ((weighting() * losses).sum() + weighting.regulariser()).backward()
        optimizer.step()
    torch.testing.assert_close(weighting().detach(), 1 / losses, rtol=0.02, atol=0.0)


def test_module_trains_log_variances_as_loss_weights():
    module = LoMixSegmentationModule(UNet(in_channels=1, num_classes=3, base_channels=4, depth=2), 3,
                                     weighting="uncertainty")  # fmt: skip
    assert module.loss_weight_parameters() == [module.criterion.weighting.log_variance]
