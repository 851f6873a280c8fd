"""Data modules (synthetic shapes, Synapse, ACDC, image/mask folders), their datasets and transforms."""

from lomix_lightning.data.acdc import ACDC_CLASS_NAMES, ACDCDataModule
from lomix_lightning.data.components.multiscale import MultiScaleCollate, scaled_size
from lomix_lightning.data.components.slices import SliceDataset
from lomix_lightning.data.components.splits import count_for_fraction, select_cases, split_by_ratio
from lomix_lightning.data.components.transforms import (
    SeededTransform,
    folder_eval_transform,
    folder_train_transform,
    medical_eval_transform,
    medical_train_transform,
)
from lomix_lightning.data.components.volumes import VolumeDataset
from lomix_lightning.data.folder import (
    FolderSegmentationDataModule,
    FolderSegmentationDataset,
    load_binary_mask,
    pair_files,
)
from lomix_lightning.data.prepare_synapse import TRANSUNET_TEST_CASES, TRANSUNET_TRAIN_CASES, prepare_synapse
from lomix_lightning.data.synapse import SYNAPSE_14_TO_9, SynapseDataModule, synapse_class_names
from lomix_lightning.data.synapse_volumes import SynapseVolumesDataModule
from lomix_lightning.data.synthetic import SyntheticShapesDataModule, SyntheticShapesDataset, make_shapes_sample
from lomix_lightning.data.synthetic_volumes import SyntheticVolumesDataModule, SyntheticVolumesDataset

__all__ = [
    "ACDCDataModule",
    "ACDC_CLASS_NAMES",
    "FolderSegmentationDataModule",
    "FolderSegmentationDataset",
    "MultiScaleCollate",
    "SYNAPSE_14_TO_9",
    "SeededTransform",
    "SliceDataset",
    "SynapseDataModule",
    "SynapseVolumesDataModule",
    "SyntheticShapesDataModule",
    "SyntheticShapesDataset",
    "SyntheticVolumesDataModule",
    "SyntheticVolumesDataset",
    "TRANSUNET_TEST_CASES",
    "TRANSUNET_TRAIN_CASES",
    "VolumeDataset",
    "count_for_fraction",
    "folder_eval_transform",
    "folder_train_transform",
    "load_binary_mask",
    "make_shapes_sample",
    "medical_eval_transform",
    "medical_train_transform",
    "pair_files",
    "prepare_synapse",
    "scaled_size",
    "select_cases",
    "split_by_ratio",
    "synapse_class_names",
]
