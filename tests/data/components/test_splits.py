import pytest

from lomix_lightning.data import count_for_fraction, select_cases, split_by_ratio

SYNAPSE_TRAIN = [f"case{i:04d}" for i in (5, 6, 7, 9, 10, 21, 23, 24, 26, 27, 28, 30, 31, 33, 34, 37, 39, 40)]


@pytest.mark.parametrize(("fraction", "expected"), [(0.05, 1), (0.1, 2), (0.2, 4), (0.4, 7), (1.0, 18)])
def test_paper_table3_counts(fraction, expected):
    # paper Table 3: 5% (1 scan), 10% (2 scans), 20% (4 scans), 40% (7 scans) of the 18 training scans
    assert count_for_fraction(fraction, 18) == expected


def test_round_half_up_and_minimum_one():
    assert count_for_fraction(0.25, 10) == 3  # 2.5 -> 3 (Python's round would give 2)
    assert count_for_fraction(0.35, 10) == 4  # 3.5 -> 4 despite 0.35 * 10 = 3.4999999999999996
    assert count_for_fraction(0.01, 18) == 1
    with pytest.raises(ValueError, match="fraction"):
        count_for_fraction(0.0, 18)
    with pytest.raises(ValueError, match="fraction"):
        count_for_fraction(1.5, 18)


@pytest.mark.parametrize(("fraction", "expected"), [(0.05, 1), (0.1, 2), (0.2, 4), (0.4, 7)])
def test_select_cases_sizes_exclusion_and_reproducibility(fraction, expected):
    val = ["case0039", "case0040"]
    chosen = select_cases(SYNAPSE_TRAIN, fraction, seed=1234, exclude=val)
    assert len(chosen) == expected
    assert not set(chosen) & set(val)
    assert set(chosen) <= set(SYNAPSE_TRAIN)
    assert chosen == sorted(chosen)
    assert chosen == select_cases(list(reversed(SYNAPSE_TRAIN)), fraction, seed=1234, exclude=val)


def test_select_cases_depends_on_seed_and_is_nested():
    draws = {tuple(select_cases(SYNAPSE_TRAIN, 0.2, seed=s)) for s in range(10)}
    assert len(draws) > 1
    for seed in range(5):
        subsets = [set(select_cases(SYNAPSE_TRAIN, f, seed=seed)) for f in (0.05, 0.1, 0.2, 0.4, 1.0)]
        assert all(a <= b for a, b in zip(subsets, subsets[1:]))


def test_select_cases_clamps_with_warning_and_rejects_empty_pool():
    with pytest.warns(UserWarning, match="only 16"):
        chosen = select_cases(SYNAPSE_TRAIN, 1.0, seed=0, exclude=["case0039", "case0040"])
    assert len(chosen) == 16
    with pytest.raises(ValueError, match="no case left"):
        select_cases(["a"], 0.5, seed=0, exclude=["a"])


def test_split_by_ratio():
    items = [f"img{i:02d}" for i in range(20)]
    train, val, test = split_by_ratio(items, (0.8, 0.1, 0.1), seed=42)
    assert (len(train), len(val), len(test)) == (16, 2, 2)
    assert sorted(train + val + test) == items
    assert (train, val, test) == split_by_ratio(list(reversed(items)), (0.8, 0.1, 0.1), seed=42)
    assert (train, val, test) != split_by_ratio(items, (0.8, 0.1, 0.1), seed=43)
    assert [len(s) for s in split_by_ratio(items[:6], (0.8, 0.1, 0.1), seed=0)] == [4, 1, 1]
    assert split_by_ratio(items[:4], (0.0, 0.0, 1.0), seed=0) == ([], [], items[:4])
    for bad in [(0.8, 0.1), (0.8, 0.3, 0.1), (1.1, -0.1, 0.0)]:
        with pytest.raises(ValueError, match="splits"):
            split_by_ratio(items, bad, seed=0)
    with pytest.raises(ValueError, match="no training item"):
        split_by_ratio(["a", "b"], (0.5, 0.25, 0.25), seed=0)
