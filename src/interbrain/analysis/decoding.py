"""Event decoding from hidden states (SPEC §6.1) with a batched linear-SVM solver.

The classifier is the exact ``sklearn.svm.LinearSVC(penalty="l2", loss="squared_hinge", C=1,
class_weight="balanced", dual=False)`` model, but solved for many label vectors at once:

    minimise over (w, b):  0.5 * (||w||^2 + b^2) + C * sum_i c_i * max(0, 1 - y_i (w . x_i + b))^2

with balanced class weights c_i = n / (2 n_class(y_i)) computed from each label vector's own counts.
**Intercept.** As in liblinear (``intercept_scaling=1``) the bias is an ordinary weight on a constant
feature of value 1, so it is regularised with the rest (the ``0.5 b^2`` term above).

**Solver.** Semi-smooth Newton on the primal (the objective is once differentiable and piecewise
quadratic; its generalised Hessian is ``I + 2 X_a^T diag(C c_i [margin violated]) X_a``). Each Newton
system is solved by preconditioned conjugate gradients, all label vectors together: the training
features of a fold are shared, so every Hessian-vector product is one [P, D] x [D, n] and one
[P, n] x [n, D] matmul for all P label vectors. The preconditioner (``_preconditioner``) is built per
problem at every Newton step when each label vector's minority class is small (rare events such as
collisions: the exact minority-class curvature plus a shared majority-class part), otherwise it is one
shared matrix, the Hessian with the curvature averaged over the label vectors at the first Newton step.
Steps use an Armijo backtracking line search; a label vector leaves the batch once its
float64 gradient norm falls below ``tol`` (default 1e-6) times its gradient norm at w = 0. Not reaching
that within ``max_iter`` Newton steps raises. Every fold starts from w = 0 (starting fold k+1 from fold
k's solutions took more Newton steps, not fewer, on real rollouts).

**Shuffled-label control.** Permutations of the labels *within episodes* (so each episode keeps its
own event count). Within-episode permutation keeps the global class counts but not the per-fold
counts of the timestep scheme, so class weights are computed per label vector per training fold.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from threadpoolctl import threadpool_limits

from interbrain.errors import InterbrainError, check_choice

# Hessian-vector products inside CG run in float32 (they only shape the search direction); gradients,
# margins, objective and the stopping test are float64. CG for a Newton step stops at a relative
# residual of clip(||g|| / ||g(0)||, 1e-4, 0.1) (inexact Newton, superlinear until the floor).
_HV_DTYPE = torch.float32
_CG_FORCING = (1e-4, 0.1)
SCHEMES = ("grouped", "timestep")

#: SPEC §6.1 targets: name -> (agent whose hidden is decoded, label key, mask key or None).
DECODING_TARGETS: dict[str, tuple[str, str, str | None]] = {
    "chaser_collision": ("chaser", "collision", None),
    "chaser_partner_escape": ("chaser", "explorer_escape", "chaser_fov"),
    "explorer_collision": ("explorer", "collision", None),
    "explorer_partner_approach": ("explorer", "chaser_approach", "explorer_fov"),
}


@dataclass
class DecodeResult:
    """One decoding target's outcome (SPEC §6.1). ``status`` is ``"ok"`` or ``"insufficient"``.

    An insufficient result carries None for every score and the failed rule in ``reason``; counts are
    those after masking and subsampling, and ``n_shuffles`` is the requested number of shuffles.
    """

    target: str
    status: str
    reason: str | None
    balanced_accuracy: float | None
    fold_scores: list[float] | None
    null_mean: float | None
    p_value: float | None
    n_shuffles: int
    n_samples: int
    n_positive: int
    n_negative: int
    n_pos_episodes: int
    scheme: str

    def row(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Batched linear SVM (squared hinge, L2, balanced class weights)
# ----------------------------------------------------------------------------------------------


def _pcg(S, Xa, XaT, b, precond, stop, max_cg):
    """Solve (I + 2 Xa^T diag(S_p) Xa) x_p = b_p for every row p by preconditioned CG.

    Row p stops once its residual norm is <= stop_p. Finished rows are frozen (zero step) and dropped
    from the matmuls once fewer than half of the current rows are still running. Returns the solutions
    and the number of Hessian-vector products computed.
    """
    x_out = torch.zeros_like(b)
    cur = torch.arange(b.shape[0])
    Sc, st = S, stop
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r, cur)
    p = z.clone()
    rz = torch.linalg.vecdot(r, z)
    live = r.norm(dim=1) > st
    work = 0                                     # Hessian-vector products computed (rows x iterations)
    for _ in range(max_cg):
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live < 0.5 * cur.numel():
            x_out[cur] = x
            keep = torch.nonzero(live).flatten()
            cur, Sc, x, r, p, rz, st, live = (t[keep] for t in (cur, Sc, x, r, p, rz, st, live))
        hp = p + 2.0 * ((Sc * (p.to(XaT.dtype) @ XaT)) @ Xa).to(p.dtype)     # may run in lower precision
        work += cur.numel()
        alpha = torch.where(live, rz / torch.linalg.vecdot(p, hp), 0.0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * hp
        z = precond(r, cur)
        rz_new = torch.linalg.vecdot(r, z)
        beta = torch.where(live, rz_new / rz, 0.0)
        p = z + beta[:, None] * p
        rz = rz_new
        live &= r.norm(dim=1) > st
    x_out[cur] = x
    return x_out, work


def _preconditioner(S, Xa, XaT, Xh, minority):
    """CG preconditioner for the Newton systems (I + 2 Xa^T diag(S_p) Xa) of the problems in the batch.

    When every problem's minority class is small (max count x (D+1) <= 16 n: the correction then costs
    at most about eight CG iterations), M_p = A + 2 X_m^T S_m X_m: A carries each row's majority-class
    curvature averaged over the problems in which that row is a majority row, and every problem adds its
    own minority-class curvature exactly (so M_p = H_p when the majority curvatures agree, e.g. at w = 0
    for label permutations). Otherwise one shared M: the Hessian with the batch-mean curvature.
    Rare, heavily weighted events (collisions: ~1 % positives, class weight ~40) sit in different rows
    of every shuffled label vector, which a shared matrix cannot represent; with the exact minority term
    CG needs 3-7x fewer iterations. The per-problem factors are built and applied in float32 (a
    preconditioner only shapes the CG path; float64 if the float32 Cholesky fails).
    Returns ``(apply, per_problem)`` with ``apply(r, rows) -> M_rows^-1 r``.
    """
    k, n = S.shape
    d1 = Xa.shape[1]
    m_max = int(minority.sum(1).max())
    if m_max * d1 > 16 * n:                                   # shared: the batch-mean curvature
        A = torch.eye(d1, dtype=S.dtype) + 2.0 * (XaT * S.mean(0)) @ Xa
        Minv = torch.cholesky_inverse(torch.linalg.cholesky(A))
        return (lambda r, rows: r @ Minv), False
    # each row's mean curvature over the problems in which it is a majority-class row
    maj = ~minority
    s_maj = torch.where(maj, S, 0.0).sum(0) / maj.sum(0).clamp(min=1)
    A = torch.eye(d1, dtype=S.dtype) + 2.0 * (XaT * s_maj) @ Xa
    order = torch.argsort(minority.to(torch.int8), dim=1, descending=True, stable=True)[:, :m_max]
    # a minority row's weight replaces the shared majority-class weight that A gives it (0 on padding rows)
    w = torch.where(minority.gather(1, order), S.gather(1, order) - s_maj[order], 0.0).to(_HV_DTYPE)
    Xm = Xh[order]                                                              # [k, m_max, D+1]
    M = torch.baddbmm(A.to(_HV_DTYPE).expand(k, d1, d1), Xm.transpose(1, 2) * w[:, None, :], Xm, alpha=2.0)
    L, info = torch.linalg.cholesky_ex(M)
    if bool(info.any()):
        L = torch.linalg.cholesky(M.to(S.dtype))
    Minv = torch.cholesky_inverse(L).to(_HV_DTYPE)                             # [k, D+1, D+1]
    cache = {}

    def apply(r, rows):
        if cache.get("rows") is not rows:                 # CG compacts its batch rarely: index once
            cache["rows"], cache["Minv"] = rows, Minv[rows]
        # M^-1 is symmetric: r^T M^-1 as a row-vector bmm (several times faster than M^-1 r on CPU)
        return torch.bmm(r.to(_HV_DTYPE)[:, None, :], cache["Minv"]).squeeze(1).to(r.dtype)
    return apply, True


def fit_linear_svm_batch(X, Y, *, C: float = 1.0, tol: float = 1e-6, max_iter: int = 100):
    """Fit the balanced squared-hinge L2 linear SVM for every label column of ``Y`` at once.

    X: [n, D] features (standardise beforehand; the solver adds the regularised unit bias feature).
    Y: [n, P] bool labels, one problem per column; class weights n / (2 n_class) from each column's
    own counts; every column starts from w = 0. Column p is done when
    ||grad_p|| <= tol * ||grad_p(w=0)|| (float64 gradient); more than ``max_iter`` Newton steps raise.
    Returns ``(coef [P, D], intercept [P], info)``: float64 arrays and work counts (Newton steps;
    Hessian-vector and Newton-step products, each summed over the columns still in the batch; Newton steps
    that used per-problem preconditioners).
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=bool)
    if Y.ndim == 1:
        Y = Y[:, None]
    n, d = X.shape
    if Y.shape[0] != n:
        raise InterbrainError(f"labels have {Y.shape[0]} rows but features have {n}")
    P = Y.shape[1]
    f64 = torch.float64
    Xa = torch.from_numpy(np.concatenate([X, np.ones((n, 1))], axis=1))      # [n, D+1], unit bias feature
    XaT = Xa.T.contiguous()
    Xh, XhT = Xa.to(_HV_DTYPE), XaT.to(_HV_DTYPE)
    Yt = torch.from_numpy(np.ascontiguousarray(Y.T))                           # [P, n]
    n_pos = Yt.sum(1, dtype=f64)
    c_pos = C * n / (2.0 * n_pos.clamp(min=1.0))
    c_neg = C * n / (2.0 * (n - n_pos).clamp(min=1.0))
    Cw = torch.where(Yt, c_pos[:, None], c_neg[:, None])                       # C * class weight [P, n]
    Ys = Yt.to(f64).mul_(2.0).sub_(1.0)                                        # labels as +-1
    minority = Yt == (2.0 * n_pos <= n)[:, None]                               # each column's smaller class
    g0n = 2.0 * ((Cw * Ys) @ Xa).norm(dim=1)    # gradient norm at w = 0 (every margin violated)

    W = torch.zeros(P, d + 1, dtype=f64)
    viol = 1.0 - Ys * (W @ XaT)                                                # 1 - y * margin
    W_out = W.clone()
    idx = torch.arange(P)                                                      # columns in the batch
    pos = viol.clamp(min=0.0)
    rc = Cw * pos
    f0 = 0.5 * torch.linalg.vecdot(W, W) + torch.linalg.vecdot(rc, pos)         # objective per column
    steps = hess_products = newton_products = n_per_problem = 0
    shared = None
    while True:
        g = W - 2.0 * (rc * Ys) @ Xa
        gn = g.norm(dim=1)
        todo = gn > tol * g0n[idx]
        n_todo = int(todo.sum())
        if n_todo == 0:
            break
        if steps >= max_iter:
            raise InterbrainError(f"linear SVM: {n_todo} problems not converged to tol={tol:g} "
                                  f"in max_iter={max_iter} Newton steps")
        if n_todo < 0.5 * idx.numel():                 # drop finished columns from the batch
            W_out[idx] = W
            keep = torch.nonzero(todo).flatten()
            idx, W, viol, pos, rc, Cw, Ys, minority, f0, g, gn, todo = (
                t[keep] for t in (idx, W, viol, pos, rc, Cw, Ys, minority, f0, g, gn, todo))
        steps += 1
        S = torch.where(pos > 0, Cw, 0.0)                                      # curvature weights [k, n]
        if shared is None:    # per-problem factors follow the curvature every step; a shared M is kept
            precond, per_problem = _preconditioner(S, Xa, XaT, Xh, minority)
            shared = None if per_problem else precond
            n_per_problem += per_problem
        forcing = torch.clamp(gn / g0n[idx], min=_CG_FORCING[0], max=_CG_FORCING[1])
        stop = torch.where(todo, forcing * gn, 0.0)
        direction, work = _pcg(S.to(_HV_DTYPE), Xh, XhT, torch.where(todo[:, None], -g, 0.0), precond, stop,
                               max_cg=max(50, d))
        del S
        hess_products += work
        newton_products += idx.numel()
        ydm = Ys * (direction @ XaT)                   # change of y * margin per unit step
        slope = torch.linalg.vecdot(g, direction)
        ww, wd, dd = (torch.linalg.vecdot(a, b) for a, b in ((W, W), (W, direction), (direction, direction)))
        t = torch.ones(idx.numel(), dtype=f64)
        for _ in range(40):                              # Armijo backtracking, per column
            v = torch.addcmul(viol, t[:, None].expand_as(ydm), ydm, value=-1.0)
            vp = v.clamp(min=0.0)
            cvp = Cw * vp
            f1 = 0.5 * (ww + 2.0 * t * wd + t * t * dd) + torch.linalg.vecdot(cvp, vp)
            bad = f1 > f0 + 1e-4 * t * slope
            if not bool(bad.any()):
                break
            t = torch.where(bad, 0.5 * t, t)
        W = W + t[:, None] * direction
        viol, pos, rc, f0 = v, vp, cvp, f1
    W_out[idx] = W
    W_out = W_out.numpy()
    info = {"newton_steps": steps, "hessian_products": hess_products, "newton_products": newton_products,
            "per_problem_preconditioner_steps": n_per_problem}
    return W_out[:, :d], W_out[:, d], info


# ----------------------------------------------------------------------------------------------
# Folds, permutations, scores
# ----------------------------------------------------------------------------------------------


def fold_assignment(labels, episodes, scheme: str, n_folds: int, seed: int) -> np.ndarray:
    """Fold id (0..n_folds-1) per sample (SPEC §6.1).

    ``grouped``: stratified, grouped by episode (``StratifiedGroupKFold``, shuffled with ``seed``): no
    episode is split across folds. ``timestep``: stratified, shuffled at the timestep level
    (``StratifiedKFold``), the labelled variant ``timestep_folds``.
    """
    check_choice("scheme", scheme, SCHEMES)
    labels = np.asarray(labels, dtype=bool)
    episodes = np.asarray(episodes)
    n = labels.shape[0]
    if scheme == "grouped":
        n_groups = np.unique(episodes).size
        if n_groups < n_folds:
            raise InterbrainError(f"grouped folds need >= n_folds={n_folds} episodes, got {n_groups}")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), labels, groups=episodes)
    else:
        smallest = int(min(labels.sum(), n - labels.sum()))
        if smallest < n_folds:
            raise InterbrainError(f"timestep folds need >= n_folds={n_folds} samples per class, got {smallest}")
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(n), labels)
    fold = np.full(n, -1, dtype=np.int64)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    return fold


def permute_within_episodes(labels, episodes, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """[n, n_perm] label copies, each an independent random permutation of ``labels`` within every episode."""
    labels = np.asarray(labels)
    _, code = np.unique(np.asarray(episodes), return_inverse=True)
    base = np.argsort(code, kind="stable")                                  # indices grouped by episode
    keys = code[None, :] + rng.random((n_perm, code.size))                  # random order inside a block
    order = np.argsort(keys, axis=1)
    out = np.empty((code.size, n_perm), dtype=labels.dtype)
    out[base, :] = labels[order].T
    return out


def _balanced_accuracy(pred, truth) -> np.ndarray:
    """Column-wise ½(TPR + TNR); a class absent from a column's truth is left out of its mean."""
    pos = truth.sum(0)
    neg = truth.shape[0] - pos
    tpr = np.where(pos > 0, (pred & truth).sum(0) / np.maximum(pos, 1), np.nan)
    tnr = np.where(neg > 0, (~pred & ~truth).sum(0) / np.maximum(neg, 1), np.nan)
    return np.nanmean(np.stack([tpr, tnr]), axis=0)


def _check_inputs(features, labels, episodes):
    features = np.asarray(features)
    labels = np.asarray(labels)
    episodes = np.asarray(episodes)
    if features.ndim != 2:
        raise InterbrainError(f"features must be 2-D [N, D], got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.number):
        raise InterbrainError(f"features must be numeric, got dtype {features.dtype}")
    n = features.shape[0]
    if labels.shape != (n,) or episodes.shape != (n,):
        raise InterbrainError(
            f"labels {labels.shape} and episodes {episodes.shape} must both have shape ({n},) to match features")
    if labels.dtype != bool:
        if not (np.issubdtype(labels.dtype, np.integer) and np.isin(labels, (0, 1)).all()):
            raise InterbrainError(f"labels must be bool (or 0/1 integers), got dtype {labels.dtype}")
        labels = labels.astype(bool)
    if not np.issubdtype(episodes.dtype, np.integer):
        raise InterbrainError(f"episodes must be integer episode ids, got dtype {episodes.dtype}")
    if not np.isfinite(features).all():
        raise InterbrainError(f"features contain {int((~np.isfinite(features)).sum())} non-finite values")
    return features.astype(np.float64, copy=False), labels, episodes


def _check_int(key, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InterbrainError(f"{key} must be an integer >= {minimum}, got {value!r}")


def decode(features, labels, episodes, *, target: str = "", scheme: str = "grouped", n_folds: int = 5,
           n_shuffles: int = 200, seed: int = 0, max_samples: int = 20_000, min_class: int = 50,
           min_pos_episodes: int = 5, C: float = 1.0, tol: float = 1e-6, threads: int | None = 1) -> DecodeResult:
    """Decode a binary event from features with cross-validated balanced accuracy (SPEC §6.1).

    features [N, D], labels [N] bool, episodes [N] int: already masked (valid episodes, FOV steps).
    Above ``max_samples`` a seeded subsample (without replacement, episode ids kept) is used.
    Eligibility after subsampling: each class >= ``min_class`` samples and positives in >=
    ``min_pos_episodes`` episodes; every fold must have both classes in its training and test part
    (the test part too, since a balanced accuracy needs both). Otherwise ``status="insufficient"``.
    Each fold is standardised with its training statistics (population SD; SD < 1e-12 -> 1).
    Randomness: folds use ``random_state=seed``; the subsample ``numpy.random.default_rng([seed, 1])``;
    the label permutations ``default_rng([seed, 2])``.
    The null: ``n_shuffles`` within-episode label permutations scored with the same folds;
    p = (1 + #null >= observed) / (n_shuffles + 1).
    ``threads``: torch intra-op and BLAS threads while fitting (restored afterwards; None: unchanged).
    The default 1 is deliberate: the solver issues thousands of small tensor ops, and on a shared CPU
    every multi-threaded op waits for all its threads to be scheduled, which made 2 threads 3-5x slower
    than 1 on the 2-core development machine under load. Run units in parallel processes instead.
    """
    check_choice("scheme", scheme, SCHEMES)
    if threads is not None:
        _check_int("threads", threads, 1)
    _check_int("n_folds", n_folds, 2)
    _check_int("n_shuffles", n_shuffles, 0)
    _check_int("max_samples", max_samples, 1)
    _check_int("min_class", min_class, 1)
    _check_int("min_pos_episodes", min_pos_episodes, 1)
    if isinstance(C, bool) or not isinstance(C, (int, float)) or not C > 0:
        raise InterbrainError(f"C must be a positive number, got {C!r}")
    features, labels, episodes = _check_inputs(features, labels, episodes)

    if labels.size > max_samples:
        keep = np.sort(np.random.default_rng([seed, 1]).choice(labels.size, max_samples, replace=False))
        features, labels, episodes = features[keep], labels[keep], episodes[keep]
    n = int(labels.size)
    n_pos = int(labels.sum())
    n_pos_eps = int(np.unique(episodes[labels]).size)
    base = dict(target=target, n_shuffles=n_shuffles, n_samples=n, n_positive=n_pos, n_negative=n - n_pos,
                n_pos_episodes=n_pos_eps, scheme=scheme)

    def insufficient(reason):
        return DecodeResult(status="insufficient", reason=reason, balanced_accuracy=None, fold_scores=None,
                            null_mean=None, p_value=None, **base)

    if n_pos < min_class:
        return insufficient(f"positive class has {n_pos} samples < min_class {min_class}")
    if n - n_pos < min_class:
        return insufficient(f"negative class has {n - n_pos} samples < min_class {min_class}")
    if n_pos_eps < min_pos_episodes:
        return insufficient(f"positives occur in {n_pos_eps} episodes < min_pos_episodes {min_pos_episodes}")
    fold = fold_assignment(labels, episodes, scheme, n_folds, seed)
    for part in ("training", "test"):
        for k in range(n_folds):
            sel = fold != k if part == "training" else fold == k
            n_pos_part = int(labels[sel].sum())
            if n_pos_part == 0 or n_pos_part == int(sel.sum()):
                cls = "positive" if n_pos_part == 0 else "negative"
                return insufficient(f"fold {k} {part} part lacks the {cls} class")

    Y = labels[:, None]
    if n_shuffles:
        Y = np.concatenate([Y, permute_within_episodes(labels, episodes, n_shuffles,
                                                       np.random.default_rng([seed, 2]))], axis=1)
    with limit_threads(threads):
        scores = _cross_validate(features, Y, fold, n_folds, C, tol)
    score = scores.mean(0)
    obs = float(score[0])
    null = score[1:]
    return DecodeResult(
        status="ok", reason=None, balanced_accuracy=obs, fold_scores=[float(s) for s in scores[:, 0]],
        null_mean=float(null.mean()) if n_shuffles else None,
        p_value=float((1 + np.sum(null >= obs)) / (n_shuffles + 1)) if n_shuffles else None, **base)


def _cross_validate(features, Y, fold, n_folds, C, tol) -> np.ndarray:
    """[n_folds, P] balanced accuracies of every label column of Y, one batched SVM fit per fold."""
    scores = np.zeros((n_folds, Y.shape[1]))
    for k in range(n_folds):
        train, test = fold != k, fold == k
        mu = features[train].mean(0)
        sd = features[train].std(0)
        sd[sd < 1e-12] = 1.0
        coef, intercept, _ = fit_linear_svm_batch((features[train] - mu) / sd, Y[train], C=C, tol=tol)
        pred = ((features[test] - mu) / sd) @ coef.T + intercept > 0
        scores[k] = _balanced_accuracy(pred, Y[test])
    return scores


@contextlib.contextmanager
def limit_threads(n: int | None):
    """Run the block with ``n`` torch intra-op and numpy BLAS threads (None: unchanged); restores both."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Rollouts
# ----------------------------------------------------------------------------------------------


def _get(rollout, key):
    if key not in rollout:
        raise InterbrainError(f"rollout lacks tensor {key!r}")
    return np.asarray(rollout[key])


def decode_rollout(rollout: dict, *, lag: int = 0, targets=None, **kw) -> list[DecodeResult]:
    """Decode the SPEC §6.1 targets from one §5.3 rollout.

    Degenerate episodes (``episode_degenerate``) are masked out. For hidden[t] the FOV mask is
    ``fov[t]`` (the state s_t that produced hidden[t]). ``lag=0``: label[t] (the outcome of action t,
    s_t -> s_{t+1}); ``lag=1``: label[t-1] (the event s_{t-1} -> s_t, already observed), so t = 1..T-1.
    Samples are ordered episode-major (all steps of episode 0, then episode 1, ...), episode id = its
    index in the rollout. ``targets``: subset of :data:`DECODING_TARGETS` names (default all four);
    other keyword arguments go to :func:`decode`.
    """
    if lag not in (0, 1):
        raise InterbrainError(f"lag must be 0 or 1, got {lag!r}")
    names = list(DECODING_TARGETS) if targets is None else list(targets)
    for name in names:
        check_choice("decoding target", name, tuple(DECODING_TARGETS))
    degenerate = _get(rollout, "episode_degenerate").astype(bool)
    results = []
    for name in names:
        agent, label_key, mask_key = DECODING_TARGETS[name]
        hidden = _get(rollout, f"{agent}_hidden")
        label = _get(rollout, label_key).astype(bool)
        T, E = label.shape
        if hidden.shape[:2] != (T, E) or degenerate.shape != (E,):
            raise InterbrainError(
                f"{agent}_hidden {hidden.shape}, {label_key} {label.shape} and episode_degenerate "
                f"{degenerate.shape} disagree on (T, E)")
        mask = np.broadcast_to(~degenerate, (T, E)).copy()
        if mask_key is not None:
            fov = _get(rollout, mask_key).astype(bool)
            if fov.shape != (T + 1, E):
                raise InterbrainError(f"{mask_key} has shape {fov.shape}, expected {(T + 1, E)}")
            mask &= fov[:T]
        if lag == 1:
            label = np.concatenate([np.zeros((1, E), dtype=bool), label[:-1]], axis=0)
            mask[0] = False
        ep = np.broadcast_to(np.arange(E), (T, E))
        sel = mask.T                                                        # episode-major order
        results.append(decode(hidden.transpose(1, 0, 2)[sel], label.T[sel], ep.T[sel], target=name, **kw))
    return results


def synthetic_rollout(T: int = 500, E: int = 25, D: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """A rollout-shaped synthetic dataset for benchmarks: autocorrelated hidden states with planted,
    partly linear event codes, ~8 % collisions, ~85 % FOV steps and ~15 % escape/approach events."""
    rng = np.random.default_rng(seed)
    out = {"episode_degenerate": np.zeros(E, dtype=bool)}
    for agent in ("chaser", "explorer"):
        noise = rng.standard_normal((T, E, D)).astype(np.float32)
        for t in range(1, T):
            noise[t] = 0.7 * noise[t - 1] + 0.71 * noise[t]
        out[f"{agent}_hidden"] = noise
    h = out["chaser_hidden"]
    out["collision"] = (h[..., 0] + 0.8 * rng.standard_normal((T, E))) > 1.7
    out["explorer_escape"] = (h[..., 1] + rng.standard_normal((T, E))) > 1.3
    out["chaser_approach"] = (out["explorer_hidden"][..., 1] + rng.standard_normal((T, E))) > 1.3
    fov = rng.random((T + 1, E)) < 0.85
    out["chaser_fov"] = out["explorer_fov"] = fov
    return out


def bench_decoding(T: int = 500, E: int = 25, D: int = 256, n_shuffles: int = 200, scheme: str = "grouped",
                   threads: int | None = 1) -> dict:
    """Time one unit's four targets x (1 + n_shuffles) fits at the SPEC §5.3 size on synthetic data."""
    rollout = synthetic_rollout(T, E, D)
    fit_linear_svm_batch(np.eye(8), np.eye(8, 2, dtype=bool))   # warm-up: first-call library initialisation
    per_target = {}
    t_all, cpu_all = time.perf_counter(), time.process_time()
    for name in DECODING_TARGETS:
        t0, c0 = time.perf_counter(), time.process_time()
        (res,) = decode_rollout(rollout, targets=[name], n_shuffles=n_shuffles, scheme=scheme, threads=threads)
        per_target[name] = {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
                            "n_samples": res.n_samples, "balanced_accuracy": res.balanced_accuracy,
                            "status": res.status}
    return {"seconds_total": time.perf_counter() - t_all, "cpu_seconds_total": time.process_time() - cpu_all,
            "n_shuffles": n_shuffles, "fits_per_target": n_shuffles + 1, "scheme": scheme, "T": T, "E": E, "D": D,
            "threads": threads if threads is not None else torch.get_num_threads(), "targets": per_target}


DECODING_PROTOCOL = "decoding_v1"
IDENTITY_FIELDS = ("schema_version", "protocol", "unit_id", "arch", "size", "task", "seed", "update", "visibility",
                   "rollout", "rollout_sha256", "n_valid_episodes", "status", "reason")
DECODING_FIELDS = IDENTITY_FIELDS + ("target", "scheme", "lag", "balanced_accuracy", "null_mean", "p_value",
                                     "n_shuffles", "n_samples", "n_positive", "n_negative", "n_pos_episodes")


def decode_file(rollout, out_csv, *, n_shuffles: int = 200, schemes=("grouped", "timestep"), lag: int = 0,
                seed: int = 0):
    """Decode the four SPEC §6.1 targets from one analysis rollout file into a CSV (docs/ARTIFACTS.md).

    ``grouped`` (episode-grouped folds) is the default scheme; ``timestep`` is the reproduction's labelled variant. A
    rollout with fewer than 3 valid episodes yields ``degenerate_unit`` rows, never a score.
    """
    from interbrain.io import write_csv_atomic
    from interbrain.rollout import load_rollout, rollout_identity

    for scheme in schemes:
        check_choice("scheme", scheme, ("grouped", "timestep"))
    data, meta = load_rollout(rollout)
    ident = rollout_identity(rollout, data, meta, protocol=DECODING_PROTOCOL)
    rows = []
    for scheme in schemes:
        if ident["status"] != "ok":
            rows.extend({**ident, "target": t, "scheme": scheme, "lag": lag} for t in DECODING_TARGETS)
            continue
        for res in decode_rollout(data, lag=lag, scheme=scheme, n_shuffles=n_shuffles, seed=seed):
            row = res.row()
            row.pop("fold_scores", None)
            status, reason = row.pop("status"), row.pop("reason")
            rows.append({**ident, "status": status, "reason": reason or "", "lag": lag, **row})
    return write_csv_atomic(out_csv, rows, list(DECODING_FIELDS))
