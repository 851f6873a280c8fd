"""LoMixLoss: the paper's total objective (Eq. 9) over original and mutant maps, with pluggable weighting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lomix_lightning._engine import ENGINES, EngineName, lomix_ce_dice_stats, require_native, resolve
from lomix_lightning._engine.native import engine as native_engine
from lomix_lightning.losses.ce_dice import ce_dice_from_stats, ce_dice_target
from lomix_lightning.losses.checks import PerMapLoss, check_devices_and_batch, checked_target, per_map_loss
from lomix_lightning.losses.mutation import CombinatorialMutation, as_planar, upsample_to
from lomix_lightning.losses.precision import full_precision, fusion_dtype
from lomix_lightning.losses.subsets import OPERATORS, map_family
from lomix_lightning.losses.weighting import LossWeighting, WeightingName, build_weighting

Scheme = Literal["last_layer", "deep_supervision", "mutation", "lomix"]
LossName = Literal["ce_dice", "structure"]

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
        total: The scalar training loss ``sum(weights * per_map)`` (plus the weighting's own term, if it has one).
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
    32 classes and 16 outputs) compiled kernels (:mod:`lomix_lightning._engine.native`) do each operator's fusion,
    softmax, CE and Dice per block of pixels without storing any map, and recompute them in backward; elsewhere, or with
    ``LOMIX_NATIVE=0``, tensor operations do (same values).

    Args:
        num_outputs: Number ``L`` of maps the network returns (coarse to fine; the last is the prediction). With
            ``L = 1`` no subset has two maps, so operators add no mutant and every scheme supervises ``P1`` alone.
        num_classes: Number ``C`` of classes (1 for binary segmentation with the ``structure`` loss).
        scheme: Supervision scheme, see the table.
        operators: Operators to apply, overriding the scheme's (``None`` keeps them).
        weighting: ``"learned"`` (softplus of a raw ``alpha`` per map, ``alpha`` starting at 0), ``"fixed"`` (1),
            ``"aligned"`` (:class:`~lomix_lightning.losses.aligned.AlignedWeighting`: from gradient alignment with
            the main map, probed by the Lightning module), ``"uncertainty"`` (Kendall et al. 2018: ``exp(-s_u)``,
            plus ``sum_u s_u`` in the total), or a :class:`~lomix_lightning.losses.weighting.LossWeighting`
            instance; ``None`` keeps the scheme's.
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
            softmax maps. The compiled CPU kernels keep no map at all: with ``engine="auto"`` they still run where
            they can (the bound holds), and ``engine="native"`` refuses ``memory_efficient=True`` (nothing to do).
        engine: Which engine computes ``ce_dice``: ``"auto"`` (the compiled CPU kernels where they take the maps,
            else PyTorch; ``LOMIX_NATIVE=0`` switches the kernels off), ``"native"`` (the kernels, or an error
            saying why they cannot run) or ``"torch"`` (tensor operations only). Same values; see
            :meth:`engine_for`.

    Raises:
        ValueError: On an unknown scheme, operator, weighting or loss, ``num_outputs < 1``, operators given with
            ``last_layer``, a loss that does not fit ``num_classes``, an unknown ``engine``, or ``engine="native"``
            with another loss than ``ce_dice``, with ``memory_efficient=True`` or where the kernels cannot run.

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
        engine: EngineName = "auto",
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
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; allowed engines are {list(ENGINES)}")
        self.ce_weight, self.dice_weight = float(ce_weight), float(dice_weight)
        self.loss_name, self._per_map_loss = per_map_loss(loss, num_classes, ce_weight, dice_weight, ignore_index)
        if engine == "native" and self.loss_name != "ce_dice":
            raise ValueError(f"engine='native' computes loss='ce_dice' only, got loss={self.loss_name!r}")
        if engine == "native" and memory_efficient:
            raise ValueError(
                "engine='native' with memory_efficient=True: the compiled kernels keep no map for backward anyway; "
                "pass memory_efficient=False, or engine='torch' or 'auto'"
            )
        if engine == "native":
            require_native()
        self.engine: EngineName = engine
        # The full weight vector of the last forward, detached: under FSDP the parameters outside forward are this
        # rank's shard (a plain attribute: FSDP neither shards nor gathers it, DDP does not broadcast it).
        self._last_weights: Tensor | None = None

    def engine_for(self, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
        """The engine that scores maps of ``dtype`` on ``device``: ``"native"`` or ``"pytorch: <why>"``.

        The module logs it as the ``engine`` hyper-parameter at fit start.

        Example:
            >>> LoMixLoss(2, 3, engine="torch").engine_for(torch.device("cpu"))
            "pytorch: engine='torch'"
        """
        if self.loss_name != "ce_dice":
            return f"pytorch: loss={self.loss_name!r}"
        if self.engine == "torch":
            return "pytorch: engine='torch'"
        return native_engine(device, fusion_dtype(dtype), self.num_classes, self.num_outputs)

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
        check_devices_and_batch(outputs, target)
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
                stacked, unused = self.mutation.stack(outputs, size), ()  # validated above
            check = self.check_target if check_target is None else check_target
            target = checked_target(target, size, stacked.shape[0], self.num_classes, self.ignore_index, check)
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
            return LoMixLossOutput(
                original + mutant + self._weighting_term(per_map), per_map, weights, original, mutant
            )

    def _weighting_term(self, per_map: Tensor) -> Tensor | float:
        """A weighting's own term of the total (``uncertainty``: ``sum_u s_u``); 0 for the others."""
        regulariser = getattr(self.weighting, "regulariser", None)
        return 0.0 if regulariser is None else regulariser().to(per_map.dtype)

    def _ce_dice_maps(self, stacked: Tensor, operators: Sequence[str], target: Tensor) -> Tensor:
        """``(M,)`` CE + Dice of every map through the fused engine."""
        prepared = ce_dice_target(target, self.num_classes, stacked.dtype, self.ignore_index)
        inputs = self.mutation.engine_inputs(resolve(self.engine, stacked), stacked.dtype, operators)
        stats = lomix_ce_dice_stats(stacked, operators, self.mutation.plan, prepared, inputs, self.memory_efficient)
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
            f"operators={list(self.operators)}, maps={self.num_maps}, loss={self.loss_name!r}, engine={self.engine!r}"
        )
