"""Cross-entropy + Dice, the per-map loss of the paper's multi-class experiments (Eqs. 7-8)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from lomix_lightning.losses.precision import full_precision, fusion_dtype


class CEDiceTarget(NamedTuple):
    """A label map prepared once for scoring any number of maps (see :func:`ce_dice_target`).

    Attributes:
        target: ``(B, H, W)`` class indices (ignored pixels set to 0).
        valid: ``(B, H, W)`` float mask of the counted pixels, or ``None`` if every pixel counts.
        onehot: ``(B, H*W, C)`` float one-hot labels (zero rows on ignored pixels).
        count: Number of counted pixels (a 0-d tensor).
        y_sum: ``(C,)`` counted pixels per class, ``sum(y^2) = sum(y)`` in the Dice denominator.
    """

    target: Tensor
    valid: Tensor | None
    onehot: Tensor
    count: Tensor
    y_sum: Tensor


def ce_dice_target(
    target: Tensor, num_classes: int, dtype: torch.dtype, ignore_index: int | None = None
) -> CEDiceTarget:
    """Prepare ``(B, H, W)`` labels for :func:`ce_dice_stats` (no host synchronisation).

    Example:
        >>> prepared = ce_dice_target(torch.tensor([[[0, 2, 2]]]), 3, torch.float32)
        >>> prepared.y_sum, prepared.count
        (tensor([1., 0., 2.]), tensor(3.))
    """
    b, h, w = target.shape
    target = target.long().contiguous()  # a strided target (e.g. transposed) would give a strided mask
    valid = None
    if ignore_index is not None:
        keep = target != ignore_index  # (B, H, W)
        target = target.masked_fill(~keep, 0)
        valid = keep.to(dtype)
    flat = target.reshape(b, h * w, 1)  # (B, HW, 1)
    onehot = torch.zeros(b, h * w, num_classes, dtype=dtype, device=target.device)
    if valid is None:
        onehot.scatter_(2, flat, 1.0)
    else:
        onehot.scatter_(2, flat, valid.reshape(b, h * w, 1))
    y_sum = onehot.sum(dim=(0, 1))  # (C,)
    if valid is None:
        count = torch.full((), float(b * h * w), dtype=dtype, device=target.device)  # no host-to-device copy
    else:
        count = valid.sum()
    return CEDiceTarget(target, valid, onehot, count, y_sum)


def ce_dice_stats(logits: Tensor, prepared: CEDiceTarget) -> Tensor:
    """Per-map sufficient statistics of CE + Dice: everything :func:`ce_dice_from_stats` needs.

    Sums over pixels, so the statistics of image chunks add up to those of the whole batch.

    Args:
        logits: ``(B, K, C, H, W)``: ``K`` maps scored against the same target.
        prepared: The target, from :func:`ce_dice_target`.

    Returns:
        ``(K, 1 + 2C)``: per map ``[sum of -log p_t, I_1..I_C, Q_1..Q_C]`` with ``I_c = sum p_c y_c`` and
        ``Q_c = sum p_c^2`` over the counted pixels.
    """
    return _CEDiceStats.apply(logits, prepared.target, prepared.valid, prepared.onehot)


def ce_dice_from_stats(
    stats: Tensor, prepared: CEDiceTarget, ce_weight: float, dice_weight: float, eps: float = 1e-5
) -> Tensor:
    """``(K,)`` losses ``ce_weight * CE + dice_weight * Dice`` from ``(K, 1 + 2C)`` statistics.

    Example:
        >>> prepared = ce_dice_target(torch.tensor([[[0, 1]]]), 2, torch.float32)
        >>> stats = ce_dice_stats(torch.zeros(1, 1, 2, 1, 2), prepared)  # one map of uniform logits
        >>> stats.shape, ce_dice_from_stats(stats, prepared, ce_weight=1.0, dice_weight=0.0)  # CE = log 2
        (torch.Size([1, 5]), tensor([0.6931]))
    """
    c = prepared.y_sum.shape[0]
    ce = stats[:, 0] / prepared.count.clamp_min(1.0)
    intersection, squares = stats[:, 1 : 1 + c], stats[:, 1 + c :]
    dice = 1.0 - ((2.0 * intersection + eps) / (squares + prepared.y_sum + eps)).mean(dim=1)
    return ce_weight * ce + dice_weight * dice


def ce_dice_loss(
    logits: Tensor | Sequence[Tensor],
    target: Tensor,
    ce_weight: float = 0.3,
    dice_weight: float = 0.7,
    ignore_index: int | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""``ce_weight * CE + dice_weight * Dice`` for one map or for many maps at once.

    Dice is the paper's (and the authors' ``DiceLoss``): softmax, then per class over the whole batch
    ``1 - (2 * sum(p * y) + eps) / (sum(p * p) + sum(y * y) + eps)``, averaged over all ``C`` classes including the
    background. CE is the mean over (non-ignored) pixels. One softmax serves both terms, the gradient is written by
    hand (only the softmax is kept for backward), and no value leaves the device (no host synchronisation). It runs
    in at least float32 whatever the input dtype and autocast (the loss is float32 for float16/bfloat16 logits).

    .. math::
        L = \beta \, \mathrm{CE} + \gamma \left(1 - \frac{1}{C} \sum_c
        \frac{2 \sum p_c y_c + \epsilon}{\sum p_c^2 + \sum y_c^2 + \epsilon}\right)

    Args:
        logits: ``(B, C, H, W)`` for one map; ``(B, M, C, H, W)`` or a list of ``M`` maps ``(B, C, H, W)`` scored
            against the same target.
        target: ``(B, H, W)`` integer class indices.
        ce_weight: ``beta``, the cross-entropy coefficient.
        dice_weight: ``gamma``, the Dice coefficient.
        ignore_index: A label value whose pixels count in neither term.
        eps: Smoothing of the Dice ratio.

    Returns:
        A scalar for one ``(B, C, H, W)`` map, else the ``(M,)`` per-map losses.

    Example:
        >>> logits = torch.tensor([[[[4.0, -4.0]], [[-4.0, 4.0]]]])  # (1, 2, 1, 2), right
        >>> round(ce_dice_loss(logits, torch.tensor([[[0, 1]]])).item(), 4)
        0.0001
    """
    single = isinstance(logits, Tensor) and logits.ndim == 4
    device = logits.device if isinstance(logits, Tensor) else logits[0].device
    with full_precision(device):  # float32 at least, autocast or not (fp16 pixel counts overflow past 65504)
        if single:
            logits = logits.unsqueeze(1)  # (B, 1, C, H, W)
        elif not isinstance(logits, Tensor):
            logits = torch.stack(list(logits), dim=1)  # M x (B, C, H, W) -> (B, M, C, H, W)
        logits = logits.to(fusion_dtype(logits.dtype))
        prepared = ce_dice_target(target, logits.shape[2], logits.dtype, ignore_index)
        loss = ce_dice_from_stats(ce_dice_stats(logits, prepared), prepared, float(ce_weight), float(dice_weight), eps)
    return loss[0] if single else loss


def ce_dice_forward(
    logits: Tensor, target: Tensor, valid: Tensor | None, onehot: Tensor, out: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The softmax and the :func:`ce_dice_stats` statistics of ``(b, K, C, H, W)`` logits, no autograd.

    One softmax; ``log p_t = z_t - max_c z_c + log max_c p_c`` is the log-softmax at the target without a second
    exponential pass; ``I`` comes from one batched product with the one-hot labels. Masked logits behave as in
    ``F.cross_entropy``: a ``-inf`` in a class other than the target counts as probability 0, a ``-inf`` target
    logit makes CE ``+inf``; ignored pixels (``valid == 0``) count in nothing, whatever their logits, and their
    softmax is set to 0.

    Args:
        logits: ``(b, K, C, H, W)``.
        target: ``(b, H, W)`` class indices.
        valid: ``(b, H, W)`` float mask or ``None``.
        onehot: ``(b, H*W, C)`` one-hot labels.
        out: Where to write the softmax (a new tensor if ``None``).

    Returns:
        ``p`` ``(b, K, C, H, W)`` and the ``(K, 1 + 2C)`` statistics.
    """
    b, k, c, h, w = logits.shape
    p = softmax(logits, out)  # (b, K, C, H, W)
    index = target.view(b, 1, 1, h, w).expand(b, k, 1, h, w)
    log_p_target = logits.gather(2, index).sub_(logits.amax(dim=2, keepdim=True))
    log_p_target += p.amax(dim=2, keepdim=True).log_()  # (b, K, 1, H, W)
    if valid is not None:  # an ignored pixel counts in nothing, whatever its logits (all -inf gives a NaN softmax)
        ignored = (valid == 0).view(b, 1, 1, h, w)
        p.masked_fill_(ignored, 0.0)
        log_p_target.masked_fill_(ignored, 0.0)
    p_target = p.gather(2, index).view(b, k, h * w)
    squares = torch.linalg.vector_norm(p.view(b, k, c, h * w), dim=3).square_().sum(dim=0)  # (K, C)
    ce_sum = -log_p_target.sum(dim=(0, 2, 3, 4))  # (K,)
    intersection = torch.bmm(p_target, onehot).sum(dim=0)  # (b, K, HW) @ (b, HW, C) -> (K, C)
    return p, torch.cat([ce_sum[:, None], intersection, squares], dim=1)


def softmax(logits: Tensor, out: Tensor | None = None) -> Tensor:
    """Softmax over the classes of ``(b, K, C, H, W)`` logits, into ``out`` if given (no autograd)."""
    if out is None:
        return torch.softmax(logits, dim=2)
    return torch._softmax(logits, 2, False, out=out)  # the out= form of the same kernel (no public alias)


def ce_dice_backward(
    p: Tensor, grad: Tensor, target: Tensor, valid: Tensor | None, out: Tensor | None = None
) -> Tensor:
    r"""Gradient with respect to the logits of ``sum(grad * stats)`` from the softmax ``p``, no autograd.

    With ``a_c = dL/dI_c``, ``b_c = 2 dL/dQ_c`` and ``g = dL/d(sum -log p_t)``, ``dL/dp_c = a_c y_c + b_c p_c``
    and ``dL/dz_c = b_c p_c^2 + p_c (g - a_t p_t - sum_k b_k p_k^2) + y_c (a_t p_t - g)``.

    Args:
        p: ``(b, K, C, H, W)`` softmax.
        grad: ``(K, 1 + 2C)`` gradient of the statistics.
        target: ``(b, H, W)`` class indices.
        valid: ``(b, H, W)`` float mask or ``None``.
        out: Where to write the result (a new tensor if ``None``).

    Returns:
        ``(b, K, C, H, W)``.
    """
    b, k, c, h, w = p.shape
    g_ce = grad[:, 0].view(1, k, 1, 1, 1)
    coef_a, coef_b = grad[:, 1 : 1 + c], 2.0 * grad[:, 1 + c :]  # (K, C) each
    index = target.view(b, 1, 1, h, w).expand(b, k, 1, h, w)
    grad_z = torch.mul(p, coef_b.view(1, k, c, 1, 1), out=p.new_empty(p.shape) if out is None else out)
    grad_z.mul_(p)  # b_c p_c^2
    a_p = coef_a.t()[target].permute(0, 3, 1, 2).unsqueeze(2)  # a_t, (b, K, 1, H, W)
    a_p.mul_(p.gather(2, index))  # a_t p_t
    shift = g_ce - a_p - grad_z.sum(dim=2, keepdim=True)  # g - a_t p_t - sum_k b_k p_k^2
    grad_z.addcmul_(p, shift)
    grad_z.scatter_add_(2, index, a_p.sub_(g_ce))  # the y_c terms
    if valid is not None:  # zero, not multiplied by 0: an ignored pixel's softmax may be NaN (all logits -inf)
        grad_z.masked_fill_((valid == 0).view(b, 1, 1, h, w), 0.0)
    return grad_z


class _CEDiceStats(torch.autograd.Function):
    """:func:`ce_dice_stats` with the hand-written backward of :func:`ce_dice_backward` (only ``p`` is kept)."""

    @staticmethod
    def forward(ctx, logits, target, valid, onehot):  # noqa: D102
        p, stats = ce_dice_forward(logits, target, valid, onehot)
        ctx.save_for_backward(p, target, valid)
        return stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        p, target, valid = ctx.saved_tensors
        with full_precision(p.device):
            return ce_dice_backward(p, grad, target, valid), None, None, None


class CEDiceLoss(nn.Module):
    """Module form of :func:`ce_dice_loss`.

    Example:
        >>> CEDiceLoss()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long)).shape
        torch.Size([])
    """

    def __init__(
        self, ce_weight: float = 0.3, dice_weight: float = 0.7, ignore_index: int | None = None, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0:
            raise ValueError(f"ce_weight and dice_weight must be >= 0, got {ce_weight} and {dice_weight}")
        self.ce_weight, self.dice_weight, self.ignore_index, self.eps = ce_weight, dice_weight, ignore_index, eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """See :func:`ce_dice_loss`."""
        return ce_dice_loss(logits, target, self.ce_weight, self.dice_weight, self.ignore_index, self.eps)
