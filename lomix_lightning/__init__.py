"""lomix-lightning: LoMix combinatorial multi-scale supervision for PyTorch Lightning."""

from lomix_lightning.loss import SCHEMES, LoMixLoss, LoMixLossOutput
from lomix_lightning.losses import CEDiceLoss, StructureLoss, ce_dice_loss, structure_loss
from lomix_lightning.module import LoMixSegmentationModule
from lomix_lightning.mutation import CombinatorialMutation
from lomix_lightning.ops import OPERATORS, enumerate_subsets, map_family, map_names
from lomix_lightning.weighting import (  # the weightings beyond the paper live in aligned.py and uncertainty.py
    AlignedWeighting,
    FixedWeighting,
    LossWeighting,
    SoftplusWeighting,
    UncertaintyWeighting,
)

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
