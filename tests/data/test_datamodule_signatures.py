"""The data modules must be buildable from YAML by LightningCLI (jsonargparse reads the typed __init__)."""

import pytest
from jsonargparse import ArgumentParser

from lomix_lightning.data import (
    ACDCDataModule,
    FolderSegmentationDataModule,
    SynapseDataModule,
    SyntheticShapesDataModule,
)

CASES = [
    (SyntheticShapesDataModule, {"num_classes": 5, "in_channels": 3, "image_size": 32}),
    (
        SynapseDataModule,
        {
            "root": "data/synapse",
            "list_dir": "data/synapse/lists",
            "val_cases": ["case0039", "case0040"],
            "train_fraction": 0.05,
            "remap_14_to_9": None,
            "class_order": "btcv",
        },
    ),
    (ACDCDataModule, {"root": "data/ACDC", "batch_size": 12}),
    (
        FolderSegmentationDataModule,
        {
            "images_dir": "data/Kvasir/images",
            "masks_dir": "data/Kvasir/masks",
            "splits": [0.8, 0.1, 0.1],
            "multiscale": [0.75, 1.0, 1.25],
        },
    ),
]


@pytest.mark.parametrize(("cls", "init_args"), CASES, ids=[c[0].__name__ for c in CASES])
def test_parse_and_instantiate(cls, init_args):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "data")
    cfg = parser.parse_object({"data": init_args})
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, cls)
    assert isinstance(dm.num_classes, int) and isinstance(dm.in_channels, int)
    assert len(dm.class_names) == dm.num_classes


def test_literal_options_are_checked_at_parse_time():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(SynapseDataModule, "data")
    with pytest.raises(Exception, match="class_order"):
        parser.parse_object({"data": {"root": "r", "list_dir": "l", "class_order": "alphabetical"}})
