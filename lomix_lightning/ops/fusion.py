"""The four fusion operators of the paper (Eqs. 1-5), each for one subset of logit maps.

These are the reference definitions: plain, one subset at a time. :class:`~lomix_lightning.CombinatorialMutation`
computes the same maps for all subsets at once (prefix reuse, one batched 1x1 convolution) and is tested against them.
All operators act on logits, as the authors' code does; the paper's ``P = sigma(Z)`` is notation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def add_fusion(maps: Sequence[Tensor]) -> Tensor:
    """Eq. 1: element-wise sum of the subset's maps.

    Example:
        >>> add_fusion([torch.ones(1, 2, 2, 2), 2 * torch.ones(1, 2, 2, 2)]).unique()
        tensor([3.])
    """
    out = maps[0]
    for m in maps[1:]:
        out = out + m
    return out


def mul_fusion(maps: Sequence[Tensor]) -> Tensor:
    """Eq. 2: element-wise (Hadamard) product of the subset's maps.

    Example:
        >>> mul_fusion([2 * torch.ones(1, 2, 2, 2), 3 * torch.ones(1, 2, 2, 2)]).unique()
        tensor([6.])
    """
    out = maps[0]
    for m in maps[1:]:
        out = out * m
    return out


def cat_fusion(maps: Sequence[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
    """Eq. 3: channel-wise concatenation followed by a 1x1 convolution ``W_S`` (``|S|*C -> C``).

    Args:
        maps: ``|S|`` maps of shape ``(B, C, H, W)``.
        weight: ``(C, |S|*C, 1, 1)``, the 1x1 convolution weight.
        bias: ``(C,)`` or ``None``.

    Example:
        >>> w = torch.zeros(2, 4, 1, 1); w[:, :2] = torch.eye(2)[:, :, None, None]  # keep the first map
        >>> x = torch.randn(1, 2, 3, 3)
        >>> torch.equal(cat_fusion([x, torch.randn(1, 2, 3, 3)], w, None), x)
        True
    """
    return F.conv2d(torch.cat(list(maps), dim=1), weight, bias)  # (B, |S|*C, H, W) -> (B, C, H, W)


def awf_fusion(maps: Sequence[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor:
    """Eqs. 4-5: attention-weighted fusion.

    A 1x1 convolution ``W'_S`` over the concatenation scores each member per pixel (``|S|*C -> |S|``); a softmax
    over the members turns the scores into weights, and the output is the weighted sum of the member logits.

    Args:
        maps: ``|S|`` maps of shape ``(B, C, H, W)``.
        weight: ``(|S|, |S|*C, 1, 1)``, the scoring convolution.
        bias: ``(|S|,)`` or ``None``.

    Example:
        >>> x = torch.randn(1, 3, 4, 4)
        >>> torch.allclose(awf_fusion([x, x], torch.randn(2, 6, 1, 1), None), x, atol=1e-6)
        True
    """
    scores = F.conv2d(torch.cat(list(maps), dim=1), weight, bias)  # (B, |S|, H, W)
    attention = scores.softmax(dim=1)
    stacked = torch.stack(list(maps), dim=1)  # (B, |S|, C, H, W)
    return (attention.unsqueeze(2) * stacked).sum(dim=1)
