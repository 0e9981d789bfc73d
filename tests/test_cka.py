"""Linear CKA (SPEC §6.4): identities, invariances, independence, pair bookkeeping, probe balancing."""

import numpy as np
import pytest
from scipy.stats import ortho_group

from interbrain.analysis.cka import balanced_probe_episodes, cka_matrix, linear_cka
from interbrain.errors import InterbrainError


def test_identical_inputs_give_one():
    X = np.random.default_rng(0).standard_normal((500, 20))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_hand_computed_value():
    # one-column X and Y: CKA reduces to the squared Pearson correlation of the centred columns
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 4.0])
    assert linear_cka(x[:, None], y[:, None]) == pytest.approx(np.corrcoef(x, y)[0, 1] ** 2)
    # orthogonal centred columns share nothing
    assert linear_cka(np.array([[1.0], [-1.0], [1.0], [-1.0]]), np.array([[1.0], [1.0], [-1.0], [-1.0]])) == 0.0


def test_invariant_to_orthogonal_transform_isotropic_scaling_and_offset():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 16))
    Y = X @ rng.standard_normal((16, 12)) + 0.5 * rng.standard_normal((400, 12))
    base = linear_cka(X, Y)
    Q = ortho_group.rvs(16, random_state=2)
    assert 0.2 < base < 0.99
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * X + 5.0, Y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X), rel=1e-12)
    # not invariant to anisotropic scaling (the measure is linear CKA, not CCA)
    assert abs(linear_cka(X * np.linspace(0.1, 10, 16), Y) - base) > 1e-3


def test_independent_noise_is_near_zero():
    # For independent Gaussian X (n x p), Y (n x q) the biased CKA concentrates at about
    # sqrt(p q) / n (E||X^T Y||_F^2 = n p q, ||X^T X||_F ~ n sqrt(p) for n >> p): 64/20000 = 0.0032 here.
    rng = np.random.default_rng(3)
    n, p = 20000, 64
    value = linear_cka(rng.standard_normal((n, p)), rng.standard_normal((n, p)))
    expected = p / n  # sqrt(p * q) / n with q = p; relative spread ~ sqrt(2) / p
    assert 0.5 * expected < value < 1.5 * expected


def test_zero_denominator_gives_zero():
    X = np.ones((10, 3))
    assert linear_cka(X, np.random.default_rng(4).standard_normal((10, 2))) == 0.0


def test_cka_matrix_pairs_and_diagonal():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((300, 8))
    feats = {}
    for s in range(10):  # arch "a": seeds share a latent; arch "b": independent noise
        feats[("a", s)] = base @ rng.standard_normal((8, 12)) + 0.3 * rng.standard_normal((300, 12))
        feats[("b", s)] = rng.standard_normal((300, 12))
    feats[("c", 0)] = rng.standard_normal((300, 12))
    out = cka_matrix(feats)
    assert out["archs"] == ["a", "b", "c"]
    np.testing.assert_array_equal(out["n_pairs"], [[45, 100, 10], [100, 45, 10], [10, 10, 0]])
    # the diagonal is the cross-seed mean over i != j, not a trivial 1
    within_a = [linear_cka(feats[("a", i)], feats[("a", j)]) for i in range(10) for j in range(i + 1, 10)]
    assert out["mean"][0, 0] == pytest.approx(np.mean(within_a), rel=1e-5)
    assert out["sd"][0, 0] == pytest.approx(np.std(within_a, ddof=1), rel=1e-4)
    assert 0.3 < out["mean"][0, 0] < 0.99
    across = [linear_cka(feats[("a", i)], feats[("b", j)]) for i in range(10) for j in range(10)]
    assert out["mean"][0, 1] == pytest.approx(np.mean(across), rel=1e-5) and out["mean"][1, 0] == out["mean"][0, 1]
    assert np.isnan(out["mean"][2, 2]) and np.isnan(out["sd"][2, 2])
    assert np.isfinite(out["sd"][0, 2])
    one = cka_matrix({("x", 0): feats[("a", 0)], ("y", 0): feats[("a", 1)]})
    assert one["n_pairs"][0, 1] == 1 and np.isnan(one["sd"][0, 1])


def test_cka_matrix_rejects_mismatched_probes():
    with pytest.raises(InterbrainError, match="same probe"):
        cka_matrix({("a", 0): np.zeros((5, 2)), ("b", 0): np.zeros((6, 2))})
    with pytest.raises(InterbrainError, match="tuples"):
        cka_matrix({"a": np.zeros((5, 2))})


def test_balanced_probe_equal_shares_seeded_and_independent_of_other_archs():
    eps = {"rnn": [f"r{i}" for i in range(30)], "mlp": [f"m{i}" for i in range(10)], "ssm": list(range(8))}
    probe = balanced_probe_episodes(eps, n_total=24, seed=0)
    assert {k: len(v) for k, v in probe.items()} == {"rnn": 8, "mlp": 8, "ssm": 8}
    assert all(len(set(v)) == len(v) and set(v) <= set(eps[k]) for k, v in probe.items())
    assert probe == balanced_probe_episodes(eps, n_total=24, seed=0)
    assert probe["rnn"] != balanced_probe_episodes(eps, n_total=24, seed=1)["rnn"]
    two = balanced_probe_episodes({"rnn": eps["rnn"], "mlp": eps["mlp"], "x": eps["rnn"]}, n_total=24, seed=0)
    assert two["rnn"] == probe["rnn"]  # an architecture's draw does not depend on the others
    with pytest.raises(InterbrainError, match="equally"):
        balanced_probe_episodes(eps, n_total=25)
    with pytest.raises(InterbrainError, match="needs 12"):
        balanced_probe_episodes({"rnn": eps["rnn"], "mlp": eps["mlp"]}, n_total=24)
