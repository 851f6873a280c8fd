"""`trainer.test` on Synapse-format volumes: per-organ 3-D Dice and HD95 against an independent computation."""

import h5py
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, generate_binary_structure
from scipy.spatial.distance import cdist
from torch import nn

from lomix_lightning import LoMixSegmentationModule
from lomix_lightning.data import SynapseDataModule

SIZE, DEPTH, CLASSES = 32, 6, 9


class IntensityNet(nn.Module):
    """Reads the label back from the image (image = label / 10) and predicts it shifted one pixel right.

    No parameter: the test controls exactly what is predicted, so the expected scores can be computed by hand.
    """

    num_outputs, num_classes, in_channels = 2, CLASSES, 1

    def forward(self, x):
        label = torch.round(x[:, 0] * 10).long().clamp(0, CLASSES - 1)
        shifted = torch.roll(label, shifts=1, dims=-1)
        logits = torch.nn.functional.one_hot(shifted, CLASSES).permute(0, 3, 1, 2).float() * 10
        return [logits[..., ::2, ::2], logits]


def _volume(rng):
    label = np.zeros((DEPTH, SIZE, SIZE), dtype=np.uint8)
    for organ in (1, 2, 6):  # spleen, right kidney, liver
        z0, y0, x0 = rng.integers(0, DEPTH - 3), rng.integers(2, SIZE - 12), rng.integers(2, SIZE - 12)
        label[z0 : z0 + 3, y0 : y0 + rng.integers(4, 10), x0 : x0 + rng.integers(4, 10)] = organ
    return (label / 10.0).astype(np.float32), label


@pytest.fixture
def synapse(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "train_npz").mkdir()
    (tmp_path / "test_vol_h5").mkdir()
    (tmp_path / "lists").mkdir()
    names = []
    for case in ("case0005", "case0006", "case0007"):
        image, label = _volume(rng)
        for k in range(2):
            names.append(f"{case}_slice{k:03d}")
            np.savez(tmp_path / "train_npz" / f"{names[-1]}.npz", image=image[k], label=label[k])
    volumes = {}
    for case in ("case0001", "case0002"):
        volumes[case] = _volume(rng)
        with h5py.File(tmp_path / "test_vol_h5" / f"{case}.npy.h5", "w") as f:
            f["image"], f["label"] = volumes[case]
    (tmp_path / "lists" / "train.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "lists" / "test_vol.txt").write_text("case0001\ncase0002\n")
    return tmp_path, volumes


def _surface(mask):
    return mask & ~binary_erosion(mask, generate_binary_structure(3, 1))


def _expected(volumes):
    """Per-organ Dice and HD95 (medpy's pooled 95th percentile, by brute force), TransUNet empty rule, case mean."""
    dice, hd95 = np.zeros((len(volumes), CLASSES - 1)), np.zeros((len(volumes), CLASSES - 1))
    for i, (_, label) in enumerate(volumes.values()):
        pred = np.roll(label, 1, axis=-1)
        for c in range(1, CLASSES):
            p, g = pred == c, label == c
            if p.any() and g.any():
                dice[i, c - 1] = 2 * (p & g).sum() / (p.sum() + g.sum())
                sp, sg = np.argwhere(_surface(p)), np.argwhere(_surface(g))
                d = cdist(sp, sg)
                hd95[i, c - 1] = np.percentile(np.hstack([d.min(axis=1), d.min(axis=0)]), 95)
            elif p.any():
                dice[i, c - 1], hd95[i, c - 1] = 1.0, 0.0
    return dice.mean(axis=0), hd95.mean(axis=0)


def test_volume_test_matches_independent_metrics(synapse):
    root, volumes = synapse
    data = SynapseDataModule(root=str(root), list_dir=str(root / "lists"), img_size=SIZE, batch_size=2)
    model = LoMixSegmentationModule(IntensityNet(), CLASSES, class_names=data.class_names)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = trainer.test(model, data, verbose=False)[0]
    dice, hd95 = _expected(volumes)
    assert results["test/cases"] == 2
    for c, organ in enumerate(data.class_names[1:]):
        assert results[f"test/dice/{organ}"] == pytest.approx(dice[c], abs=1e-5), organ
        assert results[f"test/hd95/{organ}"] == pytest.approx(hd95[c], abs=1e-4), organ
    assert results["test/dice"] == pytest.approx(dice.mean(), abs=1e-5)
    assert 0 < results["test/dice"] < 1 and results["test/hd95/spleen"] > 0  # the shift makes errors to measure
