import numpy as np
import pytest
import torch

from lomix_lightning.data import SyntheticShapesDataModule, SyntheticShapesDataset, make_shapes_sample


def _collect(loader):
    images, masks = [], []
    for batch in loader:
        images.append(batch["image"])
        masks.append(batch["mask"])
    return torch.cat(images), torch.cat(masks)


@pytest.mark.parametrize(("num_classes", "in_channels"), [(2, 1), (4, 1), (6, 3), (8, 3)])
def test_shapes_dtypes_and_class_range(num_classes, in_channels):
    dm = SyntheticShapesDataModule(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=32,
        num_train=6,
        num_val=4,
        num_test=4,
        batch_size=3,
    )
    assert len(dm.class_names) == num_classes
    assert dm.class_names[0] == "background"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (3, in_channels, 32, 32)
    assert batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 32, 32)
    assert batch["mask"].dtype == torch.int64
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        _, masks = _collect(loader)
        assert masks.min() >= 0
        assert masks.max() < num_classes


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_every_class_present_in_each_split(split):
    ds = SyntheticShapesDataset(8, num_classes=7, in_channels=1, image_size=64, seed=3, split=split)
    present = set()
    for i in range(len(ds)):
        present |= set(ds[i]["mask"].unique().tolist())
    assert present == set(range(7))


def test_scales_differ():
    # class 1 (blob) must cover far more pixels than class 2 (lines) and class 3 (dots)
    ds = SyntheticShapesDataset(16, num_classes=4, image_size=64, seed=0)
    counts = np.zeros(4)
    for i in range(len(ds)):
        counts += np.bincount(ds[i]["mask"].flatten().numpy(), minlength=4)
    assert counts[1] > 5 * counts[2]
    assert counts[1] > 5 * counts[3]
    assert counts[2] > 0


def test_deterministic_and_order_independent():
    a = SyntheticShapesDataset(5, num_classes=5, in_channels=3, seed=11)
    b = SyntheticShapesDataset(5, num_classes=5, in_channels=3, seed=11)
    for i in (4, 0, 2):  # a different read order must give the same samples
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    c = SyntheticShapesDataset(5, num_classes=5, in_channels=3, seed=12)
    assert not torch.equal(a[0]["image"], c[0]["image"])


def test_module_is_deterministic_including_shuffle():
    def first_train_batch():
        dm = SyntheticShapesDataModule(image_size=32, num_train=16, batch_size=4, seed=5)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))

    b1, b2 = first_train_batch(), first_train_batch()
    assert b1["name"] == b2["name"]
    assert torch.equal(b1["image"], b2["image"])


def test_splits_use_disjoint_seeds():
    kwargs = dict(num_classes=4, image_size=32, seed=0)
    train = SyntheticShapesDataset(4, split="train", **kwargs)
    val = SyntheticShapesDataset(4, split="val", **kwargs)
    test = SyntheticShapesDataset(4, split="test", **kwargs)
    train_imgs = [train[i]["image"] for i in range(4)]
    for other in (val, test):
        for i in range(4):
            assert all(not torch.equal(other[i]["image"], t) for t in train_imgs)


def test_image_intensity_follows_mask():
    # foreground classes are brighter than the background on average: the task is learnable
    image, mask = make_shapes_sample(np.random.default_rng(0), num_classes=4, in_channels=1, image_size=64)
    bg = image[0][mask == 0].mean()
    for c in range(1, 4):
        assert image[0][mask == c].mean() > bg + 0.2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_classes=1), "num_classes"),
        (dict(in_channels=2), "in_channels"),
        (dict(image_size=8), "image_size"),
        (dict(num_train=0), "num_train"),
        (dict(num_val=-1), "num_val"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_workers=-1), "num_workers"),
        (dict(seed=-3), "seed"),
        (dict(num_test=2.5), "num_test"),
    ],
)
def test_bad_args_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticShapesDataModule(**kwargs)


def test_dataset_bad_split_and_index():
    with pytest.raises(ValueError, match="split"):
        SyntheticShapesDataset(2, split="valid")
    with pytest.raises(IndexError):
        SyntheticShapesDataset(2)[2]
