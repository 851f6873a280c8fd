"""The exported prediction path: the network's final map (or the sum of all maps) at the input resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lomix_lightning.errors import LomixUserError, LomixUserTypeError
from lomix_lightning.resize import resize_logits

InferenceOutput = Literal["last", "sum"]


def as_output_list(outputs: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """A network's outputs as a list: a single tensor becomes a one-element list.

    Raises:
        TypeError: If the outputs are neither a tensor nor a list/tuple of tensors.
    """
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, (list, tuple)) and outputs and all(isinstance(o, Tensor) for o in outputs):
        return list(outputs)
    kind = type(outputs).__name__
    if isinstance(outputs, (list, tuple)):
        kind = f"{kind} of {[type(o).__name__ for o in outputs]}"
    raise LomixUserTypeError(
        f"the network must return a Tensor or a list/tuple of Tensors (coarse to fine), got {kind}"
    )


def combine_outputs(outputs: Sequence[Tensor], size: Sequence[int], mode: InferenceOutput) -> Tensor:
    """The prediction logits from a list of maps: the last one, or the sum of all, at ``size``."""
    if mode == "last":
        return resize_logits(outputs[-1], size)
    total = resize_logits(outputs[0], size)
    for out in outputs[1:]:
        total = total + resize_logits(out, size)
    return total


class PredictionNetwork(nn.Module):
    """A plain ``nn.Module`` computing a LoMix model's prediction: logits ``(B, C, H, W)`` at the input size.

    It holds only what the prediction needs: for ``mode="last"`` the network's prediction path (no auxiliary
    heads, when the network provides ``prediction_network()``), for ``mode="sum"`` the whole network. No LoMix
    parameter (loss weights, fusion convolutions) is part of it.

    Args:
        core: For ``"last"``, a module returning the final map (or a list whose last item is it); for ``"sum"``, the
            network returning all maps.
        mode: ``"last"`` or ``"sum"``.

    Example:
        >>> from lomix_lightning.models import UNet
        >>> net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=2)
        >>> PredictionNetwork(net.prediction_network(), "last")(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 3, 16, 16])
    """

    def __init__(self, core: nn.Module, mode: InferenceOutput = "last") -> None:
        super().__init__()
        if mode not in ("last", "sum"):
            raise LomixUserError(f"mode must be 'last' or 'sum', got {mode!r}")
        self.core = core
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        """Prediction logits at the input resolution."""
        outputs = self.core(x)
        if isinstance(outputs, Tensor):
            outputs = [outputs]
        return combine_outputs(outputs, x.shape[2:], self.mode)


def prediction_core(network: nn.Module, mode: InferenceOutput) -> nn.Module:
    """The part of ``network`` a prediction needs: its ``prediction_network()`` for ``"last"`` if it has one."""
    if mode == "last" and callable(getattr(network, "prediction_network", None)):
        return network.prediction_network()
    return network


@torch.no_grad()
def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())
