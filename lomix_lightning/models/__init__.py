"""Multi-output segmentation networks: each returns one logit map per decoder scale, coarse to fine."""

from lomix_lightning.models._base import FinalMapNetwork, MultiOutputNetwork
from lomix_lightning.models.emcad import EMCADNet
from lomix_lightning.models.monai import MonaiDynUNet, MonaiSegResNetDS
from lomix_lightning.models.smp import MultiScaleSMP
from lomix_lightning.models.timm_unet import TimmUNet
from lomix_lightning.models.unet import UNet

__all__ = [
    "EMCADNet",
    "FinalMapNetwork",
    "MonaiDynUNet",
    "MonaiSegResNetDS",
    "MultiOutputNetwork",
    "MultiScaleSMP",
    "TimmUNet",
    "UNet",
]
