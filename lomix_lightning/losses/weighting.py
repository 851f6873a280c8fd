"""Loss-weighting strategies: how each supervised map's loss is scaled (paper Sec. 3.4, Eq. 6)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomix_lightning.losses.aligned import AlignedWeighting
from lomix_lightning.losses.uncertainty import UncertaintyWeighting
from lomix_lightning.losses.weighting_base import LossWeighting

__all__ = [
    "WEIGHTINGS",
    "AlignedWeighting",
    "FixedWeighting",
    "LossWeighting",
    "SoftplusWeighting",
    "UncertaintyWeighting",
    "WeightingName",
    "build_weighting",
    "softplus_weights",
]

WeightingName = Literal["learned", "fixed", "aligned", "uncertainty"]


def softplus_weights(alpha: Tensor) -> Tensor:
    """Eq. 6: ``w = softplus(alpha) = ln(1 + exp(alpha))``, strictly positive.

    Example:
        >>> softplus_weights(torch.zeros(2))
        tensor([0.6931, 0.6931])
    """
    return F.softplus(alpha)


class SoftplusWeighting(LossWeighting):
    """LoMix's NAS-inspired learned weights: one raw ``alpha`` per map, ``w = softplus(alpha)``, ``alpha`` starts at 0.

    The gradient of the total loss with respect to ``alpha_u`` is ``sigmoid(alpha_u) * L_u > 0``, so every weight
    shrinks during training; the shares ``w_u / sum(w)`` carry the information (see the README).

    Args:
        num_maps: Number ``M`` of supervised maps.
        init: Initial raw value of every ``alpha`` (0 gives ``w = ln 2``, as in Algorithm 1).

    Example:
        >>> SoftplusWeighting(3)()
        tensor([0.6931, 0.6931, 0.6931], grad_fn=<SoftplusBackward0>)
    """

    learnable = True

    def __init__(self, num_maps: int, init: float = 0.0) -> None:
        super().__init__(num_maps)
        self.alpha = nn.Parameter(torch.full((num_maps,), float(init)))

    def forward(self) -> Tensor:
        """The ``(M,)`` weights ``softplus(alpha)``."""
        return softplus_weights(self.alpha)


class FixedWeighting(LossWeighting):
    """Constant weights (1 by default): deep supervision and MUTATION as in MERIT/EMCAD.

    Args:
        num_maps: Number ``M`` of supervised maps.
        value: The constant weight.

    Example:
        >>> FixedWeighting(2)()
        tensor([1., 1.])
    """

    def __init__(self, num_maps: int, value: float = 1.0) -> None:
        super().__init__(num_maps)
        if value <= 0:
            raise ValueError(f"value must be > 0, got {value}")
        self.register_buffer("_weights", torch.full((num_maps,), float(value)), persistent=False)

    def forward(self) -> Tensor:
        """The ``(M,)`` constant weights."""
        return self._weights


# the strategies beyond the paper live in their own files, which import LossWeighting from here

WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "learned": SoftplusWeighting,
    "fixed": FixedWeighting,
    "aligned": AlignedWeighting,
    "uncertainty": UncertaintyWeighting,
}
"""Weighting strategies by name."""


def build_weighting(weighting: str | LossWeighting, num_maps: int) -> LossWeighting:
    """Build a strategy from its name, or check a given instance's map count.

    Raises:
        ValueError: If the name is unknown or the instance's ``num_maps`` differs.
    """
    if isinstance(weighting, LossWeighting):
        if weighting.num_maps != num_maps:
            raise ValueError(f"weighting has num_maps={weighting.num_maps} but the loss supervises {num_maps} maps")
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed are {sorted(WEIGHTINGS)} or a LossWeighting")
    return WEIGHTINGS[weighting](num_maps)
