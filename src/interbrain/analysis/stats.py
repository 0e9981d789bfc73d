"""Summary statistics across units (SPEC §6.7).

Mean ± sample SD (ddof 1) with n; group contrasts by a two-sided permutation test on the difference
of means, exact when C(n_a + n_b, n_a) <= 10,000 and otherwise ``n_draws`` seeded random relabellings
with the add-one correction p = (1 + #|diff*| >= |diff|) / (n_draws + 1). NaNs (e.g. units whose
result is ``insufficient``) are dropped and counted, never averaged.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from interbrain.errors import InterbrainError

EXACT_LIMIT = 10_000
# Relative tolerance when comparing a relabelled difference with the observed one, so that ties
# produced by floating-point summation order count as ties (the hand case [1,2,3] vs [4,5,6]).
_TIE_RTOL = 1e-9


def _vector(x, key) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise InterbrainError(f"{key} must be a 1-D sequence of numbers, got shape {x.shape}")
    return x


def mean_sd(x) -> dict:
    """{"mean", "sd" (sample SD, ddof 1; nan if n < 2), "n", "n_dropped_nan"}; NaNs are dropped first."""
    x = _vector(x, "x")
    finite = ~np.isnan(x)
    v = x[finite]
    n = int(v.size)
    return {"mean": float(v.mean()) if n else float("nan"),
            "sd": float(v.std(ddof=1)) if n >= 2 else float("nan"),
            "n": n, "n_dropped_nan": int(x.size - n)}


def permutation_test(a, b, *, n_draws: int = 10_000, seed: int = 0) -> dict:
    """Two-sided permutation test on mean(a) - mean(b) (SPEC §6.7).

    Returns {"diff", "p", "exact", "n_a", "n_b"} with NaNs dropped from each group; if a group is empty
    after that, diff and p are NaN.
    """
    if isinstance(n_draws, bool) or not isinstance(n_draws, (int, np.integer)) or n_draws < 1:
        raise InterbrainError(f"n_draws must be a positive integer, got {n_draws!r}")
    a = _vector(a, "a")
    b = _vector(b, "b")
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    n_a, n_b = int(a.size), int(b.size)
    n_comb = math.comb(n_a + n_b, n_a)
    exact = n_comb <= EXACT_LIMIT
    if n_a == 0 or n_b == 0:
        return {"diff": float("nan"), "p": float("nan"), "exact": exact, "n_a": n_a, "n_b": n_b}
    pooled = np.concatenate([a, b])
    total = pooled.sum()
    diff = float(a.mean() - b.mean())
    threshold = abs(diff) * (1 - _TIE_RTOL)

    def diffs(sum_a):
        return sum_a / n_a - (total - sum_a) / n_b

    if exact:
        k = min(n_a, n_b)                       # enumerate the smaller group's members
        idx = np.array(list(itertools.combinations(range(n_a + n_b), k)), dtype=np.int64).reshape(n_comb, k)
        sub = pooled[idx].sum(1)
        null = diffs(sub if k == n_a else total - sub)
        p = float(np.mean(np.abs(null) >= threshold))
    else:
        rng = np.random.default_rng(seed)
        null = np.empty(n_draws)
        for start in range(0, n_draws, 1000):
            k = min(1000, n_draws - start)
            perm = np.argsort(rng.random((k, n_a + n_b)), axis=1)[:, :n_a]
            null[start:start + k] = diffs(pooled[perm].sum(1))
        p = float((1 + np.sum(np.abs(null) >= threshold)) / (n_draws + 1))
    return {"diff": diff, "p": p, "exact": exact, "n_a": n_a, "n_b": n_b}


def pearson(x, y) -> dict:
    """Pearson r over the pairs where both values are present: {"r", "n"}.

    r is NaN when fewer than 2 pairs remain or a series is constant.
    """
    x = _vector(x, "x")
    y = _vector(y, "y")
    if x.shape != y.shape:
        raise InterbrainError(f"x and y must have the same length, got {x.size} and {y.size}")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 2:
        return {"r": float("nan"), "n": n}
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return {"r": float(xc @ yc / denom) if denom > 0 else float("nan"), "n": n}
