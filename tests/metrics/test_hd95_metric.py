import itertools

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from lomix_lightning.metrics import hd95, surface_distances


def brute_surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Foreground voxels with a background (or out-of-array) neighbour: offsets with |o|_1 <= connectivity."""
    offsets = [o for o in itertools.product((-1, 0, 1), repeat=mask.ndim) if 0 < sum(abs(v) for v in o) <= connectivity]
    padded = np.pad(mask, 1, constant_values=False)
    out = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        for o in offsets:
            if not padded[tuple(i + 1 + d for i, d in zip(idx, o))]:
                out[idx] = True
                break
    return out


def brute_hd95(a, b, spacing=None, connectivity=1):
    sp = np.ones(a.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    pa = np.argwhere(brute_surface(a, connectivity)) * sp
    pb = np.argwhere(brute_surface(b, connectivity)) * sp
    d = cdist(pa, pb)
    return float(np.percentile(np.hstack((d.min(axis=1), d.min(axis=0))), 95))


def random_blob(rng, shape, sigma=1.5):
    field = gaussian_filter(rng.standard_normal(shape), sigma)
    mask = field > np.quantile(field, rng.uniform(0.6, 0.9))
    return mask


@pytest.mark.parametrize("seed", range(12))
def test_hd95_matches_brute_force_2d(seed):
    rng = np.random.default_rng(seed)
    a, b = random_blob(rng, (24, 20)), random_blob(rng, (24, 20))
    for connectivity in (1, 2):
        for spacing in (None, (0.7, 1.9)):
            assert hd95(a, b, spacing, connectivity) == pytest.approx(brute_hd95(a, b, spacing, connectivity))


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force_3d(seed):
    rng = np.random.default_rng(100 + seed)
    a, b = random_blob(rng, (7, 14, 12), 1.2), random_blob(rng, (7, 14, 12), 1.2)
    for connectivity in (1, 3):
        for spacing in (None, (2.5, 0.8, 0.8)):
            assert hd95(a, b, spacing, connectivity) == pytest.approx(brute_hd95(a, b, spacing, connectivity))


def test_directed_distances_match_brute_force():
    rng = np.random.default_rng(7)
    a, b = random_blob(rng, (16, 16)), random_blob(rng, (16, 16))
    d_ab, d_ba = surface_distances(a, b)
    pa, pb = np.argwhere(brute_surface(a, 1)), np.argwhere(brute_surface(b, 1))
    d = cdist(pa, pb)
    np.testing.assert_allclose(np.sort(d_ab), np.sort(d.min(axis=1)))
    np.testing.assert_allclose(np.sort(d_ba), np.sort(d.min(axis=0)))


def test_objects_touching_the_border():
    # the crop must keep array-border voxels on the surface (erosion treats outside as background)
    a = np.zeros((10, 10), bool)
    a[:, :4] = True
    b = np.zeros((10, 10), bool)
    b[:6, :] = True
    assert hd95(a, b) == pytest.approx(brute_hd95(a, b))
    full = np.ones((5, 6), bool)
    assert hd95(full, full) == 0.0


def test_hand_worked_values():
    # two single voxels (distance sqrt(3^2 + 4^2) = 5)
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[1, 1] = True
    b[4, 5] = True
    assert hd95(a, b) == pytest.approx(5.0)
    assert hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(np.hypot(6, 4))
    # a 3x3 square (columns 2-4) and the same square shifted to columns 5-7; the nearest surface of the other
    # square is column 5 (resp. 4), so distances depend on the column only:
    sq = np.zeros((9, 9), bool)
    sq[2:5, 2:5] = True
    moved = np.roll(sq, 3, axis=1)
    d_ab, d_ba = surface_distances(sq, moved)
    # surface of A = all 8 border voxels (col 2: 3 voxels at distance 3, col 3: 2 voxels at 2, col 4: 3 voxels at 1)
    assert sorted(d_ab.tolist()) == [1, 1, 1, 2, 2, 3, 3, 3]
    assert sorted(d_ba.tolist()) == [1, 1, 1, 2, 2, 3, 3, 3]
    # pooled 16 values; 95th percentile with linear interpolation: index 0.95*15 = 14.25 -> 3
    assert hd95(sq, moved) == pytest.approx(3.0)
    assert hd95(sq, sq) == 0.0


def test_percentile_is_pooled_not_max_of_directed():
    # A: a 10x10 square; B: the same square plus a 3x3 square in columns 14-16 (rows 0-2).
    # d(A->B): 36 zeros. d(B->A): 36 zeros + the small square's 8 surface voxels at distances to column 9:
    # column 14 -> 5 (x3), column 15 -> 6 (x2), column 16 -> 7 (x3).
    # pooled (80 values): index 0.95 * 79 = 75.05 -> sorted[75] = 6, sorted[76] = 6 -> 6.0
    # directed B->A only (44 values): index 0.95 * 43 = 40.85 -> 6 + 0.85 * (7 - 6) = 6.85 (max-of-directed style)
    a = np.zeros((20, 20), bool)
    a[0:10, 0:10] = True
    b = a.copy()
    b[0:3, 14:17] = True
    assert hd95(a, b) == pytest.approx(6.0)
    _, d_ba = surface_distances(a, b)
    assert np.percentile(d_ba, 95) == pytest.approx(6.85)


def test_symmetric_and_accepts_int_masks():
    rng = np.random.default_rng(3)
    a, b = random_blob(rng, (15, 15)), random_blob(rng, (15, 15))
    assert hd95(a, b) == pytest.approx(hd95(b, a))
    assert hd95(a.astype(np.uint8) * 3, b.astype(np.int64)) == pytest.approx(hd95(a, b))


def test_errors():
    a = np.zeros((5, 5), bool)
    a[2, 2] = True
    with pytest.raises(ValueError, match="pred"):
        hd95(np.zeros((5, 5)), a)
    with pytest.raises(ValueError, match="gt"):
        hd95(a, np.zeros((5, 5)))
    with pytest.raises(ValueError, match="same shape"):
        hd95(a, np.ones((5, 6)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing=(1.0, 0.0))
    with pytest.raises(ValueError, match="connectivity"):
        hd95(a, a, connectivity=3)
