"""The Combinatorial Mutation Module (CMM, paper Sec. 3.3): original maps plus every fused subset."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lomix_lightning.ops.subsets import OPERATORS, enumerate_subsets, map_names, validate_operators

_MAX_QUIET_OUTPUTS = 6


def fusion_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fusion and per-map losses run in: at least float32 (products of logits overflow float16).

    Example:
        >>> fusion_dtype(torch.bfloat16), fusion_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def full_precision(device: torch.device) -> AbstractContextManager:
    """A context that switches autocast off on ``device``, so fusion and losses stay in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def upsample_to(outputs: Sequence[Tensor], size: tuple[int, int], dtype: torch.dtype) -> list[Tensor]:
    """Cast maps to ``dtype`` and resize those of another size to ``size`` (bilinear, ``align_corners=False``)."""
    resized = []
    for out in outputs:
        out = out.to(dtype)
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        resized.append(out)
    return resized


def _subset_key(subset: tuple[int, ...]) -> str:
    return "_".join(str(i + 1) for i in subset)


class CombinatorialMutation(nn.Module):
    """Fuse every subset (``|S| >= 2``) of a network's output maps with the paper's operators.

    Maps are returned in :attr:`map_names` order: the ``L`` originals ``P1..PL`` (as the network returns them,
    coarse to fine), then for each operator every subset in ``itertools.combinations`` order. All maps are at the
    largest output resolution (bilinear, ``align_corners=False``) and computed in at least float32, also under
    autocast. ``cat`` holds one learned 1x1 convolution per subset (``|S|*C -> C``, Eq. 3); ``awf`` one learned 1x1
    convolution per subset over the concatenation (``|S|*C -> |S|`` scores, Eq. 4), softmax over the members per
    pixel, and the weighted sum of the member logits (Eq. 5). Only the chosen operators create parameters.

    Internally the per-subset convolutions of one operator run as a single block-sparse 1x1 convolution over all
    ``L*C`` input channels, ``add``/``mul`` reuse the result of each subset's prefix, and no map is copied into a
    stacked tensor.

    Args:
        num_outputs: Number ``L`` of maps the network returns.
        num_classes: Number ``C`` of channels of each map.
        operators: Operator keys among ``add``, ``mul``, ``cat``, ``awf``, applied in this order.

    Raises:
        ValueError: If ``num_outputs < 1``, ``num_classes < 1``, or an operator is unknown or repeated.

    Example:
        >>> cmm = CombinatorialMutation(num_outputs=3, num_classes=2)
        >>> len(cmm.map_names), cmm.map_names[:4]
        (19, ['P1', 'P2', 'P3', 'add(1,2)'])
        >>> maps = cmm([torch.randn(2, 2, 4, 4), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 16, 16)])
        >>> maps["awf(1,2,3)"].shape
        torch.Size([2, 2, 16, 16])
    """

    def __init__(self, num_outputs: int, num_classes: int, operators: Sequence[str] = OPERATORS) -> None:
        super().__init__()
        if not isinstance(num_outputs, int) or num_outputs < 1:
            raise ValueError(f"num_outputs must be an integer >= 1, got {num_outputs!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        self.operators = validate_operators(operators)
        if num_outputs > _MAX_QUIET_OUTPUTS and self.operators:
            warnings.warn(
                f"num_outputs={num_outputs}: the number of mutant maps grows as 2^L "
                f"({len(map_names(num_outputs, self.operators))} maps here); expect high memory use",
                stacklevel=2,
            )
        self.num_outputs = num_outputs
        self.num_classes = num_classes
        self.subsets = enumerate_subsets(num_outputs)
        self.map_names = map_names(num_outputs, self.operators)
        c, num_in = num_classes, num_outputs * num_classes
        if "cat" in self.operators:
            self.cat = nn.ModuleDict({_subset_key(s): nn.Conv2d(len(s) * c, c, 1) for s in self.subsets})
            self.register_buffer("_cat_index", self._block_index([c] * len(self.subsets), num_in), persistent=False)
        if "awf" in self.operators:
            self.awf = nn.ModuleDict({_subset_key(s): nn.Conv2d(len(s) * c, len(s), 1) for s in self.subsets})
            self.register_buffer(
                "_awf_index", self._block_index([len(s) for s in self.subsets], num_in), persistent=False
            )

    def _block_index(self, rows_per_subset: list[int], num_in: int) -> Tensor:
        """Flat positions in a dense ``(sum(rows), L*C)`` weight of each subset's ``(rows, |S|*C)`` weight."""
        c = self.num_classes
        index, row0 = [], 0
        for rows, subset in zip(rows_per_subset, self.subsets):
            for r in range(rows):
                for i in subset:  # column block of member i in the concatenation order
                    start = (row0 + r) * num_in + i * c
                    index.extend(range(start, start + c))
            row0 += rows
        return torch.tensor(index, dtype=torch.long)

    @staticmethod
    def _dense(
        convs: nn.ModuleDict, index: Tensor, rows: int, num_in: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """Assemble per-subset 1x1 convolutions into one block-sparse ``(rows, num_in, 1, 1)`` weight and a bias."""
        flat = torch.cat([conv.weight.reshape(-1) for conv in convs.values()]).to(dtype)
        weight = flat.new_zeros(rows * num_in).index_copy(0, index, flat)
        bias = torch.cat([conv.bias for conv in convs.values()]).to(dtype)
        return weight.view(rows, num_in, 1, 1), bias

    def validate(self, outputs: Sequence[Tensor]) -> None:
        """Check the network outputs: count, tensor type, 4-D, same batch size, ``num_classes`` channels.

        Raises:
            TypeError: If ``outputs`` is not a sequence of tensors.
            ValueError: On a wrong number of maps, a wrong rank, batch size or channel count.
        """
        if isinstance(outputs, Tensor) or not isinstance(outputs, Sequence):
            raise TypeError(
                f"outputs must be a list or tuple of {self.num_outputs} tensors (coarse to fine), "
                f"got {type(outputs).__name__}"
            )
        if len(outputs) != self.num_outputs:
            raise ValueError(f"expected {self.num_outputs} output maps (num_outputs), got {len(outputs)}")
        for i, out in enumerate(outputs):
            if not isinstance(out, Tensor):
                raise TypeError(f"output {i} (P{i + 1}) must be a Tensor, got {type(out).__name__}")
            if out.ndim != 4:
                raise ValueError(f"output P{i + 1} must have shape (B, C, H, W), got shape {tuple(out.shape)}")
            if out.shape[1] != self.num_classes:
                raise ValueError(
                    f"output P{i + 1} has {out.shape[1]} channels but num_classes={self.num_classes} "
                    f"(shape {tuple(out.shape)})"
                )
            if out.shape[0] != outputs[0].shape[0]:
                raise ValueError(
                    f"outputs have different batch sizes: P1 has {outputs[0].shape[0]}, P{i + 1} has {out.shape[0]}"
                )

    @staticmethod
    def output_size(outputs: Sequence[Tensor]) -> tuple[int, int]:
        """The largest spatial size among the outputs (by pixel count)."""
        largest = max(outputs, key=lambda t: t.shape[-1] * t.shape[-2])
        return int(largest.shape[-2]), int(largest.shape[-1])

    def prepare(self, outputs: Sequence[Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """Validate the outputs, cast them to the fusion dtype and resize them to the largest output size.

        Call under :func:`full_precision` to keep autocast off.

        Returns:
            The resized maps (a list of ``L`` tensors ``(B, C, H, W)``) and, if ``cat`` or ``awf`` is enabled, their
            channel concatenation ``(B, L*C, H, W)`` (else ``None``).
        """
        self.validate(outputs)
        maps = upsample_to(outputs, self.output_size(outputs), fusion_dtype(outputs[0].dtype))
        stacked = torch.cat(maps, dim=1) if {"cat", "awf"} & set(self.operators) else None  # (B, L*C, H, W)
        return maps, stacked

    def fuse(self, operator: str, maps: list[Tensor], stacked: Tensor | None) -> list[Tensor]:
        """One operator's mutants, one ``(B, C, H, W)`` map per subset in :attr:`subsets` order."""
        if operator not in self.operators:
            raise ValueError(f"operator {operator!r} is not enabled; enabled operators are {list(self.operators)}")
        return getattr(self, f"_fuse_{operator}")(maps, stacked)

    def forward(self, outputs: Sequence[Tensor]) -> dict[str, Tensor]:
        """Every supervised map by name (see :attr:`map_names`), each ``(B, C, H, W)``."""
        with full_precision(outputs[0].device if len(outputs) else torch.device("cpu")):
            maps, stacked = self.prepare(outputs)
            fused = [m for op in self.operators for m in self.fuse(op, maps, stacked)]
        return dict(zip(self.map_names, maps + fused))

    def _fuse_prefix(self, maps: list[Tensor], combine: Callable[[Tensor, Tensor], Tensor]) -> list[Tensor]:
        # combinations order lists every subset after its prefix, so each mutant costs one operation
        done: dict[tuple[int, ...], Tensor] = {}
        for s in self.subsets:
            head = maps[s[0]] if len(s) == 2 else done[s[:-1]]
            done[s] = combine(head, maps[s[-1]])
        return list(done.values())

    def _fuse_add(self, maps: list[Tensor], stacked: Tensor | None) -> list[Tensor]:
        return self._fuse_prefix(maps, torch.add)

    def _fuse_mul(self, maps: list[Tensor], stacked: Tensor | None) -> list[Tensor]:
        return self._fuse_prefix(maps, torch.mul)

    def _fuse_cat(self, maps: list[Tensor], stacked: Tensor) -> list[Tensor]:
        c, k = self.num_classes, len(self.subsets)
        weight, bias = self._dense(self.cat, self._cat_index, k * c, stacked.shape[1], stacked.dtype)
        fused = F.conv2d(stacked, weight, bias)  # (B, L*C, H, W) -> (B, K*C, H, W)
        return list(fused.split(c, dim=1))

    def _fuse_awf(self, maps: list[Tensor], stacked: Tensor) -> list[Tensor]:
        rows = sum(len(s) for s in self.subsets)
        weight, bias = self._dense(self.awf, self._awf_index, rows, stacked.shape[1], stacked.dtype)
        scores = F.conv2d(stacked, weight, bias)  # (B, sum|S|, H, W): each subset's member scores, in order
        fused, row0 = [], 0
        for s in self.subsets:
            attention = scores[:, row0 : row0 + len(s)].softmax(dim=1)  # (B, |S|, H, W)
            out = attention[:, :1] * maps[s[0]]
            for j, i in enumerate(s[1:], start=1):
                out = out + attention[:, j : j + 1] * maps[i]
            fused.append(out)
            row0 += len(s)
        return fused
