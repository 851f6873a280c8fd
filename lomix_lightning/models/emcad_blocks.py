"""Building blocks of the EMCAD decoder (Rahman et al., CVPR 2024), as in SLDGroup/EMCAD ``lib/decoders.py``.

MSDC (multi-scale depth-wise convolution), MSCB (multi-scale convolution block), EUCB (efficient up-convolution
block), LGAG (large-kernel grouped attention gate), CAB (channel attention) and SAB (spatial attention). Every block
initialises its convolutions with N(0, 0.02) (biases 0) and its BatchNorms with weight 1, bias 0, as the reference.
"""

from collections.abc import Sequence
from math import gcd
from typing import Literal

import torch
from torch import Tensor, nn

from lomix_lightning.errors import LomixUserError

__all__ = ["CAB", "EUCB", "LGAG", "MSCB", "MSDC", "SAB", "Activation", "activation_layer", "channel_shuffle"]

Activation = Literal["relu", "relu6", "leakyrelu", "prelu", "gelu", "hswish"]
ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "leakyrelu", "prelu", "gelu", "hswish")


def activation_layer(name: Activation) -> nn.Module:
    """Return a new activation module (in place where PyTorch allows it), as the reference ``act_layer``.

    Example:
        >>> activation_layer("relu6")
        ReLU6(inplace=True)
    """
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    if name == "leakyrelu":
        return nn.LeakyReLU(0.2, inplace=True)
    if name == "prelu":
        return nn.PReLU(num_parameters=1, init=0.2)
    if name == "gelu":
        return nn.GELU()
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    raise LomixUserError(f"`activation` must be one of {ACTIVATIONS}, got {name!r}.")


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave the channels of ``groups`` equal groups (ShuffleNet).

    Example:
        >>> channel_shuffle(torch.arange(6.0).view(1, 6, 1, 1), groups=2).flatten().tolist()
        [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    """
    B, C, H, W = x.shape
    x = x.view(B, groups, C // groups, H, W).transpose(1, 2)  # (B, C/g, g, H, W)
    return x.contiguous().view(B, C, H, W)


def _init_normal(module: nn.Module) -> None:
    """The reference ``_init_weights(scheme='normal')`` applied to every submodule."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MSDC(nn.Module):
    """Multi-scale depth-wise convolution: one ``DWConv k x k -> BN -> act`` branch per kernel size.

    Args:
        channels: Input and output channels of every branch.
        kernel_sizes: One odd kernel size per branch.
        activation: Activation after each branch.
        dw_parallel: ``True``: every branch sees the input. ``False``: each branch's output is added to the input of
            the next branch.

    Returns:
        The list of branch outputs, each ``(B, channels, H, W)``.
    """

    def __init__(
        self, channels: int, kernel_sizes: Sequence[int], activation: Activation = "relu6", dw_parallel: bool = True
    ) -> None:
        super().__init__()
        self.dw_parallel = dw_parallel
        self.dwconvs = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, bias=False),
                nn.BatchNorm2d(channels),
                activation_layer(activation),
            )
            for k in kernel_sizes
        )
        _init_normal(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return one output per kernel size."""
        outputs = []
        for dwconv in self.dwconvs:
            out = dwconv(x)
            outputs.append(out)
            if not self.dw_parallel:
                x = x + out
        return outputs


class MSCB(nn.Module):
    """Multi-scale convolution block: expand (1x1), MSDC, combine, channel shuffle, project (1x1), residual.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (a bias-free 1x1 projection on the residual path if they differ).
        kernel_sizes: MSDC kernel sizes.
        expansion_factor: Width multiplier of the expansion.
        dw_parallel: MSDC branch mode (see :class:`MSDC`).
        add: Combine the MSDC branches by a sum (``True``) or a channel concatenation (``False``).
        activation: Activation of the expansion and the MSDC branches.

    Example:
        >>> MSCB(8, 8, kernel_sizes=(1, 3, 5))(torch.zeros(1, 8, 4, 4)).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: int = 2,
        dw_parallel: bool = True,
        add: bool = True,
        activation: Activation = "relu6",
    ) -> None:
        super().__init__()
        self.add = add
        expanded = in_channels * expansion_factor
        self.pconv1 = nn.Sequential(
            nn.Conv2d(in_channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), activation_layer(activation)
        )
        self.msdc = MSDC(expanded, kernel_sizes, activation=activation, dw_parallel=dw_parallel)
        combined = expanded if add else expanded * len(kernel_sizes)
        self.shuffle_groups = gcd(combined, out_channels)
        self.pconv2 = nn.Sequential(nn.Conv2d(combined, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.residual = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )
        _init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return ``residual(x) + pconv2(shuffle(combine(msdc(pconv1(x)))))``."""
        branches = self.msdc(self.pconv1(x))
        combined = sum(branches) if self.add else torch.cat(branches, dim=1)  # the reference's left-to-right sum
        out = self.pconv2(channel_shuffle(combined, self.shuffle_groups))
        return self.residual(x) + out


class EUCB(nn.Module):
    """Efficient up-convolution block: nearest 2x upsampling, ``DWConv 3x3 -> BN -> act``, then a 1x1 conv.

    The reference also applies ``channel_shuffle(x, groups=in_channels)`` before the 1x1 conv; with one channel per
    group that is the identity, so it is left out.

    Example:
        >>> EUCB(8, 4)(torch.zeros(1, 8, 3, 3)).shape
        torch.Size([1, 4, 6, 6])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, activation: Activation = "relu"):
        super().__init__()
        self.up_dwc = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            activation_layer(activation),
        )
        self.pwc = nn.Conv2d(in_channels, out_channels, 1)
        _init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the upsampled ``(B, out_channels, 2H, 2W)`` map."""
        return self.pwc(self.up_dwc(x))


class LGAG(nn.Module):
    """Large-kernel grouped attention gate: gate the skip ``x`` with the decoder feature ``g``.

    ``psi = sigmoid(BN(conv1x1(act(BN(Wg * g) + BN(Wx * x)))))``; returns ``x * psi``. ``Wg`` and ``Wx`` are
    ``kernel_size`` convolutions from ``channels`` to ``channels // 2`` with ``channels // 2`` groups.

    Example:
        >>> g, x = torch.zeros(1, 8, 4, 4), torch.ones(1, 8, 4, 4)
        >>> LGAG(8)(g, x).shape
        torch.Size([1, 8, 4, 4])
    """

    def __init__(self, channels: int, kernel_size: int = 3, activation: Activation = "relu") -> None:
        super().__init__()
        inter = channels // 2
        groups = 1 if kernel_size == 1 else inter
        self.W_g = nn.Sequential(
            nn.Conv2d(channels, inter, kernel_size, padding=kernel_size // 2, groups=groups), nn.BatchNorm2d(inter)
        )
        self.W_x = nn.Sequential(
            nn.Conv2d(channels, inter, kernel_size, padding=kernel_size // 2, groups=groups), nn.BatchNorm2d(inter)
        )
        self.psi = nn.Sequential(nn.Conv2d(inter, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.activation = activation_layer(activation)
        _init_normal(self)

    def forward(self, g: Tensor, x: Tensor) -> Tensor:
        """Return the gated skip ``(B, channels, H, W)``."""
        psi = self.psi(self.activation(self.W_g(g) + self.W_x(x)))  # (B, 1, H, W)
        return x * psi


class CAB(nn.Module):
    """Channel attention: a shared bottleneck MLP on the average- and max-pooled vectors, summed, sigmoid.

    The reduction ratio is 16, or ``channels`` when there are fewer than 16 channels. Returns the attention map
    ``(B, channels, 1, 1)``; the caller multiplies it in.

    Example:
        >>> CAB(32)(torch.zeros(2, 32, 4, 4)).shape
        torch.Size([2, 32, 1, 1])
    """

    def __init__(self, channels: int, ratio: int = 16, activation: Activation = "relu") -> None:
        super().__init__()
        reduced = channels // min(ratio, channels)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(channels, reduced, 1, bias=False)
        self.activation = activation_layer(activation)
        self.fc2 = nn.Conv2d(reduced, channels, 1, bias=False)
        _init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the channel attention map."""
        avg_out = self.fc2(self.activation(self.fc1(self.avg_pool(x))))
        max_out = self.fc2(self.activation(self.fc1(self.max_pool(x))))
        return torch.sigmoid(avg_out + max_out)


class SAB(nn.Module):
    """Spatial attention: a 7x7 conv over the channel-mean and channel-max maps, sigmoid.

    Returns the attention map ``(B, 1, H, W)``; the caller multiplies it in.

    Example:
        >>> SAB()(torch.zeros(2, 5, 4, 4)).shape
        torch.Size([2, 1, 4, 4])
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        _init_normal(self)

    def forward(self, x: Tensor) -> Tensor:
        """Return the spatial attention map."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return torch.sigmoid(self.conv(pooled))
