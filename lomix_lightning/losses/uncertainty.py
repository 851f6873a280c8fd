"""Uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018): ``sum_u exp(-s_u) L_u + s_u`` with learned ``s_u``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lomix_lightning.losses.weighting_base import LossWeighting


def uncertainty_weights(log_variance: Tensor) -> Tensor:
    """The weights ``exp(-s)`` of the per-map losses.

    Example:
        >>> uncertainty_weights(torch.tensor([0.0, 1.0]))
        tensor([1.0000, 0.3679])
    """
    return torch.exp(-log_variance)


def uncertainty_regulariser(log_variance: Tensor) -> Tensor:
    """The term ``sum_u s_u`` added to the total loss (it stops every ``s_u`` from growing without bound).

    Example:
        >>> uncertainty_regulariser(torch.tensor([0.5, -0.25]))
        tensor(0.2500)
    """
    return log_variance.sum()


class UncertaintyWeighting(LossWeighting):
    """Kendall et al.'s homoscedastic-uncertainty weights: ``w_u = exp(-s_u)`` plus ``s_u`` in the total loss.

    The total is ``sum_u exp(-s_u) L_u + s_u``; its minimum over ``s_u`` is at ``s_u = ln L_u``, so each weight moves
    towards ``1 / L_u``. ``s_u`` starts at 0 (every weight 1) and trains with the network (as the ``loss_weights``
    parameter group of :class:`~lomix_lightning.LoMixSegmentationModule`). :class:`~lomix_lightning.LoMixLoss` adds
    :meth:`regulariser` to its total.

    Args:
        num_maps: Number ``M`` of supervised maps.

    Example:
        >>> weighting = UncertaintyWeighting(2)
        >>> weighting()
        tensor([1., 1.], grad_fn=<ExpBackward0>)
        >>> weighting.regulariser()
        tensor(0., grad_fn=<SumBackward0>)
    """

    learnable = True

    def __init__(self, num_maps: int) -> None:
        super().__init__(num_maps)
        self.log_variance = nn.Parameter(torch.zeros(num_maps))

    def forward(self) -> Tensor:
        """The ``(M,)`` weights ``exp(-s)``."""
        return uncertainty_weights(self.log_variance)

    def regulariser(self) -> Tensor:
        """``sum_u s_u``, added to the total loss."""
        return uncertainty_regulariser(self.log_variance)
