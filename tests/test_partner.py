"""SPEC §6.5 partner representation: predictors by hand, R^2 by hand, planted partner/self codes."""

import numpy as np
import pytest

from interbrain.analysis.partner import (
    GROUPS, PARTNER_GROUPS, build_predictors, neural_action_space, non_redundant_variance, r_squared)
from interbrain.errors import InterbrainError

MOVES = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])                          # SPEC §1.1 action order


def _walk_rollout(T, E, seed):
    """Random walks on the 10 x 10 grid with random event flags (a rollout with the §5.3 keys used here)."""
    rng = np.random.default_rng(seed)
    out = {}
    for agent in ("chaser", "explorer"):
        actions = rng.integers(0, 4, (T, E))
        pos = np.zeros((T + 1, E, 2), dtype=np.int16)
        pos[0] = rng.integers(0, 10, (E, 2))
        for t in range(T):
            pos[t + 1] = np.clip(pos[t] + MOVES[actions[t]], 0, 9)
        out[f"{agent}_pos"], out[f"{agent}_action"] = pos, actions.astype(np.int8)
    for key in ("collision", "chaser_new_field", "chaser_approach", "explorer_new_field", "explorer_escape",
                "explorer_escape_close", "explorer_escape_near", "explorer_escape_far"):
        out[key] = rng.random((T, E)) < 0.2
    return out


def test_build_predictors_by_hand():
    T, E = 3, 1
    ro = {
        "chaser_pos": np.array([[[0, 9]], [[3, 9]], [[9, 0]], [[5, 5]]], dtype=np.int16),
        "explorer_pos": np.array([[[1, 2]], [[2, 2]], [[4, 5]], [[0, 0]]], dtype=np.int16),
        "chaser_action": np.array([[2], [3], [0]], dtype=np.int8),
        "explorer_action": np.array([[1], [1], [2]], dtype=np.int8),
        "collision": np.array([[True], [False], [False]]),
        "chaser_new_field": np.array([[False], [True], [False]]),
        "chaser_approach": np.array([[False], [False], [True]]),
        "explorer_new_field": np.array([[True], [False], [False]]),
        "explorer_escape": np.array([[False], [True], [True]]),
        "explorer_escape_close": np.array([[False], [True], [False]]),
        "explorer_escape_near": np.array([[False], [False], [True]]),
        "explorer_escape_far": np.array([[False], [False], [False]]),
    }
    g = build_predictors(ro)
    assert tuple(g) == GROUPS and all(v.shape[:2] == (T, E) for v in g.values())
    np.testing.assert_allclose(g["collision"][:, 0, 0], [1, 0, 0])
    np.testing.assert_allclose(g["self_position"][:, 0], [[0, 1], [1 / 3, 1], [1, 0]])   # s_0..s_2 only, /9
    np.testing.assert_allclose(g["partner_position"][:, 0], [[1 / 9, 2 / 9], [2 / 9, 2 / 9], [4 / 9, 5 / 9]])
    np.testing.assert_array_equal(g["self_action"][:, 0], [[0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(g["partner_action"][:, 0], [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(g["self_behaviour"][:, 0], [[0, 0], [1, 0], [0, 1]])
    np.testing.assert_array_equal(g["partner_behaviour"][:, 0],
                                  [[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 1, 0, 1, 0]])
    ex = build_predictors(ro, role="explorer")                               # roles swap
    np.testing.assert_array_equal(ex["self_position"], g["partner_position"])
    np.testing.assert_array_equal(ex["partner_action"], g["self_action"])
    np.testing.assert_array_equal(ex["self_behaviour"], g["partner_behaviour"])

    bad = dict(ro, chaser_action=np.array([[2], [4], [0]], dtype=np.int8))
    with pytest.raises(InterbrainError, match="chaser_action"):
        build_predictors(bad)
    with pytest.raises(InterbrainError, match="explorer_pos"):
        build_predictors(dict(ro, explorer_pos=ro["explorer_pos"][:T]))
    with pytest.raises(InterbrainError, match="role"):
        build_predictors(ro, role="judge")


def test_neural_action_space_by_hand():
    h = np.array([[1.0, 2.0, 3.0], [3.0, 0.0, -1.0]])                         # two steps, H = 3
    W = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])                          # W^T W = diag(4, 0, 1): not a projection
    z = neural_action_space(h, W)
    raw = np.array([[4.0, 0.0, 3.0], [12.0, 0.0, -1.0]])
    np.testing.assert_allclose(z, raw - raw.mean(0))
    with pytest.raises(InterbrainError, match="action_weight"):
        neural_action_space(h, W[:, :2])
    with pytest.raises(InterbrainError, match="non-finite"):
        neural_action_space(np.full((2, 3), np.inf), W)


def test_r_squared_by_hand_and_rank_deficient_design():
    # z = [1,2,3,4] on x = [0,1,0,1] + intercept: group means 2 and 3, SSE = 4, SST = 5 -> R^2 = 0.2.
    assert r_squared([1, 2, 3, 4], [0, 1, 0, 1]) == pytest.approx(0.2)
    # Two response columns, pooled: column 2 = x is fitted exactly (SST 1, SSE 0) -> 1 - (4 + 0)/(5 + 1).
    z = np.array([[1, 0], [2, 1], [3, 0], [4, 1.0]])
    assert r_squared(z, [0, 1, 0, 1]) == pytest.approx((1 + 1) / (5 + 1))
    # A full one-hot plus intercept is rank deficient; the fit (a projection) is unchanged.
    onehot = np.array([[1, 0], [0, 1], [1, 0], [0, 1.0]])
    assert r_squared([1, 2, 3, 4], onehot) == pytest.approx(0.2)
    # A constant column (an event that never happens) adds nothing; an all-constant design explains nothing.
    assert r_squared([1, 2, 3, 4], np.c_[[0, 1, 0, 1], np.full(4, 1 / 3)]) == pytest.approx(0.2)
    assert r_squared([1, 2, 3, 4], np.full(4, 1 / 3)) == 0.0


def test_partner_position_code_gives_partner_contribution_only():
    T, E = 300, 10
    ro = _walk_rollout(T, E, seed=0)
    g = build_predictors(ro)
    rng = np.random.default_rng(1)
    z = g["partner_position"] @ rng.standard_normal((2, 12))               # exact linear code, R^2 = 1
    out = non_redundant_variance(z, g, n_shifts=5)
    assert out["r2_full"] == pytest.approx(1.0)
    assert out["partner"] > 80 and out["contributions"]["partner_position"] > 80
    # Unrelated groups: R2_g = R2_full = 1, so what remains is chance_g - chance_full (shift noise).
    for name in ("self_position", "self_action", "self_behaviour", "collision", "partner_action"):
        assert abs(out["contributions"][name]) < 3, name
    assert set(out["contributions"]) == set(GROUPS) and out["joint"] == list(PARTNER_GROUPS)
    for name, value in out["contributions"].items():                         # the official formula
        assert value == pytest.approx(100 * ((out["r2_full"] - out["chance_full"])
                                             - (out["r2_shifted"][name] - out["chance_shifted"][name])))


def test_self_position_code_gives_no_partner_contribution():
    T, E = 300, 10
    ro = _walk_rollout(T, E, seed=2)
    g = build_predictors(ro)
    rng = np.random.default_rng(3)
    z = g["self_position"] @ rng.standard_normal((2, 12)) + 0.3 * rng.standard_normal((T, E, 12))
    out = non_redundant_variance(z, g, n_shifts=5)
    assert out["contributions"]["self_position"] > 30
    assert abs(out["partner"]) < 3
    assert out["chance_full"] < out["r2_full"]


def test_shifts_stay_within_episodes():
    """A predictor constant within each episode is unchanged by within-episode shifts: zero contribution."""
    T, E = 80, 6
    rng = np.random.default_rng(4)
    level = rng.standard_normal(E)
    episode_level = np.broadcast_to(level, (T, E))[..., None].copy()
    noise = rng.standard_normal((T, E, 1))
    z = 2.0 * episode_level + 0.1 * noise + 0.5 * np.roll(noise, 1, axis=0)
    out = non_redundant_variance(z, {"level": episode_level, "noise": noise}, n_shifts=3, joint=())
    assert out["partner"] is None
    assert out["r2_shifted"]["level"] == pytest.approx(out["r2_full"], abs=1e-12)  # shifts never cross episodes
    assert abs(out["contributions"]["level"]) < 0.5                         # only chance-shift noise remains
    assert out["contributions"]["noise"] > 0.1


def test_non_redundant_variance_rejects_bad_input():
    z = np.zeros((40, 2, 3))
    z[:, :, 0] = np.arange(80).reshape(40, 2)
    with pytest.raises(InterbrainError, match="group 'a'"):
        non_redundant_variance(z, {"a": np.zeros((39, 2, 1))}, min_shift=5, joint=())
    with pytest.raises(InterbrainError, match="min_shift"):
        non_redundant_variance(z, {"a": np.zeros((40, 2, 1))}, min_shift=21, joint=())
    with pytest.raises(InterbrainError, match="joint group"):
        non_redundant_variance(z, {"a": np.zeros((40, 2, 1))}, min_shift=5)
    with pytest.raises(InterbrainError, match="zero variance"):
        non_redundant_variance(np.ones((40, 2, 3)), {"a": np.zeros((40, 2, 1))}, min_shift=5, joint=())
