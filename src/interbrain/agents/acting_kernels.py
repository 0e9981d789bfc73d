"""The attention agents' acting steps as compiled loops (numba): attention over a KV cache, LayerNorm, and the
transformer pair step's input embedding (issue 6).

While acting, each step of an attention agent works on a few rows: a pair step's 80 rows (two agents × 40
episodes) of width 64. Torch's kernels spend most of such a call setting up; the loops here do not.
- Attention: per (row, head) one query over the keys cached so far. As batched BLAS products that is 2 × rows ×
  heads products of 1 × dh by dh × L, each too small for its kernel; at 80 rows × 4 heads and dh 16 a call took
  45-200 µs at 1-100 keys. The loops read each key and value once, and the pair step writes its caches in the same
  pass.
- LayerNorm with its affine weights (torch: ``layer_norm`` and ``addcmul``, 15 µs at [2, 40, 64] in place), and the
  pair step's residual sum before it.

A `matched` transformer's `fast` update took 23 ms less with these loops (169 against 199 ms, rollout 73 against
99 ms; in-process A/B, 20 alternating rounds, session 23).

The loops are compiled without fast-math, so their results do not depend on how the arrays are laid out in memory:
each score is the sum over the head's channels in channel order and each output the sum over keys in key order, as
separate multiplies and adds; vectorisation only runs independent lanes side by side (keys for the scores,
channels for the outputs). LayerNorm's sums run in :data:`LANES` fixed lanes, added up in a fixed order at the end.
So the transformer pair step, with its transposed key cache and stacked agents, and an agent's own step over its
``[.., L, dh]`` cache give the same bits (``tests/test_fast_paths.py``). The exponential is numpy's (vectorised;
elementwise, so also the same bits for any layout). ``tests/test_acting_kernels.py`` checks the loops against the
formulas in float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from interbrain.step_kernels import gather_inputs

DTYPES = (np.float32, np.float64)


@njit(cache=True, boundscheck=False)
def write_step(qkv, kt, v, t):
    """Step ``t``'s keys and values from its qkv output [rows, 3, heads, dh] into the caches: kt [rows, heads, dh, W]
    (keys transposed) and v [rows, heads, W, dh]."""
    rows, _, heads, dh = qkv.shape
    for r in range(rows):
        for h in range(heads):
            for c in range(dh):
                kt[r, h, c, t] = qkv[r, 1, h, c]
                v[r, h, t, c] = qkv[r, 2, h, c]


@njit(cache=True, boundscheck=False)
def shifted_scores(q, kt, n_keys, scale, s, maxima):
    """s[r, h, j] = (scale · q[r, h]) · k_j minus the row's largest such score (kept in maxima [rows, heads]), for the
    first ``n_keys`` keys: q [rows, heads, dh], kt [rows, heads, dh, >= n_keys], s [rows, heads, >= n_keys]. Each score
    adds its channels' products in channel order; a pass over the keys takes four channels (a quarter of the passes
    over s)."""
    rows, heads, dh = q.shape
    for r in range(rows):
        for h in range(heads):
            a = q[r, h, 0] * scale
            for j in range(n_keys):
                s[r, h, j] = a * kt[r, h, 0, j]
            c = 1
            if dh >= 4:  # channels 1-3, then four at a time
                a1, a2, a3 = q[r, h, 1] * scale, q[r, h, 2] * scale, q[r, h, 3] * scale
                for j in range(n_keys):
                    s[r, h, j] = ((s[r, h, j] + a1 * kt[r, h, 1, j]) + a2 * kt[r, h, 2, j]) + a3 * kt[r, h, 3, j]
                c = 4
            while c + 4 <= dh:
                a0, a1 = q[r, h, c] * scale, q[r, h, c + 1] * scale
                a2, a3 = q[r, h, c + 2] * scale, q[r, h, c + 3] * scale
                for j in range(n_keys):
                    s[r, h, j] = (((s[r, h, j] + a0 * kt[r, h, c, j]) + a1 * kt[r, h, c + 1, j])
                                  + a2 * kt[r, h, c + 2, j]) + a3 * kt[r, h, c + 3, j]
                c += 4
            for rest in range(c, dh):
                a = q[r, h, rest] * scale
                for j in range(n_keys):
                    s[r, h, j] = s[r, h, j] + a * kt[r, h, rest, j]
            m = s[r, h, 0]
            for j in range(1, n_keys):
                m = max(m, s[r, h, j])
            maxima[r, h] = m
            for j in range(n_keys):
                s[r, h, j] = s[r, h, j] - m


@njit(cache=True, boundscheck=False)
def weighted_values(e, v, n_keys, maxima, out, lse):
    """From e = exp(scores - maxima) [rows, heads, >= n_keys]: out[r, h] = Σ_j e_j v_j / Σ_j e_j over v [rows, heads,
    >= n_keys, dh] (out [rows, heads, dh]); lse[r, h] = maxima[r, h] + log Σ_j e_j, the log-sum-exp of the scores.
    The sums run in four interleaved partial sums (keys j ≡ 0, 1, 2, 3 mod 4), added (0 + 1) + (2 + 3) at the end: four
    independent chains of additions instead of one through memory (2.4× faster at 100 keys)."""
    rows, heads, dh = out.shape
    acc = np.empty((4, dh), out.dtype)
    full = n_keys - n_keys % 4
    for r in range(rows):
        for h in range(heads):
            acc[:] = 0.0
            t0 = t1 = t2 = t3 = e.dtype.type(0.0)
            for j in range(0, full, 4):
                w0, w1, w2, w3 = e[r, h, j], e[r, h, j + 1], e[r, h, j + 2], e[r, h, j + 3]
                t0, t1, t2, t3 = t0 + w0, t1 + w1, t2 + w2, t3 + w3
                for c in range(dh):
                    acc[0, c] = acc[0, c] + w0 * v[r, h, j, c]
                for c in range(dh):
                    acc[1, c] = acc[1, c] + w1 * v[r, h, j + 1, c]
                for c in range(dh):
                    acc[2, c] = acc[2, c] + w2 * v[r, h, j + 2, c]
                for c in range(dh):
                    acc[3, c] = acc[3, c] + w3 * v[r, h, j + 3, c]
            for j in range(full, n_keys):
                w0 = e[r, h, j]
                t0 = t0 + w0
                for c in range(dh):
                    acc[0, c] = acc[0, c] + w0 * v[r, h, j, c]
            total = (t0 + t1) + (t2 + t3)
            for c in range(dh):
                out[r, h, c] = ((acc[0, c] + acc[1, c]) + (acc[2, c] + acc[3, c])) / total
            lse[r, h] = maxima[r, h] + math.log(total)


def attend_cached(q: np.ndarray, kt: np.ndarray, v: np.ndarray, n_keys: int, scores: np.ndarray, out: np.ndarray,
                  lse: np.ndarray) -> None:
    """Softmax attention of q [rows, heads, dh] over the first ``n_keys`` cached keys kt [rows, heads, dh, >= n_keys]
    (transposed) and values v [rows, heads, >= n_keys, dh], scaled by 1/√dh, into out [rows, heads, dh]; the
    log-sum-exp of each query's scaled scores into lse [rows, heads] (what the flash kernel's backward takes).
    ``scores`` [rows, heads, >= n_keys] is scratch. All arrays of one dtype (float32 or float64), any strides."""
    maxima = np.empty(out.shape[:2], out.dtype)
    shifted_scores(q, kt, n_keys, q.dtype.type(q.shape[-1] ** -0.5), scores, maxima)
    e = scores[:, :, :n_keys]
    np.exp(e, out=e)
    weighted_values(scores, v, n_keys, maxima, out, lse)


LANES = 16  # LayerNorm's sums: this many partial sums, one per lane of a 512-bit float32 vector


@njit(cache=True, boundscheck=False)
def _normalise_row(x, w, b, eps, lanes, out):
    """out = (x - mean(x)) / sqrt(var(x) + eps) * w + b for one row x [d] (the biased variance, as torch's)."""
    d = x.shape[0]
    full = d - d % LANES
    n = x.dtype.type(d)  # typed constants: numba would promote a float32 expression with a Python number to float64
    one = x.dtype.type(1.0)
    for lane in range(LANES):
        lanes[lane] = 0.0
    for i in range(0, full, LANES):
        for lane in range(LANES):
            lanes[lane] = lanes[lane] + x[i + lane]
    total = lanes[0]
    for lane in range(1, LANES):
        total = total + lanes[lane]
    for i in range(full, d):
        total = total + x[i]
    mean = total / n
    for lane in range(LANES):
        lanes[lane] = 0.0
    for i in range(0, full, LANES):
        for lane in range(LANES):
            dev = x[i + lane] - mean
            lanes[lane] = lanes[lane] + dev * dev
    var = lanes[0]
    for lane in range(1, LANES):
        var = var + lanes[lane]
    for i in range(full, d):
        dev = x[i] - mean
        var = var + dev * dev
    rstd = one / math.sqrt(var / n + eps)
    for i in range(d):
        out[i] = (x[i] - mean) * rstd * w[i] + b[i]


@njit(cache=True, boundscheck=False)
def layer_norm(x, weight, bias, eps, out):
    """LayerNorm over the last axis with per-agent affine weights: x [agents, rows, d], weight and bias [agents, d],
    out [agents, rows, d]."""
    lanes = np.empty(LANES, x.dtype)
    for a in range(x.shape[0]):
        for r in range(x.shape[1]):
            _normalise_row(x[a, r], weight[a], bias[a], eps, lanes, out[a, r])


@njit(cache=True, boundscheck=False)
def add_layer_norm(x, y, weight, bias, eps, out):
    """x += y (the residual sum), then :func:`layer_norm` of x into out."""
    lanes = np.empty(LANES, x.dtype)
    for a in range(x.shape[0]):
        for r in range(x.shape[1]):
            xr = x[a, r]
            yr = y[a, r]
            for i in range(xr.shape[0]):
                xr[i] = xr[i] + yr[i]
            _normalise_row(xr, weight[a], bias[a], eps, lanes, out[a, r])


@njit(cache=True, boundscheck=False)
def embed_step(table, obs, at, episode_offset, pos, emb, x):
    """The pair step's input: per agent a and episode b, e = table[r0] + table[r1] with (r0, r1) = obs[a, at[b] +
    episode_offset[b]] (no offset when ``episode_offset`` is empty; ``ChaseEnv.acting_tables``' table, or the step's
    rows themselves with ``at`` = 0..B-1), written to ``emb[a, b]`` (:func:`interbrain.step_kernels.gather_inputs`),
    and x[a, b] = e + pos[a]."""
    gather_inputs(obs, at, episode_offset, table, emb)
    for a in range(x.shape[0]):
        for b in range(x.shape[1]):
            for i in range(x.shape[2]):
                x[a, b, i] = emb[a, b, i] + pos[a, i]
