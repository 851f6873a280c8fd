"""MONAI's deep-supervision networks (DynUNet, SegResNetDS) in our multi-output network contract, 2-D and 3-D.

MONAI returns its auxiliary maps in its own formats: ``DynUNet`` stacks them into one ``(B, 1+k, C, *spatial)``
tensor after a nearest-neighbour upsampling (training only), ``SegResNetDS`` returns a finest-first list in training
and one map in eval. The adapters here return every map at its native resolution, coarse to fine, in train and eval
mode alike (the loss resizes them itself, trilinearly in float32); :meth:`forward_final` and
:meth:`prediction_network` compute the final map alone, without any auxiliary head. The MONAI network is built
inside (from plain arguments, so checkpoints and configs rebuild it) and reachable as ``.net``; MONAI is imported
only when an adapter is built (``pip install "lomix-lightning[monai]"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn

from lomix_lightning.errors import LomixMissingDependencyError, LomixUserError
from lomix_lightning.models._base import MultiOutputNetwork, check_positive_int

__all__ = ["MonaiDynUNet", "MonaiSegResNetDS", "require_monai"]

SpatialDims = Literal[2, 3]


def require_monai() -> Any:
    """Import and return the ``monai`` package, or raise a one-line error saying what to install.

    Raises:
        ImportError: If MONAI is not installed (a :class:`~lomix_lightning.errors.LomixMissingDependencyError`).
    """
    try:
        import monai
    except ImportError as err:
        raise LomixMissingDependencyError(
            'the MONAI networks need MONAI: pip install "lomix-lightning[monai]"'
        ) from err
    return monai


def _check_input(x: Tensor, in_channels: int, spatial_dims: int) -> None:
    if x.ndim != spatial_dims + 2 or x.shape[1] != in_channels:
        dims = "D, H, W" if spatial_dims == 3 else "H, W"
        raise LomixUserError(f"Expected an input of shape (B, {in_channels}, {dims}), got {tuple(x.shape)}.")


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise LomixUserError(f"`spatial_dims` must be 2 or 3, got {spatial_dims!r}.")


class _DynUNetPath(nn.Module):
    """DynUNet's encoder-decoder path (no head): ``downs`` top to bottom, the bottleneck, ``ups`` bottom to top."""

    def __init__(self, downs: Sequence[nn.Module], bottleneck: nn.Module, ups: Sequence[nn.Module]) -> None:
        super().__init__()
        self.downs = nn.ModuleList(downs)
        self.bottleneck = bottleneck
        self.ups = nn.ModuleList(ups)

    def forward(self, x: Tensor) -> Tensor:
        """The finest decoder feature."""
        return _dynunet_decode(self.downs, self.bottleneck, self.ups, x)[-1]


def _dynunet_decode(
    downs: Sequence[nn.Module], bottleneck: nn.Module, ups: Sequence[nn.Module], x: Tensor
) -> list[Tensor]:
    """The decoder features, coarse to fine: what MONAI's recursive ``DynUNetSkipLayer`` chain computes."""
    skips = []
    for down in downs:
        x = down(x)
        skips.append(x)
    x = bottleneck(x)
    features = []
    for up, skip in zip(ups, reversed(skips)):
        x = up(x, skip)
        features.append(x)
    return features  # the last one feeds the output block


class _PathAndHead(nn.Module):
    """A decoder path followed by the final head only: the exported prediction network."""

    def __init__(self, path: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.path = path
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        """The final logit map."""
        return self.head(self.path(x))


class MonaiDynUNet(MultiOutputNetwork):
    """MONAI's ``DynUNet`` (nnU-Net's architecture) with ``deep_supervision=True``, returning native-resolution maps.

    ``forward`` returns ``deep_supr_num + 1`` maps, coarse to fine: the deep-supervision heads at their own decoder
    resolution (MONAI's ``net.heads``, not the nearest-upsampled stack of its training output), then the final
    map. ``forward_final`` equals ``DynUNet`` in eval mode.

    Args:
        in_channels: Channels of the input image.
        num_classes: Output channels ``C``.
        spatial_dims: 2 or 3.
        strides: One stride per level (an int or one per dimension); the first is usually 1. The input size must be
            divisible by their product.
        kernel_size: One kernel size per level (default 3 everywhere).
        filters: Channels per level (default MONAI's: ``32 * 2^i``, at most 320 in 3-D).
        deep_supr_num: Number of auxiliary heads (must be below ``len(strides) - 1``).
        norm_name: MONAI's normalisation name (``"instance"``, ``"batch"``, ...).
        res_block: Residual blocks instead of plain conv blocks.

    Example:
        >>> import torch
        >>> net = MonaiDynUNet(1, 3, spatial_dims=3, strides=(1, 2, 2), filters=(4, 8, 16), deep_supr_num=1)
        >>> [tuple(o.shape) for o in net(torch.zeros(1, 1, 8, 8, 8))]
        [(1, 3, 4, 4, 4), (1, 3, 8, 8, 8)]
        >>> net.prediction_network()(torch.zeros(1, 1, 8, 8, 8)).shape
        torch.Size([1, 3, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: SpatialDims = 3,
        strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2),
        kernel_size: Sequence[int | Sequence[int]] | None = None,
        filters: Sequence[int] | None = None,
        deep_supr_num: int = 2,
        norm_name: str = "instance",
        res_block: bool = False,
    ) -> None:
        super().__init__()
        monai = require_monai()
        _check_spatial_dims(spatial_dims)
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("deep_supr_num", deep_supr_num),
        ):
            check_positive_int(name, value)
        strides = [list(s) if isinstance(s, Sequence) else s for s in strides]
        if not 1 <= deep_supr_num < len(strides) - 1:
            raise LomixUserError(
                f"`deep_supr_num` must be in [1, {len(strides) - 2}] for {len(strides)} levels, got {deep_supr_num}."
            )
        kernel_size = [3] * len(strides) if kernel_size is None else list(kernel_size)
        self.net = monai.networks.nets.DynUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            kernel_size=kernel_size,
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=None if filters is None else list(filters),
            norm_name=norm_name,
            deep_supervision=True,
            deep_supr_num=deep_supr_num,
            res_block=res_block,
        )
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims
        self.num_outputs = deep_supr_num + 1
        self._factor = [1] * spatial_dims  # the input must be a multiple of the strides' product, per dimension
        for stride in strides:
            for d in range(spatial_dims):
                self._factor[d] *= stride[d] if isinstance(stride, list) else stride

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.in_channels, self.spatial_dims)
        if any(size % f for size, f in zip(x.shape[2:], self._factor)):
            raise LomixUserError(
                f"DynUNet needs spatial sizes divisible by {self._factor} (the strides' product), "
                f"got {tuple(x.shape[2:])}."
            )

    def _chain(self) -> tuple[list[nn.Module], nn.Module, list[nn.Module], list[nn.Module]]:
        """Walk MONAI's recursive skip layers: downsamples (top down), bottleneck, upsamples and heads (bottom up)."""
        downs, ups, heads, layer = [], [], [], self.net.skip_layers
        while hasattr(layer, "next_layer"):  # a DynUNetSkipLayer; the innermost next_layer is the bottleneck
            downs.append(layer.downsample)
            ups.append(layer.upsample)
            heads.append(layer.super_head if layer.index > 0 else None)
            layer = layer.next_layer
        return downs, layer, ups[::-1], heads[::-1]

    def _path(self) -> _DynUNetPath:
        downs, bottleneck, ups, _ = self._chain()
        return _DynUNetPath(downs, bottleneck, ups)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``deep_supr_num + 1`` logit maps, coarse to fine, each at its decoder level's resolution."""
        self._check(x)
        downs, bottleneck, ups, heads = self._chain()
        features = _dynunet_decode(downs, bottleneck, ups, x)  # coarse to fine
        aux = [head(f) for head, f in zip(heads, features) if head is not None]
        return [*aux, self.net.output_block(features[-1])]

    def forward_final(self, x: Tensor) -> Tensor:
        """Return the final map only (what ``DynUNet`` returns in eval mode), computing no auxiliary head."""
        self._check(x)
        return self.net.output_block(self._path()(x))

    def auxiliary_heads(self) -> nn.ModuleList:
        """MONAI's deep-supervision heads."""
        return nn.ModuleList(self.net.deep_supervision_heads)

    def prediction_network(self) -> nn.Module:
        """Encoder, decoder and the output block, sharing this network's modules, without the auxiliary heads."""
        return _PathAndHead(self._path(), self.net.output_block)


class _SegResNetDSPath(nn.Module):
    """SegResNetDS's encoder and decoder blocks (no head): the loop of MONAI's ``SegResNetDS._forward``."""

    def __init__(self, encoder: nn.Module, upsamples: Sequence[nn.Module], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.upsamples = nn.ModuleList(upsamples)
        self.blocks = nn.ModuleList(blocks)

    def decode(self, x: Tensor) -> list[Tensor]:
        """The decoder features, coarse to fine (MONAI's loop, which adds each skip in place)."""
        skips = self.encoder(x)[::-1]  # deepest first
        x, features = skips[0], []
        for upsample, block, skip in zip(self.upsamples, self.blocks, skips[1:]):
            x = block(upsample(x) + skip)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        """The finest decoder feature."""
        return self.decode(x)[-1]


class MonaiSegResNetDS(MultiOutputNetwork):
    """MONAI's ``SegResNetDS`` returning all ``dsdepth`` maps, coarse to fine, in train and eval mode.

    ``forward_final`` equals ``SegResNetDS`` in eval mode. The input size must be divisible by
    ``2 ** (len(blocks_down) - 1)``.

    Args:
        in_channels: Channels of the input image.
        num_classes: Output channels ``C``.
        spatial_dims: 2 or 3.
        init_filters: Channels of the first level (doubled per level).
        blocks_down: Residual blocks per encoder level.
        dsdepth: Number of maps (deep-supervision levels, at most ``len(blocks_down) - 1``, the decoder levels).
        norm: MONAI's normalisation name.

    Example:
        >>> import torch
        >>> net = MonaiSegResNetDS(1, 3, spatial_dims=2, init_filters=4, blocks_down=(1, 1, 1), dsdepth=2)
        >>> [tuple(o.shape) for o in net(torch.zeros(1, 1, 16, 16))]
        [(1, 3, 8, 8), (1, 3, 16, 16)]
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: SpatialDims = 3,
        init_filters: int = 32,
        blocks_down: Sequence[int] = (1, 2, 2, 4),
        dsdepth: int = 3,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        monai = require_monai()
        _check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("dsdepth", dsdepth)):
            check_positive_int(name, value)
        if dsdepth > len(blocks_down) - 1:
            raise LomixUserError(
                f"`dsdepth` must be at most len(blocks_down) - 1 = {len(blocks_down) - 1} (the decoder levels), "
                f"got dsdepth={dsdepth}."
            )
        self.net = monai.networks.nets.SegResNetDS(
            spatial_dims=spatial_dims,
            init_filters=init_filters,
            in_channels=in_channels,
            out_channels=num_classes,
            norm=norm,
            blocks_down=tuple(blocks_down),
            dsdepth=dsdepth,
        )
        self.in_channels, self.num_classes, self.spatial_dims = in_channels, num_classes, spatial_dims
        self.num_outputs = dsdepth

    def _path(self) -> _SegResNetDSPath:
        levels = self.net.up_layers
        return _SegResNetDSPath(self.net.encoder, [lv["upsample"] for lv in levels], [lv["blocks"] for lv in levels])

    def _check(self, x: Tensor) -> None:
        _check_input(x, self.in_channels, self.spatial_dims)
        if not self.net.is_valid_shape(x):
            raise LomixUserError(
                f"SegResNetDS needs spatial sizes divisible by {self.net.shape_factor()}, got {tuple(x.shape[2:])}."
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return ``dsdepth`` logit maps, coarse to fine, each at its decoder level's resolution."""
        self._check(x)
        levels = self.net.up_layers
        features = self._path().decode(x)
        return [lv["head"](f) for lv, f in zip(levels, features)][-self.num_outputs :]

    def forward_final(self, x: Tensor) -> Tensor:
        """Return the final map only (what ``SegResNetDS`` returns in eval mode)."""
        self._check(x)
        return self.net.up_layers[-1]["head"](self._path()(x))

    def auxiliary_heads(self) -> nn.ModuleList:
        """The heads of the coarser levels."""
        return nn.ModuleList(lv["head"] for lv in self.net.up_layers[len(self.net.up_layers) - self.num_outputs : -1])

    def prediction_network(self) -> nn.Module:
        """Encoder, decoder blocks and the final head, sharing this network's modules, without the auxiliary heads."""
        return _PathAndHead(self._path(), self.net.up_layers[-1]["head"])
