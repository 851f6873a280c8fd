"""The Combinatorial Mutation Module (CMM, paper Sec. 3.3): original maps plus every fused subset."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lomix_lightning._engine import NativeInputs, TorchInputs, pack
from lomix_lightning._engine.batched import FuseFunction
from lomix_lightning._engine.plan import SubsetPlan
from lomix_lightning._engine.pytorch import DenseSlice
from lomix_lightning.losses.precision import full_precision, fusion_dtype
from lomix_lightning.losses.subsets import OPERATORS, enumerate_subsets, map_names, validate_operators
from lomix_lightning.resize import resize_logits

__all__ = ["CombinatorialMutation", "as_planar", "upsample_to"]

_MAX_QUIET_OUTPUTS = 6


def upsample_to(outputs: Sequence[Tensor], size: tuple[int, ...], dtype: torch.dtype) -> list[Tensor]:
    """Cast maps to ``dtype`` and resize those of another size to ``size`` (bi/trilinear, ``align_corners=False``)."""
    resized = []
    for out in outputs:
        out = out.to(dtype)
        resized.append(resize_logits(out, size))
    return resized


def as_planar(stacked: Tensor) -> Tensor:
    """View stacked 3-D maps ``(B, L, C, D, H, W)`` as ``(B, L, C, D*H, W)``; 2-D maps pass unchanged.

    Every engine works per pixel and sums over all pixels of a map, so a volume's voxels become the pixels of one
    ``(D*H, W)`` image: CE means, Dice sums and the 1x1(x1) convolutions of ``cat``/``awf`` are then over all voxels.

    Example:
        >>> as_planar(torch.zeros(2, 3, 4, 5, 6, 7)).shape
        torch.Size([2, 3, 4, 30, 7])
    """
    return stacked.flatten(3, 4) if stacked.ndim == 6 else stacked  # (B, L, C, D, H, W) -> (B, L, C, D*H, W)


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
    Volumes ``(B, C, D, H, W)`` work alike: trilinear resize, and the 1x1 convolutions act per voxel (1x1x1).

    Internally the maps are stacked once into ``(B, L, C, H, W)``; each operator writes all its mutants into one
    ``(B, K, C, H, W)`` tensor with a hand-written backward: ``add``/``mul`` reuse the result of each subset's
    prefix, and the per-subset convolutions of ``cat``/``awf`` run as one block-sparse ``(rows, L*C)`` matrix product.

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
        self.plan = SubsetPlan.build(num_outputs)
        self.map_names = map_names(num_outputs, self.operators)
        incidence = torch.zeros(num_outputs, len(self.subsets))
        for k, subset in enumerate(self.subsets):
            incidence[list(subset), k] = 1.0
        self.register_buffer("_incidence", incidence, persistent=False)
        c, num_in = num_classes, num_outputs * num_classes
        if "cat" in self.operators:
            self.cat = nn.ModuleDict({_subset_key(s): nn.Conv2d(len(s) * c, c, 1) for s in self.subsets})
            self.register_buffer("_cat_index", self._block_index([c] * len(self.subsets), num_in), persistent=False)
        if "awf" in self.operators:
            self.awf = nn.ModuleDict({_subset_key(s): nn.Conv2d(len(s) * c, len(s), 1) for s in self.subsets})
            self.register_buffer("_awf_index", self._awf_dense_index(num_in), persistent=False)
            self.register_buffer("_awf_rows", self.plan.member_rows(num_outputs), persistent=False)
        if "mul" in self.operators:
            self.register_buffer("_mul_index", self.plan.index_table(), persistent=False)
            self.register_buffer("_mul_incidence", self.plan.member_incidence(), persistent=False)
        self.register_buffer("_dense_gather", self._dense_gather_index(), persistent=False)
        self.register_buffer("_dense_fill", torch.tensor([0.0, float("-inf")]), persistent=False)

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

    def _awf_dense_index(self, num_in: int) -> Tensor:
        """Flat positions in a dense ``(K*L, L*C)`` weight (row ``k*L + i``: subset ``k``'s score of map ``i``)."""
        c, num_maps = self.num_classes, self.num_outputs
        index = []
        for k, subset in enumerate(self.subsets):
            for i in subset:  # the conv's output rows, in member order
                for m in subset:  # column block of member m in the concatenation order
                    start = (k * num_maps + i) * num_in + m * c
                    index.extend(range(start, start + c))
        return torch.tensor(index, dtype=torch.long)

    @property
    def dense_operators(self) -> tuple[str, ...]:
        """The enabled operators with convolutions (``cat``/``awf``), in :attr:`operators` order."""
        return tuple(op for op in self.operators if op in ("cat", "awf"))

    def _dense_gather_index(self) -> Tensor:
        """Per element of :meth:`dense_block`, its position in the source ``[packed parameters..., 0, -inf]``."""
        num_in = self.num_outputs * self.num_classes
        sources, dense = 0, []  # (packed weight positions, packed bias positions, rows, weight index, bias rows)
        for op in self.dense_operators:
            index = self._cat_index if op == "cat" else self._awf_index
            rows = len(self.subsets) * (self.num_classes if op == "cat" else self.num_outputs)
            bias_rows = torch.arange(rows) if op == "cat" else self._awf_rows
            dense.append((sources, sources + index.numel(), rows, index, bias_rows))
            sources += index.numel() + bias_rows.numel()
        zero, minus_inf = sources, sources + 1  # the two fill values after the parameters
        parts = []
        for weight_start, bias_start, rows, index, bias_rows in dense:
            weight = torch.full((rows * num_in,), zero, dtype=torch.long)
            weight[index] = torch.arange(weight_start, weight_start + index.numel())
            bias = torch.full((rows,), zero if bias_rows.numel() == rows else minus_inf, dtype=torch.long)
            bias[bias_rows] = torch.arange(bias_start, bias_start + bias_rows.numel())
            parts += [weight, bias]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def dense_block(self, dtype: torch.dtype) -> Tensor | None:
        """Every :meth:`dense_parameters` weight and bias of :attr:`dense_operators` in one flat tensor.

        Built by one concatenation and one gather (differentiable); ``None`` without ``cat``/``awf``. Per operator
        in order: its ``(rows, L*C)`` dense weight, then its ``(rows,)`` dense bias.

        Example:
            >>> cmm = CombinatorialMutation(2, 2, ["cat", "awf"])
            >>> block, parts = cmm.dense_block(torch.float32), []
            >>> for op in cmm.dense_operators:
            ...     parts += [p.reshape(-1) for p in cmm.dense_parameters(op, torch.float32)]
            >>> torch.equal(block, torch.cat(parts))
            True
        """
        if not self.dense_operators:
            return None
        parts = []
        for op in self.dense_operators:
            convs = self.cat if op == "cat" else self.awf
            parts += [conv.weight.reshape(-1) for conv in convs.values()]
            parts += [conv.bias for conv in convs.values()]
        source = torch.cat([*parts, self._dense_fill.to(parts[0].dtype)]).to(dtype)
        return source.index_select(0, self._dense_gather)

    def dense_parameters(self, op: str, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
        """The per-subset 1x1 convolutions of ``cat``/``awf`` as one block-sparse ``(rows, L*C)`` weight and a bias.

        Differentiable: gradients reach each subset's convolution. ``cat``: ``(K*C, L*C)``; ``awf``: ``(K*L, L*C)``,
        row ``k*L + i`` the score of map ``i`` in subset ``k``, with zero weights and a ``-inf`` bias where ``i`` is not
        a member (its softmax weight is then exactly 0). The constant tables of the other operators: ``add``, the
        ``(L, K)`` 0/1 incidence of maps in subsets (its backward is one matrix product) and ``None``; ``mul``, the
        index table and member incidence of :class:`~lomix_lightning._engine.plan.SubsetPlan`.
        """
        if op == "add":
            return self._incidence.to(dtype), None
        if op == "mul":
            return self._mul_index, self._mul_incidence.to(dtype)
        if op not in ("cat", "awf"):
            return None, None
        flat, bias = pack(self.convolutions(op), dtype)  # subset by subset
        num_in = self.num_outputs * self.num_classes
        if op == "cat":
            rows = bias.shape[0]
            return flat.new_zeros(rows * num_in).index_copy(0, self._cat_index, flat).view(rows, num_in), bias
        rows = len(self.subsets) * self.num_outputs
        weight = flat.new_zeros(rows * num_in).index_copy(0, self._awf_index, flat).view(rows, num_in)
        return weight, bias.new_full((rows,), float("-inf")).index_copy(0, self._awf_rows, bias)

    def convolutions(self, op: str) -> list[tuple[Tensor, Tensor]]:
        """Per subset, in subset order, the ``(weight, bias)`` of ``cat``/``awf``'s 1x1 convolution (the parameters)."""
        return [(conv.weight, conv.bias) for conv in (self.cat if op == "cat" else self.awf).values()]

    def dense_slices(self) -> tuple[DenseSlice, ...]:
        """Per operator of :meth:`dense_block`: ``(operator, start, rows, L*C)``; its ``(rows,)`` bias follows."""
        num_in, start, slices = self.num_outputs * self.num_classes, 0, []
        for op in self.dense_operators:
            rows = len(self.subsets) * (self.num_classes if op == "cat" else self.num_outputs)
            slices.append((op, start, rows, num_in))
            start += rows * (num_in + 1)
        return tuple(slices)

    def engine_inputs(
        self, engine: Literal["native", "pytorch"], dtype: torch.dtype, operators: Sequence[str] | None = None
    ) -> NativeInputs | TorchInputs:
        """The parameters the loss engine needs to fuse ``operators`` (default: all enabled), handed to it.

        ``native``: the ``cat``/``awf`` convolutions; ``pytorch``: the dense block (built only when a scored operator
        needs it), its slices and the ``add``/``mul`` constant tables.
        """
        operators = self.operators if operators is None else tuple(operators)
        if engine == "native":
            return NativeInputs({op: self.convolutions(op) for op in operators if op in ("cat", "awf")})
        block = self.dense_block(dtype) if any(op in operators for op in self.dense_operators) else None
        tables = {op: self.dense_parameters(op, dtype) for op in operators if op in ("add", "mul")}
        return TorchInputs(block, self.dense_slices(), tables)

    def validate(self, outputs: Sequence[Tensor]) -> None:
        """Check the network outputs: count, tensor type, all 4-D or all 5-D, same batch size, ``num_classes`` channels.

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
            if out.ndim not in (4, 5):
                raise ValueError(
                    f"output P{i + 1} must have shape (B, C, H, W) or (B, C, D, H, W), got shape {tuple(out.shape)}"
                )
            if out.ndim != outputs[0].ndim:  # 3-D support: no mixing of 2-D and 3-D maps
                raise ValueError(
                    f"outputs mix 2-D and 3-D maps: P1 has shape {tuple(outputs[0].shape)}, "
                    f"P{i + 1} has shape {tuple(out.shape)}; all must be (B, C, H, W) or all (B, C, D, H, W)"
                )
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
    def output_size(outputs: Sequence[Tensor]) -> tuple[int, ...]:
        """The largest spatial size among the outputs (by pixel or voxel count): ``(H, W)`` or ``(D, H, W)``."""
        largest = max(outputs, key=lambda t: math.prod(t.shape[2:]))
        return tuple(int(s) for s in largest.shape[2:])

    def prepare(self, outputs: Sequence[Tensor]) -> Tensor:
        """Validate the outputs, cast them to the fusion dtype, resize them to the largest size and stack them.

        Call under :func:`full_precision` to keep autocast off.

        Returns:
            ``(B, L, C, H, W)``: the maps ``P1..PL``; 3-D maps as ``(B, L, C, D*H, W)`` (see :func:`as_planar`).
        """
        self.validate(outputs)
        return self.stack(outputs, self.output_size(outputs))

    @staticmethod
    def stack(outputs: Sequence[Tensor], size: tuple[int, ...]) -> Tensor:
        """:meth:`prepare` for outputs already validated, at their :meth:`output_size` ``size``."""
        stacked = torch.stack(upsample_to(outputs, size, fusion_dtype(outputs[0].dtype)), dim=1)
        return as_planar(stacked)  # 3-D: (B, L, C, D, H, W) -> (B, L, C, D*H, W)

    def fuse(self, operator: str, stacked: Tensor) -> Tensor:
        """One operator's mutants ``(B, K, C, H, W)``, one map per subset in :attr:`subsets` order."""
        if operator not in self.operators:
            raise ValueError(f"operator {operator!r} is not enabled; enabled operators are {list(self.operators)}")
        if not self.subsets:
            return stacked[:, :0]
        weight, bias = self.dense_parameters(operator, stacked.dtype)
        return FuseFunction.apply(operator, self.plan, stacked.contiguous(), weight, bias)

    def forward(self, outputs: Sequence[Tensor]) -> dict[str, Tensor]:
        """Every supervised map by name (see :attr:`map_names`), each ``(B, C, H, W)`` (3-D: ``(B, C, D, H, W)``)."""
        with full_precision(outputs[0].device if len(outputs) else torch.device("cpu")):
            stacked = self.prepare(outputs)
            groups = [stacked] + [self.fuse(op, stacked) for op in self.operators]
        size = self.output_size(outputs)
        groups = [g.reshape(*g.shape[:3], *size) for g in groups]  # 3-D: (B, K, C, D*H, W) -> (B, K, C, D, H, W)
        return dict(zip(self.map_names, [group[:, k] for group in groups for k in range(group.shape[1])]))
