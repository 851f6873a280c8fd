"""The LoMix loss core: LoMixLoss, CombinatorialMutation, weighting, subsets, and the per-map losses exported here.

``lomix.py`` (LoMixLoss), ``mutation.py`` (CombinatorialMutation), ``weighting.py``, ``subsets.py``, ``precision.py``,
``checks.py``, ``ce_dice.py``, ``structure.py``.

Import the first ones from :mod:`lomix_lightning` (``from lomix_lightning import LoMixLoss``): this package stays free
of them so that the engine (:mod:`lomix_lightning._engine`) can use the per-map losses' math without an import circle.
"""

from lomix_lightning.losses.ce_dice import CEDiceLoss, ce_dice_loss
from lomix_lightning.losses.structure import StructureLoss, boundary_weight, structure_loss

__all__ = ["CEDiceLoss", "StructureLoss", "boundary_weight", "ce_dice_loss", "structure_loss"]
