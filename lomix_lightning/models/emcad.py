"""EMCADNet: the EMCAD decoder (Rahman et al., CVPR 2024) on a timm encoder, the default LoMix network.

Follows SLDGroup/EMCAD ``lib/networks.py`` and ``lib/decoders.py`` (the LoMix repository ships them unchanged), with
the encoder taken from timm (``features_only=True``) instead of the authors' PVT copy.
"""

from collections.abc import Sequence
from typing import Any

import timm
from torch import Tensor, nn

from lomix_lightning.errors import LomixUserError
from lomix_lightning.models._base import DecoderHeadsNetwork, check_image_batch, check_positive_int
from lomix_lightning.models.emcad_blocks import ACTIVATIONS, CAB, EUCB, LGAG, MSCB, SAB, Activation

__all__ = ["EMCADDecoder", "EMCADNet", "GreyStemEncoder"]

_MAX_LEVELS = 4  # the reference decodes the four stride-4..32 features


class EMCADDecoder(nn.Module):
    """The EMCAD decoder: MSCAM on the deepest feature, then per level EUCB, LGAG-gated additive skip, MSCAM.

    MSCAM is ``d = CAB(d) * d; d = SAB(d) * d; d = MSCB(d)``; a single :class:`SAB` is shared by all stages. EUCB,
    LGAG and CAB use ReLU; ``activation`` applies to the MSCBs (as in the reference, where the training script
    passes ``relu6``).

    Args:
        channels: Encoder channels, coarse to fine (e.g. ``(512, 320, 128, 64)`` for pvt_v2_b2); each even.
        kernel_sizes: MSDC kernel sizes.
        expansion_factor: MSCB expansion.
        dw_parallel: MSDC branch mode.
        add: MSCB branch combination (sum or concatenation).
        lgag_kernel_size: Kernel size of the LGAG convolutions.
        activation: MSCB activation.

    Shape:
        - Input: the encoder features, coarse to fine, each twice the size of the previous one.
        - Output: one ``(B, channels[s], h_s, w_s)`` map per level, coarse to fine.

    Example:
        >>> import torch
        >>> dec = EMCADDecoder(channels=(16, 8))
        >>> [tuple(d.shape) for d in dec([torch.zeros(1, 16, 2, 2), torch.zeros(1, 8, 4, 4)])]
        [(1, 16, 2, 2), (1, 8, 4, 4)]
    """

    def __init__(
        self,
        channels: Sequence[int],
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: int = 2,
        dw_parallel: bool = True,
        add: bool = True,
        lgag_kernel_size: int = 3,
        activation: Activation = "relu6",
    ) -> None:
        super().__init__()
        mscb = {
            "kernel_sizes": tuple(kernel_sizes),
            "expansion_factor": expansion_factor,
            "dw_parallel": dw_parallel,
            "add": add,
            "activation": activation,
        }
        self.mscbs = nn.ModuleList(MSCB(c, c, **mscb) for c in channels)
        self.cabs = nn.ModuleList(CAB(c) for c in channels)
        self.eucbs = nn.ModuleList(EUCB(c_in, c_out) for c_in, c_out in zip(channels[:-1], channels[1:]))
        self.lgags = nn.ModuleList(LGAG(c, kernel_size=lgag_kernel_size) for c in channels[1:])
        self.sab = SAB()  # one instance shared by every stage, as in the reference

    def _mscam(self, d: Tensor, stage: int) -> Tensor:
        d = self.cabs[stage](d) * d
        d = self.sab(d) * d
        return self.mscbs[stage](d)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Return the decoder features of every stage, coarse to fine."""
        d = self._mscam(features[0], 0)
        outputs = [d]
        for stage, (eucb, lgag, skip) in enumerate(zip(self.eucbs, self.lgags, features[1:]), start=1):
            d = eucb(d)
            d = d + lgag(g=d, x=skip)  # additive aggregation of the gated skip
            d = self._mscam(d, stage)
            outputs.append(d)
        return outputs


class GreyStemEncoder(nn.Module):
    """Optional ``Conv1x1(1->3) -> BN -> ReLU`` stem, then a ``features_only`` backbone; features coarse to fine.

    Args:
        stem: The grey-to-RGB stem, or ``nn.Identity()``.
        backbone: A timm ``features_only`` model.
        num_levels: How many of the deepest features to keep.
    """

    def __init__(self, stem: nn.Module, backbone: nn.Module, num_levels: int) -> None:
        super().__init__()
        self.stem = stem
        self.backbone = backbone
        self.num_levels = num_levels

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the ``num_levels`` deepest features, coarse to fine."""
        return self.backbone(self.stem(x))[-self.num_levels :][::-1]


class EMCADNet(DecoderHeadsNetwork):
    """PVT-EMCAD: a timm encoder, the EMCAD decoder and one 1x1 head per stage (``[p4, p3, p2, p1]``).

    With ``in_channels == 1`` the image goes through the reference's ``Conv1x1(1->3) -> BN -> ReLU`` stem before an
    RGB encoder; other channel counts are handed to timm (``in_chans``). The decoder uses the (up to) four deepest
    encoder features; channels and strides come from timm's ``feature_info``. The outputs stay at their native
    resolution (1/32, 1/16, 1/8, 1/4 for PVT); the reference upsamples them inside the network, here the loss and
    the export do.

    Args:
        num_classes: Logit channels ``C`` of every head.
        encoder: A timm model with ``features_only`` support whose levels double in stride (``pvt_v2_b0`` ..
            ``pvt_v2_b5``, ``resnet*``, ``convnext*``, ...).
        pretrained: Load timm's ImageNet weights for the encoder (downloads them).
        kernel_sizes: MSDC kernel sizes (odd).
        expansion_factor: MSCB expansion.
        lgag_kernel_size: LGAG kernel size (odd).
        activation: MSCB activation.
        in_channels: Image channels.
        dw_parallel: MSDC branch mode.
        add: MSCB branch combination.
        drop_path_rate: Stochastic depth of the encoder (0.1 in the reference PVT).
        encoder_kwargs: Extra keyword arguments for ``timm.create_model``.

    Shape:
        - Input: ``(B, in_channels, H, W)`` with ``H, W`` divisible by the encoder's largest stride (32 for PVT).
        - Output: 4 maps ``(B, C, H / r, W / r)``, ``r`` = 32, 16, 8, 4 for PVT (coarse to fine).

    Raises:
        ValueError: If ``encoder`` is not a timm model with ``features_only`` support, its strides do not double
            per level, or a decoder width is odd.
        ValueError: If an integer argument is not positive, a kernel size is even, or ``activation`` is unknown.
        ValueError: If the input shape does not match (see Shape).

    Example:
        >>> import torch
        >>> net = EMCADNet(num_classes=2, encoder="test_convnext", in_channels=1)
        >>> [tuple(p.shape) for p in net(torch.zeros(1, 1, 64, 64))]
        [(1, 2, 2, 2), (1, 2, 4, 4), (1, 2, 8, 8), (1, 2, 16, 16)]
    """

    def __init__(
        self,
        num_classes: int = 9,
        encoder: str = "pvt_v2_b2",
        pretrained: bool = False,
        kernel_sizes: Sequence[int] = (1, 3, 5),
        expansion_factor: int = 2,
        lgag_kernel_size: int = 3,
        activation: Activation = "relu6",
        in_channels: int = 1,
        dw_parallel: bool = True,
        add: bool = True,
        drop_path_rate: float = 0.1,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("expansion_factor", expansion_factor),
            ("lgag_kernel_size", lgag_kernel_size),
        ):
            check_positive_int(name, value)
        kernel_sizes = tuple(kernel_sizes)
        if not kernel_sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in kernel_sizes):
            raise LomixUserError(
                f"`kernel_sizes` must be a non-empty sequence of positive odd integers, got {kernel_sizes}."
            )
        for name, sizes in (("kernel_sizes", kernel_sizes), ("lgag_kernel_size", (lgag_kernel_size,))):
            if any(k % 2 == 0 for k in sizes):
                raise LomixUserError(f"`{name}` must be odd (to keep the spatial size), got {sizes}.")
        if activation not in ACTIVATIONS:
            raise LomixUserError(f"`activation` must be one of {ACTIVATIONS}, got {activation!r}.")
        if not timm.is_model(encoder):
            raise LomixUserError(f"`encoder` {encoder!r} is not a timm model (see `timm.list_models()`).")
        try:
            backbone = timm.create_model(
                encoder,
                pretrained=pretrained,
                features_only=True,
                in_chans=3 if in_channels == 1 else in_channels,
                drop_path_rate=drop_path_rate,
                **(encoder_kwargs or {}),
            )
        except RuntimeError as err:  # timm raises RuntimeError for models without a feature extractor
            raise LomixUserError(f"`encoder` {encoder!r} does not support features_only=True: {err}") from err
        num_levels = min(_MAX_LEVELS, len(backbone.feature_info.channels()))
        channels = tuple(backbone.feature_info.channels()[-num_levels:][::-1])  # coarse to fine
        reductions = tuple(backbone.feature_info.reduction()[-num_levels:][::-1])
        if num_levels < 2 or any(r_coarse != 2 * r_fine for r_coarse, r_fine in zip(reductions, reductions[1:])):
            raise LomixUserError(
                f"`encoder` {encoder!r} needs >= 2 feature levels whose stride doubles per level (EUCB upsamples 2x), "
                f"got strides {reductions[::-1]}."
            )
        if any(c % 2 for c in channels):
            raise LomixUserError(
                f"`encoder` {encoder!r} has an odd feature width in {channels}; LGAG needs even widths."
            )
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.num_outputs = num_levels
        self.reductions = reductions
        stem = (
            nn.Sequential(nn.Conv2d(1, 3, kernel_size=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True))
            if in_channels == 1
            else nn.Identity()
        )
        self.encoder = GreyStemEncoder(stem, backbone, num_levels)
        self.decoder = EMCADDecoder(
            channels,
            kernel_sizes=kernel_sizes,
            expansion_factor=expansion_factor,
            dw_parallel=dw_parallel,
            add=add,
            lgag_kernel_size=lgag_kernel_size,
            activation=activation,
        )
        self.heads = nn.ModuleList(nn.Conv2d(c, num_classes, kernel_size=1) for c in channels)

    def check_input(self, x: Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, H, W)`` with ``H, W`` divisible by the stride."""
        check_image_batch(x, self.in_channels)
        stride = self.reductions[0]
        if x.shape[-2] % stride or x.shape[-1] % stride:
            raise LomixUserError(f"EMCADNet needs H and W divisible by {stride}, got {tuple(x.shape[-2:])}.")
