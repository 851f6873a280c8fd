"""A small classic U-Net with one 1x1 logit head per decoder stage (Ronneberger et al., 2015)."""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomix_lightning.errors import LomixUserError
from lomix_lightning.models._base import DecoderHeadsNetwork, check_positive_int

__all__ = ["DoubleConv", "UNet", "UNetDecoder", "UNetEncoder"]

UpMode = Literal["transposed", "bilinear"]
_UP_MODES = ("transposed", "bilinear")


class DoubleConv(nn.Sequential):
    """Two ``Conv3x3 (no bias) -> BatchNorm -> ReLU`` layers.

    Example:
        >>> DoubleConv(3, 8)(torch.zeros(1, 3, 5, 5)).shape
        torch.Size([1, 8, 5, 5])
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """U-Net contracting path: ``DoubleConv`` blocks separated by 2x2 max-pooling.

    Args:
        in_channels: Image channels.
        channels: Width of each level, finest first; ``len(channels) - 1`` poolings.

    Shape:
        - Input: ``(B, in_channels, H, W)``.
        - Output: a list with one ``(B, channels[i], H / 2**i, W / 2**i)`` map per level (floor division).
    """

    def __init__(self, in_channels: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.blocks = nn.ModuleList(DoubleConv(c_in, c_out) for c_in, c_out in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the features of every level, finest first."""
        smallest = 2 ** (len(self.blocks) - 1)
        if min(x.shape[-2:]) < smallest:
            depth = len(self.blocks) - 1
            raise LomixUserError(
                f"a UNet of depth={depth} halves the image {depth} times and needs at least {smallest}x{smallest} "
                f"pixels, got {tuple(x.shape[-2:])}; use a smaller depth or larger images"
            )
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, kernel_size=2))
            features.append(x)
        return features


class UNetDecoder(nn.Module):
    """U-Net expanding path: upsample, concatenate the skip, ``DoubleConv``.

    Args:
        channels: The encoder widths, finest first (as given to :class:`UNetEncoder`).
        up_mode: ``"transposed"`` (a 2x2 transposed convolution that halves the channels first) or
            ``"bilinear"`` (parameter-free; the block then reduces the concatenated channels).

    Shape:
        - Input: the encoder's list.
        - Output: ``len(channels) - 1`` maps, coarse to fine; stage ``j`` has ``channels[-2 - j]`` channels at the
          resolution of the matching skip.
    """

    def __init__(self, channels: tuple[int, ...], up_mode: UpMode = "transposed") -> None:
        super().__init__()
        self.up_mode = up_mode
        deep = channels[:0:-1]  # coarsest first: the input width of each stage
        skip = channels[-2::-1]  # the skip (= output) width of each stage
        if up_mode == "transposed":
            self.ups = nn.ModuleList(nn.ConvTranspose2d(d, s, kernel_size=2, stride=2) for d, s in zip(deep, skip))
            self.blocks = nn.ModuleList(DoubleConv(2 * s, s) for s in skip)
        else:
            self.ups = nn.ModuleList(nn.Identity() for _ in skip)
            self.blocks = nn.ModuleList(DoubleConv(d + s, s) for d, s in zip(deep, skip))

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """Return the decoder features of every stage, coarse to fine."""
        x = features[-1]
        outputs = []
        for up, block, skip in zip(self.ups, self.blocks, features[-2::-1]):
            if self.up_mode == "transposed":
                x = up(x)
                # Odd sizes: pooling floored, so the upsampled map can be one pixel short of the skip.
                x = F.pad(x, (0, skip.shape[-1] - x.shape[-1], 0, skip.shape[-2] - x.shape[-2]))
            else:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))  # (B, c_up + c_skip, h, w) -> (B, c_skip, h, w)
            outputs.append(x)
        return outputs


class UNet(DecoderHeadsNetwork):
    """A classic U-Net that returns one logit map per decoder stage, coarse to fine.

    ``depth`` poolings give ``depth`` decoder stages and ``num_outputs = depth`` maps at resolutions
    ``1/2**(depth-1), ..., 1/2, 1`` of the input. The last map (full resolution) is the prediction.

    Args:
        in_channels: Image channels.
        num_classes: Logit channels ``C`` of every head.
        base_channels: Width of the first level; level ``i`` has ``base_channels * 2**i`` channels.
        depth: Number of poolings (and decoder stages / outputs).
        up_mode: ``"transposed"`` 2x2 convolution (the original U-Net, and faster on CPU) or ``"bilinear"``
            upsampling.

    Shape:
        - Input: ``(B, in_channels, H, W)``; any ``H, W`` >= ``2**depth``.
        - Output: ``depth`` maps ``(B, C, H / 2**(depth-1-s), W / 2**(depth-1-s))`` for ``s = 0..depth-1``.

    Raises:
        ValueError: If ``in_channels``, ``num_classes``, ``base_channels`` or ``depth`` is not a positive integer.
        ValueError: If ``up_mode`` is not ``"transposed"`` or ``"bilinear"``.

    Example:
        >>> net = UNet(in_channels=1, num_classes=3, base_channels=4, depth=3)
        >>> [tuple(p.shape) for p in net(torch.zeros(2, 1, 32, 32))]
        [(2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32)]
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        base_channels: int = 16,
        depth: int = 4,
        up_mode: UpMode = "transposed",
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_channels", base_channels),
            ("depth", depth),
        ):
            check_positive_int(name, value)
        if up_mode not in _UP_MODES:
            raise LomixUserError(f"`up_mode` must be one of {_UP_MODES}, got {up_mode!r}.")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_outputs = depth
        channels = tuple(base_channels * 2**i for i in range(depth + 1))
        self.encoder = UNetEncoder(in_channels, channels)
        self.decoder = UNetDecoder(channels, up_mode=up_mode)
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, kernel_size=1) for c in channels[-2::-1])
