"""Synapse 3-D: prepare-synapse writes whole training volumes; the volume data module samples patches from them."""

import h5py
import numpy as np
import pytest
import torch
from test_prepare_synapse_data import write_raw

from lomix_lightning.data import prepare_synapse
from lomix_lightning.data.synapse_volumes import SynapseVolumesDataModule
from lomix_lightning.errors import LomixUserError

pytest.importorskip("monai")


@pytest.fixture
def prepared(tmp_path):
    volumes = write_raw(tmp_path / "raw", ids=(1, 2, 5, 6))
    out = tmp_path / "synapse"
    prepare_synapse(
        str(tmp_path / "raw"), str(out), ["case0001", "case0005", "case0006"], ["case0002"], verbose=False,
        train_volumes=True,
    )  # fmt: skip
    return out, volumes


def test_prepare_writes_training_volumes(prepared):
    out, volumes = prepared
    assert sorted(p.name for p in (out / "train_vol_h5").iterdir()) == [
        "case0001.npy.h5", "case0005.npy.h5", "case0006.npy.h5"
    ]  # fmt: skip
    hu, label = volumes["case0005"]
    with h5py.File(out / "train_vol_h5" / "case0005.npy.h5", "r") as f:
        np.testing.assert_array_equal(f["label"][()], label.transpose(2, 0, 1))  # (x, y, z) -> (z, x, y)
        expected = (np.clip(hu, -125, 275) + 125) / 400
        np.testing.assert_allclose(f["image"][()], expected.transpose(2, 0, 1), atol=1e-6)
        np.testing.assert_allclose(f["spacing"][()], [3.0, 0.8, 0.8], rtol=1e-6)


def test_patches_validation_and_test_volumes(prepared):
    out, _ = prepared
    dm = SynapseVolumesDataModule(
        str(out), patch_size=(4, 8, 8), batch_size=3, pos=1.0, neg=0.0, val_cases=["case0006"]
    )
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (3, 1, 4, 8, 8) and train["mask"].shape == (3, 4, 8, 8)
    assert train["image"].dtype == torch.float32 and train["mask"].dtype == torch.int64
    assert set(train["mask"].unique().tolist()) <= {0, 5, 6}  # raw 11 -> 5 (pancreas), 13 -> 0 (9 classes)
    assert all((m > 0).any() for m in train["mask"])  # pos=1, neg=0: every patch is centred on foreground
    first, second = (next(iter(dm.val_dataloader())) for _ in range(2))
    assert len(dm.val_dataloader().dataset) == 2  # one volume, 2 fixed patches
    torch.testing.assert_close(first["image"], second["image"])  # validation patches are fixed
    test = next(iter(dm.test_dataloader()))
    assert test["image"].shape == (1, 1, 4, 16, 12) and test["mask"].shape == (1, 4, 16, 12)
    torch.testing.assert_close(test["spacing"], torch.tensor([[3.0, 0.8, 0.8]]))
    big = SynapseVolumesDataModule(str(out), patch_size=(8, 20, 20), batch_size=1)  # larger than a volume: padded
    assert next(iter(big.train_dataloader()))["image"].shape == (1, 1, 8, 20, 20)


def test_errors_name_the_problem(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(LomixUserError, match="--train_volumes"):
        SynapseVolumesDataModule(str(tmp_path / "nowhere")).train_dataloader()
    with pytest.raises(LomixUserError, match=r"val_cases \['case0099'\]"):
        SynapseVolumesDataModule(str(out), val_cases=["case0099"]).train_dataloader()
    with pytest.raises(LomixUserError, match="patch_size"):
        SynapseVolumesDataModule(str(out), patch_size=(8, 8))
