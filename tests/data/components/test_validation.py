"""The one integer validator and the one label-range helper of lomix_lightning.data.components.validation."""

import numpy as np
import pytest
import torch

from lomix_lightning.data.components.validation import (
    check_int,
    check_label_range,
    label_range_mask,
    labels_outside_range,
)


def _outside_by_loop(values, high, ignore_index):
    """Independent reference: a plain loop over the flattened labels."""
    found = set()
    for v in np.asarray(values).ravel().tolist():
        if (v < 0 or v > high) and v != ignore_index:
            found.add(v)
    return sorted(found)


@pytest.mark.parametrize("ignore_index", [None, 255, -100])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_labels_outside_range_matches_a_plain_loop(ignore_index, as_tensor):
    rng = np.random.default_rng(0)
    labels = rng.choice([-100, -1, 0, 1, 2, 3, 4, 7, 255], size=(3, 5, 6))
    expected = _outside_by_loop(labels, high=3, ignore_index=ignore_index)
    given = torch.from_numpy(labels) if as_tensor else labels
    assert labels_outside_range(given, high=3, ignore_index=ignore_index) == expected
    mask = label_range_mask(given, high=3, ignore_index=ignore_index)
    assert np.asarray(mask).sum() == sum(1 for v in labels.ravel() if (v < 0 or v > 3) and v != ignore_index), (
        "the mask flags exactly the offending pixels"
    )


def test_labels_outside_range_in_range_limit_and_binary():
    assert labels_outside_range(np.zeros((0,), dtype=np.int64), high=3) == []
    assert labels_outside_range(torch.tensor([[0, 1], [1, 0]]), high=1) == []
    assert labels_outside_range(torch.arange(-5, 20), high=9, limit=3) == [-5, -4, -3]


def test_check_label_range_messages():
    check_label_range(np.array([0.0, 2.0]), 3, "ok.npz")
    with pytest.raises(ValueError, match=r"^a\.npz: label ids must lie in \[0, 2\], found \[-1, 3\]$"):
        check_label_range(np.array([[0, 3], [-1, 2]]), 3, "a.npz")
    with pytest.raises(ValueError, match=r"^b\.npz: label map contains non-integer values$"):
        check_label_range(np.array([0.0, 1.5]), 3, "b.npz")


@pytest.mark.parametrize("value", [0, -3, 2.0, True, "4", None])
def test_check_int_one_message_style(value):
    with pytest.raises(ValueError, match=rf"^`batch_size` must be an integer >= 1, got {value!r}$"):
        check_int("batch_size", value, minimum=1)


def test_check_int_accepts_ints_and_numpy_ints():
    check_int("seed", 0, minimum=0)
    check_int("seed", np.int64(5), minimum=0)
