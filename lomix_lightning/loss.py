"""LoMixLoss: the paper's total objective (Eq. 9) over original and mutant maps, with pluggable weighting."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from lomix_lightning.losses.ce_dice import (
    CEDiceTarget,
    ce_dice_backward,
    ce_dice_forward,
    ce_dice_from_stats,
    ce_dice_target,
    softmax,
)
from lomix_lightning.losses.structure import structure_loss
from lomix_lightning.mutation import (
    CombinatorialMutation,
    SubsetPlan,
    full_precision,
    fuse_backward,
    fuse_forward,
    fusion_dtype,
    upsample_to,
)
from lomix_lightning.ops.subsets import OPERATORS, map_family
from lomix_lightning.weighting import LossWeighting, WeightingName, build_weighting

Scheme = Literal["last_layer", "deep_supervision", "mutation", "lomix"]
LossName = Literal["ce_dice", "structure"]
PerMapLoss = Callable[[Tensor, Tensor], Tensor]

SCHEMES: dict[str, tuple[tuple[str, ...], str]] = {
    "last_layer": ((), "fixed"),
    "deep_supervision": ((), "fixed"),
    "mutation": (("add",), "fixed"),
    "lomix": (OPERATORS, "learned"),
}
"""Each supervision scheme's default operators and weighting."""


class LoMixLossOutput(NamedTuple):
    """What :class:`LoMixLoss` returns.

    Attributes:
        total: The scalar training loss ``sum(weights * per_map)``.
        per_map: ``(M,)`` unweighted per-map losses, in ``map_names`` order (detach before logging).
        weights: ``(M,)`` the weights used.
        original: Weighted loss of the network's own maps ``P1..PL`` (the part deep supervision would have).
        mutant: Weighted loss of the mutant maps (0 without operators).
    """

    total: Tensor
    per_map: Tensor
    weights: Tensor
    original: Tensor
    mutant: Tensor


class LoMixLoss(nn.Module):
    r"""Supervise a network's multi-scale outputs and their fused mutants with per-map weights (paper Eq. 9).

    .. math::
        \mathcal{L} = \sum_{i=1}^{L} w_i \mathcal{L}_i + \sum_{op} \sum_{S} w_S^{(op)} \mathcal{L}_S^{(op)}

    ``scheme`` picks the paper's four supervision settings; ``operators`` and ``weighting`` override its defaults, so
    every ablation (single operators, fixed vs learned, learned deep supervision) is one argument away:

    ===================  ==================================  ==========
    scheme               maps                                weighting
    ===================  ==================================  ==========
    ``last_layer``       ``PL`` only                         fixed 1
    ``deep_supervision`` ``P1..PL``                          fixed 1
    ``mutation``         ``P1..PL`` + every ``add`` subset   fixed 1
    ``lomix``            ``P1..PL`` + add, mul, cat, awf     learned
    ===================  ==================================  ==========

    With ``ce_dice`` one fused engine computes every map: each operator writes all its mutants into one tensor, one
    softmax serves CE and Dice, and the backward is written by hand (keeping at most the softmax, see
    ``memory_efficient``). No host synchronisation; at least float32 even under autocast. On the CPU the batch is
    processed a few images at a time through scratch buffers that each thread keeps and reuses across calls.

    Args:
        num_outputs: Number ``L`` of maps the network returns (coarse to fine; the last is the prediction).
        num_classes: Number ``C`` of classes (1 for binary segmentation with the ``structure`` loss).
        scheme: Supervision scheme, see the table.
        operators: Operators to apply, overriding the scheme's (``None`` keeps them).
        weighting: ``"learned"`` (softplus of a raw ``alpha`` per map, ``alpha`` starting at 0), ``"fixed"`` (1), or
            a :class:`~lomix_lightning.weighting.LossWeighting` instance; ``None`` keeps the scheme's.
        loss: Per-map loss: ``"ce_dice"`` (multi-class), ``"structure"`` (binary), or any callable
            ``(logits (B, C, H, W), target) -> scalar``, applied to each map in turn.
        ce_weight: Cross-entropy coefficient of ``ce_dice`` (paper: 0.3).
        dice_weight: Dice coefficient of ``ce_dice`` (paper: 0.7).
        ignore_index: A label value to ignore in ``ce_dice``.
        check_target: Check that labels lie in ``[0, C)`` (one device-to-host sync per call; switch off for speed
            once the data is trusted).
        memory_efficient: Keep nothing but the stacked maps for backward and recompute every operator's mutants and
            softmax there, one image at a time (for a loss other than ``ce_dice``: ``torch.utils.checkpoint`` per
            operator). Same values and gradients, for a second fusion and softmax in backward. By default the
            softmax of the original and ``cat`` maps is kept and the ``add``/``mul``/``awf`` mutants are recomputed,
            which bounds the loss's extra memory to about ``L + K`` softmax maps.

    Raises:
        ValueError: On an unknown scheme, operator, weighting or loss, ``num_outputs < 1``, operators given with
            ``last_layer``, or a loss that does not fit ``num_classes``.

    Example:
        >>> loss = LoMixLoss(num_outputs=2, num_classes=3)
        >>> loss.map_names
        ['P1', 'P2', 'add(1,2)', 'mul(1,2)', 'cat(1,2)', 'awf(1,2)']
        >>> outputs = [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)]
        >>> result = loss(outputs, torch.randint(0, 3, (2, 8, 8)))
        >>> result.per_map.shape, round(result.weights[0].item(), 4)
        (torch.Size([6]), 0.6931)
        >>> result.total.backward()
    """

    def __init__(
        self,
        num_outputs: int,
        num_classes: int,
        scheme: Scheme = "lomix",
        operators: Sequence[str] | None = None,
        weighting: WeightingName | LossWeighting | None = None,
        loss: LossName | PerMapLoss = "ce_dice",
        ce_weight: float = 0.3,
        dice_weight: float = 0.7,
        ignore_index: int | None = None,
        check_target: bool = True,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; allowed schemes are {list(SCHEMES)}")
        default_operators, default_weighting = SCHEMES[scheme]
        if scheme == "last_layer" and operators:
            raise ValueError(
                f"scheme 'last_layer' supervises only the last map; operators must be empty, got {operators!r}"
            )
        self.scheme = scheme
        self.mutation = CombinatorialMutation(
            num_outputs, num_classes, default_operators if operators is None else operators
        )
        self.num_outputs, self.num_classes = num_outputs, num_classes
        self.operators = self.mutation.operators
        if scheme == "last_layer":
            self.map_names = [f"P{num_outputs}"]
        else:
            self.map_names = list(self.mutation.map_names)
        self.map_families = [map_family(name) for name in self.map_names]
        self.weighting = build_weighting(default_weighting if weighting is None else weighting, len(self.map_names))
        self.ignore_index = ignore_index
        self.check_target = check_target
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"memory_efficient must be True or False, got {memory_efficient!r}")
        self.memory_efficient = memory_efficient
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)
        self.loss_name, self._per_map_loss = self._build_loss(loss, ce_weight, dice_weight, ignore_index)

    def _build_loss(
        self, loss: LossName | PerMapLoss, ce_weight: float, dice_weight: float, ignore_index: int | None
    ) -> tuple[str, PerMapLoss | None]:
        if callable(loss):
            return getattr(loss, "__name__", type(loss).__name__), loss
        if loss == "ce_dice":
            if self.num_classes < 2:
                raise ValueError(
                    f"loss='ce_dice' needs num_classes >= 2 (softmax over classes), got num_classes={self.num_classes};"
                    " use loss='structure' for binary segmentation with one output channel"
                )
            if ce_weight < 0 or dice_weight < 0:
                raise ValueError(f"ce_weight and dice_weight must be >= 0, got {ce_weight} and {dice_weight}")
            return loss, None  # the fused engine (_LoMixStats)
        if loss == "structure":
            if self.num_classes != 1:
                raise ValueError(
                    f"loss='structure' is binary and needs num_classes=1, got num_classes={self.num_classes}"
                )
            if ignore_index is not None:
                raise ValueError(f"loss='structure' does not support ignore_index (got {ignore_index})")
            return loss, structure_loss
        raise ValueError(
            f"unknown loss {loss!r}; allowed are 'ce_dice', 'structure' or a callable (logits, target) -> scalar"
        )

    @property
    def num_maps(self) -> int:
        """Number ``M`` of supervised maps."""
        return len(self.map_names)

    @property
    def learnable(self) -> bool:
        """Whether the weights are learned."""
        return self.weighting.learnable

    def weights(self) -> Tensor:
        """The ``(M,)`` current weights."""
        return self.weighting()

    def weights_dict(self) -> dict[str, float]:
        """``{map name: weight}`` as Python floats, for logging (one host sync)."""
        return dict(zip(self.map_names, self.weights().detach().float().cpu().tolist()))

    def _target(self, target: Tensor, size: tuple[int, int], batch: int) -> Tensor:
        binary = self.num_classes == 1
        if binary and target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        expected = (batch, *size)
        if tuple(target.shape) != expected:
            extra = " or (B, 1, H, W)" if binary else ""
            raise ValueError(
                f"target has shape {tuple(target.shape)}, expected (B, H, W){extra} = {expected} "
                "to match the batch size and the largest output resolution"
            )
        if not binary and (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
            raise TypeError(
                f"target must hold integer class indices for num_classes={self.num_classes}, got {target.dtype}"
            )
        if self.check_target:
            high = 1 if binary else self.num_classes - 1
            bad = (target < 0) | (target > high)
            if self.ignore_index is not None:
                bad &= target != self.ignore_index
            if bool(bad.any()):
                values = torch.unique(target[bad])[:10].tolist()
                allowed = "[0, 1]" if binary else f"[0, {self.num_classes})"
                ignore = f" or ignore_index={self.ignore_index}" if self.ignore_index is not None else ""
                raise ValueError(f"target holds labels {values} outside {allowed}{ignore}")
        return target

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> LoMixLossOutput:
        """Compute the weighted total over all supervised maps.

        Args:
            outputs: ``L`` logit maps ``(B, C, H_l, W_l)``, coarse to fine; they are resized to the largest one.
            target: ``(B, H, W)`` class indices at the largest output resolution (binary: ``(B, H, W)`` or
                ``(B, 1, H, W)`` with values in ``[0, 1]``).

        Returns:
            A :class:`LoMixLossOutput`.
        """
        device = outputs[0].device if isinstance(outputs, Sequence) and len(outputs) else torch.device("cpu")
        with full_precision(device):
            if self.scheme == "last_layer":
                self.mutation.validate(outputs)
                size = self.mutation.output_size(outputs)
                stacked = upsample_to([outputs[-1]], size, fusion_dtype(outputs[-1].dtype))[0].unsqueeze(1)
                operators, unused = (), outputs[:-1]
            else:
                operators = self.operators if self.mutation.subsets else ()  # one map: no subset to fuse
                stacked, unused = self.mutation.prepare(outputs), ()
            target = self._target(target, tuple(stacked.shape[-2:]), stacked.shape[0])
            if self._per_map_loss is None:
                per_map = self._ce_dice_maps(stacked, operators, target)
            else:
                per_map = torch.cat([self._group_loss(op, stacked, target) for op in ("original", *operators)])
            weights = self.weights().to(per_map.dtype)
            weighted = weights * per_map
            num_original = stacked.shape[1]
            original = weighted[:num_original].sum()
            for out in unused:  # a zero-weighted term keeps maps this scheme ignores in the graph (DDP needs that)
                original = original + 0.0 * out.sum()
            mutant = weighted[num_original:].sum()
            return LoMixLossOutput(original + mutant, per_map, weights, original, mutant)

    def _ce_dice_maps(self, stacked: Tensor, operators: Sequence[str], target: Tensor) -> Tensor:
        """``(M,)`` CE + Dice of every map through the fused engine."""
        prepared = ce_dice_target(target, self.num_classes, stacked.dtype, self.ignore_index)
        params = [p for op in operators for p in self.mutation.dense_parameters(op, stacked.dtype)]
        groups = ("original", *operators)
        keep = tuple(not self.memory_efficient and op in _KEPT for op in groups)
        chunk = _chunk_size(stacked, len(self.mutation.subsets), self.memory_efficient)
        plan = _EnginePlan(groups, self.mutation.plan, prepared, chunk, keep)
        stats = _LoMixStats.apply(plan, stacked.contiguous(), *params)
        return ce_dice_from_stats(stats, prepared, self.ce_weight, self.dice_weight)

    def _group_loss(self, op: str, stacked: Tensor, target: Tensor) -> Tensor:
        """``(K,)`` losses of one operator's maps with a per-map loss other than ``ce_dice``."""

        def losses(stacked: Tensor) -> Tensor:
            maps = stacked if op == "original" else self.mutation.fuse(op, stacked)  # (B, K, C, H, W)
            if self.loss_name == "structure":
                return self._per_map_loss(maps, target)
            return torch.stack([self._per_map_loss(maps[:, k], target).reshape(()) for k in range(maps.shape[1])])

        if self.memory_efficient and torch.is_grad_enabled():
            return checkpoint(losses, stacked, use_reentrant=False)
        return losses(stacked)

    def extra_repr(self) -> str:
        """Summary shown in ``print(module)``."""
        return (
            f"scheme={self.scheme!r}, num_outputs={self.num_outputs}, num_classes={self.num_classes}, "
            f"operators={list(self.operators)}, maps={self.num_maps}, loss={self.loss_name!r}"
        )


_CPU_CHUNK_BYTES = 48 * 2**20
"""Size of one operator's mutants for a chunk of images on the CPU (the reused buffers are about three of these)."""

_KEPT = ("original", "cat")
"""Groups whose softmax the default engine keeps for backward (the others are recomputed, to bound memory)."""


@dataclass(frozen=True)
class _EnginePlan:
    """What :class:`_LoMixStats` computes: operator groups (``"original"`` first), target, chunking, kept groups."""

    groups: tuple[str, ...]
    subsets: SubsetPlan
    prepared: CEDiceTarget
    chunk: int
    keep: tuple[bool, ...]


class _LoMixStats(torch.autograd.Function):
    """CE + Dice statistics ``(M, 1 + 2C)`` of the original maps and all mutants, fusion and loss fused.

    The batch is processed ``plan.chunk`` images at a time, each operator's mutants written into one reused
    buffer. For the groups in ``plan.keep`` the softmax (and the ``mul`` products, the ``awf`` attention) is kept
    for backward; the other groups' mutants and softmax are recomputed there, chunk by chunk.
    """

    @staticmethod
    def forward(ctx, plan, stacked, *params):  # noqa: D102
        batch, _, c, h, w = stacked.shape
        num_subsets = len(plan.subsets.subsets)
        softmaxes = [
            stacked.new_empty(batch, stacked.shape[1] if op == "original" else num_subsets, c, h, w) if keep else None
            for op, keep in zip(plan.groups, plan.keep)
        ]
        kept_mul = any(keep and op == "mul" for op, keep in zip(plan.groups, plan.keep))
        products = stacked.new_empty(batch, num_subsets, c, h, w) if kept_mul else None
        attention, chunk_stats = [], []
        for start in range(0, batch, plan.chunk):
            end = start + plan.chunk
            x, target = stacked[start:end], _target_chunk(plan.prepared, start, plan.chunk)
            stats = []
            for g, (op, keep) in enumerate(zip(plan.groups, plan.keep)):
                fused, aux = _fuse(
                    op, x, plan.subsets, params, g, products[start:end] if keep and op == "mul" else None
                )
                out = softmaxes[g][start:end] if keep else _workspace("softmax", fused)
                stats.append(ce_dice_forward(fused, *target, out=out)[1])
                if keep and op == "awf":
                    attention.append(aux)
            chunk_stats.append(torch.cat(stats))
        ctx.plan, ctx.num_params = plan, len(params)
        ctx.save_for_backward(stacked, products, *params, *softmaxes, *attention)
        return torch.stack(chunk_stats).sum(dim=0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        plan, (stacked, products, *rest) = ctx.plan, ctx.saved_tensors
        params, rest = rest[: ctx.num_params], rest[ctx.num_params :]
        softmaxes, attention = rest[: len(plan.groups)], rest[len(plan.groups) :]
        grad_stacked = torch.empty_like(stacked)  # the original group, first, writes every element
        grad_params = [None if p is None or not p.requires_grad else torch.zeros_like(p) for p in params]
        with torch.autocast(device_type=stacked.device.type, enabled=False):
            for c, start in enumerate(range(0, stacked.shape[0], plan.chunk)):
                end = start + plan.chunk
                x, (target, valid, _) = stacked[start:end], _target_chunk(plan.prepared, start, plan.chunk)
                grad_x, row = grad_stacked[start:end], 0
                for g, (op, keep) in enumerate(zip(plan.groups, plan.keep)):
                    if keep:
                        fused = products[start:end] if op == "mul" else x if op == "original" else None
                        aux = attention[c] if op == "awf" else None
                        p = softmaxes[g][start:end]
                    else:
                        fused, aux = _fuse(op, x, plan.subsets, params, g)
                        p = softmax(fused, out=_workspace("softmax", fused))
                    rows = grad[row : row + p.shape[1]]
                    row += p.shape[1]
                    if op == "original":
                        ce_dice_backward(p, rows, target, valid, out=grad_x)
                        continue
                    grad_fused = ce_dice_backward(p, rows, target, valid, out=_workspace("grad", p))
                    fuse_backward(
                        op,
                        x,
                        fused,
                        aux,
                        grad_fused,
                        grad_x,
                        plan.subsets,
                        params[2 * g - 2],
                        grad_params[2 * g - 2 : 2 * g],
                    )
        return None, grad_stacked, *grad_params


def _fuse(
    op: str, x: Tensor, subsets: SubsetPlan, params: Sequence[Tensor | None], group: int, into: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """One operator group of a chunk: ``(b, K, C, H, W)`` maps (in ``into`` or a workspace) and the fusion's extra."""
    if op == "original":
        return x, None
    b, _, c, h, w = x.shape
    if into is None:
        into = _workspace("fused", x, (b, len(subsets.subsets), c, h, w))
    return into, fuse_forward(op, x, into, subsets, params[2 * group - 2], params[2 * group - 1])


def _chunk_size(stacked: Tensor, num_subsets: int, memory_efficient: bool) -> int:
    """Images per chunk: one when saving memory; on the CPU as many as fit the cached buffers; else the batch."""
    batch, num_maps, c, h, w = stacked.shape
    if memory_efficient:
        return 1
    if stacked.device.type != "cpu":
        return batch
    per_image = max(num_maps, num_subsets) * c * h * w * stacked.element_size()
    return max(1, min(batch, _CPU_CHUNK_BYTES // per_image))


def _target_chunk(prepared: CEDiceTarget, start: int, size: int) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(target, valid, onehot)`` of images ``start .. start + size``."""
    valid = None if prepared.valid is None else prepared.valid[start : start + size]
    return prepared.target[start : start + size], valid, prepared.onehot[start : start + size]


_WORKSPACE = threading.local()


def _workspace(name: str, like: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """A scratch tensor of ``shape`` (default ``like.shape``), reused across calls on the CPU.

    Fresh large CPU allocations are returned to the OS on free and page-faulted back in on first touch, which costs
    more than the arithmetic here; each thread keeps one buffer per name and grows it as needed. On other devices
    the caching allocator already reuses memory, so this is ``like.new_empty(shape)``.
    """
    shape = tuple(like.shape if shape is None else shape)
    if like.device.type != "cpu":
        return like.new_empty(shape)
    cache = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel, key = math.prod(shape), (name, like.dtype, torch.is_inference_mode_enabled())
    buffer = cache.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = cache[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)
