"""SPEC §6.1 event decoding: planted signals, chance levels, fold hygiene (pitfall 1), eligibility, alignment."""

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from interbrain.analysis import decoding
from interbrain.analysis.decoding import (
    DECODING_TARGETS, decode, decode_rollout, fit_linear_svm_batch, fold_assignment, permute_within_episodes)
from interbrain.errors import InterbrainError


def _episodes(E, T):
    return np.repeat(np.arange(E), T)


def _sk_svc(tol=1e-8):
    return LinearSVC(penalty="l2", loss="squared_hinge", C=1, class_weight="balanced", dual=False, tol=tol,
                     max_iter=10_000)


def _bacc(pred, y):
    return 0.5 * ((pred & y).sum() / y.sum() + (~pred & ~y).sum() / (~y).sum())


# ---------------------------------------------------------------------------------------------- solver


def test_batched_solver_matches_sklearn_linearsvc_per_column():
    """Each label column (different class balance, so different class weights) equals its own LinearSVC."""
    rng = np.random.default_rng(0)
    n, d = 1200, 24
    X = rng.standard_normal((n, d))
    w = rng.standard_normal(d)
    Y = np.stack([X @ w + 2.0 * rng.standard_normal(n) > 0,               # balanced, noisy code
                  X[:, 0] + 0.7 * rng.standard_normal(n) > 1.8,            # ~5 % positives
                  rng.random(n) < 0.3,                                     # pure noise
                  X @ w > 0.5], axis=1)                                    # separable
    Xs = StandardScaler().fit_transform(X)
    Xtest = StandardScaler().fit(X).transform(rng.standard_normal((600, d)))
    coef, intercept, _ = fit_linear_svm_batch(Xs, Y, tol=1e-8)
    for j in range(Y.shape[1]):
        sk = _sk_svc().fit(Xs, Y[:, j])
        scale = np.abs(sk.coef_).max()
        np.testing.assert_allclose(coef[j], sk.coef_[0], atol=1e-5 * scale)
        assert intercept[j] == pytest.approx(sk.intercept_[0], abs=1e-5 * max(scale, 1))
        ytest = Xtest @ sk.coef_[0] + sk.intercept_[0] > 0
        ours = Xtest @ coef[j] + intercept[j] > 0
        assert np.mean(ours != ytest) < 1e-3


def _rare_event_batch(n=2000, d=20, n_perm=12, seed=3):
    """A rare event (~3 % positives) with a partly linear code plus within-data label permutations."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = X[:, 0] + X[:, 1] + 1.2 * rng.standard_normal(n) > 2.6
    Y = np.stack([y] + [rng.permutation(y) for _ in range(n_perm)], axis=1)
    return StandardScaler().fit_transform(X), Y


def test_per_problem_preconditioner_is_the_exact_hessian_for_permuted_labels_at_zero():
    """At w = 0 every margin is violated; permutations share class counts, so every row's majority
    curvature is the same in every problem and M_p must equal H_p = I + 2 Xa^T diag(S_p) Xa exactly."""
    Xs, Y = _rare_event_batch()
    n, d = Xs.shape
    Xa = torch.from_numpy(np.concatenate([Xs, np.ones((n, 1))], axis=1))
    Yt = torch.from_numpy(np.ascontiguousarray(Y.T))
    n_pos = Yt.sum(1, dtype=torch.float64)
    S = torch.where(Yt, (n / (2 * n_pos))[:, None], (n / (2 * (n - n_pos)))[:, None])   # C * class weight
    minority = Yt.clone()
    apply, per_problem = decoding._preconditioner(S, Xa, Xa.T.contiguous(), Xa.float(), minority)
    assert per_problem
    v = torch.randn(Y.shape[1], d + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    Hv = v + 2.0 * ((S * (v @ Xa.T)) @ Xa)                                   # exact Hessian products
    rows = torch.arange(Y.shape[1])
    np.testing.assert_allclose(apply(Hv, rows).numpy(), v.numpy(), rtol=0, atol=2e-3 * float(v.abs().max()))
    sub = rows[[5, 1]]                                                        # a compacted CG batch
    np.testing.assert_allclose(apply(Hv[sub], sub).numpy(), v[sub].numpy(), rtol=0, atol=2e-3 * float(v.abs().max()))
    # the per-problem correction is used only while it is cheap: minority count x (D + 1) <= 16 n
    wide = torch.randn(n, 40, dtype=torch.float64)
    for frac, expected in ((0.45, False), (0.3, True)):
        minority = torch.rand(Yt.shape, generator=torch.Generator().manual_seed(1)) < frac
        _, per_problem = decoding._preconditioner(S, wide, wide.T.contiguous(), wide.float(), minority)
        assert per_problem is expected, frac


def test_rare_event_batch_uses_per_problem_preconditioner_and_matches_sklearn():
    Xs, Y = _rare_event_batch()
    coef, intercept, info = fit_linear_svm_batch(Xs, Y, tol=1e-8)
    assert info["per_problem_preconditioner_steps"] == info["newton_steps"] > 0
    for j in (0, 1, 7):
        sk = _sk_svc().fit(Xs, Y[:, j])
        scale = np.abs(sk.coef_).max()
        np.testing.assert_allclose(coef[j], sk.coef_[0], atol=1e-5 * scale)
        assert intercept[j] == pytest.approx(sk.intercept_[0], abs=1e-5 * max(scale, 1))


def test_decode_fold_scores_match_sklearn_pipeline():
    """decode = standardise with training-fold stats + LinearSVC + balanced accuracy, fold by fold."""
    rng = np.random.default_rng(1)
    E, T, d = 20, 60, 16
    X = rng.standard_normal((E * T, d)) * rng.uniform(0.5, 3, d) + rng.normal(0, 2, d)
    y = X[:, :3].sum(1) + 3.0 * rng.standard_normal(E * T) > 2.0
    ep = _episodes(E, T)
    res = decode(X, y, ep, n_shuffles=0)
    fold = fold_assignment(y, ep, "grouped", 5, 0)
    expected = []
    for k in range(5):
        tr, te = fold != k, fold == k
        scaler = StandardScaler().fit(X[tr])
        sk = _sk_svc(1e-6).fit(scaler.transform(X[tr]), y[tr])
        expected.append(_bacc(sk.predict(scaler.transform(X[te])).astype(bool), y[te]))
    np.testing.assert_allclose(res.fold_scores, expected, atol=1e-3)
    assert res.balanced_accuracy == pytest.approx(np.mean(expected), abs=1e-3)
    assert 0.6 < res.balanced_accuracy < 0.95                                  # a partly decodable event


def test_each_fold_is_standardised_with_its_training_statistics(monkeypatch):
    rng = np.random.default_rng(11)
    E, T = 10, 40
    X = rng.normal(5.0, 3.0, (E * T, 4)) + np.repeat(rng.normal(0, 4, (E, 4)), T, axis=0)
    X[:, 3] = 2.0                                                             # constant feature: scale 1
    y = X[:, 0] > 5
    seen = []
    real = decoding.fit_linear_svm_batch
    monkeypatch.setattr(decoding, "fit_linear_svm_batch", lambda Xs, Y, **kw: seen.append(Xs) or real(Xs, Y, **kw))
    res = decode(X, y, _episodes(E, T), n_shuffles=3)
    assert res.status == "ok" and len(seen) == 5
    for Xs in seen:
        np.testing.assert_allclose(Xs[:, :3].mean(0), 0, atol=1e-10)
        np.testing.assert_allclose(Xs[:, :3].std(0), 1, atol=1e-10)
        assert (Xs[:, 3] == 0).all()


# ---------------------------------------------------------------------------------------------- scores


def test_random_labels_score_chance_and_planted_code_scores_high():
    rng = np.random.default_rng(2)
    E, T, d = 20, 100, 32
    X = rng.standard_normal((E * T, d))
    ep = _episodes(E, T)
    noise = decode(X, rng.random(E * T) < 0.3, ep, n_shuffles=20)
    assert noise.status == "ok" and abs(noise.balanced_accuracy - 0.5) < 0.06
    assert noise.p_value > 0.1
    planted = X @ rng.standard_normal(d) > 0.3
    code = decode(X, planted, ep, n_shuffles=20)
    assert code.balanced_accuracy > 0.97
    assert code.p_value == pytest.approx(1 / 21)                               # beats every shuffle
    assert abs(code.null_mean - 0.5) < 0.05
    assert decode(X, planted, ep, n_shuffles=20).row() == code.row()            # seeded, reproducible


def test_class_imbalance_does_not_inflate_balanced_accuracy():
    rng = np.random.default_rng(3)
    E, T = 30, 100
    y = rng.random(E * T) < 0.05                                               # ~150 positives
    res = decode(rng.standard_normal((E * T, 20)), y, _episodes(E, T), n_shuffles=0)
    assert res.status == "ok" and res.n_positive >= 50
    assert abs(res.balanced_accuracy - 0.5) < 0.07


def test_thread_setting_is_restored_and_does_not_change_results():
    rng = np.random.default_rng(12)
    E, T = 10, 60
    X = rng.standard_normal((E * T, 12))
    y = X[:, :2].sum(1) + rng.standard_normal(E * T) > 1.0
    before = torch.get_num_threads()
    one = decode(X, y, _episodes(E, T), n_shuffles=0, threads=1)
    assert torch.get_num_threads() == before
    two = decode(X, y, _episodes(E, T), n_shuffles=0, threads=2)
    assert torch.get_num_threads() == before
    assert one.balanced_accuracy == pytest.approx(two.balanced_accuracy, abs=1e-3)
    with pytest.raises(InterbrainError, match="threads"):
        decode(X, y, _episodes(E, T), threads=0)


# ---------------------------------------------------------------------------------------------- folds


def test_grouped_folds_never_split_an_episode_and_timestep_folds_do():
    rng = np.random.default_rng(4)
    E, T = 25, 80
    ep = _episodes(E, T)
    y = rng.random(E * T) < 0.2
    grouped = fold_assignment(y, ep, "grouped", 5, 0)
    assert set(grouped) == set(range(5))
    assert all(np.unique(grouped[ep == e]).size == 1 for e in range(E))
    assert all(y[grouped == k].any() for k in range(5))                       # stratified: positives everywhere
    timestep = fold_assignment(y, ep, "timestep", 5, 0)
    assert set(timestep) == set(range(5))
    assert max(np.unique(timestep[ep == e]).size for e in range(E)) > 1
    rates = [y[timestep == k].mean() for k in range(5)]
    assert max(rates) - min(rates) < 0.01                                      # stratified


def test_episode_fingerprint_inflates_timestep_folds_only():
    """Pitfall 1: an episode fingerprint plus episode-level label rates leak through timestep folds."""
    rng = np.random.default_rng(0)
    E, T, d = 100, 20, 100
    fingerprint = 3.0 * rng.standard_normal((E, d))
    X = (fingerprint[:, None, :] + rng.standard_normal((E, T, d))).reshape(-1, d)
    rate = np.where(np.arange(E) % 2 == 0, 0.9, 0.1)
    y = (rng.random((E, T)) < rate[:, None]).reshape(-1)
    ep = _episodes(E, T)
    grouped = decode(X, y, ep, scheme="grouped", n_shuffles=0)
    timestep = decode(X, y, ep, scheme="timestep", n_shuffles=0)
    assert (grouped.scheme, timestep.scheme) == ("grouped", "timestep")
    assert abs(grouped.balanced_accuracy - 0.5) < 0.12
    assert timestep.balanced_accuracy > 0.78


def test_permutations_stay_within_episodes():
    rng = np.random.default_rng(5)
    ep = rng.permutation(_episodes(6, 30))                                     # episodes interleaved
    y = rng.random(ep.size) < 0.3
    perms = permute_within_episodes(y, ep, 50, rng)
    for e in range(6):
        assert (perms[ep == e].sum(0) == y[ep == e].sum()).all()
    assert (perms != y[:, None]).any(axis=0).mean() > 0.9                      # and they do move labels


# ---------------------------------------------------------------------------------------------- eligibility


def test_insufficient_is_never_a_number():
    rng = np.random.default_rng(6)
    E, T = 20, 50
    X = rng.standard_normal((E * T, 8))
    ep = _episodes(E, T)
    few = np.zeros(E * T, dtype=bool)
    few[rng.choice(E * T, 49, replace=False)] = True
    res = decode(X, few, ep)
    assert res.status == "insufficient" and res.balanced_accuracy is None and res.p_value is None
    assert "49" in res.reason and "min_class" in res.reason and res.n_positive == 49
    narrow = np.isin(ep, [0, 1, 2, 3]) & (rng.random(E * T) < 0.5)            # ~100 positives in 4 episodes
    res = decode(X, narrow, ep)
    assert res.status == "insufficient" and "min_pos_episodes" in res.reason and res.n_pos_episodes == 4
    assert res.fold_scores is None and res.null_mean is None
    mostly = rng.random(E * T) < 0.97                                          # too few negatives
    assert "negative" in decode(X, mostly, ep).reason
    empty = decode(np.zeros((0, 8)), np.zeros(0, bool), np.zeros(0, int), target="x")
    assert empty.status == "insufficient" and empty.n_samples == 0


def test_insufficient_when_a_fold_part_lacks_a_class():
    rng = np.random.default_rng(13)
    E, T = 10, 60
    X = rng.standard_normal((E * T, 4))
    ep = _episodes(E, T)
    two_episodes = np.isin(ep, [3, 7]) & (rng.random(E * T) < 0.6)           # 5 grouped folds, 2 with positives
    res = decode(X, two_episodes, ep, min_pos_episodes=1)
    assert res.status == "insufficient" and "lacks the positive class" in res.reason
    assert res.balanced_accuracy is None
    one_episode = (ep == 5) & (rng.random(E * T) < 0.9)                      # its fold trains without positives
    res = decode(X, one_episode, ep, min_pos_episodes=1)
    assert res.status == "insufficient" and "training part lacks the positive class" in res.reason


def test_subsampling_caps_samples_and_keeps_episode_ids():
    rng = np.random.default_rng(7)
    E, T = 10, 120
    X = rng.standard_normal((E * T, 6))
    y = X[:, 0] > 0.5
    res = decode(X, y, _episodes(E, T), max_samples=600, n_shuffles=0)
    assert res.status == "ok" and res.n_samples == 600
    assert res.n_positive + res.n_negative == 600 and res.n_pos_episodes == E


def test_bad_input_raises_naming_the_problem():
    X, y, ep = np.zeros((10, 2)), np.zeros(10, bool), np.zeros(10, int)
    with pytest.raises(InterbrainError, match="scheme"):
        decode(X, y, ep, scheme="leaky")
    with pytest.raises(InterbrainError, match="labels"):
        decode(X, y[:5], ep)
    with pytest.raises(InterbrainError, match="non-finite"):
        decode(np.full((10, 2), np.nan), y, ep)
    with pytest.raises(InterbrainError, match="n_shuffles"):
        decode(X, y, ep, n_shuffles=-1)
    with pytest.raises(InterbrainError, match="lag"):
        decode_rollout({}, lag=2)


# ---------------------------------------------------------------------------------------------- rollouts


def _tiny_rollout(rng, T=40, E=6, H=5):
    out = {"episode_degenerate": np.arange(E) == 2}                          # episode 2 is degenerate
    for agent in ("chaser", "explorer"):
        out[f"{agent}_hidden"] = rng.standard_normal((T, E, H)).astype(np.float32)
        out[f"{agent}_fov"] = rng.random((T + 1, E)) < 0.6
    for key in ("collision", "explorer_escape", "chaser_approach"):
        out[key] = rng.random((T, E)) < 0.3
    return out


def test_decode_rollout_masks_and_alignment_by_hand(monkeypatch):
    rng = np.random.default_rng(8)
    T, E = 40, 6
    ro = _tiny_rollout(rng, T, E)
    calls = []
    monkeypatch.setattr(decoding, "decode", lambda f, l, e, **kw: calls.append((f, l, e, kw)) or kw["target"])
    assert decode_rollout(ro) == list(DECODING_TARGETS)
    valid = [e for e in range(E) if not ro["episode_degenerate"][e]]
    for (feat, lab, eps, kw), (name, (agent, label_key, mask_key)) in zip(calls, DECODING_TARGETS.items()):
        rows = [(t, e) for e in valid for t in range(T) if mask_key is None or ro[mask_key][t, e]]
        assert len(feat) == len(rows) == (T * len(valid) if mask_key is None
                                           else ro[mask_key][:T, valid].sum())
        np.testing.assert_array_equal(feat, np.array([ro[f"{agent}_hidden"][t, e] for t, e in rows]))
        np.testing.assert_array_equal(lab, np.array([ro[label_key][t, e] for t, e in rows]))
        np.testing.assert_array_equal(eps, np.array([e for _, e in rows]))
    calls.clear()
    decode_rollout(ro, lag=1, targets=["chaser_partner_escape"], scheme="timestep")
    (feat, lab, eps, kw), = calls
    rows = [(t, e) for e in valid for t in range(1, T) if ro["chaser_fov"][t, e]]   # mask fov[t], label[t-1]
    np.testing.assert_array_equal(feat, np.array([ro["chaser_hidden"][t, e] for t, e in rows]))
    np.testing.assert_array_equal(lab, np.array([ro["explorer_escape"][t - 1, e] for t, e in rows]))
    assert kw["scheme"] == "timestep"


def test_lag_one_decodes_the_previous_event():
    rng = np.random.default_rng(9)
    T, E = 150, 8
    ro = _tiny_rollout(rng, T, E)
    ro["collision"] = rng.random((T, E)) < 0.25
    h = rng.standard_normal((T, E, 5)).astype(np.float32)
    h[1:, :, 0] += 3.0 * ro["collision"][:-1]                  # hidden[t] carries the s_{t-1} -> s_t event
    ro["chaser_hidden"] = h
    (lag1,) = decode_rollout(ro, lag=1, targets=["chaser_collision"], n_shuffles=0)
    (lag0,) = decode_rollout(ro, lag=0, targets=["chaser_collision"], n_shuffles=0)
    assert lag1.n_samples == (T - 1) * (E - 1) and lag0.n_samples == T * (E - 1)
    assert lag1.balanced_accuracy > 0.9
    assert abs(lag0.balanced_accuracy - 0.5) < 0.08


def test_decode_rollout_rejects_inconsistent_tensors():
    rng = np.random.default_rng(10)
    ro = _tiny_rollout(rng)
    ro["chaser_fov"] = ro["chaser_fov"][:-1]                    # [T, E] instead of [T+1, E]
    with pytest.raises(InterbrainError, match="chaser_fov"):
        decode_rollout(ro, targets=["chaser_partner_escape"])
    del ro["collision"]
    with pytest.raises(InterbrainError, match="collision"):
        decode_rollout(ro, targets=["chaser_collision"])
    with pytest.raises(InterbrainError, match="decoding target"):
        decode_rollout(ro, targets=["nope"])
