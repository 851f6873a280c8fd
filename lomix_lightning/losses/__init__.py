"""Per-map segmentation losses."""

from lomix_lightning.losses.ce_dice import CEDiceLoss, ce_dice_loss
from lomix_lightning.losses.structure import StructureLoss, boundary_weight, structure_loss

__all__ = ["CEDiceLoss", "StructureLoss", "boundary_weight", "ce_dice_loss", "structure_loss"]
