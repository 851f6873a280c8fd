"""lomix-lightning: LoMix combinatorial multi-scale supervision for PyTorch Lightning."""

from lomix_lightning.losses import CEDiceLoss, StructureLoss, ce_dice_loss, structure_loss
from lomix_lightning.losses.lomix import SCHEMES, LoMixLoss, LoMixLossOutput
from lomix_lightning.losses.mutation import CombinatorialMutation
from lomix_lightning.losses.subsets import OPERATORS, enumerate_subsets, map_family, map_names
from lomix_lightning.losses.weighting import (  # aligned and uncertainty: losses/aligned.py, losses/uncertainty.py
    AlignedWeighting,
    FixedWeighting,
    LossWeighting,
    SoftplusWeighting,
    UncertaintyWeighting,
)
from lomix_lightning.module import LoMixSegmentationModule

__version__ = "0.1.0.dev0"

__all__ = [
    "AlignedWeighting",
    "CEDiceLoss",
    "CombinatorialMutation",
    "FixedWeighting",
    "LoMixLoss",
    "LoMixLossOutput",
    "LoMixSegmentationModule",
    "LossWeighting",
    "OPERATORS",
    "SCHEMES",
    "SoftplusWeighting",
    "StructureLoss",
    "UncertaintyWeighting",
    "__version__",
    "ce_dice_loss",
    "enumerate_subsets",
    "map_family",
    "map_names",
    "structure_loss",
]
