import numpy as np
import pytest
import torch
from _fixtures import write_acdc

from lomix_lightning.data import ACDCDataModule


def test_shapes_classes_and_volumes(tmp_path):
    root = write_acdc(tmp_path / "ACDC")
    dm = ACDCDataModule(root=str(root), img_size=32, batch_size=3)
    assert (dm.num_classes, dm.in_channels, dm.class_names) == (4, 1, ["background", "RV", "Myo", "LV"])
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.val_set) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, 1, 32, 32) and batch["mask"].shape == (3, 32, 32)
    assert batch["mask"].dtype == torch.int64 and batch["mask"].max() <= 3
    val = next(iter(dm.val_dataloader()))
    assert set(val["mask"].unique().tolist()) == {0, 1, 2, 3}
    dm.setup("test")
    vol = next(iter(dm.test_dataloader()))
    assert vol["image"].shape == (1, 8, 50, 44) and vol["mask"].shape == (1, 8, 50, 44)
    assert vol["case_name"] == ["case_000_volume_ED"] and bool(vol["volume"][0])
    assert set(vol["mask"].unique().tolist()) == {0, 1, 2, 3}


def test_explicit_list_dir_and_glob_fallback(tmp_path):
    root = write_acdc(tmp_path / "a", list_subdir="my_lists")
    dm = ACDCDataModule(root=str(root), list_dir=str(root / "my_lists"), img_size=32)
    dm.setup("fit")
    assert len(dm.train_set) == 6
    # without any list file the sorted npz files of each split folder are used
    root2 = write_acdc(tmp_path / "b", with_lists=False)
    dm2 = ACDCDataModule(root=str(root2), img_size=32)
    dm2.setup("fit")
    assert [p.name for p in dm2.train_set.paths] == sorted(p.name for p in (root2 / "train").glob("*.npz"))


def test_bad_files_are_named(tmp_path):
    root = write_acdc(tmp_path / "ACDC")
    np.savez(root / "train" / "patient000_frame01_slice_0.npz", image=np.zeros((48, 40)), label=np.zeros((48, 40)))
    label = np.zeros((48, 40))
    label[0, 0] = 4
    np.savez(root / "train" / "patient001_frame01_slice_1.npz", img=np.zeros((48, 40)), label=label)
    dm = ACDCDataModule(root=str(root), img_size=32)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"patient000_frame01_slice_0\.npz: missing key\(s\) \['img'\]"):
        dm.train_set[0]
    with pytest.raises(ValueError, match=r"patient001_frame01_slice_1\.npz: label ids must lie in \[0, 3\]"):
        dm.train_set[1]
    (root / "valid" / "patient001_frame01_slice_1.npz").unlink()
    with pytest.raises(FileNotFoundError, match="patient001_frame01_slice_1"):
        ACDCDataModule(root=str(root)).setup("fit")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        ACDCDataModule(root=str(root), list_dir=str(tmp_path / "none")).setup("fit")


def test_empty_split_folder_and_2d_test_file(tmp_path):
    root = write_acdc(tmp_path / "x", with_lists=False)
    for p in (root / "valid").glob("*.npz"):
        p.unlink()
    with pytest.raises(ValueError, match="no .npz files"):
        ACDCDataModule(root=str(root)).setup("fit")
    np.savez(root / "test" / "case_000_volume_ED.npz", img=np.zeros((50, 44)), label=np.zeros((50, 44)))
    dm = ACDCDataModule(root=str(root))
    dm.setup("test")
    with pytest.raises(ValueError, match=r"case_000_volume_ED\.npz: expected a 3-D volume"):
        dm.test_set[0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="img_size"):
        ACDCDataModule(root="x", img_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        ACDCDataModule(root="x", batch_size=-1)
