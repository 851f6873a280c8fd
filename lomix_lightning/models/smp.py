"""Multi-output wrapper for segmentation-models-pytorch (smp) models: 1x1 heads on intermediate decoder stages."""

import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base import SegmentationModel
from torch import Tensor, nn
from torch.func import functional_call

from lomix_lightning.errors import LomixUserError
from lomix_lightning.models._base import MultiOutputNetwork, check_image_batch, check_positive_int

__all__ = ["MultiScaleSMP", "SMPFinalMap", "SUPPORTED_ARCHS"]

SMPArch = Literal["Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "UPerNet", "DeepLabV3Plus"]

# Decoder stages that can carry an auxiliary head, coarse to fine, per model class. Each module must run exactly
# once per forward; the decoder's own output (through the model's segmentation head) is always the last map.
# UnetPlusPlus: the x_0_j nodes are the spine that leads to the output (one per scale), not UNet++'s same-scale
# nested nodes.
_TAPS: dict[type[nn.Module], Callable[[nn.Module], list[nn.Module]]] = {
    smp.Unet: lambda decoder: list(decoder.blocks)[:-1],
    smp.UnetPlusPlus: lambda decoder: [decoder.blocks[f"x_0_{j}"] for j in range(decoder.depth)],
    smp.MAnet: lambda decoder: list(decoder.blocks)[:-1],
    smp.Linknet: lambda decoder: list(decoder.blocks)[:-1],
    smp.FPN: lambda decoder: [decoder.p5, decoder.p4, decoder.p3, decoder.p2],
    smp.UPerNet: lambda decoder: [decoder.psp, *decoder.fpn_conv_blocks],
    smp.DeepLabV3Plus: lambda decoder: [decoder.aspp],
}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(model_class.__name__ for model_class in _TAPS)


def _stage_modules(model: nn.Module) -> list[nn.Module]:
    for model_class, taps in _TAPS.items():
        if isinstance(model, model_class):
            return taps(model.decoder)
    raise LomixUserError(
        f"{type(model).__name__} has no decoder stages to tap; supported architectures: {SUPPORTED_ARCHS}."
    )


@contextmanager
def _capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[Tensor | None]]:
    """Record the output of each module during the ``with`` block (hooks are removed on exit)."""
    outputs: list[Tensor | None] = [None] * len(modules)

    def make_hook(index: int) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            if outputs[index] is not None:
                raise RuntimeError(f"Decoder stage {type(module).__name__} ran twice in one forward pass.")
            outputs[index] = output

        return hook

    handles = [module.register_forward_hook(make_hook(i)) for i, module in enumerate(modules)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


class SMPFinalMap(nn.Module):
    """The wrapped smp model alone (no auxiliary head); ``forward`` is the model's own forward.

    Example:
        >>> net = MultiScaleSMP("Unet", "resnet18", num_classes=2, in_channels=1, num_outputs=2, encoder_depth=3,
        ...                     decoder_channels=(16, 8, 4))
        >>> net.prediction_network()(torch.zeros(1, 1, 32, 32)).shape
        torch.Size([1, 2, 32, 32])
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Return the model's segmentation logits."""
        return self.model(x)


class MultiScaleSMP(MultiOutputNetwork):
    """An smp segmentation model that returns ``num_outputs`` logit maps, coarse to fine.

    The last map is the model's own segmentation head output (unchanged). The ``num_outputs - 1`` maps before it
    come from 1x1 convolution heads on the finest intermediate decoder stages, read with forward hooks that exist
    only during :meth:`forward`:

    ========================  ======================================================  ===========
    architecture              tapped stages (coarse to fine)                          max outputs
    ========================  ======================================================  ===========
    Unet, MAnet, Linknet      ``decoder.blocks[:-1]``                                 depth
    UnetPlusPlus              ``decoder.blocks["x_0_j"]`` (the spine to the output)   depth
    FPN                       ``p5, p4, p3, p2``                                      5
    UPerNet                   ``psp, *fpn_conv_blocks``                               5
    DeepLabV3Plus             ``aspp``                                                2
    ========================  ======================================================  ===========

    The heads' input channels are read by a dry run on the ``meta`` device (no compute, no weights touched).

    Args:
        arch: smp architecture name.
        encoder_name: Any encoder smp accepts for ``arch``, including ``"tu-<timm name>"``.
        encoder_weights: Pretrained encoder weights (e.g. ``"imagenet"``; downloads) or ``None``.
        num_classes: Logit channels ``C`` (smp's ``classes``).
        in_channels: Image channels.
        num_outputs: Number of logit maps, from 1 to the architecture's maximum.
        **smp_kwargs: Passed to ``smp.create_model`` (e.g. ``encoder_depth``, ``decoder_channels``).

    Shape:
        - Input: ``(B, in_channels, H, W)`` with ``H, W`` divisible by the encoder's output stride.
        - Output: ``num_outputs`` maps ``(B, C, h_s, w_s)``, coarse to fine, each at its stage's resolution; the
          last one at the model's output resolution.

    Raises:
        ValueError: If ``arch`` is not supported or smp rejects the arguments.
        ValueError: If ``num_outputs`` is not in ``1 .. max outputs``.
        ValueError: If ``smp_kwargs`` sets ``classes``, ``activation`` or ``aux_params`` (logits only).

    Example:
        >>> net = MultiScaleSMP("FPN", "resnet18", num_classes=3, in_channels=1, num_outputs=4)
        >>> [tuple(p.shape) for p in net(torch.zeros(1, 1, 64, 64))]
        [(1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 16, 16), (1, 3, 64, 64)]
    """

    def __init__(
        self,
        arch: SMPArch = "Unet",
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        num_classes: int = 1,
        in_channels: int = 3,
        num_outputs: int = 4,
        **smp_kwargs: Any,
    ) -> None:
        super().__init__()
        if arch not in SUPPORTED_ARCHS:
            raise LomixUserError(
                f"`arch` must be one of {SUPPORTED_ARCHS} (decoders with stages to tap), got {arch!r}."
            )
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        for key in ("classes", "activation", "aux_params"):
            if smp_kwargs.get(key) is not None:
                raise LomixUserError(
                    f"`{key}` cannot be passed to MultiScaleSMP (got {smp_kwargs[key]!r}): use `num_classes`; "
                    "the network returns logits only."
                )
        try:
            model = smp.create_model(
                arch,
                encoder_name=encoder_name,
                encoder_weights=encoder_weights,
                classes=num_classes,
                in_channels=in_channels,
                **smp_kwargs,
            )
        except (KeyError, ValueError, TypeError) as err:
            raise LomixUserError(f"smp.create_model({arch!r}, encoder_name={encoder_name!r}) failed: {err}") from err
        self._wrap(model, num_outputs)

    @classmethod
    def from_model(cls, model: SegmentationModel, num_outputs: int = 4) -> "MultiScaleSMP":
        """Wrap an existing smp model, keeping its weights (the model is shared, not copied).

        Args:
            model: An smp model of a supported architecture, without classification head or activation.
            num_outputs: Number of logit maps.

        Raises:
            ValueError: If the architecture is not supported, ``num_outputs`` is out of range, or the model has a
                classification head or an output activation.

        Example:
            >>> model = smp.FPN("resnet18", encoder_weights=None, classes=2)
            >>> net = MultiScaleSMP.from_model(model, num_outputs=3)
            >>> net.model is model, net.num_outputs, net.num_classes
            (True, 3, 2)
        """
        if not isinstance(model, nn.Module) or not hasattr(model, "decoder"):
            raise LomixUserError(f"`model` must be an smp SegmentationModel, got {type(model).__name__}.")
        if getattr(model, "classification_head", None) is not None:
            raise LomixUserError("`model` has a classification head (aux_params); MultiScaleSMP needs logits only.")
        activation = getattr(model.segmentation_head[-1], "activation", nn.Identity())
        if not isinstance(activation, nn.Identity):
            raise LomixUserError(f"`model` has an output activation ({activation}); MultiScaleSMP needs logits only.")
        network = cls.__new__(cls)
        MultiOutputNetwork.__init__(network)
        network._wrap(model, num_outputs)
        return network

    def _wrap(self, model: nn.Module, num_outputs: int) -> None:
        stages = _stage_modules(model)
        max_outputs = len(stages) + 1
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or not 1 <= num_outputs <= max_outputs:
            raise LomixUserError(
                f"`num_outputs` must be an integer in [1, {max_outputs}] for this {type(model).__name__} "
                f"({len(stages)} decoder stages + the output), got {num_outputs!r}."
            )
        self.model = model
        self.arch = type(model).__name__
        self.num_outputs = num_outputs
        self.in_channels = _in_channels(model)
        self._taps = stages[len(stages) - (num_outputs - 1) :]  # plain list: not registered twice
        stage_channels, self.num_classes = _probe_channels(model, self._taps, self.in_channels)
        self.heads = nn.ModuleList(nn.Conv2d(c, self.num_classes, kernel_size=1) for c in stage_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``num_outputs`` logit maps, coarse to fine."""
        check_image_batch(x, self.in_channels)
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):  # as smp's own forward
            self.model.check_input_shape(x)
        with _capture_outputs(self._taps) as stage_outputs:
            decoded = self.model.decoder(self.model.encoder(x))
        if any(output is None for output in stage_outputs):
            raise RuntimeError(f"A tapped decoder stage of this {self.arch} did not run in the forward pass.")
        final = self.model.segmentation_head(decoded)
        return [head(feature) for head, feature in zip(self.heads, stage_outputs)] + [final]

    def forward_final(self, x: Tensor) -> Tensor:
        """Return the model's own segmentation logits (no hook, no auxiliary head)."""
        check_image_batch(x, self.in_channels)
        return self.model(x)

    def auxiliary_heads(self) -> nn.ModuleList:
        """Return the ``num_outputs - 1`` stage heads."""
        return self.heads

    def prediction_network(self) -> SMPFinalMap:
        """Return the wrapped smp model (shared, not copied) without the auxiliary heads."""
        return SMPFinalMap(self.model)


def _in_channels(model: nn.Module) -> int:
    # smp encoders (native and "tu-") record it; otherwise the first convolution tells.
    value = getattr(model.encoder, "_in_channels", None)
    if isinstance(value, int):
        return value
    return next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)).in_channels


def _probe_channels(model: nn.Module, taps: Sequence[nn.Module], in_channels: int) -> tuple[list[int], int]:
    """Return the channels of each tapped stage and of the model output, from a dry run.

    The run uses the meta device (no compute, weights untouched). An encoder that cannot run on meta falls back to
    a real forward in eval mode without gradients, with every module's train/eval flag restored afterwards.
    """
    side = max(64, 2 * int(getattr(model.encoder, "output_stride", 32)))
    shape = (2, in_channels, side, side)  # batch 2: BatchNorm in train mode needs > 1 value per channel
    state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers())
    }
    try:
        with _capture_outputs(taps) as stage_outputs:
            output = functional_call(model, state, (torch.zeros(shape, device="meta"),))
    except (RuntimeError, NotImplementedError):
        flags = {module: module.training for module in model.modules()}
        device = next(itertools.chain(model.parameters(), model.buffers())).device
        try:
            model.eval()
            with torch.no_grad(), _capture_outputs(taps) as stage_outputs:
                output = model(torch.zeros(shape, device=device))
        finally:
            for module, flag in flags.items():
                module.training = flag
    return [t.shape[1] for t in stage_outputs], output.shape[1]
