"""PLSC shared subspace (SPEC §6.2): hand cases, planted signals, null equivalence, variants."""

import numpy as np
import pytest

from interbrain.analysis.plsc import (
    _evaluate,
    count_shared,
    draw_derangements,
    draw_shifts,
    plsc_fit,
    plsc_test,
    residualize,
    score_correlations,
    shift_range,
    zscore,
)
from interbrain.errors import InterbrainError


def ar1(rng, shape, phi):
    """AR(1) along axis 1 with unit stationary variance."""
    out = np.empty(shape)
    out[:, 0] = rng.standard_normal((shape[0],) + shape[2:])
    eps = rng.standard_normal(shape) * np.sqrt(1 - phi**2)
    for t in range(1, shape[1]):
        out[:, t] = phi * out[:, t - 1] + eps[:, t]
    return out


def planted(seed, E=8, T=240, D=48, k=3, amp=0.7):
    """k shared AR(1) latents mixed into both agents, plus independent AR(1) noise per unit."""
    rng = np.random.default_rng(seed)
    z = ar1(rng, (E, T, k), 0.8)
    X = amp * z @ rng.standard_normal((k, D)) + ar1(rng, (E, T, D), 0.8)
    Y = amp * z @ rng.standard_normal((k, D)) + ar1(rng, (E, T, D), 0.8)
    return X, Y


# ---------------------------------------------------------------------------------------------------------------------
# basic operations
# ---------------------------------------------------------------------------------------------------------------------


def test_zscore_population_std_and_constant_unit():
    X = np.array([[1.0, 2.0], [3.0, 2.0], [5.0, 2.0]])
    Z, mean, scale = zscore(X)
    np.testing.assert_allclose(mean, [3.0, 2.0])
    np.testing.assert_allclose(scale, [np.sqrt(8 / 3), 1.0])  # population std; constant unit -> scale 1
    np.testing.assert_allclose(Z[:, 0], np.array([-2.0, 0.0, 2.0]) / np.sqrt(8 / 3))
    np.testing.assert_array_equal(Z[:, 1], 0.0)


def test_residualize_subtracts_valid_episode_mean_per_timestep():
    rng = np.random.default_rng(0)
    H = rng.standard_normal((4, 6, 3))
    H[3] += 1e6  # invalid episode must not enter the mean
    valid = np.array([True, True, True, False])
    R = residualize(H, valid)
    np.testing.assert_allclose(R[valid].mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(R[0], H[0] - H[:3].mean(axis=0), atol=1e-12)
    with pytest.raises(InterbrainError, match="at least 2 valid"):
        residualize(H, np.array([True, False, False, False]))


def test_shift_range_official_window_and_draws():
    assert shift_range(500, 31) == (31, 470)  # SPEC §6.2: [31, T - 30]
    assert shift_range(500, 60) == (60, 441)  # same rule with min_shift = 60
    with pytest.raises(InterbrainError, match="too short"):
        shift_range(40, 31)
    with pytest.raises(InterbrainError, match="min_shift"):
        shift_range(500, 1)
    d = draw_shifts([500, 100], 4000, 31, np.random.default_rng(0))
    assert d.shape == (4000, 2)
    assert d[:, 0].min() == 31 and d[:, 0].max() == 470
    assert d[:, 1].min() == 31 and d[:, 1].max() == 70


def test_plsc_fit_hand_case_perfect_correlation():
    x = np.array([1.0, 2.0, 3.0, 4.0])[:, None]
    fit = plsc_fit(x, 2 * x + 5)
    # z-scored with the population std, C = sum(z^2)/(n-1) = n/(n-1)
    np.testing.assert_allclose(fit.S, [4 / 3])
    np.testing.assert_allclose(fit.r, [1.0])
    np.testing.assert_allclose(fit.mean_x, [2.5])
    np.testing.assert_allclose(fit.scale_x, [np.sqrt(1.25)])


def test_r_formula_and_S_match_direct_scores():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    Y = 0.5 * X[:, :10] @ rng.standard_normal((10, 9)) + rng.standard_normal((300, 9))
    fit = plsc_fit(X, Y)
    Xz, Yz = zscore(X)[0], zscore(Y)[0]
    np.testing.assert_allclose(fit.r, score_correlations(Xz, Yz, fit.U, fit.V), atol=1e-12)
    scores_cov = ((Xz @ fit.U) * (Yz @ fit.V)).sum(axis=0) / (len(X) - 1)
    np.testing.assert_allclose(fit.S, scores_cov, atol=1e-12)
    np.testing.assert_allclose(fit.U.T @ fit.U, np.eye(9), atol=1e-12)
    assert np.all(np.diff(fit.S) <= 1e-12)


def test_rank_deficient_data_gives_zero_tail_ranks():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 6))  # rank 3 in 6 units
    Y = rng.standard_normal((200, 6))
    fit = plsc_fit(X, Y)
    np.testing.assert_array_equal(fit.S[3:], 0.0)
    np.testing.assert_array_equal(fit.r[3:], 0.0)
    np.testing.assert_allclose(fit.U.T @ fit.U, np.eye(6), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# decision rule
# ---------------------------------------------------------------------------------------------------------------------


def test_contiguous_prefix_rule():
    assert count_shared([True, False, True]) == 1
    assert count_shared([False, True, True]) == 0
    assert count_shared([True, True, True]) == 3
    assert count_shared([True, False, True], rule="count_s") == 2
    # through _evaluate: rank 1 passes, rank 2 fails on r only, rank 3 passes -> k* = 1
    null_S = np.tile([1.0, 1.0, 1.0], (40, 1))
    null_r = np.tile([0.5, 0.5, 0.5], (40, 1))
    ev = _evaluate(np.array([2.0, 2.0, 2.0]), np.array([0.9, 0.4, 0.9]), null_S, null_r, 97.5, "prefix")
    assert ev["k_star"] == 1
    np.testing.assert_array_equal(ev["passes"], [True, False, True])


def test_p_value_and_delta_pcc_definitions():
    X, Y = planted(3, E=4, T=160, D=16, amp=0.3)
    res = plsc_test(X, Y, mode="pooled", n_null=199, seed=5)
    assert res.p_value == pytest.approx((1 + np.sum(res.null_r1 >= res.r1)) / 200)
    assert res.delta_pcc == pytest.approx(res.r1 - res.null_r1.mean())
    assert res.null_r1_mean == pytest.approx(res.null_r1.mean())


# ---------------------------------------------------------------------------------------------------------------------
# planted ground truth
# ---------------------------------------------------------------------------------------------------------------------


def test_planted_shared_dimensions_are_recovered():
    X, Y = planted(0)
    pooled = plsc_test(X, Y, mode="pooled", n_null=200)
    per_episode = plsc_test(X, Y, mode="per_episode", n_null=200)
    assert pooled.k_star == 3
    assert abs(per_episode.k_star - 3) <= 0.25
    assert pooled.p_value < 0.01 and pooled.delta_pcc > 0.3
    assert per_episode.n_episodes == 8 and len(per_episode.per_episode) == 8


def test_independent_streams_have_no_shared_dimensions():
    rng = np.random.default_rng(4)
    X = ar1(rng, (8, 240, 48), 0.8)
    Y = ar1(rng, (8, 240, 48), 0.8)
    pooled = plsc_test(X, Y, mode="pooled", n_null=200)
    per_episode = plsc_test(X, Y, mode="per_episode", n_null=200)
    assert pooled.k_star == 0
    assert abs(pooled.delta_pcc) < 0.05
    assert per_episode.k_star <= 0.25
    assert abs(per_episode.delta_pcc) < 0.05


def test_time_locked_signal_is_shared_raw_and_removed_by_residualization():
    # E = 24: with per-episode shifts the residualized observed statistic has E/(E-1) times the null variance
    # (the across-episode zero-sum constraint is aligned only in the observed pairing), so few episodes run liberal.
    rng = np.random.default_rng(5)
    E, T, D = 24, 160, 24
    t = np.arange(T)
    clock = np.stack([np.sin(2 * np.pi * t / 37), np.cos(2 * np.pi * t / 23), np.exp(-t / 15)], axis=1)
    X = 1.5 * clock @ rng.standard_normal((3, D)) + ar1(rng, (E, T, D), 0.8)  # same clock in every episode
    Y = 1.5 * clock @ rng.standard_normal((3, D)) + ar1(rng, (E, T, D), 0.8)
    raw = plsc_test(X, Y, mode="pooled", n_null=200)
    resid = plsc_test(X, Y, mode="pooled", n_null=200, residualized=True)
    shuffle = plsc_test(X, Y, mode="pooled", null="episode_shuffle", n_null=200)
    assert raw.k_star >= 2 and raw.delta_pcc > 0.3
    assert resid.k_star == 0 and abs(resid.delta_pcc) < 0.05
    assert shuffle.k_star == 0  # time-locked structure stays in the episode-shuffle null (SPEC §6.2)


# ---------------------------------------------------------------------------------------------------------------------
# fast null == direct null
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(mode="per_episode"),
        dict(mode="pooled"),
        dict(mode="pooled", null="episode_shuffle"),
        dict(mode="pooled", residualized=True),
        dict(mode="pooled", exclude=True),
        dict(mode="per_episode", exclude=True),
    ],
)
def test_fast_null_equals_direct_null(kwargs):
    rng = np.random.default_rng(6)
    X, Y = planted(7, E=3, T=70, D=9, amp=0.5)
    Y = np.concatenate([Y, rng.standard_normal(Y.shape[:2] + (2,))], axis=2)  # unequal unit counts
    if kwargs.pop("exclude", False):
        kwargs["exclude_identical_actions"] = (rng.integers(0, 4, (3, 70)), rng.integers(0, 4, (3, 70)))
    common = dict(n_null=40, min_shift=8, seed=3, **kwargs)
    fast = plsc_test(X, Y, **common)
    direct = plsc_test(X, Y, null_method="direct", **common)
    fast32 = plsc_test(X, Y, null_dtype="float32", **common)
    for key in ("null_S_q", "null_r_q", "null_r1"):
        np.testing.assert_allclose(getattr(fast, key), getattr(direct, key), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(getattr(fast32, key), getattr(direct, key), rtol=1e-4, atol=1e-5)
    assert fast.k_star == direct.k_star and fast.p_value == direct.p_value


def test_fast_null_matches_direct_on_ill_conditioned_full_width_data():
    rng = np.random.default_rng(8)
    L = rng.standard_normal((1, 300, 8)).cumsum(axis=1) * 0.1
    X = np.tanh(L @ rng.standard_normal((8, 64)) + 1e-3 * rng.standard_normal((1, 300, 64)))
    Y = np.tanh(L[:, ::-1] @ rng.standard_normal((8, 64)) + 1e-3 * rng.standard_normal((1, 300, 64)))
    fast = plsc_test(X, Y, mode="pooled", n_null=12)
    direct = plsc_test(X, Y, mode="pooled", n_null=12, null_method="direct")
    assert fast.S[0] / fast.S[-1] > 1e4  # the tail spans many orders of magnitude
    np.testing.assert_allclose(fast.null_S_q, direct.null_S_q, rtol=1e-7)
    np.testing.assert_allclose(fast.null_r_q, direct.null_r_q, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# variants and masks
# ---------------------------------------------------------------------------------------------------------------------


def test_identical_action_exclusion_drops_exactly_those_steps():
    X, Y = planted(9, E=3, T=80, D=8)
    rng = np.random.default_rng(9)
    ca = rng.integers(0, 4, (3, 80))
    ea = rng.integers(0, 4, (3, 80))
    valid = np.array([True, False, True])
    res = plsc_test(X, Y, mode="pooled", n_null=20, min_shift=10, valid=valid, exclude_identical_actions=(ca, ea))
    keep = ca != ea
    assert res.n_samples == keep[0].sum() + keep[2].sum()
    ref = plsc_fit(np.vstack([X[0][keep[0]], X[2][keep[2]]]), np.vstack([Y[0][keep[0]], Y[2][keep[2]]]))
    np.testing.assert_allclose(res.S, ref.S, rtol=1e-12)
    np.testing.assert_allclose(np.abs(res.fit.U.T @ ref.U).diagonal(), 1.0, atol=1e-8)
    assert res.identical_action_excluded


def test_invalid_episodes_are_excluded():
    X, Y = planted(10, E=5, T=100, D=10)
    X[[1, 3]] = np.nan  # invalid episodes may hold anything, even non-finite values
    valid = np.array([True, False, True, False, True])
    masked = plsc_test(X, Y, mode="pooled", n_null=50, min_shift=10, valid=valid)
    subset = plsc_test(X[valid], Y[valid], mode="pooled", n_null=50, min_shift=10)
    np.testing.assert_allclose(masked.null_S_q, subset.null_S_q, rtol=1e-12)
    assert masked.r1 == pytest.approx(subset.r1) and masked.k_star == subset.k_star
    np.testing.assert_array_equal(masked.episodes, [0, 2, 4])
    per_ep = plsc_test(X, Y, mode="per_episode", n_null=50, min_shift=10, valid=valid)
    assert [ep["episode"] for ep in per_ep.per_episode] == [0, 2, 4]
    with pytest.raises(InterbrainError, match="NaN"):
        plsc_test(X, Y, mode="pooled", n_null=5, min_shift=10)


def test_episode_shuffle_uses_derangements():
    perms = draw_derangements(5, 2000, np.random.default_rng(0))
    assert not np.any(perms == np.arange(5))
    assert np.all(np.sort(perms, axis=1) == np.arange(5))
    assert len({tuple(p) for p in perms}) == 44  # every derangement of 5 occurs (there are 44)
    np.testing.assert_array_equal(draw_derangements(2, 3, np.random.default_rng(1)), [[1, 0]] * 3)
    X, Y = planted(11, E=3, T=60, D=6)
    with pytest.raises(InterbrainError, match="pooled"):
        plsc_test(X, Y, mode="per_episode", null="episode_shuffle")
    with pytest.raises(InterbrainError, match="at least 2"):
        plsc_test(X[:1], Y[:1], mode="pooled", null="episode_shuffle", n_null=5)


def test_episode_shuffle_mrr_configuration():
    X, Y = planted(12, E=4, T=120, D=12)
    res = plsc_test(X, Y, mode="pooled", null="episode_shuffle_mrr")
    assert res.n_null == 200 and res.quantile == 95.0 and res.min_shift is None
    assert res.k_star == np.sum(res.S > res.null_S_q)  # S only, counted over all ranks


def test_result_summary_and_tensors_roundtrip(tmp_path):
    from safetensors.numpy import load_file, save_file

    X, Y = planted(13, E=3, T=80, D=8)
    res = plsc_test(X, Y, mode="per_episode", n_null=30, min_shift=10)
    row = res.summary()
    assert row["mode"] == "per_episode" and row["n_episodes"] == 3 and row["k_star"] == res.k_star
    assert row["k_star"] == pytest.approx(np.mean([ep["k_star"] for ep in res.per_episode]))
    tensors = res.to_tensors()
    save_file(tensors, str(tmp_path / "plsc.safetensors"))
    back = load_file(str(tmp_path / "plsc.safetensors"))
    np.testing.assert_array_equal(back["per_episode.S"], np.stack([ep["S"] for ep in res.per_episode]))
    np.testing.assert_array_equal(back["fit.U"], res.fit.U)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="both"), "mode"),
        (dict(null="bootstrap"), "null"),
        (dict(n_null=0), "n_null"),
        (dict(quantile=100), "quantile"),
        (dict(valid=np.ones(2, dtype=bool)), "valid"),
        (dict(min_shift=40), "too short"),
        (dict(exclude_identical_actions=(np.zeros((3, 5)), np.zeros((3, 5)))), "exclude_identical_actions"),
    ],
)
def test_bad_input_raises_one_line_error(kwargs, match):
    X, Y = planted(14, E=3, T=60, D=4)
    with pytest.raises(InterbrainError, match=match):
        plsc_test(X, Y, **{"n_null": 5, **kwargs})


def test_plsc_file_rows_keep_identity_and_fixed_header(tmp_path):
    """The file driver: one row per variant, the unit's seed kept apart from the null's, a fixed header also for
    degenerate units (so tables concatenate), and values equal to plsc_test on the same data."""
    import pandas as pd

    from interbrain.analysis.plsc import PLSC_VARIANTS, plsc_file, plsc_test
    from interbrain.rollout import save_rollout

    rng = np.random.default_rng(0)
    T, E, D = 120, 4, 16
    z = rng.standard_normal((T, E, 2))
    data = {"chaser_hidden": (rng.standard_normal((T, E, D)) + z[..., :1]).astype(np.float32),
            "explorer_hidden": (rng.standard_normal((T, E, D)) + z[..., :1]).astype(np.float32),
            "chaser_action": rng.integers(0, 4, (T, E)).astype(np.int8),
            "explorer_action": rng.integers(0, 4, (T, E)).astype(np.int8),
            "episode_degenerate": np.array([False, False, True, False])}
    meta = {"protocol": "analysis_selfplay_v1", "schema_version": 1, "unit_id": "rnn/social/seed_0007", "arch": "rnn",
            "size": "matched", "task": "social", "seed": 7, "visibility": "partial",
            "checkpoint": {"path": "x", "sha256": "y", "update": 800}}
    path = save_rollout(data, meta, tmp_path / "r.safetensors")
    plsc_file(path, tmp_path / "p.csv", tmp_path / "p.safetensors", n_null=50, variants=("pooled", "per_episode"))
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table["variant"]) == ["pooled", "per_episode"]
    assert (table["seed"] == 7).all() and (table["null_seed"] == 0).all() and (table["update"] == 800).all()
    assert (table["n_valid_episodes"] == 3).all() and len(set(table.columns)) == len(table.columns)
    ref = plsc_test(data["chaser_hidden"].transpose(1, 0, 2), data["explorer_hidden"].transpose(1, 0, 2), mode="pooled",
                    n_null=50, valid=~data["episode_degenerate"])
    assert table.loc[0, "k_star"] == ref.k_star and abs(table.loc[0, "r1"] - ref.r1) < 1e-9

    data["episode_degenerate"][:] = True
    bad = save_rollout(data, meta, tmp_path / "bad.safetensors")
    plsc_file(bad, tmp_path / "b.csv", tmp_path / "b.safetensors", n_null=50)
    degenerate = pd.read_csv(tmp_path / "b.csv")
    assert list(degenerate.columns) == list(table.columns)
    assert (degenerate["status"] == "degenerate_unit").all() and degenerate["k_star"].isna().all()
    assert len(degenerate) == len(PLSC_VARIANTS)
