import cv2
import h5py
import numpy as np
import pytest
import torch
from _fixtures import SYNAPSE_SIZE as SIZE
from _fixtures import write_synapse

from lomix_lightning.data import (
    SYNAPSE_14_TO_9,
    SeededTransform,
    SliceDataset,
    SynapseDataModule,
    medical_train_transform,
)
from lomix_lightning.data.components.loaders import make_loader

CASES = ["case0005", "case0006", "case0007", "case0009", "case0010"]


@pytest.fixture
def synapse_root(tmp_path):
    return write_synapse(tmp_path / "synapse", CASES)


def make_dm(root, **kwargs):
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("batch_size", 4)
    return SynapseDataModule(root=str(root), list_dir=str(root / "lists"), **kwargs)


def test_default_split_shapes_and_remap(synapse_root):
    dm = make_dm(synapse_root)
    assert (dm.num_classes, dm.in_channels, len(dm.class_names)) == (9, 1, 9)
    assert dm.class_names[5] == "pancreas"
    dm.setup("fit")
    assert dm.val_case_names == ["case0009", "case0010"]
    assert dm.train_case_names == ["case0005", "case0006", "case0007"]
    assert dm.remap_applied is True
    assert len(dm.train_set) == 9 and len(dm.val_set) == 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 32, 32) and batch["mask"].dtype == torch.int64
    masks = torch.cat([b["mask"] for b in dm.val_dataloader()])
    assert masks.max() <= 8
    assert 5 in masks.unique().tolist()  # pancreas (raw id 11) became 5


def test_validation_is_resize_only(synapse_root):
    dm = make_dm(synapse_root)
    dm.setup("validate")
    item = dm.val_set[0]
    raw = np.load(synapse_root / "train_npz" / f"{item['name']}.npz")
    expected_img = cv2.resize(raw["image"].astype(np.float32), (32, 32), interpolation=cv2.INTER_CUBIC)
    expected_lbl = cv2.resize(SYNAPSE_14_TO_9[raw["label"].astype(int)], (32, 32), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_allclose(item["image"][0].numpy(), expected_img, atol=1e-6)
    np.testing.assert_array_equal(item["mask"].numpy(), expected_lbl)
    assert torch.equal(dm.val_set[0]["image"], item["image"])  # no randomness


def test_test_volumes_original_resolution(synapse_root):
    dm = make_dm(synapse_root)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].shape == (1, 8, SIZE, SIZE) and b["image"].dtype == torch.float32
    assert b["mask"].shape == (1, 8, SIZE, SIZE) and b["mask"].dtype == torch.int64
    assert b["case_name"] == ["case0001"]
    assert bool(b["volume"][0])
    assert set(b["mask"].unique().tolist()) == {0, 5, 6}
    assert len(list(dm.predict_dataloader())) == 2


def test_training_fraction_picks_whole_cases(tmp_path):
    cases = [f"case{i:04d}" for i in range(1, 13)]
    root = write_synapse(tmp_path / "s", cases, slices=2)
    dm = make_dm(root, train_fraction=0.25, seed=7)  # 0.25 * 12 = 3 cases, drawn from the 10 non-val cases
    dm.setup("fit")
    assert len(dm.train_case_names) == 3
    assert not set(dm.train_case_names) & set(dm.val_case_names)
    train_names = {p.stem for p in dm.train_set.paths}
    assert train_names == {f"{c}_slice{k:03d}" for c in dm.train_case_names for k in range(2)}
    again = make_dm(root, train_fraction=0.25, seed=7)
    again.setup("fit")
    assert again.train_case_names == dm.train_case_names
    others = set()
    for seed in range(8):
        other = make_dm(root, train_fraction=0.25, seed=seed)
        other.setup("fit")
        others.add(tuple(other.train_case_names))
    assert len(others) > 1


def test_explicit_cases_and_empty_validation(synapse_root):
    dm = make_dm(synapse_root, train_cases=["case0010"], val_cases=["case0005"])
    dm.setup("fit")
    assert dm.train_case_names == ["case0010"] and dm.val_case_names == ["case0005"]
    dm = make_dm(synapse_root, val_cases=[])
    dm.setup("fit")
    assert len(dm.train_case_names) == 5
    assert dm.val_dataloader() == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(train_cases=["case0005"], train_fraction=0.5), "at most one"),
        (dict(train_fraction=0.0), "train_fraction"),
        (dict(num_classes=10), "num_classes"),
        (dict(remap_14_to_9=True, num_classes=14), "remap"),
        (dict(batch_size=0), "batch_size"),
        (dict(val_cases="case0005"), "val_cases"),
        (dict(class_order="transunet", num_classes=14), "transunet"),
    ],
)
def test_bad_arguments(synapse_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(synapse_root, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(val_cases=["case0099"]), "case0099"),
        (dict(train_cases=["case0009"], val_cases=["case0009"]), "overlap"),
    ],
)
def test_bad_cases_fail_in_setup(synapse_root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_dm(synapse_root, **kwargs).setup("fit")


def test_remap_detection_and_14_classes(tmp_path):
    root9 = write_synapse(tmp_path / "nine", CASES, labels14=False)
    dm = make_dm(root9)
    dm.setup("fit")
    assert dm.remap_applied is False
    root14 = write_synapse(tmp_path / "fourteen", CASES)
    dm14 = make_dm(root14, num_classes=14)
    dm14.setup("test")
    assert dm14.remap_applied is False and len(dm14.class_names) == 14
    assert 11 in next(iter(dm14.test_dataloader()))["mask"].unique().tolist()
    # 14-class files with the remap switched off do not fit 9 classes: the error names the file
    dm_off = make_dm(root14, remap_14_to_9=False)
    dm_off.setup("fit")
    with pytest.raises(ValueError, match=r"case0005_slice000\.npz.*\[0, 8\]"):
        dm_off.train_set[0]


def test_bad_files_are_named(synapse_root):
    (synapse_root / "train_npz" / "case0006_slice001.npz").unlink()
    with pytest.raises(FileNotFoundError, match="case0006_slice001"):
        make_dm(synapse_root).setup("fit")


def test_missing_key_and_shape_mismatch_are_named(synapse_root):
    np.savez(synapse_root / "train_npz" / "case0005_slice000.npz", img=np.zeros((SIZE, SIZE)), label=np.zeros((8, 8)))
    np.savez(synapse_root / "train_npz" / "case0005_slice001.npz", image=np.zeros((SIZE, SIZE)), label=np.zeros((8, 8)))
    dm = make_dm(synapse_root, remap_14_to_9=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"case0005_slice000\.npz: missing key\(s\) \['image'\]"):
        dm.train_set[0]
    with pytest.raises(ValueError, match=r"case0005_slice001\.npz: image shape"):
        dm.train_set[1]


def test_missing_list_and_test_volume(synapse_root):
    with pytest.raises(FileNotFoundError, match="train.txt"):
        SynapseDataModule(root=str(synapse_root), list_dir=str(synapse_root / "nolists")).setup("fit")
    (synapse_root / "test_vol_h5" / "case0002.npy.h5").unlink()
    with pytest.raises(FileNotFoundError, match="case0002"):
        make_dm(synapse_root).setup("test")


def test_label_out_of_range_in_volume(synapse_root):
    with h5py.File(synapse_root / "test_vol_h5" / "case0001.npy.h5", "r+") as f:
        f["label"][0, 0, 0] = 20
    dm = make_dm(synapse_root)
    dm.setup("test")
    with pytest.raises(ValueError, match=r"case0001\.npy\.h5"):
        dm.test_set[0]


# ---------------------------------------------------------------- augmentation
def l_shape(size=32):
    """An asymmetric L so that every element of the dihedral group gives a different mask."""
    m = np.zeros((size, size), np.uint8)
    m[6:26, 8:13] = 1
    m[21:26, 8:22] = 1
    return m


def dihedral(m):
    rots = [np.rot90(m, k) for k in range(4)]
    return {"proper": rots, "reflection": [np.flip(r, axis) for r in rots for axis in (0, 1)]}


def test_augmentation_keeps_mask_aligned_and_matches_reference_branches():
    mask = l_shape()
    image = mask.astype(np.float32)
    t = SeededTransform(medical_train_transform(32), seed=0)
    counts = {"identity": 0, "reflection": 0, "proper_rotation": 0, "other": 0}
    n = 400
    for _ in range(n):
        out_img, out_mask = t(image, mask)
        # aligned: the thresholded image is the mask, up to boundary pixels of rotations
        inter = np.logical_and(out_img > 0.5, out_mask > 0).sum()
        union = np.logical_or(out_img > 0.5, out_mask > 0).sum()
        assert inter / union > 0.85
        group = dihedral(mask)
        if np.array_equal(out_mask, mask):
            counts["identity"] += 1
        elif any(np.array_equal(out_mask, r) for r in group["reflection"]):
            counts["reflection"] += 1
            assert np.allclose(out_img, out_mask)  # exact for flips and right-angle rotations
        elif any(np.array_equal(out_mask, r) for r in group["proper"]):
            counts["proper_rotation"] += 1
        else:
            counts["other"] += 1
    # reference: 0.5 rot90 + mandatory flip (a reflection), 0.25 small rotation, 0.25 nothing
    assert counts["proper_rotation"] == 0
    assert abs(counts["reflection"] / n - 0.5) < 0.08
    assert abs(counts["other"] / n - 0.25) < 0.08
    assert 0.25 - 0.08 < counts["identity"] / n < 0.25 + 0.1  # + rotations by a near-zero angle


def test_augmentation_is_seeded():
    mask = l_shape()
    image = mask.astype(np.float32)
    a = SeededTransform(medical_train_transform(24), seed=3)
    b = SeededTransform(medical_train_transform(24), seed=3)
    c = SeededTransform(medical_train_transform(24), seed=4)
    outs_a = [a(image, mask)[1] for _ in range(10)]
    outs_b = [b(image, mask)[1] for _ in range(10)]
    outs_c = [c(image, mask)[1] for _ in range(10)]
    assert all(np.array_equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not all(np.array_equal(x, y) for x, y in zip(outs_a, outs_c))


def test_train_loader_reproducible_and_workers_differ(synapse_root):
    def run(num_workers):
        dm = make_dm(synapse_root, seed=11, num_workers=num_workers, batch_size=1)
        dm.setup("fit")
        return [(b["name"][0], b["mask"]) for b in dm.train_dataloader()]

    first, second = run(0), run(0)
    assert [n for n, _ in first] == [n for n, _ in second]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, second))
    w1, w2 = run(2), run(2)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(w1, w2))


def test_each_worker_gets_its_own_augmentation_stream(tmp_path):
    # albumentations 2.0.8 does not reseed per worker; SeededTransform must, or workers replay the same stream
    path = tmp_path / "s.npz"
    np.savez(path, image=l_shape().astype(np.float32), label=l_shape())
    ds = SliceDataset([path] * 16, 2, SeededTransform(medical_train_transform(32), seed=0))
    masks = [b["mask"][0] for b in make_loader(ds, 1, num_workers=2, shuffle=False, seed=0)]
    worker0, worker1 = masks[0::2], masks[1::2]  # DataLoader hands batches to workers round-robin
    assert not all(torch.equal(a, b) for a, b in zip(worker0, worker1))
    again = [b["mask"][0] for b in make_loader(ds, 1, num_workers=2, shuffle=False, seed=0)]
    assert all(torch.equal(a, b) for a, b in zip(masks, again))
