"""Unique subspace (SPEC §6.3) and perturbation bases (SPEC §6.6; pitfalls 2 and 3)."""

import numpy as np
import pytest
import torch

from interbrain.analysis.plsc import zscore
from interbrain.analysis.subspace import (
    VARIANCE_MATCHED,
    PerturbationBases,
    _circular_shift_units,
    apply_removal,
    perturbation_bases,
    random_complement_basis,
    unique_subspace,
)
from interbrain.errors import InterbrainError

D = 24
K = 3


def planted(seed=0, n_ep=6, T=200, amp=2.0):
    """K shared latents in both agents (strong), plus a private chaser direction and unit noise; offsets and scales."""
    rng = np.random.default_rng(seed)
    N = n_ep * T
    z = rng.standard_normal((N, K))
    private = rng.standard_normal((N, 1))
    X = amp * z @ rng.standard_normal((K, D)) + 1.5 * private @ rng.standard_normal((1, D))
    X = X + rng.standard_normal((N, D))
    Y = amp * z @ rng.standard_normal((K, D)) + rng.standard_normal((N, D))
    X = X * rng.uniform(0.5, 3.0, D) + rng.uniform(-2, 2, D)  # raw units: unequal scales and offsets (pitfall 2)
    return X, Y, [T] * n_ep


@pytest.fixture(scope="module")
def bases():
    X, Y, lengths = planted()
    return X, perturbation_bases(X, Y, k=K, seed=0, paper_rank=8, episode_lengths=lengths, variance_matched=True)


def test_unique_subspace_hand_case():
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((4000, 3))
    Z = (Z - Z.mean(0)) @ np.linalg.inv(np.linalg.cholesky(np.cov(Z, rowvar=False))).T  # exactly white
    Xz = Z * np.array([2.0, np.sqrt(2.0), 1.0])  # variances 4, 2, 1 along the axes
    pcs, explained = unique_subspace(Xz, np.eye(3)[:, :1])  # shared = axis 0
    np.testing.assert_allclose(np.abs(pcs), np.eye(3)[:, 1:], atol=1e-10)
    np.testing.assert_allclose(explained, [2 / 7, 1 / 7], atol=1e-10)


def test_unique_subspace_is_orthogonal_complement_pca(bases):
    X, pb = bases
    Xz = (X - pb.mu) / pb.sigma
    pcs, explained = unique_subspace(Xz, pb.P)
    assert pcs.shape == (D, D - K)
    np.testing.assert_allclose(pcs.T @ pcs, np.eye(D - K), atol=1e-10)
    assert np.abs(pb.P.T @ pcs).max() < 1e-10
    assert np.all(np.diff(explained) <= 1e-12)
    shared = np.trace(pb.P.T @ np.cov(Xz, rowvar=False) @ pb.P) / np.trace(np.cov(Xz, rowvar=False))
    assert explained.sum() + shared == pytest.approx(1.0, abs=1e-10)


def test_standardise_uses_chaser_population_std(bases):
    X, pb = bases
    _, mean, scale = zscore(X)
    np.testing.assert_allclose(pb.mu, mean)
    np.testing.assert_allclose(pb.sigma, scale)
    np.testing.assert_allclose(pb.P.T @ pb.P, np.eye(K), atol=1e-12)


def test_removal_zeroes_projection_in_standardised_coordinates(bases):
    X, pb = bases
    h = pb.apply(X, "shared_removed")
    u = (h - pb.mu) / pb.sigma
    assert np.abs(u @ pb.P).max() < 1e-6  # pitfall 2
    # the rest of the standardised activity is untouched
    u0 = (X - pb.mu) / pb.sigma
    np.testing.assert_allclose(u - u @ pb.P @ pb.P.T, u0 - u0 @ pb.P @ pb.P.T, atol=1e-9)
    # removing in raw coordinates (the earlier bug) would leave a projection on P
    raw_removed = X - X @ pb.P @ pb.P.T
    assert np.abs(((raw_removed - pb.mu) / pb.sigma) @ pb.P).max() > 0.1
    np.testing.assert_allclose(pb.apply(h, "shared_removed"), h, atol=1e-9)  # idempotent
    np.testing.assert_array_equal(pb.apply(X, "baseline"), X)


def test_keep_mode_keeps_only_P(bases):
    X, pb = bases
    h = pb.apply(X, "shared_only")
    u = (h - pb.mu) / pb.sigma
    u0 = (X - pb.mu) / pb.sigma
    np.testing.assert_allclose(u - u @ pb.P @ pb.P.T, 0.0, atol=1e-9)
    np.testing.assert_allclose(u @ pb.P, u0 @ pb.P, atol=1e-9)
    assert pb.keep == {**{c: False for c in pb.bases}, "shared_only": True}


def test_controls_orthogonal_to_P_and_rank_matched(bases):
    X, pb = bases
    for cond in ("random_orthogonal", "top_unique_removed", "paper_control", VARIANCE_MATCHED):
        Q = pb.bases[cond]
        assert np.linalg.norm(pb.P.T @ Q) < 1e-6, cond  # pitfall 3
        np.testing.assert_allclose(Q.T @ Q, np.eye(Q.shape[1]), atol=1e-10)
    assert pb.bases["random_orthogonal"].shape == (D, K)
    assert pb.bases["top_unique_removed"].shape == (D, K)
    assert pb.bases["paper_control"].shape == (D, 8)
    assert pb.bases["baseline"].shape == (D, 0)
    # top_unique is the leading unique PCs: it removes at least as much variance as the random control
    rv = pb.removed_variance
    assert rv["top_unique_removed"] > rv["random_orthogonal"]
    assert rv["shared_removed"] > rv["top_unique_removed"]


def test_removed_variance_of_shared_removed_on_planted_data():
    rng = np.random.default_rng(2)
    N = 3000
    z = rng.standard_normal((N, 2))
    # chaser units 0 and 1 carry the two shared latents, all other units independent: Σ_u ≈ I, P ≈ [e0, e1]
    X = np.hstack([z + 0.1 * rng.standard_normal((N, 2)), rng.standard_normal((N, D - 2))]) * 4.0 + 1.0
    Y = np.hstack([z + 0.1 * rng.standard_normal((N, 2)), rng.standard_normal((N, D - 2))])
    pb = perturbation_bases(X, Y, k=2, paper_rank=4)
    assert np.linalg.svd(pb.P[:2], compute_uv=False).min() > 0.99  # span(P) ≈ span(e0, e1)
    assert pb.removed_variance["shared_removed"] == pytest.approx(2 / D, abs=0.01)
    Xz = (X - pb.mu) / pb.sigma
    Xc = Xz - Xz.mean(0)
    direct = np.square(Xc @ pb.P).sum() / np.square(Xc).sum()  # an independent path to tr(PᵀΣP)/tr(Σ)
    assert pb.removed_variance["shared_removed"] == pytest.approx(direct, rel=1e-10)
    assert pb.removed_variance["shared_only"] == pytest.approx(1 - direct, rel=1e-10)
    assert pb.removed_variance["baseline"] == 0.0


def test_variance_matched_picks_closest_prefix():
    X, Y, lengths = planted(3, amp=0.6)
    pb = perturbation_bases(X, Y, k=K, paper_rank=D - K, episode_lengths=lengths, variance_matched=True)
    seq = pb.bases["paper_control"]  # with paper_rank = D - k this is the whole candidate sequence
    Xz = (X - pb.mu) / pb.sigma
    cov = np.cov(Xz, rowvar=False)
    prefix = [np.trace(seq[:, :r].T @ cov @ seq[:, :r]) / np.trace(cov) for r in range(1, D - K + 1)]
    target = pb.removed_variance["shared_removed"]
    best = int(np.argmin(np.abs(np.array(prefix) - target))) + 1
    assert 1 < best < D - K  # the match is interior, so the test distinguishes ranks
    assert pb.variance_matched_rank == best
    np.testing.assert_array_equal(pb.bases[VARIANCE_MATCHED], seq[:, :best])
    assert pb.removed_variance[VARIANCE_MATCHED] == pytest.approx(prefix[best - 1])


def test_random_complement_basis_is_seeded_orthonormal_and_outside_P():
    P = np.linalg.qr(np.random.default_rng(7).standard_normal((D, 4)))[0]
    Q = random_complement_basis(P, 6, 0)
    assert Q.shape == (D, 6)
    np.testing.assert_allclose(Q.T @ Q, np.eye(6), atol=1e-12)
    assert np.linalg.norm(P.T @ Q) < 1e-12
    np.testing.assert_array_equal(Q, random_complement_basis(P, 6, 0))
    assert np.abs(Q - random_complement_basis(P, 6, 1)).max() > 0.1
    with pytest.raises(InterbrainError, match="rank must"):
        random_complement_basis(P, D - 3, 0)


def test_paper_control_shifts_each_unit_within_episodes():
    rng = np.random.default_rng(4)
    Z = rng.standard_normal((300, 5))
    out = _circular_shift_units(Z, [100, 200], 31, np.random.default_rng(0))
    for start, length in ((0, 100), (100, 200)):
        seg, shifted = Z[start : start + length], out[start : start + length]
        for j in range(5):
            s = [s for s in range(length) if np.array_equal(np.roll(seg[:, j], s), shifted[:, j])]
            assert len(s) == 1 and 31 <= s[0] <= length - 30
    # the shifted data break cross-unit correlation, so its top PCs are not the data's top PCs (pitfall 3):
    # 8 paper-control dims remove far less than the 3 top unique dims, which hold the planted private direction
    X, Y, lengths = planted(5)
    pb = perturbation_bases(X, Y, k=K, paper_rank=8, episode_lengths=lengths)
    assert pb.removed_variance["paper_control"] < 0.5 * pb.removed_variance["top_unique_removed"]


def test_numpy_and_torch_agree(bases):
    X, pb = bases
    for cond in pb.bases:
        ref = pb.apply(X, cond)
        t64 = pb.apply(torch.from_numpy(X), cond)
        assert isinstance(t64, torch.Tensor) and t64.dtype == torch.float64
        np.testing.assert_allclose(t64.numpy(), ref, rtol=1e-12, atol=1e-12)
        t32 = apply_removal(torch.from_numpy(X).float(), pb.mu, pb.sigma, pb.bases[cond], keep=pb.keep[cond])
        assert t32.dtype == torch.float32
        np.testing.assert_allclose(t32.numpy(), ref, rtol=1e-4, atol=1e-4)
    h = pb.apply(torch.from_numpy(X).float(), "shared_removed")
    u = (h - torch.as_tensor(pb.mu).float()) / torch.as_tensor(pb.sigma).float()
    assert (u @ torch.as_tensor(pb.P).float()).abs().max() < 1e-4  # float32 rounding only


def test_tensors_roundtrip_through_safetensors(tmp_path, bases):
    from safetensors.numpy import load_file, save_file

    X, pb = bases
    save_file(pb.to_tensors(), str(tmp_path / "bases.safetensors"))
    back = PerturbationBases.from_tensors(load_file(str(tmp_path / "bases.safetensors")))
    assert back.metadata() == pb.metadata()
    for cond in pb.bases:
        np.testing.assert_array_equal(back.apply(X, cond), pb.apply(X, cond))
    with pytest.raises(InterbrainError, match="lack entry"):
        PerturbationBases.from_tensors({"mu": pb.mu})


def test_bad_input_raises():
    X, Y, lengths = planted(6, n_ep=2, T=100)
    with pytest.raises(InterbrainError, match="episode_lengths"):
        perturbation_bases(X, Y, k=2, paper_rank=8, episode_lengths=[100, 50])
    with pytest.raises(InterbrainError, match="k must"):
        perturbation_bases(X, Y, k=0, paper_rank=8)
    with pytest.raises(InterbrainError, match="complement"):
        perturbation_bases(X, Y, k=10, paper_rank=20)
    with pytest.raises(InterbrainError, match="units"):
        apply_removal(X[:, :5], np.zeros(D), np.ones(D), np.zeros((D, 1)))
    with pytest.raises(InterbrainError, match="orthonormal"):
        unique_subspace(X, np.ones((D, 1)))
