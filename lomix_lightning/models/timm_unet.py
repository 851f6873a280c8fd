"""A U-Net decoder on any timm ``features_only`` encoder, with one 1x1 logit head per decoder stage."""

from collections.abc import Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomix_lightning.errors import LomixUserError
from lomix_lightning.models._base import DecoderHeadsNetwork, check_positive_int
from lomix_lightning.models.unet import DoubleConv

__all__ = ["SkipDecoder", "TimmUNet"]


class SkipDecoder(nn.Module):
    """A light U-Net decoder: per stage, upsample bilinearly to the skip, concatenate it, ``DoubleConv``.

    Args:
        encoder_channels: Channels of the encoder features, finest first (``S + 1`` entries for ``S`` stages).
        decoder_channels: Output channels of each stage, coarse to fine (``S`` entries).

    Shape:
        - Input: the encoder's list, finest first.
        - Output: ``S`` maps, coarse to fine; stage ``s`` has ``decoder_channels[s]`` channels at the resolution
          of encoder feature ``S - 1 - s``.

    Example:
        >>> dec = SkipDecoder(encoder_channels=(4, 8, 16), decoder_channels=(8, 4))
        >>> feats = [torch.zeros(1, 4, 8, 8), torch.zeros(1, 8, 4, 4), torch.zeros(1, 16, 2, 2)]
        >>> [tuple(f.shape) for f in dec(feats)]
        [(1, 8, 4, 4), (1, 4, 8, 8)]
    """

    def __init__(self, encoder_channels: Sequence[int], decoder_channels: Sequence[int]) -> None:
        super().__init__()
        skips = tuple(encoder_channels[-2::-1])  # coarse to fine
        inputs = (encoder_channels[-1], *decoder_channels[:-1])
        self.blocks = nn.ModuleList(
            DoubleConv(c_in + c_skip, c_out) for c_in, c_skip, c_out in zip(inputs, skips, decoder_channels)
        )

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Return the decoder features of every stage, coarse to fine."""
        x = features[-1]
        outputs = []
        for block, skip in zip(self.blocks, features[-2::-1]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))  # (B, c_in + c_skip, h, w) -> (B, c_out, h, w)
            outputs.append(x)
        return outputs


class TimmUNet(DecoderHeadsNetwork):
    """A timm ``features_only`` encoder with a U-Net decoder and one logit head per decoder stage.

    Channels and strides are read from the encoder's ``feature_info``. An encoder with ``F`` feature levels
    gives ``F - 1`` decoder stages; the heads sit on the last (finest) ``num_outputs`` stages. The finest map is
    at the resolution of the encoder's finest feature (e.g. 1/2 of the input for a ResNet, 1/4 for PVT or
    ConvNeXt); the loss upsamples it.

    Args:
        encoder_name: Any timm model that supports ``features_only=True`` with increasing reductions.
        num_classes: Logit channels ``C`` of every head.
        in_channels: Image channels, passed to timm as ``in_chans``.
        pretrained: Load timm's ImageNet weights (downloads them; keep ``False`` offline).
        decoder_channels: Output channels of each decoder stage, coarse to fine (``F - 1`` entries). Default:
            the widths of the matching skip features.
        num_outputs: Number of logit maps, from 1 to ``F - 1``. Default: ``F - 1`` (one per stage).
        encoder_kwargs: Extra keyword arguments for ``timm.create_model`` (e.g. ``drop_path_rate``,
            ``out_indices``).

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: ``num_outputs`` maps ``(B, C, H / r, W / r)``, with ``r`` the reductions of the finest
          ``num_outputs`` skip features, coarse to fine.

    Raises:
        ValueError: If ``encoder_name`` is not a timm model or does not support ``features_only``.
        ValueError: If the encoder has fewer than two feature levels or its reductions do not increase.
        ValueError: If ``num_classes`` or ``in_channels`` is not a positive integer.
        ValueError: If ``decoder_channels`` has the wrong length or a non-positive entry.
        ValueError: If ``num_outputs`` is not in ``1 .. F - 1``.

    Example:
        >>> net = TimmUNet("test_resnet", num_classes=2, in_channels=1)
        >>> [tuple(p.shape) for p in net(torch.zeros(1, 1, 64, 64))]
        [(1, 2, 4, 4), (1, 2, 8, 8), (1, 2, 16, 16), (1, 2, 32, 32)]
    """

    def __init__(
        self,
        encoder_name: str = "resnet18",
        num_classes: int = 1,
        in_channels: int = 3,
        pretrained: bool = False,
        decoder_channels: Sequence[int] | None = None,
        num_outputs: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        if not timm.is_model(encoder_name):
            raise LomixUserError(f"`encoder_name` {encoder_name!r} is not a timm model (see `timm.list_models()`).")
        try:
            self.encoder = timm.create_model(
                encoder_name, features_only=True, pretrained=pretrained, in_chans=in_channels, **(encoder_kwargs or {})
            )
        except RuntimeError as err:  # timm raises RuntimeError for models without a feature extractor
            raise LomixUserError(f"`encoder_name` {encoder_name!r} does not support features_only=True: {err}") from err
        channels = tuple(self.encoder.feature_info.channels())
        reductions = tuple(self.encoder.feature_info.reduction())
        if len(channels) < 2 or any(r1 >= r2 for r1, r2 in zip(reductions[:-1], reductions[1:])):
            raise LomixUserError(
                f"`encoder_name` {encoder_name!r} needs >= 2 feature levels with increasing reductions, "
                f"got reductions {reductions}."
            )
        num_stages = len(channels) - 1
        decoder_channels = tuple(channels[-2::-1] if decoder_channels is None else decoder_channels)
        if len(decoder_channels) != num_stages:
            raise LomixUserError(
                f"`decoder_channels` needs {num_stages} entries (one per decoder stage of {encoder_name!r}), "
                f"got {decoder_channels}."
            )
        for width in decoder_channels:
            check_positive_int("decoder_channels[i]", width)
        num_outputs = num_stages if num_outputs is None else num_outputs
        if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or not 1 <= num_outputs <= num_stages:
            raise LomixUserError(
                f"`num_outputs` must be an integer in [1, {num_stages}] for {encoder_name!r}, got {num_outputs!r}."
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_outputs = num_outputs
        self.reductions = reductions[num_outputs - 1 :: -1]  # coarse to fine, one per output
        self.decoder = SkipDecoder(channels, decoder_channels)
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, kernel_size=1) for c in decoder_channels[-num_outputs:])
