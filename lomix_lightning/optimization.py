"""The optimizer of a LoMix module: the network's parameters and the loss weights (``alpha``) in two groups."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["build_optimizers"]


def build_optimizers(
    parameters: Iterable[nn.Parameter],
    loss_weights: list[nn.Parameter],
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    loss_weight_lr: float | None = None,
    loss_weight_decay: float | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: the groups ``network`` and ``loss_weights`` (own lr/decay if given).

    Args:
        parameters: Every parameter of the module (the loss weights among them are put in their own group).
        loss_weights: The learned loss-weight parameters; no group when empty.
        optimizer: Factory of the optimizer from the groups; ``None`` = AdamW(lr=1e-4, weight_decay=1e-4), the
            paper's.
        lr_scheduler: Optional factory of a scheduler (it monitors ``val/dice``).
        loss_weight_lr: Learning rate of the loss-weight group; ``None`` = the optimizer's.
        loss_weight_decay: Weight decay of the loss-weight group; ``None`` = the optimizer's.

    Example:
        >>> net, alpha = nn.Linear(2, 2), nn.Parameter(torch.zeros(3))
        >>> opt = build_optimizers([*net.parameters(), alpha], [alpha], loss_weight_lr=0.1)
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in opt.param_groups]
        [('network', 2, 0.0001), ('loss_weights', 1, 0.1)]
    """
    weight_ids = {id(p) for p in loss_weights}
    others = [p for p in parameters if id(p) not in weight_ids and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": others, "name": "network"}]
    if weight_ids:
        group: dict[str, Any] = {"params": list(loss_weights), "name": "loss_weights"}
        if loss_weight_lr is not None:
            group["lr"] = loss_weight_lr
        if loss_weight_decay is not None:
            group["weight_decay"] = loss_weight_decay
        groups.append(group)
    built = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4) if optimizer is None else optimizer(groups)
    if lr_scheduler is None:
        return built
    return {"optimizer": built, "lr_scheduler": {"scheduler": lr_scheduler(built), "monitor": "val/dice"}}
