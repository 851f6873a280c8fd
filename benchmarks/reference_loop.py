"""The authors' cost structure, kept as the benchmark baseline (SLDGroup/LoMix trainer.py + utils.DiceLoss).

A Python loop over the maps; per map one ``nn.CrossEntropyLoss`` and one per-class Dice that rebuilds the one-hot
target and calls ``.item()`` per class (the host syncs of the original). The concat convolution is registered here
(the original re-creates it in every forward, which only adds cost), and fusion reuses nothing across subsets.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _DiceLoss(nn.Module):
    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = n_classes

    def _one_hot_encoder(self, input_tensor: Tensor) -> Tensor:
        return torch.cat([(input_tensor == i).unsqueeze(1) for i in range(self.n_classes)], dim=1).float()

    def _dice_loss(self, score: Tensor, target: Tensor) -> Tensor:
        target = target.float()
        smooth = 1e-5
        intersect = torch.sum(score * target)
        y_sum = torch.sum(target * target)
        z_sum = torch.sum(score * score)
        return 1 - (2 * intersect + smooth) / (z_sum + y_sum + smooth)

    def forward(self, inputs: Tensor, target: Tensor) -> Tensor:
        inputs = torch.softmax(inputs, dim=1)
        target = self._one_hot_encoder(target)
        class_wise_dice = []
        loss = 0.0
        for i in range(self.n_classes):
            dice = self._dice_loss(inputs[:, i], target[:, i])
            class_wise_dice.append(1.0 - dice.item())  # the original's host sync
            loss += dice
        return loss / self.n_classes


class _WeightedFusion(nn.Module):
    def __init__(self, num_stages: int, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(num_classes, 1, 1) for _ in range(num_stages)])

    def forward(self, maps: list[Tensor]) -> Tensor:
        scores = torch.stack([conv(m) for conv, m in zip(self.convs, maps)], dim=1).softmax(dim=1)
        return (scores * torch.stack(maps, dim=1)).sum(dim=1)


class ReferenceLoopLoss(nn.Module):
    """LoMix loss with the reference code's structure (a loop over 4 + 44 maps, per-class Dice with syncs)."""

    def __init__(self, num_outputs: int, num_classes: int, operations=("add", "mul", "wf", "concat")) -> None:
        super().__init__()
        self.subsets = [s for k in range(2, num_outputs + 1) for s in itertools.combinations(range(num_outputs), k)]
        self.operations = operations
        self.alpha_orig = nn.Parameter(torch.zeros(num_outputs))
        self.alpha_mut = nn.ParameterDict({op: nn.Parameter(torch.zeros(len(self.subsets))) for op in operations})
        self.wf = nn.ModuleDict({str(k): _WeightedFusion(k, num_classes) for k in range(2, num_outputs + 1)})
        self.concat = nn.ModuleList([nn.Conv2d(len(s) * num_classes, num_classes, 1) for s in self.subsets])
        self.ce = nn.CrossEntropyLoss()
        self.dice = _DiceLoss(num_classes)

    def _map_loss(self, logits: Tensor, target: Tensor) -> Tensor:
        return 0.3 * self.ce(logits, target) + 0.7 * self.dice(logits, target)

    def forward(self, outputs: list[Tensor], target: Tensor) -> Tensor:
        size = target.shape[-2:]
        maps = [F.interpolate(o, size=size, mode="bilinear") if o.shape[-2:] != size else o for o in outputs]
        total = 0.0
        for i, m in enumerate(maps):
            total = total + F.softplus(self.alpha_orig[i]) * self._map_loss(m, target)
        for op in self.operations:
            for j, s in enumerate(self.subsets):
                members = [maps[i] for i in s]
                if op == "add":
                    fused = sum(members[1:], members[0])
                elif op == "mul":
                    fused = members[0]
                    for m in members[1:]:
                        fused = fused * m
                elif op == "wf":
                    fused = self.wf[str(len(s))](members)
                else:
                    fused = self.concat[j](torch.cat(members, dim=1))
                total = total + F.softplus(self.alpha_mut[op][j]) * self._map_loss(fused, target)
        return total
