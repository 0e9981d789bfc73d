"""SPEC §6.7 statistics: hand-computed cases."""

import itertools
import math

import numpy as np
import pytest

from interbrain.analysis.stats import mean_sd, pearson, permutation_test
from interbrain.errors import InterbrainError


def test_mean_sd_is_sample_sd_and_drops_nan():
    out = mean_sd([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert out["mean"] == pytest.approx(2.5)
    assert out["sd"] == pytest.approx(math.sqrt(5 / 3))       # ddof 1: sum of squares 5 over n-1 = 3
    assert (out["n"], out["n_dropped_nan"]) == (4, 1)
    single = mean_sd([7.0])
    assert single["mean"] == 7.0 and math.isnan(single["sd"]) and single["n"] == 1
    assert mean_sd([])["n"] == 0 and math.isnan(mean_sd([])["mean"])


def test_permutation_hand_case_is_exact():
    out = permutation_test([1, 2, 3], [4, 5, 6])
    # C(6,3) = 20 relabellings; only {1,2,3} and {4,5,6} reach |diff| = 3.
    assert out == {"diff": -3.0, "p": pytest.approx(2 / 20), "exact": True, "n_a": 3, "n_b": 3}
    assert permutation_test([4, 5, 6], [1, 2, 3])["p"] == pytest.approx(0.1)
    # Identical groups: every relabelling is at least as extreme as a zero difference.
    assert permutation_test([1, 1], [1, 1])["p"] == 1.0


def test_exact_uneven_groups_match_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.8, 1, 2), rng.normal(0, 1, 9)        # C(11, 2) = 55, smaller group first
    pooled = np.concatenate([a, b])
    obs = abs(a.mean() - b.mean())
    null = [abs(pooled[list(c)].mean() - np.delete(pooled, list(c)).mean())
            for c in itertools.combinations(range(11), 2)]
    expected = np.mean(np.array(null) >= obs - 1e-12)
    assert permutation_test(a, b)["p"] == pytest.approx(expected)
    assert permutation_test(b, a)["p"] == pytest.approx(expected)   # larger group enumerated via complement


def test_switch_from_exact_to_sampled_and_sampled_agrees_with_exact():
    assert permutation_test(np.arange(7.0), np.arange(7.0) + 3)["exact"] is True     # C(14,7) = 3432
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1, 8), rng.normal(0, 1, 8)                                 # C(16,8) = 12870
    out = permutation_test(a, b, n_draws=10_000, seed=1)
    assert out["exact"] is False
    pooled = np.concatenate([a, b])
    obs = abs(a.mean() - b.mean())
    sums = np.array([pooled[list(c)].sum() for c in itertools.combinations(range(16), 8)])
    exact_p = np.mean(np.abs(sums / 8 - (pooled.sum() - sums) / 8) >= obs - 1e-12)
    assert abs(out["p"] - exact_p) < 0.015
    assert out["p"] >= 1 / 10_001                                                     # add-one correction
    assert permutation_test(a, b, n_draws=10_000, seed=1)["p"] == out["p"]            # seeded


def test_sampled_p_add_one_floor():
    out = permutation_test(np.arange(20.0) + 100, np.arange(20.0), n_draws=99, seed=0)
    assert out["exact"] is False and out["p"] == pytest.approx(1 / 100)


def test_permutation_nan_and_empty_and_bad_input():
    out = permutation_test([1, 2, float("nan"), 3], [4, 5, 6])
    assert (out["n_a"], out["p"]) == (3, pytest.approx(0.1))
    empty = permutation_test([float("nan")], [1.0, 2.0])
    assert empty["n_a"] == 0 and math.isnan(empty["p"])
    with pytest.raises(InterbrainError, match="n_draws"):
        permutation_test([1], [2], n_draws=0)
    with pytest.raises(InterbrainError, match="1-D"):
        permutation_test([[1, 2]], [2])


def test_pearson_hand_case():
    # x = [1,2,3], y = [2,4,7]: centred x = [-1,0,1], y = [-7/3,-1/3,8/3]; sum xy = 5, sum x^2 = 2, sum y^2 = 114/9.
    assert pearson([1, 2, 3], [2, 4, 7])["r"] == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == {"r": pytest.approx(-1.0), "n": 4}
    out = pearson([1, 2, float("nan"), 4], [1, 2, 3, 4])
    assert out == {"r": pytest.approx(1.0), "n": 3}
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])["r"])
    with pytest.raises(InterbrainError, match="same length"):
        pearson([1, 2], [1, 2, 3])
