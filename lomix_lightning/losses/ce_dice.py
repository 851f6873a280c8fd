"""Cross-entropy + Dice, the per-map loss of the paper's multi-class experiments (Eqs. 7-8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    hand (only the softmax is kept for backward), and no value leaves the device (no host synchronisation).

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
    maps = [logits] if single else list(logits.unbind(1) if isinstance(logits, Tensor) else logits)
    valid = None
    if ignore_index is not None:
        valid = target != ignore_index  # (B, H, W)
        target = target.masked_fill(~valid, 0)
    loss = _CEDice.apply(target, valid, float(ce_weight), float(dice_weight), float(eps), *maps)
    return loss[0] if single else loss


class _CEDice(torch.autograd.Function):
    """Fused CE + Dice over a list of ``(B, C, H, W)`` maps with a hand-written backward.

    Only each map's softmax ``p`` is kept for backward. With ``S_c = sum p_c^2 + sum y_c^2`` and ``I_c = sum p_c y_c``
    per class, ``dDice/dp_c = a_c y_c + b_c p_c`` with ``a_c = -2 / (C (S_c + eps))`` and
    ``b_c = 2 (2 I_c + eps) / (C (S_c + eps)^2)``, and ``dCE/dz_c = (p_c - y_c) / N``; the softmax Jacobian turns
    ``g_c = dL/dp_c`` into ``dL/dz_c = p_c (g_c - sum_k p_k g_k)``.
    """

    @staticmethod
    def forward(ctx, target, valid, ce_weight, dice_weight, eps, *maps):  # noqa: D102
        b, c, h, w = maps[0].shape
        dtype = maps[0].dtype
        onehot = F.one_hot(target, c).to(dtype)  # (B, H, W, C)
        mask = None if valid is None else valid.to(dtype)  # (B, H, W)
        if mask is not None:
            onehot = onehot * mask[..., None]
        if mask is not None:
            count = mask.sum().clamp_min(1.0)
        else:
            count = torch.tensor(float(b * h * w), dtype=dtype, device=target.device)
        onehot_flat = onehot.reshape(-1, c)  # (N, C)
        y_sum = onehot_flat.sum(dim=0)  # sum(y^2) = sum(y), (C,)
        index = target[:, None]  # (B, 1, H, W)
        losses, probs, stats = [], [], []
        for z in maps:
            log_p = z.log_softmax(dim=1)
            log_p_target = log_p.gather(1, index)[:, 0]  # (B, H, W)
            p = log_p.exp_()  # softmax, in place of the log-softmax
            if mask is not None:
                log_p_target = log_p_target * mask
            ce = -log_p_target.sum() / count
            p_target = p.gather(1, index).reshape(-1)  # (N,)
            intersection = onehot_flat.t() @ p_target  # sum(p * y) per class, (C,)
            p_valid = p if mask is None else p * mask[:, None]
            denominator = torch.linalg.vector_norm(p_valid, dim=(0, 2, 3)).square() + y_sum + eps  # S_c + eps
            dice = 1.0 - ((2.0 * intersection + eps) / denominator).mean()
            losses.append(ce_weight * ce + dice_weight * dice)
            probs.append(p)
            stats.append(torch.stack([intersection, denominator]))
        ctx.save_for_backward(target, valid, count, torch.stack(stats), *probs)
        ctx.weights = (ce_weight, dice_weight, eps)
        return torch.stack(losses)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        target, valid, count, stats, *probs = ctx.saved_tensors
        ce_weight, dice_weight, eps = ctx.weights
        c = probs[0].shape[1]
        index = target[:, None]  # (B, 1, H, W)
        grads = []
        for j, p in enumerate(probs):
            g_ce = ce_weight * grad[j] / count
            intersection, denominator = stats[j]
            coef_a = dice_weight * grad[j] * (-2.0 / c) / denominator  # (C,)
            coef_b = dice_weight * grad[j] * (2.0 / c) * (2.0 * intersection + eps) / denominator.square()
            u = p * coef_b.view(1, c, 1, 1)  # b_c p_c
            p_target = p.gather(1, index)  # (B, 1, H, W)
            a_target = coef_a[index]  # a_t per pixel, (B, 1, H, W)
            s = (u * p).sum(dim=1, keepdim=True) + a_target * p_target  # sum_k p_k g_k of the Dice part
            grad_z = p * (u - s + g_ce)
            grad_z.scatter_add_(1, index, a_target * p_target - g_ce)  # the y_c terms
            if valid is not None:
                grad_z.mul_(valid.to(p.dtype)[:, None])
            grads.append(grad_z)
        return (None, None, None, None, None, *grads)


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
