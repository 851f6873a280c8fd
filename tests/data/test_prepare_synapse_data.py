import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from lomix_lightning.data import SynapseDataModule, prepare_synapse


def write_raw(raw, ids=(1, 2, 5), shape=(16, 12, 4), zooms=(0.8, 0.8, 3.0)):
    """Tiny BTCV-like NIfTI pairs under raw/RawData/Training/{img,label}."""
    img_dir = raw / "RawData" / "Training" / "img"
    lbl_dir = raw / "RawData" / "Training" / "label"
    img_dir.mkdir(parents=True)
    lbl_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    volumes = {}
    for i in ids:
        hu = rng.uniform(-1000, 1000, size=shape)
        label = np.zeros(shape, np.int16)
        label[2:8, 3:9, :] = 6  # liver
        label[10:13, 1:4, 1:3] = 11  # pancreas
        label[0, 0, 0] = 13
        for data, path in ((hu, img_dir / f"img{i:04d}.nii.gz"), (label, lbl_dir / f"label{i:04d}.nii.gz")):
            nii = nib.Nifti1Image(data.astype(np.float32 if data is hu else np.int16), np.diag([*zooms, 1.0]))
            nii.header.set_zooms(zooms)
            nib.save(nii, str(path))
        volumes[f"case{i:04d}"] = (hu.astype(np.float32), label)
    return volumes


def test_prepare_writes_the_transunet_layout(tmp_path):
    volumes = write_raw(tmp_path / "raw")
    out = tmp_path / "synapse"
    summary = prepare_synapse(
        str(tmp_path / "raw"), str(out), train_cases=["case0005", "case0001"], test_cases=["case0002"], verbose=False
    )
    assert summary == {"train_cases": 2, "train_slices": 8, "test_cases": 1}
    names = (out / "lists" / "train.txt").read_text().split()
    assert names[:2] == ["case0005_slice000", "case0005_slice001"] and len(names) == 8
    assert (out / "lists" / "test_vol.txt").read_text().split() == ["case0002"]
    hu, label = volumes["case0005"]
    with np.load(out / "train_npz" / "case0005_slice002.npz") as f:
        image, lab = f["image"], f["label"]
    # clip to [-125, 275] and scale to [0, 1]; slice k is raw[:, :, k] (transpose (x, y, z) -> (z, x, y))
    expected = (np.clip(hu[:, :, 2], -125, 275) + 125) / 400
    np.testing.assert_allclose(image, expected, atol=1e-6)
    np.testing.assert_array_equal(lab, label[:, :, 2])
    assert image.shape == (16, 12) and image.dtype == np.float32 and lab.dtype == np.uint8
    with h5py.File(out / "test_vol_h5" / "case0002.npy.h5", "r") as f:
        assert f["image"].shape == (4, 16, 12) and f["label"].shape == (4, 16, 12)
        np.testing.assert_allclose(f["spacing"][()], [3.0, 0.8, 0.8], rtol=1e-6)  # (z, x, y)
        np.testing.assert_array_equal(f["label"][()], volumes["case0002"][1].transpose(2, 0, 1))
        assert 0.0 <= f["image"][()].min() and f["image"][()].max() <= 1.0


def test_prepared_data_loads_in_the_data_module(tmp_path):
    write_raw(tmp_path / "raw")
    out = tmp_path / "synapse"
    prepare_synapse(str(tmp_path / "raw"), str(out), ["case0001", "case0005"], ["case0002"], verbose=False)
    dm = SynapseDataModule(str(out), str(out / "lists"), img_size=32, batch_size=2, val_cases=["case0005"])
    dm.setup("test")
    assert "spacing" not in next(iter(dm.test_dataloader()))  # default: HD95 in voxel units, as the paper
    dm = SynapseDataModule(
        str(out), str(out / "lists"), img_size=32, batch_size=2, val_cases=["case0005"], return_spacing=True
    )
    dm.setup("fit")
    assert dm.remap_applied  # ids 11 and 13 exist -> 14-class data
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 1, 32, 32)
    dm.setup("test")
    vol = next(iter(dm.test_dataloader()))
    assert vol["image"].shape == (1, 4, 16, 12)
    assert set(vol["mask"].unique().tolist()) == {0, 5, 6}  # 11 -> 5, 13 -> 0
    torch.testing.assert_close(vol["spacing"], torch.tensor([[3.0, 0.8, 0.8]]))


def test_prepare_errors(tmp_path, monkeypatch):
    write_raw(tmp_path / "raw", ids=(1, 2))
    with pytest.raises(ValueError, match="case0007"):
        prepare_synapse(str(tmp_path / "raw"), str(tmp_path / "o"), ["case0007"], ["case0001"], verbose=False)
    with pytest.raises(ValueError, match="both"):
        prepare_synapse(str(tmp_path / "raw"), str(tmp_path / "o"), ["case0001"], ["case0001"], verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no imgXXXX"):
        prepare_synapse(str(tmp_path / "empty"), str(tmp_path / "o2"), ["case0001"], [], verbose=False)
    (tmp_path / "raw" / "RawData" / "Training" / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(ValueError, match="no label file for .*img0002"):
        prepare_synapse(str(tmp_path / "raw"), str(tmp_path / "o"), ["case0001"], [], verbose=False)
    monkeypatch.setitem(sys.modules, "nibabel", None)  # simulate a missing optional dependency
    with pytest.raises(ImportError, match=r"pip install lomix-lightning\[nifti\]"):
        prepare_synapse(str(tmp_path / "raw"), str(tmp_path / "o"), ["case0001"], [], verbose=False)


def test_bad_label_file_is_named(tmp_path):
    write_raw(tmp_path / "raw", ids=(1,))
    bad = np.zeros((16, 12, 4), np.int16)
    bad[0, 0, 0] = 20
    nib.save(
        nib.Nifti1Image(bad, np.eye(4)), str(tmp_path / "raw" / "RawData" / "Training" / "label" / "label0001.nii.gz")
    )
    with pytest.raises(ValueError, match=r"label0001\.nii\.gz.*\[0, 13\]"):
        prepare_synapse(str(tmp_path / "raw"), str(tmp_path / "o"), ["case0001"], [], verbose=False)
