"""The fused CE + Dice engine of :class:`~lomix_lightning.LoMixLoss`: its one entry, and the packed kernel layout.

:func:`lomix_ce_dice_stats` scores the original maps and every operator's mutants (fusion, softmax, CE and Dice
statistics; only sums leave the forward) with a hand-written backward, through one of two engines:

* ``native``: the compiled CPU kernels (:mod:`lomix_lightning._engine.native`), which fuse and score each pixel block
  in cache and store no map; backward recomputes everything. They read the ``cat``/``awf`` convolutions *packed*:
  each subset's ``(rows, |S|*C, 1, 1)`` weight flattened, in subset order, into one flat weight (and the biases into
  one flat bias). This module alone knows that layout: :func:`pack` writes it, :func:`subset_layout` describes it.
* ``pytorch``: tensor operations (:mod:`lomix_lightning._engine.pytorch`), on any device, dtype and under
  ``torch.compile``; same values.

The caller hands the fusion parameters in (:class:`NativeInputs` or
:class:`~lomix_lightning._engine.pytorch.TorchInputs`); the engine never reads the mutation module.
:func:`resolve` picks the engine for given maps.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lomix_lightning._engine import pytorch as torch_engine
from lomix_lightning._engine._build import library, unavailable_reason
from lomix_lightning._engine.native import GroupSpec, groups_grad, groups_stats, unsupported, usable
from lomix_lightning._engine.plan import SubsetPlan
from lomix_lightning._engine.pytorch import TorchInputs
from lomix_lightning.losses.ce_dice import CEDiceTarget

EngineName = Literal["auto", "native", "torch"]
"""The engine choice of :class:`~lomix_lightning.LoMixLoss`: ``auto`` (the kernels where they run), or one forced."""

ENGINES: tuple[str, ...] = ("auto", "native", "torch")


class NativeInputs(NamedTuple):
    """The fusion parameters the compiled kernels read, handed in by the caller.

    Attributes:
        convolutions: ``cat``/``awf``: per subset (in subset order) the ``nn.Conv2d`` ``(weight, bias)``.
    """

    convolutions: dict[str, Sequence[tuple[Tensor, Tensor]]]


class GroupLayout(NamedTuple):
    """Where each subset's members and 1x1 convolution live in the flat arrays the kernels read.

    Attributes:
        members: int32, subset ``k`` is ``members[offsets[k]:offsets[k + 1]]``.
        offsets: int32 ``(K + 1,)``.
        woff: int64 ``(K,)`` start of subset ``k``'s ``(rows_k, |S| C)`` weight in the packed weight.
        boff: int64 ``(K,)`` start of its ``rows_k`` biases in the packed bias.
        weight_size: Length of the packed weight.
        bias_size: Length of the packed bias.
    """

    members: Tensor
    offsets: Tensor
    woff: Tensor
    boff: Tensor
    weight_size: int
    bias_size: int


def pack(convolutions: Sequence[tuple[Tensor, Tensor]], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The per-subset convolutions as one flat weight and one flat bias (differentiable): :func:`subset_layout`.

    Example:
        >>> weight, bias = pack([(torch.ones(2, 4, 1, 1), torch.zeros(2)), (torch.ones(2, 6, 1, 1), torch.ones(2))],
        ...                     torch.float32)  # fmt: skip
        >>> weight.shape, bias.tolist()
        (torch.Size([20]), [0.0, 0.0, 1.0, 1.0])
    """
    weight = torch.cat([w.reshape(-1) for w, _ in convolutions]).to(dtype)
    return weight, torch.cat([b for _, b in convolutions]).to(dtype)


def subset_layout(subsets: Sequence[Sequence[int]], num_classes: int = 1, rows: str = "none") -> GroupLayout:
    """The layout of ``subsets``; ``rows`` gives the 1x1 convolutions' outputs: ``"cat"`` (C), ``"awf"`` (``|S|``).

    Example:
        >>> layout = subset_layout([(0, 1), (0, 1, 2)], num_classes=2, rows="awf")
        >>> layout.members.tolist(), layout.offsets.tolist(), layout.woff.tolist(), layout.weight_size
        ([0, 1, 0, 1, 2], [0, 2, 5], [0, 8], 26)
    """
    members, offsets, woff, boff = [], [0], [], []
    weight_size = bias_size = 0
    for subset in subsets:
        members.extend(subset)
        offsets.append(offsets[-1] + len(subset))
        out_rows = {"cat": num_classes, "awf": len(subset), "none": 0}[rows]
        woff.append(weight_size)
        boff.append(bias_size)
        weight_size += out_rows * len(subset) * num_classes
        bias_size += out_rows
    as_int = functools.partial(torch.tensor, dtype=torch.int32)
    as_long = functools.partial(torch.tensor, dtype=torch.int64)
    return GroupLayout(as_int(members), as_int(offsets), as_long(woff), as_long(boff), weight_size, bias_size)


def identity_layout(num_maps: int) -> GroupLayout:
    """One-member subsets ``(0,), (1,), ...``: score the source maps themselves."""
    return subset_layout([(i,) for i in range(num_maps)])


def require_native() -> None:
    """Check that the compiled kernels can run in this process (builds them on first use).

    Raises:
        ValueError: Naming why they cannot (``LOMIX_NATIVE=0``, no C compiler, a failed build, ...).
    """
    if library() is None:
        why = unavailable_reason()
        raise ValueError(f"engine='native' cannot run here: {why}; use engine='auto' or engine='torch'")


def resolve(choice: EngineName, stacked: Tensor) -> Literal["native", "pytorch"]:
    """The engine that scores ``(B, L, C, H, W)`` maps for ``choice``.

    Raises:
        ValueError: If ``choice`` is ``"native"`` and the kernels cannot take these maps (the reason is named).
    """
    if choice == "torch":
        return "pytorch"
    compiling = torch.compiler.is_compiling()
    if choice == "auto":
        return "native" if not compiling and usable(stacked) else "pytorch"
    why = "torch.compile (the kernels are opaque to it)" if compiling else None
    why = why or unsupported(stacked.device, stacked.dtype, stacked.shape[2], stacked.shape[1])
    if why is None:
        require_native()
    else:
        raise ValueError(f"engine='native' cannot score these maps: {why}; use engine='auto' or engine='torch'")
    return "native"


def lomix_ce_dice_stats(
    stacked: Tensor,
    operators: Sequence[str],
    subsets: SubsetPlan,
    prepared: CEDiceTarget,
    inputs: NativeInputs | TorchInputs,
    memory_efficient: bool = False,
) -> Tensor:
    """CE + Dice statistics of the original maps and of every operator's mutants, differentiable.

    Args:
        stacked: ``(B, L, C, H, W)`` the original maps.
        operators: Operators whose mutants to score, in map order (may be empty).
        subsets: The subset plan.
        prepared: The target, from :func:`~lomix_lightning.losses.ce_dice.ce_dice_target`.
        inputs: The fusion parameters: :class:`NativeInputs` runs the compiled kernels (check :func:`resolve`
            first), :class:`~lomix_lightning._engine.pytorch.TorchInputs` the PyTorch engine.
        memory_efficient: PyTorch engine: keep only ``stacked`` for backward and recompute everything there, in
            chunks of images of at most 48 MiB of mutants per operator (the kernels keep nothing anyway).

    Returns:
        ``(L + K * len(operators), 1 + 2C)`` statistics, originals first (see
        :func:`~lomix_lightning.losses.ce_dice.ce_dice_from_stats`).

    Example:
        >>> from lomix_lightning import CombinatorialMutation
        >>> from lomix_lightning.losses.ce_dice import ce_dice_stats, ce_dice_target
        >>> x = torch.randn(2, 2, 3, 4, 4)  # (B, L, C, H, W)
        >>> prepared = ce_dice_target(torch.randint(0, 3, (2, 4, 4)), 3, torch.float32)
        >>> cmm = CombinatorialMutation(2, 3, ["mul"])
        >>> stats = lomix_ce_dice_stats(x, ["mul"], cmm.plan, prepared, cmm.engine_inputs("pytorch", x.dtype))
        >>> torch.allclose(stats[2], ce_dice_stats(x.prod(1, keepdim=True), prepared)[0], atol=1e-5)
        True
    """
    groups = ("original", *operators)
    if isinstance(inputs, NativeInputs):  # the kernels keep nothing, take the whole batch
        layouts = _kernel_layouts(subsets.subsets, stacked.shape[1], stacked.shape[2], groups)
        params = [p for op in operators for p in _packed(inputs, op, stacked.dtype)]
        return _LoMixStats.apply(_NativePlan(groups, prepared, layouts), stacked.contiguous(), None, *params)
    plan, params = torch_engine.plan(stacked, groups, subsets, prepared, inputs, memory_efficient)
    return _LoMixStats.apply(plan, stacked.contiguous(), inputs.block, *params)


def _packed(inputs: NativeInputs, op: str, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    return pack(inputs.convolutions[op], dtype) if op in ("cat", "awf") else (None, None)


@functools.lru_cache(maxsize=64)
def _kernel_layouts(
    subsets: tuple[tuple[int, ...], ...], num_maps: int, num_classes: int, groups: tuple[str, ...]
) -> tuple[GroupLayout, ...]:
    """Per group, the kernels' layout (built once per configuration, not on every step)."""
    return tuple(
        identity_layout(num_maps)
        if op == "original"
        else subset_layout(subsets, num_classes, op if op in ("cat", "awf") else "none")
        for op in groups
    )


@dataclass(frozen=True)
class _NativePlan:
    """What the kernels compute: operator groups (``"original"`` first), target, and per group its layout."""

    groups: tuple[str, ...]
    prepared: CEDiceTarget
    layouts: tuple[GroupLayout, ...]


class _LoMixStats(torch.autograd.Function):
    """CE + Dice statistics ``(M, 1 + 2C)`` of the original maps and all mutants, fusion and loss fused.

    Inputs after the plan: the maps, the PyTorch engine's dense ``cat``/``awf`` block (``None`` for the kernels), then
    per operator its ``(weight, bias)`` slots (the kernels: packed ``cat``/``awf`` parameters; PyTorch: ``add``/``mul``
    tables).
    """

    @staticmethod
    def forward(ctx, plan, stacked, block, *params):  # noqa: D102
        ctx.plan, ctx.num_params = plan, len(params)
        if isinstance(plan, _NativePlan):
            ctx.save_for_backward(stacked, *params)
            return torch.cat(groups_stats(_native_specs(plan, params), stacked, *_labels(plan)))
        stats, params, saved = torch_engine.forward(plan, stacked, block, params)
        ctx.save_for_backward(stacked, *params, *saved)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        plan, (stacked, *rest) = ctx.plan, ctx.saved_tensors
        params, rest = rest[: ctx.num_params], rest[ctx.num_params :]
        if isinstance(plan, _NativePlan):
            grad_stacked, *grad_params = _native_backward(plan, grad, stacked, params)
            return None, grad_stacked, None, *grad_params
        return None, *torch_engine.backward(plan, grad, stacked, params, rest, ctx.needs_input_grad[2])


def _labels(plan: _NativePlan) -> tuple[Tensor, Tensor | None]:
    return plan.prepared.target, plan.prepared.valid


def _native_specs(plan: _NativePlan, params: Sequence[Tensor | None]) -> list[GroupSpec]:
    """The kernels' group list: the original maps (``identity``), then each operator with its packed parameters."""
    slots = [(None, None), *zip(params[0::2], params[1::2])]  # per group, in plan.groups order
    return [
        GroupSpec("identity" if op == "original" else op, layout, *slot)
        for op, layout, slot in zip(plan.groups, plan.layouts, slots)
    ]


def _native_backward(
    plan: _NativePlan, grad: Tensor, stacked: Tensor, params: Sequence[Tensor | None]
) -> tuple[Tensor | None, ...]:
    """Gradients of the kernels' statistics: ``(grad stacked, *grad params)``; every fusion is recomputed."""
    specs = _native_specs(plan, params)
    grads = grad.split([spec.layout.offsets.numel() - 1 for spec in specs])
    grad_stacked = torch.empty_like(stacked)  # the original group, first, writes every element
    outs = groups_grad(specs, stacked, grads, *_labels(plan), grad_stacked)
    grad_params: list[Tensor | None] = []
    for out, weight, bias in zip(outs[1:], params[0::2], params[1::2]):  # out: cat/awf (grad weight, grad bias)
        parts = out or (None, None)
        grad_params += [part if p is not None and p.requires_grad else None for part, p in zip(parts, (weight, bias))]
    return grad_stacked, *grad_params


def native_stats(logits: Tensor, target: Tensor, valid: Tensor | None) -> Tensor | None:
    """``(K, 1 + 2C)`` CE + Dice statistics of ``(b, K, C, H, W)`` logits (as ``ce_dice_stats``), or ``None``.

    ``None`` when the kernels do not take these logits (see :func:`~lomix_lightning._engine.native.usable`).

    Example:
        >>> logits, target = torch.zeros(1, 1, 2, 1, 2), torch.zeros(1, 1, 2, dtype=torch.long)  # (b, K, C, H, W)
        >>> stats = native_stats(logits, target, None)  # [sum -log p_t, I_0, I_1, Q_0, Q_1]: 2 log 2, 1, 0, .5, .5
        >>> stats is None or stats.tolist() == [[1.3862943649291992, 1.0, 0.0, 0.5, 0.5]]
        True
    """
    if not usable(logits):
        return None
    return groups_stats([GroupSpec("identity", identity_layout(logits.shape[1]))], logits, target, valid)[0]


def native_grad(logits: Tensor, grad: Tensor, target: Tensor, valid: Tensor | None, out: Tensor) -> Tensor | None:
    """Gradient of ``sum(grad * stats)`` with respect to ``(b, K, C, H, W)`` logits, written to ``out``, or ``None``."""
    if not usable(logits):
        return None
    groups_grad([GroupSpec("identity", identity_layout(logits.shape[1]))], logits, [grad], target, valid, out)
    return out


__all__ = [
    "ENGINES",
    "EngineName",
    "GroupLayout",
    "NativeInputs",
    "TorchInputs",
    "identity_layout",
    "lomix_ce_dice_stats",
    "native_grad",
    "native_stats",
    "pack",
    "require_native",
    "resolve",
    "subset_layout",
]
