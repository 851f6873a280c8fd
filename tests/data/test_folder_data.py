from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lomix_lightning.data import (
    FolderSegmentationDataModule,
    MultiScaleCollate,
    load_binary_mask,
    pair_files,
    scaled_size,
)
from lomix_lightning.data.components.transforms import IMAGENET_MEAN, IMAGENET_STD

H, W = 40, 50


def write_folder(root: Path, n: int = 6, same_dir: bool = False):
    images = root / "images"
    masks = images if same_dir else root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(exist_ok=True)
    for i in range(n):
        mask = np.zeros((H, W), np.uint8)
        mask[5 + i : 20 + i, 10 : 30 + i] = 255
        mask[28:34, 36:44] = 255  # a second, small blob: the shape is not symmetric
        image = np.full((H, W, 3), 30, np.uint8)
        image[mask > 0] = 250
        ext = ".jpg" if i == 5 and not same_dir else ".png"  # jpg images are fine (mask stays png)
        Image.fromarray(image).save(images / f"img{i}{ext}")
        mask_name = f"img{i}.png" if (i % 2 and not same_dir) else f"img{i}_mask.png"
        Image.fromarray(mask).save(masks / mask_name)
    return images, masks


def test_pairing_rules(tmp_path):
    images, masks = write_folder(tmp_path)
    pairs = pair_files(images, masks)
    assert [p.stem for p in pairs] == [f"img{i}" for i in range(6)]
    assert [p.mask.name for p in pairs[:2]] == ["img0_mask.png", "img1.png"]
    # an exact-stem mask wins over a suffixed one
    Image.fromarray(np.zeros((H, W), np.uint8)).save(masks / "img0.png")
    assert pair_files(images, masks)[0].mask.name == "img0.png"


def test_same_dir_layout_and_extra_masks_merged(tmp_path):
    images, _ = write_folder(tmp_path, same_dir=True)
    extra = np.zeros((H, W), np.uint8)
    extra[0:3, 0:3] = 255
    Image.fromarray(extra).save(images / "img2_mask_1.png")  # BUSI-style second lesion
    pairs = pair_files(images, images)
    assert [p.stem for p in pairs] == [f"img{i}" for i in range(6)]
    assert pairs[2].extra_masks == (images / "img2_mask_1.png",)
    dm = FolderSegmentationDataModule(str(images), str(images), img_size=64, splits=(0.0, 0.0, 1.0), augment=False)
    dm.setup()
    item = next(x for x in dm.test_set if x["name"] == "img2")
    assert item["mask"][0, 0] == 1  # the extra mask's corner is foreground


def test_pairing_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no image files"):
        pair_files(empty, empty)
    images, masks = write_folder(tmp_path / "a")
    (masks / "img1.png").unlink()
    with pytest.raises(ValueError, match=r"have no mask.*img1\.png"):
        pair_files(images, masks)
    images, masks = write_folder(tmp_path / "b")
    for p in masks.iterdir():
        p.rename(masks / f"other_{p.name}")
    with pytest.raises(ValueError, match="no image .* has a matching mask"):
        pair_files(images, masks)
    images, masks = write_folder(tmp_path / "c")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(masks / "img0_mask.bmp")
    with pytest.raises(ValueError, match="ambiguous"):
        pair_files(images, masks)
    with pytest.raises(FileNotFoundError, match="nope"):
        pair_files(tmp_path / "nope", masks)


def test_binarisation(tmp_path):
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert load_binary_mask(tmp_path / "g.png").tolist() == [[0, 0, 1, 1]]
    Image.fromarray(np.array([[0, 1, 1, 0]], np.uint8)).save(tmp_path / "01.png")
    assert load_binary_mask(tmp_path / "01.png").tolist() == [[0, 1, 1, 0]]
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 1] = 255
    rgb[0, 2] = (255, 0, 0)  # mean 85 -> background
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert load_binary_mask(tmp_path / "rgb.png").tolist() == [[0, 1, 0]]
    pal = Image.fromarray(np.array([[0, 2, 1]], np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20] + [0] * 759)
    pal.save(tmp_path / "p.png")
    assert load_binary_mask(tmp_path / "p.png").tolist() == [[0, 1, 1]]
    Image.fromarray(np.array([[0, 40000]], np.uint16)).save(tmp_path / "16.png")
    assert load_binary_mask(tmp_path / "16.png").tolist() == [[0, 1]]


def make_dm(images, masks, **kwargs):
    kwargs.setdefault("img_size", 64)
    kwargs.setdefault("batch_size", 2)
    return FolderSegmentationDataModule(str(images), str(masks), **kwargs)


def test_split_sizes_reproducible_and_disjoint(tmp_path):
    images, masks = write_folder(tmp_path)
    dm = make_dm(images, masks, seed=42)
    dm.setup("fit")
    s = dm.split_stems
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (4, 1, 1)
    assert sorted(s["train"] + s["val"] + s["test"]) == [f"img{i}" for i in range(6)]
    dm2 = make_dm(images, masks, seed=42)
    dm2.setup("fit")
    assert dm2.split_stems == s
    splits = set()
    for seed in range(6):
        other = make_dm(images, masks, seed=seed)
        other.setup("fit")
        splits.add(tuple(other.split_stems["test"]))
    assert len(splits) > 1


def test_split_files(tmp_path):
    images, masks = write_folder(tmp_path)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("img0\nimg1\nimg2\n")
    (lists / "val.txt").write_text("img3\n")
    (lists / "test.txt").write_text("img4\nimg5\n")
    dm = make_dm(images, masks, split_files=str(lists))
    dm.setup()
    assert dm.split_stems == {"train": ["img0", "img1", "img2"], "val": ["img3"], "test": ["img4", "img5"]}
    (lists / "test.txt").write_text("img4\nimg9\n")
    with pytest.raises(ValueError, match=r"test\.txt.*img9"):
        make_dm(images, masks, split_files=str(lists)).setup()
    (lists / "test.txt").write_text("img3\n")
    with pytest.raises(ValueError, match="already listed"):
        make_dm(images, masks, split_files=str(lists)).setup()


def denormalise(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean) * 255


def test_multiscale_batches_and_alignment(tmp_path):
    images, masks = write_folder(tmp_path)
    dm = make_dm(images, masks, img_size=64, splits=(1.0, 0.0, 0.0), batch_size=2, seed=0)
    dm.setup("fit")
    allowed = {scaled_size(64, s) for s in (0.75, 1.0, 1.25)}
    assert allowed == {64, 96}  # 48 -> 64, 64 -> 64, 80 -> 96 (multiples of 32)
    seen = set()
    for _ in range(4):
        for batch in dm.train_dataloader():
            b, c, h, w = batch["image"].shape
            assert c == 3 and h == w and h % 32 == 0 and h in allowed
            assert batch["mask"].shape == (b, h, w) and batch["mask"].dtype == torch.int64
            assert set(batch["mask"].unique().tolist()) <= {0, 1}
            seen.add(h)
            # aligned after rotation/flips/resizing: bright pixels of the image are the mask
            bright = denormalise(batch["image"][0]).mean(0) > 140
            agree = (bright == batch["mask"][0].bool()).float().mean().item()
            assert agree > 0.97
    assert seen == allowed


def test_augmentation_moves_the_shape_and_eval_does_not(tmp_path):
    images, masks = write_folder(tmp_path)
    dm = make_dm(images, masks, img_size=64, splits=(1.0, 0.0, 0.0), multiscale=[1.0], seed=1)
    dm.setup("fit")
    reference = make_dm(images, masks, img_size=64, splits=(0.0, 0.0, 1.0), augment=False)
    reference.setup()
    plain = {x["name"]: x["mask"] for x in reference.test_set}
    moved = [not torch.equal(dm.train_set[i]["mask"], plain[dm.train_set[i]["name"]]) for i in range(6)]
    assert sum(moved) >= 5  # a random rotation in [-90, 90] almost never leaves the mask unchanged
    again = {x["name"]: x["mask"] for x in reference.test_set}
    assert all(torch.equal(plain[k], again[k]) for k in plain)


def test_normalisation_and_eval_size(tmp_path):
    images, masks = write_folder(tmp_path)
    dm = make_dm(images, masks, img_size=96, splits=(0.0, 0.0, 1.0), augment=False)
    dm.setup()
    item = dm.test_set[0]
    assert item["image"].shape == (3, 96, 96) and item["mask"].shape == (96, 96)
    corner = item["image"][:, 0, 0]  # background value 30 in every channel
    expected = (30 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(corner, expected.float(), atol=1e-4, rtol=0)
    assert (dm.num_classes, dm.in_channels, dm.class_names) == (1, 3, ["foreground"])


def test_size_mismatch_named(tmp_path):
    images, masks = write_folder(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "img0_mask.png")
    dm = make_dm(images, masks, splits=(0.0, 0.0, 1.0))
    dm.setup()
    with pytest.raises(ValueError, match=r"img0\.png.*img0_mask\.png"):
        dm.test_set[0]


def test_multiscale_collate_seeded():
    samples = [{"image": torch.rand(3, 64, 64), "mask": torch.randint(0, 2, (64, 64))} for _ in range(2)]
    a = MultiScaleCollate(64, (0.5, 1.0, 1.5), seed=3)
    b = MultiScaleCollate(64, (0.5, 1.0, 1.5), seed=3)
    sizes_a = [a(samples)["image"].shape[-1] for _ in range(20)]
    assert sizes_a == [b(samples)["image"].shape[-1] for _ in range(20)]
    assert set(sizes_a) == {32, 64, 96}
    out = MultiScaleCollate(64, (2.0,), seed=0)(samples)
    # nearest-exact upsampling by 2 repeats every mask pixel
    assert torch.equal(out["mask"][0], samples[0]["mask"].repeat_interleave(2, 0).repeat_interleave(2, 1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(splits=(0.5, 0.5)), "splits"),
        (dict(splits=(0.8, 0.3, 0.1)), "splits"),
        (dict(multiscale=[]), "multiscale"),
        (dict(multiscale=[1.0, -0.5]), "multiscale"),
        (dict(img_size=16), "img_size"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FolderSegmentationDataModule("images", "masks", **kwargs)


def test_empty_split_loader_raises(tmp_path):
    images, masks = write_folder(tmp_path)
    dm = make_dm(images, masks, splits=(1.0, 0.0, 0.0))
    dm.setup()
    with pytest.raises(ValueError, match="val split is empty"):
        dm.val_dataloader()
