"""PLSC shared subspace and its null tests (SPEC §6.2).

Recipe (the paper's, as in the official ``plsc.m`` / ``computeSharedNullDistribution.m``):

1. z-score every unit with the population std (a unit with std < 1e-12 gets scale 1);
2. C = XᵀY/(n−1), SVD C = U S Vᵀ; loadings U (chaser), V (explorer); scores XU, YV; S_k is the covariance of
   score pair k and r_k its Pearson correlation;
3. null: circular shifts of Y (2,000 by default), refit, record null S_k and r_k per rank;
4. k* = length of the contiguous prefix of ranks with S_k > q97.5(null S_k) and r_k > q97.5(null r_k);
5. ΔPCC = r_1 − mean(null r_1), p = (1 + #null r_1 ≥ r_1)/(n_null + 1).

**Shift range.** A shift s moves Y to Y[t − s] (``np.roll``). It is uniform on [min_shift, T − min_shift + 1], which is
the official ``tempShift(·, L)`` window (``randperm(T − L) + L/2``) with L = 2(min_shift − 1): the default
min_shift = 31 gives [31, T − 30] exactly as SPEC §6.2 step 3. The same rule with min_shift = 60 gives [60, T − 59];
the reproduction's port (``torch.randint(60, T − 60 + 1)``) draws from [60, T − 60], one lag fewer.

**Fast null.** A circular shift (per episode, within its own boundaries) permutes the rows of Y, so each agent's
standardisation and covariance are unchanged; only C moves. The data are rotated once into each agent's principal
axes (an orthogonal change of basis, which leaves S and r unchanged and makes both covariances diagonal), directions
with variance ≤ ``RANK_TOL`` × the largest are dropped (they carry no covariance; their ranks get S = r = 0), and
then:

- the shifted cross-covariances for every lag come from one FFT cross-correlation per episode;
- per-episode mode evaluates each distinct lag once (T = 500 has only 440 admissible lags for 2,000 draws);
- pooled mode sums each draw's per-episode lag matrices;
- each C is decomposed by a batched symmetric eigensolver on CᵀC; singular values are recomputed as ‖C v_k‖
  (a Rayleigh quotient, accurate to the working precision of C rather than of CᵀC), and
  r_k = S_k² / sqrt((C v_k)ᵀ Λx (C v_k) · v_kᵀ Λy v_k), which is S_k / sqrt(var(score_x) var(score_y)) without scores.

``null_method="direct"`` is the reference: ``np.roll`` (or re-pairing) and a full refit with :func:`plsc_fit` on every
draw. Tests assert both agree (to ~1e-9 relative in float64, including spectra spanning 10⁴ and more).

**Precision.** The null runs in float64 by default. Forming CᵀC squares the dynamic range of the spectrum, and real
hidden states span several decades (S_1/S_256 ≈ 10⁵ on AR(1) toy data), so a float32 null is wrong in the tail
(errors of 100 % and more at the last ranks) while the paper's social k* reaches ≈ 165 of 256 ranks.
``null_dtype="float32"`` is about twice as fast and only accurate for ranks with S_k ≳ 10⁻³ S_1 (quick looks at r_1,
ΔPCC and small k*).

**Threads.** Decompositions and FFT blocks run on ``torch.get_num_threads()`` Python threads with one torch thread
each (batched LAPACK barely uses intra-op threads and thrashes on shared cores). Memory: per-episode mode holds one
[T, a, b] lag table per thread (0.26 GB in float64 for T = 500, 256 units); pooled mode holds all n_null cross
matrices (1.05 GB for 2,000 draws) plus one table.

**Residualized data.** Subtracting the across-episode mean makes the episodes' residuals sum to zero at each t. The
observed pairing aligns the two agents' constraints, the per-episode circular null does not, so under independence the
observed cross-covariance has about E/(E−1) times the null variance: slightly liberal for few episodes (≈ 4 % with
E = 25). The episode-shuffle null keeps the alignment and has no such bias.

**Identical-action exclusion** (variant ``identical_action_excluded``). Steps where both agents chose the same action
are dropped from both series *before* standardisation, and the remaining steps of each episode are treated as one
compacted series: the circular null shifts that compacted series within its episode, with the shift range taken from
its kept length T′. Every null pairing is therefore still at least min_shift real steps from alignment, both agents'
sample sets (and covariances) are exactly those of the observed fit, and the fast null applies unchanged. (The
reproduction instead shifts the full series and re-applies the chaser-time mask, which changes the explorer's sample
set on every draw.)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from interbrain.errors import InterbrainError, check_choice

MODES = ("per_episode", "pooled")
NULLS = ("circular", "episode_shuffle", "episode_shuffle_mrr")
NULL_METHODS = ("fast", "direct")
NULL_DTYPES = ("float32", "float64")
RANK_TOL = 1e-10  # principal-axis variance (relative to the largest) below which a direction is numerically null
STD_FLOOR = 1e-12  # SPEC §6.2 step 1
_NULL_DEFAULTS = {  # null -> (n_null, quantile, rule)
    "circular": (2000, 97.5, "prefix"),
    "episode_shuffle": (2000, 97.5, "prefix"),
    "episode_shuffle_mrr": (200, 95.0, "count_s"),
}
_BATCH = 32  # cross-covariance matrices per batched decomposition (float64 batch stays under the 32 MB mmap threshold)


# ----------------------------------------------------------------------------------------------------------------------
# Basic operations
# ----------------------------------------------------------------------------------------------------------------------


def zscore(X, axis: int = 0):
    """Z-score along ``axis`` with the population std (SPEC §6.2 step 1); std < 1e-12 gets scale 1.

    Returns ``(X_z, mean, scale)`` in float64 with ``mean``/``scale`` reduced along ``axis``.
    """
    X = np.asarray(X, dtype=np.float64)
    mean = X.mean(axis=axis, keepdims=True)
    scale = X.std(axis=axis, keepdims=True)
    scale = np.where(scale < STD_FLOOR, 1.0, scale)
    return (X - mean) / scale, np.squeeze(mean, axis=axis), np.squeeze(scale, axis=axis)


def residualize(H, valid=None):
    """Subtract the across-(valid-)episode mean at every timestep (SPEC §6.2 variant ``residualized``).

    ``H`` is [E, T, D]; the mean over the valid episodes is subtracted from every episode (invalid ones too, which the
    caller excludes anyway). Needs at least 2 valid episodes, otherwise nothing would remain.
    """
    H = np.asarray(H)
    if H.ndim != 3:
        raise InterbrainError(f"residualize needs hidden states of shape [episodes, time, units], got shape {H.shape}")
    valid = _valid_mask(valid, H.shape[0])
    if valid.sum() < 2:
        raise InterbrainError(f"residualized PLSC needs at least 2 valid episodes, got {int(valid.sum())}")
    mean = H[valid].astype(np.float64).mean(axis=0)
    return (H - mean[None]).astype(np.result_type(H.dtype, np.float32), copy=False)


def shift_range(length: int, min_shift: int) -> tuple[int, int]:
    """Inclusive circular-shift range [min_shift, length − min_shift + 1] (see the module docstring)."""
    if isinstance(min_shift, bool) or not isinstance(min_shift, (int, np.integer)) or min_shift < 2:
        raise InterbrainError(f"min_shift must be an integer >= 2, got {min_shift!r}")
    lo, hi = int(min_shift), int(length) - int(min_shift) + 1
    if hi < lo:
        raise InterbrainError(
            f"episode of {length} steps is too short for min_shift={min_shift} (needs >= {2 * min_shift - 1} steps)"
        )
    return lo, hi


def draw_shifts(lengths, n_null: int, min_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Circular shifts [n_null, E]: column e is uniform on episode e's :func:`shift_range`."""
    bounds = np.array([shift_range(n, min_shift) for n in lengths], dtype=np.int64)
    return rng.integers(bounds[:, 0], bounds[:, 1] + 1, size=(n_null, len(lengths)))


def draw_derangements(n_episodes: int, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform random derangements [n_draws, E]: row b pairs chaser episode e with explorer episode row[e] != e."""
    if n_episodes < 2:
        raise InterbrainError(f"episode_shuffle null needs at least 2 valid episodes, got {n_episodes}")
    out = np.empty((n_draws, n_episodes), dtype=np.int64)
    identity = np.arange(n_episodes)
    for b in range(n_draws):
        perm = rng.permutation(n_episodes)
        while np.any(perm == identity):  # rejection sampling: acceptance ~1/e, uniform over derangements
            perm = rng.permutation(n_episodes)
        out[b] = perm
    return out


def score_correlations(Xz, Yz, U, V) -> np.ndarray:
    """Pearson correlation of every score pair (X U[:, k], Y V[:, k]) computed from the scores (the reference)."""
    a = Xz @ U
    b = Yz @ V
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = (a * b).sum(axis=0)
    den = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


# ----------------------------------------------------------------------------------------------------------------------
# One fit
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class PLSCFit:
    """One PLSC decomposition (SPEC §6.2 steps 1–2), in standardised coordinates.

    ``U`` [Dx, K] and ``V`` [Dy, K] (K = min(Dx, Dy)) are orthonormal loadings; ``S`` [K] the score covariances,
    ``r`` [K] the score correlations (ranks beyond the data's numerical rank have S = r = 0). ``mean_*`` and
    ``scale_*`` are the standardisation (population std, < 1e-12 → 1). Signs: the largest-|·| entry of each U column
    is positive (V flipped with it).
    """

    U: np.ndarray
    S: np.ndarray
    V: np.ndarray
    r: np.ndarray
    mean_x: np.ndarray
    scale_x: np.ndarray
    mean_y: np.ndarray
    scale_y: np.ndarray
    n_samples: int


@dataclass
class _Side:
    """One agent's standardised data in its principal-axis coordinates (numerically null axes dropped)."""

    z: np.ndarray  # [n, D] z-scored
    mean: np.ndarray
    scale: np.ndarray
    basis: np.ndarray  # [D, d] principal axes with variance > RANK_TOL * max
    lam: np.ndarray  # [d] their variances (ddof 1)
    pcs: np.ndarray  # [n, d] = z @ basis


def _side(H: np.ndarray, name: str) -> _Side:
    z, mean, scale = zscore(H)
    n = z.shape[0]
    if n < 3:
        raise InterbrainError(f"PLSC needs at least 3 samples, got {n} for {name}")
    lam, vec = np.linalg.eigh(z.T @ z / (n - 1))
    lam, vec = lam[::-1], vec[:, ::-1]
    if not lam[0] > 0:
        raise InterbrainError(f"{name} hidden states have no variance (every unit constant)")
    keep = lam > RANK_TOL * lam[0]
    basis = np.ascontiguousarray(vec[:, keep])
    return _Side(z=z, mean=mean, scale=scale, basis=basis, lam=lam[keep], pcs=z @ basis)


def _complete(B: np.ndarray, n_cols: int) -> np.ndarray:
    """``n_cols`` orthonormal columns spanning part of the orthogonal complement of orthonormal ``B``."""
    if n_cols == 0:
        return np.zeros((B.shape[0], 0))
    Q, _ = np.linalg.qr(B, mode="complete")
    return Q[:, B.shape[1] : B.shape[1] + n_cols]


def _fix_signs(U: np.ndarray, V: np.ndarray) -> None:
    """In place: the largest-|·| entry of every U column positive; V flipped alongside."""
    if U.shape[1] == 0:
        return
    idx = np.abs(U).argmax(axis=0)
    sign = np.sign(U[idx, np.arange(U.shape[1])])
    sign[sign == 0] = 1.0
    U *= sign
    V *= sign


def _pcc_from_loadings(S, Ur, Vr, lam_x, lam_y) -> np.ndarray:
    """r_k = S_k / sqrt(var(x-score k) · var(y-score k)); in principal-axis coordinates var = Σ_i λ_i (loading_ik)².

    Equals :func:`score_correlations` because z-scored data are centred and cov(score pair k) = S_k (tested).
    """
    den = np.sqrt((lam_x[:, None] * Ur**2).sum(0) * (lam_y[:, None] * Vr**2).sum(0))
    return np.divide(S, den, out=np.zeros_like(S), where=den > 0)


def _fit_sides(sx: _Side, sy: _Side) -> PLSCFit:
    n = sx.z.shape[0]
    C = sx.pcs.T @ sy.pcs / (n - 1)
    Ur, S, Vrt = np.linalg.svd(C, full_matrices=False)
    U = sx.basis @ Ur
    V = sy.basis @ Vrt.T
    r = _pcc_from_loadings(S, Ur, Vrt.T, sx.lam, sy.lam)
    _fix_signs(U, V)
    K = min(sx.z.shape[1], sy.z.shape[1])
    extra = K - S.size
    if extra:
        U = np.hstack([U, _complete(U, extra)])
        V = np.hstack([V, _complete(V, extra)])
        S = np.concatenate([S, np.zeros(extra)])
        r = np.concatenate([r, np.zeros(extra)])
    return PLSCFit(U=U, S=S, V=V, r=r, mean_x=sx.mean, scale_x=sx.scale, mean_y=sy.mean, scale_y=sy.scale, n_samples=n)


def plsc_fit(X, Y) -> PLSCFit:
    """Fit PLSC on time-aligned samples ``X`` [n, Dx] (chaser) and ``Y`` [n, Dy] (explorer) (SPEC §6.2 steps 1–2)."""
    X = _as_float_array(X, "X", 2)
    Y = _as_float_array(Y, "Y", 2)
    if X.shape[0] != Y.shape[0]:
        raise InterbrainError(f"X and Y must have the same number of samples, got {X.shape[0]} and {Y.shape[0]}")
    return _fit_sides(_side(X, "chaser"), _side(Y, "explorer"))


# ----------------------------------------------------------------------------------------------------------------------
# Null engines
# ----------------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    return torch.float32 if name == "float32" else torch.float64


def _parallel_map(fn, items: list) -> list:
    """``[fn(x) for x in items]`` on ``torch.get_num_threads()`` worker threads, each running torch single-threaded.

    Batched LAPACK calls gain little from intra-op threads and thrash when the cores are shared; one matrix batch
    per thread scales instead. The caller's thread setting is restored afterwards. ``fn`` must only run torch code.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if workers <= 1:
        return [fn(x) for x in items]

    def run(x):
        torch.set_num_threads(1)
        return fn(x)

    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


def _buffer(store: dict, key: str, shape: tuple, dtype) -> torch.Tensor:
    """A reusable tensor from ``store`` (large fresh allocations cost page faults on every call)."""
    buf = store.get(key)
    if buf is None or tuple(buf.shape) != tuple(shape) or buf.dtype != dtype:
        buf = store[key] = torch.empty(shape, dtype=dtype)
    return buf


_ROWS = 8  # chaser axes per FFT block: an ~8 MB complex work buffer in float64 (32 rows: ~33 MB, filled 1.8x slower)


class _LagTable:
    """All circular lags of one episode: ``table[l, i, j] = Σ_t xp[t, i] yp[(t − l) mod T, j]`` (``np.roll(yp, l)``).

    Computed from one FFT cross-correlation along time, in blocks of ``_ROWS`` chaser axes that can run on separate
    threads (each with its own work buffers) and write disjoint columns of the reused ``[T, a, b]`` table. Lag-major,
    so every lag's cross-product is one contiguous [a, b] matrix: the pooled null adds ``table[l]`` as it is and
    :meth:`lags` gathers whole matrices (a lag-last table costs a strided gather and a transposed copy of
    ~0.23 GB per episode, which took 40 % of the pooled null's wall time).
    """

    def __init__(self, xp: np.ndarray, yp: np.ndarray, dtype, store: dict):
        self.T, self.a = xp.shape
        self.b = yp.shape[1]
        self.dtype = dtype
        self.fx = torch.fft.rfft(torch.from_numpy(xp).to(dtype), dim=0)  # [F, a]
        self.fy = torch.fft.rfft(torch.from_numpy(yp).to(dtype), dim=0).conj()  # [F, b]
        self.table = _buffer(store, "table", (self.T, self.a, self.b), dtype)
        self.blocks = [range(i0, min(self.a, i0 + _ROWS)) for i0 in range(0, self.a, _ROWS)]

    def fill(self, rows: range, work: dict) -> None:
        n = len(rows)
        prod = _buffer(work, "prod", (self.fx.shape[0], n, self.b), self.fx.dtype)
        torch.mul(self.fx[:, rows.start : rows.stop, None], self.fy[:, None, :], out=prod)
        torch.fft.irfft(prod, n=self.T, dim=0, out=self.table[:, rows.start : rows.stop])

    def compute(self, work: dict) -> "_LagTable":
        for rows in self.blocks:
            self.fill(rows, work)
        return self

    def lags(self, idx, out: torch.Tensor | None = None) -> torch.Tensor:
        """[len(idx), a, b]: the cross-products at lags ``idx`` (a 1-D integer tensor), contiguous (into ``out``, a
        reused buffer of that shape, when given)."""
        return torch.index_select(self.table, 0, idx, out=out)


def _spectra(C: torch.Tensor, lam_x: torch.Tensor, lam_y: torch.Tensor, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Null S and r [B, K] of a batch of cross-covariances C [B, a, b] in principal-axis coordinates.

    Symmetric eigensolver on the smaller Gram matrix; S_k = ‖C v_k‖; r_k = S_k² / sqrt(‖Λx^½ C v_k‖² ‖Λy^½ v_k‖²).
    """
    if C.shape[1] < C.shape[2]:
        C, lam_x, lam_y = C.transpose(1, 2), lam_y, lam_x  # S and r are symmetric in the two agents
    _, V = torch.linalg.eigh(C.transpose(1, 2) @ C)
    V = V.flip(-1)
    W2 = (C @ V).square_()
    S2 = W2.sum(1)
    ax = torch.matmul(lam_x, W2)
    by = torch.matmul(lam_y, V.square_())
    den = torch.sqrt(ax * by)
    r = torch.where(den > 0, S2 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    S_out = np.zeros((C.shape[0], K))
    r_out = np.zeros((C.shape[0], K))
    S_out[:, : S2.shape[1]] = torch.sqrt(S2).double().numpy()
    r_out[:, : S2.shape[1]] = r.double().numpy()
    return S_out, r_out


def _lams(sx: _Side, sy: _Side, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(sx.lam).to(dtype), torch.from_numpy(sy.lam).to(dtype)


def _split(side: _Side, lengths) -> list[np.ndarray]:
    return np.split(side.pcs, np.cumsum(lengths)[:-1])


def _null_episode_fast(sx: _Side, sy: _Side, shifts: np.ndarray, K: int, dtype, bufs: dict) -> tuple:
    """Circular null of one episode: every distinct lag is decomposed once, then mapped back to its draws.

    ``bufs`` is reused between calls on the same thread (the table is consumed before it returns).
    """
    n = sx.z.shape[0]
    table = _LagTable(sx.pcs, sy.pcs, dtype, bufs).compute(bufs)
    lags, inverse = np.unique(shifts, return_inverse=True)
    lags = torch.from_numpy(lags)
    lam_x, lam_y = _lams(sx, sy, dtype)
    S = np.zeros((lags.numel(), K))
    r = np.zeros((lags.numel(), K))
    for i0 in range(0, lags.numel(), _BATCH):
        idx = lags[i0 : i0 + _BATCH]  # the last batch may be shorter: it fills the front of the same buffer
        C = table.lags(idx, _buffer(bufs, "lags", (_BATCH, table.a, table.b), dtype)[: idx.numel()]).div_(n - 1)
        S[i0 : i0 + _BATCH], r[i0 : i0 + _BATCH] = _spectra(C, lam_x, lam_y, K)
    return S[inverse], r[inverse]


def _null_pooled_fast(sx: _Side, sy: _Side, lengths, shifts: np.ndarray, K: int, dtype) -> tuple:
    """Pooled circular null: draw b sums episode e's lag-``shifts[b, e]`` cross-product over episodes."""
    n = sx.z.shape[0]
    xs, ys = _split(sx, lengths), _split(sy, lengths)
    n_null = shifts.shape[0]
    total = torch.zeros((n_null, sx.lam.size, sy.lam.size), dtype=dtype)
    spans = [range(i0, min(n_null, i0 + _BATCH)) for i0 in range(0, n_null, _BATCH)]
    store: dict = {}  # the table buffer, reused across episodes
    local = threading.local()  # FFT work buffers, one set per worker thread
    for e in range(len(lengths)):
        lag = _LagTable(xs[e], ys[e], dtype, store)
        _parallel_map(lambda rows: lag.fill(rows, local.__dict__), lag.blocks)
        table, col = lag.table, shifts[:, e].tolist()  # draw b adds this episode's lag-shifts[b, e] matrix

        def add(span, table=table, col=col):
            for b in span:
                total[b] += table[col[b]]

        _parallel_map(add, spans)
    del store, local
    total /= n - 1
    return _decompose_all(total, sx, sy, K, spans)


def _null_shuffle_fast(sx: _Side, sy: _Side, lengths, perms: np.ndarray, K: int, dtype) -> tuple:
    """Episode-shuffle null: C = Σ_e X_eᵀ Y_{π(e)} / (n−1) from the table of all episode-pair blocks."""
    n, T, E = sx.z.shape[0], lengths[0], len(lengths)
    a, b = sx.lam.size, sy.lam.size
    xs = [torch.from_numpy(x).to(dtype) for x in _split(sx, lengths)]
    y_all = torch.from_numpy(np.ascontiguousarray(sy.pcs.reshape(E, T, b).transpose(1, 0, 2))).to(dtype)  # [T, E, b]
    blocks = torch.stack([(x.T @ y_all.reshape(T, E * b)).reshape(a, E, b).transpose(0, 1) for x in xs])  # [E, E, a, b]
    total = torch.zeros((perms.shape[0], a, b), dtype=dtype)
    spans = [range(i0, min(perms.shape[0], i0 + _BATCH)) for i0 in range(0, perms.shape[0], _BATCH)]
    rows = perms.tolist()

    def add(span):
        for d in span:
            for e, f in enumerate(rows[d]):
                total[d] += blocks[e, f]

    _parallel_map(add, spans)
    total /= n - 1
    return _decompose_all(total, sx, sy, K, spans)


def _decompose_all(total: torch.Tensor, sx: _Side, sy: _Side, K: int, spans) -> tuple[np.ndarray, np.ndarray]:
    lam_x, lam_y = _lams(sx, sy, total.dtype)
    parts = _parallel_map(lambda span: _spectra(total[span.start : span.stop], lam_x, lam_y, K), spans)
    return np.vstack([p[0] for p in parts]), np.vstack([p[1] for p in parts])


def _null_direct(xs, ys, draws: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference null: rebuild the explorer series for each draw and refit with :func:`plsc_fit`."""
    X = np.vstack(xs)
    S, r = [], []
    for row in draws:
        if kind == "circular":
            Y = np.vstack([np.roll(y, int(s), axis=0) for y, s in zip(ys, row)])
        else:
            Y = np.vstack([ys[int(p)] for p in row])
        fit = plsc_fit(X, Y)
        S.append(fit.S)
        r.append(fit.r)
    return np.array(S), np.array(r)


# ----------------------------------------------------------------------------------------------------------------------
# Test
# ----------------------------------------------------------------------------------------------------------------------


def count_shared(passes: np.ndarray, rule: str = "prefix") -> int:
    """k*: the contiguous prefix of passing ranks (default), or all passing ranks (rule ``count_s``, the MRR count)."""
    passes = np.asarray(passes, dtype=bool)
    if rule == "count_s":
        return int(passes.sum())
    fails = np.flatnonzero(~passes)
    return int(fails[0]) if fails.size else int(passes.size)


def _evaluate(S, r, null_S, null_r, quantile: float, rule: str) -> dict:
    S_q = np.percentile(null_S, quantile, axis=0)
    r_q = np.percentile(null_r, quantile, axis=0)
    passes = (S > S_q) if rule == "count_s" else (S > S_q) & (r > r_q)
    null_r1 = null_r[:, 0]
    return {
        "k_star": count_shared(passes, rule),
        "r1": float(r[0]),
        "null_r1_mean": float(null_r1.mean()),
        "delta_pcc": float(r[0] - null_r1.mean()),
        "p_value": float((1 + np.sum(null_r1 >= r[0])) / (null_r1.size + 1)),
        "S": S,
        "r": r,
        "null_S_q": S_q,
        "null_r_q": r_q,
        "passes": passes,
        "null_r1": null_r1,
    }


@dataclass
class PLSCResult:
    """Everything the tables and the safetensors output need from one PLSC test (SPEC §6.2).

    Per-rank arrays are the pooled fit's (``pooled``) or the mean over episodes (``per_episode``). In per-episode mode
    ``k_star``, ``r1``, ``delta_pcc`` and ``null_r1_mean`` are means over episodes, ``null_r1`` is the draw-wise mean
    of the episodes' null r_1 (each draw shifts every episode independently), and ``p_value`` compares the mean r_1
    with that null. ``fit`` is always the pooled fit over the analysed episodes (for §6.3 and §6.6).
    """

    k_star: float
    r1: float
    delta_pcc: float
    p_value: float
    null_r1_mean: float
    n_episodes: int
    mode: str
    null: str
    S: np.ndarray
    r: np.ndarray
    null_S_q: np.ndarray
    null_r_q: np.ndarray
    per_episode: list[dict] | None
    fit: PLSCFit | None
    null_r1: np.ndarray = field(repr=False, default=None)
    episodes: np.ndarray = field(repr=False, default=None)
    n_samples: int = 0
    n_null: int = 0
    quantile: float = 97.5
    min_shift: int | None = None
    residualized: bool = False
    identical_action_excluded: bool = False
    null_method: str = "fast"
    seed: int = 0

    def summary(self) -> dict:
        """Flat scalars for one table row."""
        out = {
            "mode": self.mode,
            "null": self.null,
            "k_star": float(self.k_star),
            "r1": float(self.r1),
            "delta_pcc": float(self.delta_pcc),
            "p_value": float(self.p_value),
            "null_r1_mean": float(self.null_r1_mean),
            "n_episodes": int(self.n_episodes),
            "n_samples": int(self.n_samples),
            "n_null": int(self.n_null),
            "quantile": float(self.quantile),
            "min_shift": self.min_shift,
            "residualized": bool(self.residualized),
            "identical_action_excluded": bool(self.identical_action_excluded),
            "null_method": self.null_method,
            "seed": int(self.seed),
        }
        if self.per_episode:
            ks = np.array([ep["k_star"] for ep in self.per_episode], dtype=float)
            out["k_star_sd"] = float(ks.std(ddof=1)) if ks.size > 1 else float("nan")
            out["k_star_max"] = float(ks.max())
        return out

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Flat dict of arrays for safetensors (per-rank results, per-episode values, the pooled fit)."""
        out = {
            "S": self.S,
            "r": self.r,
            "null_S_q": self.null_S_q,
            "null_r_q": self.null_r_q,
            "null_r1": self.null_r1,
            "episodes": self.episodes,
        }
        if self.per_episode:
            for key in ("k_star", "r1", "delta_pcc", "p_value", "null_r1_mean", "n_samples"):
                out[f"per_episode.{key}"] = np.array([ep[key] for ep in self.per_episode])
            for key in ("S", "r", "null_S_q", "null_r_q"):
                out[f"per_episode.{key}"] = np.stack([ep[key] for ep in self.per_episode])
        if self.fit is not None:
            for key in ("U", "S", "V", "r", "mean_x", "scale_x", "mean_y", "scale_y"):
                out[f"fit.{key}"] = getattr(self.fit, key)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}


def plsc_test(
    X,
    Y,
    *,
    mode: str = "per_episode",
    null: str = "circular",
    n_null: int | None = None,
    min_shift: int = 31,
    quantile: float | None = None,
    seed: int = 0,
    valid=None,
    residualized: bool = False,
    exclude_identical_actions=None,
    null_method: str = "fast",
    null_dtype: str = "float64",
) -> PLSCResult:
    """PLSC shared-dimension test on chaser ``X`` and explorer ``Y`` hidden states [E, T, D] (SPEC §6.2).

    ``valid``: bool [E] episode mask (degenerate episodes excluded). ``mode``: ``per_episode`` (default) or
    ``pooled``. ``null``: ``circular`` (default), ``episode_shuffle`` or ``episode_shuffle_mrr`` (pooled only).
    ``n_null`` and ``quantile`` default to 2,000 and 97.5 (``episode_shuffle_mrr``: 200 and 95, S only, counting all
    ranks). ``residualized`` subtracts each agent's across-valid-episode mean at every timestep first.
    ``exclude_identical_actions=(chaser_action [E, T], explorer_action [E, T])`` drops steps where both are equal
    (after residualization; see the module docstring for the null). ``null_method="direct"`` is the slow reference;
    ``null_dtype`` is the precision of the fast null (observed fits are always float64).
    """
    check_choice("mode", mode, MODES)
    check_choice("null", null, NULLS)
    check_choice("null_method", null_method, NULL_METHODS)
    check_choice("null_dtype", null_dtype, NULL_DTYPES)
    if null != "circular" and mode != "pooled":
        raise InterbrainError(f"null {null!r} is defined for mode 'pooled' only, got mode {mode!r}")
    default_n, default_q, rule = _NULL_DEFAULTS[null]
    n_null = default_n if n_null is None else n_null
    quantile = default_q if quantile is None else quantile
    if isinstance(n_null, bool) or not isinstance(n_null, (int, np.integer)) or n_null < 1:
        raise InterbrainError(f"n_null must be a positive integer, got {n_null!r}")
    if not 0 < quantile < 100:
        raise InterbrainError(f"quantile must be a percentile in (0, 100), got {quantile!r}")

    xs, ys, episodes = _prepare(X, Y, valid, residualized, exclude_identical_actions)
    lengths = [x.shape[0] for x in xs]
    rng = np.random.default_rng(seed)
    if null == "circular":
        draws = draw_shifts(lengths, n_null, min_shift, rng)
    else:
        if len(set(lengths)) != 1:
            raise InterbrainError(
                f"null {null!r} pairs whole episodes and needs equal episode lengths, "
                f"got lengths {sorted(set(lengths))}"
            )
        draws = draw_derangements(len(xs), n_null, rng)
    dtype = _torch_dtype(null_dtype)
    K = min(xs[0].shape[1], ys[0].shape[1])

    sx_all = _side(np.vstack(xs), "chaser")
    sy_all = _side(np.vstack(ys), "explorer")
    pooled_fit = _fit_sides(sx_all, sy_all)
    common = dict(
        n_episodes=len(xs),
        mode=mode,
        null=null,
        fit=pooled_fit,
        episodes=episodes,
        n_samples=int(sum(lengths)),
        n_null=int(n_null),
        quantile=float(quantile),
        min_shift=int(min_shift) if null == "circular" else None,
        residualized=bool(residualized),
        identical_action_excluded=exclude_identical_actions is not None,
        null_method=null_method,
        seed=int(seed),
    )
    if mode == "pooled":
        if null_method == "direct":
            null_S, null_r = _null_direct(xs, ys, draws, "circular" if null == "circular" else "shuffle")
        elif null == "circular":
            null_S, null_r = _null_pooled_fast(sx_all, sy_all, lengths, draws, K, dtype)
        else:
            null_S, null_r = _null_shuffle_fast(sx_all, sy_all, lengths, draws, K, dtype)
        ev = _evaluate(pooled_fit.S, pooled_fit.r, null_S, null_r, quantile, rule)
        return PLSCResult(
            k_star=float(ev["k_star"]),
            r1=ev["r1"],
            delta_pcc=ev["delta_pcc"],
            p_value=ev["p_value"],
            null_r1_mean=ev["null_r1_mean"],
            S=ev["S"],
            r=ev["r"],
            null_S_q=ev["null_S_q"],
            null_r_q=ev["null_r_q"],
            per_episode=None,
            null_r1=ev["null_r1"],
            **common,
        )

    sides = [
        (_side(x, f"chaser (episode {e})"), _side(y, f"explorer (episode {e})")) for x, y, e in zip(xs, ys, episodes)
    ]
    fits = [_fit_sides(sx, sy) for sx, sy in sides]
    if null_method == "direct":
        nulls = [_null_direct([xs[i]], [ys[i]], draws[:, i : i + 1], "circular") for i in range(len(xs))]
    else:
        local = threading.local()  # per-thread FFT buffers
        nulls = _parallel_map(
            lambda i: _null_episode_fast(*sides[i], draws[:, i], K, dtype, local.__dict__), list(range(len(xs)))
        )
        del local
    per_episode = []
    for i, (fit, (null_S, null_r)) in enumerate(zip(fits, nulls)):
        ev = _evaluate(fit.S, fit.r, null_S, null_r, quantile, rule)
        ev.update(episode=int(episodes[i]), n_samples=lengths[i])
        per_episode.append(ev)
    r1 = float(np.mean([ep["r1"] for ep in per_episode]))
    null_r1 = np.mean([ep["null_r1"] for ep in per_episode], axis=0)
    return PLSCResult(
        k_star=float(np.mean([ep["k_star"] for ep in per_episode])),
        r1=r1,
        delta_pcc=float(np.mean([ep["delta_pcc"] for ep in per_episode])),
        p_value=float((1 + np.sum(null_r1 >= r1)) / (n_null + 1)),
        null_r1_mean=float(null_r1.mean()),
        S=np.mean([ep["S"] for ep in per_episode], axis=0),
        r=np.mean([ep["r"] for ep in per_episode], axis=0),
        null_S_q=np.mean([ep["null_S_q"] for ep in per_episode], axis=0),
        null_r_q=np.mean([ep["null_r_q"] for ep in per_episode], axis=0),
        per_episode=per_episode,
        null_r1=null_r1,
        **common,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------------------


def _as_float_array(A, name: str, ndim: int) -> np.ndarray:
    A = np.asarray(A)
    if A.ndim != ndim or not np.issubdtype(A.dtype, np.number):
        raise InterbrainError(f"{name} must be a numeric array with {ndim} dimensions, got shape {A.shape}")
    A = A.astype(np.float64, copy=False)
    if not np.isfinite(A).all():
        raise InterbrainError(f"{name} contains NaN or Inf")
    return A


def _valid_mask(valid, n_episodes: int) -> np.ndarray:
    if valid is None:
        return np.ones(n_episodes, dtype=bool)
    valid = np.asarray(valid)
    if valid.shape != (n_episodes,) or valid.dtype != bool:
        raise InterbrainError(f"valid must be a bool array of shape ({n_episodes},), got {valid.dtype} {valid.shape}")
    return valid


def _prepare(X, Y, valid, residualized, exclude):
    """Valid episodes as float64 lists (residualized, then identical-action steps dropped), and their indices.

    Only valid episodes must be finite; invalid ones are never read except by their mask.
    """
    X, Y = np.asarray(X), np.asarray(Y)
    for name, A in (("X (chaser hidden)", X), ("Y (explorer hidden)", Y)):
        if A.ndim != 3 or not np.issubdtype(A.dtype, np.number):
            raise InterbrainError(f"{name} must be a numeric array [episodes, time, units], got shape {A.shape}")
    if X.shape[:2] != Y.shape[:2]:
        raise InterbrainError(f"chaser and explorer hidden must share [episodes, time], got {X.shape} and {Y.shape}")
    valid = _valid_mask(valid, X.shape[0])
    if not valid.any():
        raise InterbrainError("valid excludes every episode; PLSC needs at least one valid episode")
    episodes = np.flatnonzero(valid)
    X = _as_float_array(X[episodes], "X (chaser hidden, valid episodes)", 3)
    Y = _as_float_array(Y[episodes], "Y (explorer hidden, valid episodes)", 3)
    if residualized:
        X, Y = residualize(X), residualize(Y)
    xs, ys = list(X), list(Y)
    if exclude is not None:
        if not isinstance(exclude, (tuple, list)) or len(exclude) != 2:
            raise InterbrainError("exclude_identical_actions must be a pair (chaser_action, explorer_action)")
        ca, ea = (np.asarray(a) for a in exclude)
        expected = valid.shape + X.shape[1:2]
        if ca.shape != expected or ea.shape != expected:
            raise InterbrainError(
                f"exclude_identical_actions arrays must have shape {expected}, got {ca.shape} and {ea.shape}"
            )
        keep = ca[episodes] != ea[episodes]
        xs = [x[k] for x, k in zip(xs, keep)]
        ys = [y[k] for y, k in zip(ys, keep)]
    return xs, ys, episodes


# ------------------------------------------------------------------------------------------------ file driver
PLSC_PROTOCOL = "plsc_v1"
# variant -> plsc_test arguments (SPEC §6.2: the default recipe and the labelled variants reported beside it)
PLSC_VARIANTS: dict[str, dict] = {
    "per_episode": {"mode": "per_episode", "null": "circular"},
    "pooled": {"mode": "pooled", "null": "circular"},
    "residualized": {"mode": "per_episode", "null": "circular", "residualized": True},
    "pooled_residualized": {"mode": "pooled", "null": "circular", "residualized": True},
    "episode_shuffle": {"mode": "pooled", "null": "episode_shuffle"},
    "identical_action_excluded": {"mode": "per_episode", "null": "circular", "identical_actions": True},
}


def plsc_file(rollout, out_csv, out_tensors, *, n_null: int = 2000, min_shift: int = 31, seed: int = 0,
              variants=tuple(PLSC_VARIANTS)):
    """PLSC of one analysis rollout (chaser vs explorer ``hidden``, valid episodes) for each variant.

    Writes one CSV row per variant (docs/ARTIFACTS.md) and a safetensors file with every variant's per-rank results,
    null quantiles and the pooled fit (bases with their mean/scale), prefixed ``{variant}.``.
    """
    from safetensors.numpy import save_file

    from interbrain.io import atomic_path, write_csv_atomic
    from interbrain.rollout import load_rollout, rollout_identity

    for v in variants:
        if v not in PLSC_VARIANTS:
            raise InterbrainError(f"unknown PLSC variant {v!r}; expected one of {', '.join(PLSC_VARIANTS)}")
    data, meta = load_rollout(rollout)
    ident = rollout_identity(rollout, data, meta, protocol=PLSC_PROTOCOL)
    X = data["chaser_hidden"].transpose(1, 0, 2)  # [E, T, D]
    Y = data["explorer_hidden"].transpose(1, 0, 2)
    valid = ~data["episode_degenerate"].astype(bool)
    rows, tensors = [], {}
    for name in variants:
        args = dict(PLSC_VARIANTS[name])
        row = {**ident, "variant": name, "mode": args["mode"], "null": args["null"],
               "residualized": bool(args.get("residualized", False)), "n_null": n_null, "min_shift": min_shift}
        if ident["status"] != "ok":
            rows.append(row)
            continue
        exclude = None
        if args.pop("identical_actions", False):
            exclude = (data["chaser_action"].T, data["explorer_action"].T)
        res = plsc_test(X, Y, n_null=n_null, min_shift=min_shift, seed=seed, valid=valid,
                        exclude_identical_actions=exclude, **args)
        summary = res.summary()
        for key in ("mode", "null", "residualized", "n_null", "min_shift"):
            summary.pop(key, None)
        summary["null_seed"] = summary.pop("seed")  # the unit's seed is an identity column
        rows.append({**row, **summary})
        tensors.update({f"{name}.{k}": v for k, v in res.to_tensors().items()})
    from interbrain.analysis.decoding import IDENTITY_FIELDS

    fields = list(IDENTITY_FIELDS) + ["variant", "mode", "null", "residualized", "n_null", "min_shift", "k_star", "r1",
                                      "delta_pcc", "p_value", "null_r1_mean", "n_episodes", "n_samples", "quantile",
                                      "identical_action_excluded", "null_method", "null_seed", "k_star_sd", "k_star_max"]
    write_csv_atomic(out_csv, rows, fields)
    if not tensors:
        tensors = {"empty": np.zeros(0, np.float32)}
    with atomic_path(out_tensors) as tmp:
        save_file(tensors, str(tmp), metadata={"protocol": PLSC_PROTOCOL, "schema_version": "1",
                                                "rollout": str(rollout), "status": ident["status"]})
    return out_csv
