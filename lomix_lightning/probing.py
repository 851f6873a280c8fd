"""The Lightning side of weightings that probe gradients (``aligned``): the main loss and the per-map losses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor

from lomix_lightning.errors import LomixUserError
from lomix_lightning.inference import as_output_list, combine_outputs
from lomix_lightning.losses.lomix import LoMixLoss

if TYPE_CHECKING:
    from lomix_lightning.module import LoMixSegmentationModule


def check_probe_strategy(criterion: LoMixLoss | None, strategy: object) -> None:
    """Refuse a probing weighting under FSDP at fit start: the probe runs the network on its full parameters.

    Raises:
        LomixUserError: If the weighting probes gradients and ``strategy`` shards the parameters.
    """
    probes = getattr(getattr(criterion, "weighting", None), "maybe_probe", None) is not None
    if probes and isinstance(strategy, FSDPStrategy):
        raise LomixUserError(
            "weighting='aligned' cannot run under strategy=fsdp (its probe needs the unsharded parameters); "
            "use strategy=ddp, or weighting='learned'/'uncertainty'/'fixed' with FSDP"
        )


def probe_weighting(module: LoMixSegmentationModule, image: Tensor, mask: Tensor) -> None:
    """Let a weighting that measures gradients (``aligned``) probe this batch; it changes no state of the module.

    Weightings without a ``maybe_probe`` method (``learned``, ``fixed``, ``uncertainty``) make this a no-op.
    """
    probe = getattr(module.criterion.weighting, "maybe_probe", None)
    if probe is not None:
        probe(module.network, image, lambda raw: probe_losses(module, raw, mask), reduce=module._sum_over_ranks)


def probe_losses(module: LoMixSegmentationModule, raw: Any, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The main loss (the map used at inference: ``PL``, or the sum of the maps) and the ``(M,)`` per-map losses."""
    maps = as_output_list(raw)
    size = tuple(mask.shape[2 - maps[0].ndim :])  # (H, W) or (D, H, W), as in training
    outputs = module._resized_outputs(maps, size)
    per_map = module.criterion(outputs, mask, check_target=False).per_map
    if module.hparams.inference_output == "last":
        return per_map[module.criterion.map_names.index(f"P{len(outputs)}")], per_map
    main_loss = module.__dict__.get("_main_loss")  # a plain attribute: no submodule, nothing in the state dict
    if main_loss is None:
        hp = module.hparams
        main_loss = LoMixLoss(
            1, module.num_classes, scheme="last_layer", weighting="fixed", loss=hp.loss, ce_weight=hp.ce_weight,
            dice_weight=hp.dice_weight, ignore_index=hp.ignore_index,
        )  # fmt: skip
        module.__dict__["_main_loss"] = main_loss
    main_loss.to(mask.device)
    return main_loss([combine_outputs(outputs, size, "sum")], mask, check_target=False).total, per_map
