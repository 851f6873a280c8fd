"""A network's outputs: as a list, counted (a meta-device dry run), and the prediction path that is exported.

The prediction is the network's final map (or the sum of all maps) at the input resolution.
"""

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


def count_outputs(network: nn.Module, sizes: Sequence[int] = (224, 256)) -> int | None:
    """The number of maps ``network`` returns, from a dry run on the meta device (no memory, no arithmetic).

    The parameters and buffers are replaced by meta tensors of their shapes (``torch.func.functional_call``) and
    the network runs in eval mode on a meta image ``(1, C_in, s, s)``; ``C_in`` is ``network.in_channels`` or the
    ``in_channels`` of its first submodule that has one, ``s`` each of ``sizes`` in turn. A network that cannot run
    on the meta device (data-dependent control flow, tensors made on another device, an unknown input size) gives
    ``None``: the caller then counts the maps on a real batch, where a real error is raised as such.

    Example:
        >>> from lomix_lightning.models import UNet
        >>> count_outputs(UNet(in_channels=1, num_classes=2, base_channels=4, depth=3))
        3
        >>> count_outputs(nn.Identity()) is None  # no in_channels to build an input from
        True
    """
    channels = getattr(network, "in_channels", None)
    if not isinstance(channels, int):
        channels = next(
            (m.in_channels for m in network.modules() if isinstance(getattr(m, "in_channels", None), int)), None
        )
    if not isinstance(channels, int):
        return None
    state = {name: t.to("meta") for name, t in (*network.named_parameters(), *network.named_buffers())}
    was_training = network.training
    network.eval()
    try:
        for size in sizes:
            image = torch.empty(1, channels, size, size, device="meta")
            try:  # a failure only means "not on the meta device": the real batch decides (and raises its own error)
                with torch.no_grad():
                    outputs = torch.func.functional_call(network, state, (image,))
            except Exception:  # noqa: BLE001
                continue
            try:
                return len(as_output_list(outputs))
            except LomixUserTypeError:  # not maps: the real batch says so in the module's words
                return None
        return None
    finally:
        network.train(was_training)
