"""LoMixLoss: the paper's total objective (Eq. 9) over original and mutant maps, with pluggable weighting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lomix_lightning.losses.ce_dice import ce_dice_from_stats, ce_dice_target
from lomix_lightning.losses.engine import lomix_ce_dice_stats
from lomix_lightning.losses.structure import structure_loss
from lomix_lightning.mutation import CombinatorialMutation, as_planar, full_precision, fusion_dtype, upsample_to
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
    ``memory_efficient``). No host synchronisation; at least float32 even under autocast. On the CPU (float32, at most
    32 classes and 16 outputs) compiled kernels (:mod:`lomix_lightning.native`) do each operator's fusion, softmax,
    CE and Dice per block of pixels without storing any map, and recompute them in backward; elsewhere, or with
    ``LOMIX_NATIVE=0``, tensor operations do (same values).

    Args:
        num_outputs: Number ``L`` of maps the network returns (coarse to fine; the last is the prediction). With
            ``L = 1`` no subset has two maps, so operators add no mutant and every scheme supervises ``P1`` alone.
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
            softmax there, in chunks of images of at most 48 MiB of mutants per operator (for a loss other than
            ``ce_dice``: ``torch.utils.checkpoint`` per operator). Same values and gradients, for a second fusion and
            softmax in backward. By default the softmax of the original and ``cat`` maps is kept and the
            ``add``/``mul``/``awf`` mutants are recomputed, which bounds the loss's extra memory to about ``L + K``
            softmax maps. The CPU kernels keep nothing either way, so there this option changes nothing.

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
        # The full weight vector of the last forward, detached: under FSDP the parameters outside forward are this
        # rank's shard (a plain attribute: FSDP neither shards nor gathers it, DDP does not broadcast it).
        self._last_weights: Tensor | None = None

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
            return loss, None  # the fused engine (losses/engine.py)
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

    def current_weights(self) -> Tensor:
        """The ``(M,)`` current weights, detached, also where the parameters are sharded (FSDP).

        The live :meth:`weights` when they are whole; where a sharding strategy leaves this rank only a shard of
        the weight parameters outside forward (FSDP with ``use_orig_params=True``: ``alpha`` of shape ``(0,)`` on
        some ranks), the full weights of the last forward (with the values of before the last optimizer step if
        no forward ran since). No collective call, so any rank may call it alone.

        Raises:
            RuntimeError: If the weights are sharded and no forward has run yet.

        Example:
            >>> LoMixLoss(num_outputs=2, num_classes=2, scheme="deep_supervision").current_weights()
            tensor([1., 1.])
        """
        live = self.weights().detach()
        if type(live) is Tensor and tuple(live.shape) == (self.num_maps,):  # a DTensor shard is not whole
            return live
        if self._last_weights is None:
            raise RuntimeError(
                f"the loss weights are sharded on this rank (shape {tuple(live.shape)}, expected ({self.num_maps},))"
                " and no forward has run yet to record the full vector"
            )
        return self._last_weights

    def weights_dict(self) -> dict[str, float]:
        """``{map name: weight}`` as Python floats, for logging (one host sync); see :meth:`current_weights`."""
        return dict(zip(self.map_names, self.current_weights().float().cpu().tolist()))

    def _target(self, target: Tensor, size: tuple[int, ...], batch: int, check: bool) -> Tensor:
        binary = self.num_classes == 1
        if binary and target.ndim == len(size) + 2 and target.shape[1] == 1:
            target = target[:, 0]
        expected = (batch, *size)
        if tuple(target.shape) != expected:
            dims = "D, H, W" if len(size) == 3 else "H, W"
            extra = f" or (B, 1, {dims})" if binary else ""
            raise ValueError(
                f"target has shape {tuple(target.shape)}, expected (B, {dims}){extra} = {expected} "
                "to match the batch size and the largest output resolution"
            )
        if not binary and (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
            raise TypeError(
                f"target must hold integer class indices for num_classes={self.num_classes}, got {target.dtype}"
            )
        if check:
            high = 1 if binary else self.num_classes - 1
            bad = (target < 0) | (target > high)
            if self.ignore_index is not None:
                bad &= target != self.ignore_index
            allowed = "[0, 1]" if binary else f"[0, {self.num_classes})"
            ignore = f" or ignore_index={self.ignore_index}" if self.ignore_index is not None else ""
            if torch.compiler.is_compiling():  # no host read inside a compiled graph: a device-side assertion
                torch._assert_async(~bad.any(), f"target holds labels outside {allowed}{ignore}")
            elif bool(bad.any()):
                values = torch.unique(target[bad])[:10].tolist()
                raise ValueError(f"target holds labels {values} outside {allowed}{ignore}")
        return target

    def forward(
        self, outputs: Sequence[Tensor], target: Tensor, *, check_target: bool | None = None
    ) -> LoMixLossOutput:
        """Compute the weighted total over all supervised maps.

        Args:
            outputs: ``L`` logit maps ``(B, C, H_l, W_l)``, coarse to fine; they are resized to the largest one.
            target: ``(B, H, W)`` class indices at the largest output resolution (binary: ``(B, H, W)`` or
                ``(B, 1, H, W)`` with values in ``[0, 1]``).
            check_target: Check the label range in this call (one device-to-host sync); ``None`` = the
                ``check_target`` given at construction. The Lightning module checks labels on the host before
                they reach the device and passes ``False``.

        Returns:
            A :class:`LoMixLossOutput`.

        Raises:
            TypeError: If ``outputs`` is not a list of tensors or ``target`` not a tensor (integer for ``ce_dice``).
            ValueError: On a wrong number, shape or channel count of maps, outputs and target on different devices
                (both named), an empty batch (refused whichever engine would run), or labels out of range.
        """
        self.mutation.validate(outputs)
        _check_devices_and_batch(outputs, target)
        size = self.mutation.output_size(outputs)  # (H, W), or (D, H, W) for 3-D maps
        if len(size) == 3 and self.loss_name == "structure":
            raise ValueError("loss='structure' is 2-D only (its boundary weight pools over H, W); use 'ce_dice'")
        with full_precision(outputs[0].device):
            if self.scheme == "last_layer":
                stacked = upsample_to([outputs[-1]], size, fusion_dtype(outputs[-1].dtype))[0].unsqueeze(1)
                stacked = as_planar(stacked)  # 3-D: (B, 1, C, D, H, W) -> (B, 1, C, D*H, W)
                operators, unused = (), outputs[:-1]
            else:
                operators = self.operators if self.mutation.subsets else ()  # one map: no subset to fuse
                stacked, unused = self.mutation.prepare(outputs), ()
            check = self.check_target if check_target is None else check_target
            target = self._target(target, size, stacked.shape[0], check)
            target = target.reshape(stacked.shape[0], *stacked.shape[-2:])  # 3-D: (B, D, H, W) -> (B, D*H, W)
            if self._per_map_loss is None:
                per_map = self._ce_dice_maps(stacked, operators, target)
            else:
                per_map = torch.cat([self._group_loss(op, stacked, target, size) for op in ("original", *operators)])
            weights = self.weights().to(per_map.dtype)
            self._last_weights = weights.detach()
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
        stats = lomix_ce_dice_stats(stacked, operators, self.mutation, prepared, self.memory_efficient)
        return ce_dice_from_stats(stats, prepared, self.ce_weight, self.dice_weight)

    def _group_loss(self, op: str, stacked: Tensor, target: Tensor, size: tuple[int, ...]) -> Tensor:
        """``(K,)`` losses of one operator's maps with a per-map loss other than ``ce_dice``."""
        target = target.reshape(target.shape[0], *size)  # 3-D: back to (B, D, H, W) for the user's loss

        def losses(stacked: Tensor) -> Tensor:
            maps = stacked if op == "original" else self.mutation.fuse(op, stacked)  # (B, K, C, H, W)
            maps = maps.reshape(*maps.shape[:3], *size)  # 3-D: (B, K, C, D*H, W) -> (B, K, C, D, H, W)
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


def _check_devices_and_batch(outputs: Sequence[Tensor], target: Tensor) -> None:
    """One device for every output and the target, and a non-empty batch (both engines refuse B = 0 alike)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor of class indices, got {type(target).__name__}")
    devices = [str(out.device) for out in outputs]
    if len(set(devices)) > 1:
        where = ", ".join(f"P{i + 1} on {device}" for i, device in enumerate(devices))
        raise ValueError(f"the outputs are on different devices ({where}); move them to one device")
    if target.device != outputs[0].device:
        raise ValueError(
            f"the outputs are on {outputs[0].device} but the target is on {target.device}; "
            "move the target to the outputs' device (e.g. target.to(outputs[0].device))"
        )
    if outputs[0].shape[0] == 0:
        raise ValueError(
            f"the batch is empty: the outputs have batch size 0 (P1 shape {tuple(outputs[0].shape)}); "
            "a loss over no image is undefined; skip empty batches before the loss"
        )
