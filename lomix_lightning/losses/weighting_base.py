"""The interface every loss-weighting strategy implements (paper Sec. 3.4: one weight per supervised map)."""

from __future__ import annotations

from torch import Tensor, nn


class LossWeighting(nn.Module):
    """Interface of a weighting strategy: one non-negative weight per supervised map.

    Subclasses set :attr:`learnable` and implement :meth:`forward`, which returns the ``(M,)`` weights. The total loss
    is ``sum(weights * per_map_losses)``. Strategies are plain modules: their parameters train with the network under
    Lightning's automatic optimisation (AMP, accumulation and DDP keep working).

    Args:
        num_maps: Number ``M`` of supervised maps.
    """

    learnable: bool = False

    def __init__(self, num_maps: int) -> None:
        super().__init__()
        if not isinstance(num_maps, int) or num_maps < 1:
            raise ValueError(f"num_maps must be an integer >= 1, got {num_maps!r}")
        self.num_maps = num_maps

    def forward(self) -> Tensor:
        """The ``(M,)`` weights."""
        raise NotImplementedError
