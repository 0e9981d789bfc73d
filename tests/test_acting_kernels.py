"""The acting steps' compiled loops (agents/acting_kernels.py): attention against softmax attention computed by hand
in float64 and its independence of the caches' memory layout (the transformer pair step's transposed key cache
against an agent's own [.., L, dh] cache: the same bits), the cache write, `attend`'s single-query path, LayerNorm
against torch's and by hand, and the pair step's input embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from interbrain.agents.acting_kernels import add_layer_norm, attend_cached, embed_step, layer_norm, write_step
from interbrain.agents.transformer import acting_layer_norm, attend, compiled_acting


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax attention in float64 by the textbook formula: q [R, H, dh], k and v [R, H, L, dh] -> out [R, H, dh],
    the weights [R, H, L] and the scores' log-sum-exp [R, H]."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    scores = np.einsum("rhc,rhjc->rhj", q, k) / np.sqrt(q.shape[-1])
    top = scores.max(-1, keepdims=True)
    w = np.exp(scores - top)
    total = w.sum(-1, keepdims=True)
    return np.einsum("rhj,rhjc->rhc", w / total, v), w / total, (top + np.log(total))[..., 0]


def run(q, k, v, L, dtype):
    """attend_cached over the first L keys of k, v [R, H, W, dh] stored as the pair step stores them (keys transposed,
    time contiguous, in a window-wide buffer)."""
    R, H, W, dh = k.shape
    kt = np.ascontiguousarray(k.swapaxes(2, 3)).astype(dtype)
    out, lse = np.empty((R, H, dh), dtype), np.empty((R, H), dtype)
    attend_cached(q.astype(dtype), kt, v.astype(dtype), L, np.empty((R, H, W), dtype), out, lse)
    return out, lse


@pytest.mark.parametrize("dh", [16, 64, 6, 2])
@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_attend_cached_is_softmax_attention(dh, dtype, tol):
    rng = np.random.default_rng(dh)
    R, H, W = 7, 4, 23
    q, k, v = (rng.standard_normal(shape) * 2 for shape in ((R, H, dh), (R, H, W, dh), (R, H, W, dh)))
    for L in (1, 2, 5, 16, 17, W):
        out, lse = run(q, k, v, L, dtype)
        ref, w, ref_lse = reference(q, k[:, :, :L], v[:, :, :L])
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol * 10)
        np.testing.assert_allclose(lse, ref_lse, rtol=tol * 10, atol=tol * 10)
        if L == 1:  # one key: its weight is 1 and the output is its value, exactly; the lse is its score
            assert np.array_equal(out, v[:, :, 0].astype(dtype))


def test_attend_cached_picks_the_key_the_query_points_at():
    """A planted match: each query is a large multiple of one key (orthogonal keys), so the output is that key's value
    and the log-sum-exp is that key's score, 40 (the other seven keys score 0: 40 + log(1 + 7 e^-40))."""
    R, H, L, dh = 3, 2, 8, 16
    keys = np.eye(dh)[:L]  # orthonormal keys
    k = np.broadcast_to(keys, (R, H, L, dh)).copy()
    v = np.random.default_rng(0).standard_normal((R, H, L, dh))
    target = np.array([[0, 7], [3, 5], [7, 1]])
    q = 40.0 * np.sqrt(dh) * keys[target]  # score 40 on the target key, 0 elsewhere
    out, lse = run(q, k, v, L, np.float64)
    np.testing.assert_allclose(out, v[np.arange(R)[:, None], np.arange(H)[None], target], atol=1e-15)
    np.testing.assert_allclose(lse, 40.0 + np.log1p(7 * np.exp(-40.0)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attend_cached_bits_do_not_depend_on_the_cache_layout(dtype):
    """The pair step's caches (keys transposed, window-wide) and an agent's own (keys [.., L, dh], strided views of a
    larger buffer) give the same bits at every length, the window's full length included (where the pair's arrays are
    contiguous and compile to another specialisation)."""
    rng = np.random.default_rng(3)
    R, H, W, dh = 10, 4, 33, 16
    q = rng.standard_normal((R, H, 1, dh)).astype(dtype)
    k, v = (rng.standard_normal((R, H, W + 5, dh)).astype(dtype) for _ in range(2))
    for L in (1, 3, 15, 16, 32, W):
        kt = np.ascontiguousarray(k[:, :, :W].swapaxes(2, 3))  # [R, H, dh, W]
        pair = (np.empty((R, H, dh), dtype), np.empty((R, H), dtype))
        attend_cached(q[:, :, 0], kt, np.ascontiguousarray(v[:, :, :W]), L, np.empty((R, H, W), dtype), *pair)
        own = (np.empty((R, H, dh), dtype), np.empty((R, H), dtype))
        attend_cached(q[:, :, 0], k[:, :, :L].swapaxes(2, 3), v[:, :, :L], L, np.empty((R, H, L), dtype), *own)
        assert np.array_equal(pair[0], own[0]) and np.array_equal(pair[1], own[1]), L


def test_write_step_fills_the_step_slot_of_both_caches_and_nothing_else():
    rng = np.random.default_rng(4)
    R, H, W, dh, t = 5, 4, 9, 16, 6
    qkv = rng.standard_normal((R, 3, H, dh)).astype(np.float32)
    kt, v = np.full((R, H, dh, W), 7.0, np.float32), np.full((R, H, W, dh), 7.0, np.float32)
    write_step(qkv, kt, v, t)
    assert np.array_equal(kt[:, :, :, t], qkv[:, 1]) and np.array_equal(v[:, :, t], qkv[:, 2])
    kt[:, :, :, t] = 7.0
    v[:, :, t] = 7.0
    assert (kt == 7.0).all() and (v == 7.0).all()


def test_attend_single_query_takes_the_compiled_loops_and_equals_sdpa():
    """`attend` for one query per row and head on CPU (acting, no gradient) runs the compiled loops; it equals torch's
    scaled_dot_product_attention and writes the own-token log weight; with a gradient asked for it keeps torch's
    graph (and the same values)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 4, 1, 16), torch.randn(6, 4, 12, 16), torch.randn(6, 4, 12, 16)
    assert compiled_acting(q, k, v) and not compiled_acting(q.to(torch.bfloat16))
    lse = torch.empty(6, 4)
    with torch.no_grad():
        got = attend(q, k, v, lse_out=lse)
    ref = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(2, 3) / 4.0, -1)[:, :, 0], rtol=0, atol=2e-6)
    qg = q.clone().requires_grad_()
    assert not compiled_acting(qg, k, v)
    graph = attend(qg, k, v)
    graph.sum().backward()
    assert qg.grad is not None
    torch.testing.assert_close(graph.detach(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("d", [64, 256, 20])
def test_layer_norm_is_torchs_per_agent(d):
    """Per agent's weights, in float64 to 1e-12 of torch's LayerNorm (d 20: sums with a tail past the 16 lanes); a
    row with all values equal normalises to exactly the bias."""
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 7, d, generator=g, dtype=torch.float64) * 3 + 1
    x[1, 3] = 2.5
    w, b = torch.randn(2, d, generator=g, dtype=torch.float64), torch.randn(2, d, generator=g, dtype=torch.float64)
    out = np.empty(x.shape)
    layer_norm(x.numpy(), w.numpy(), b.numpy(), 1e-5, out)
    for a in range(2):
        ref = F.layer_norm(x[a], (d,), w[a], b[a], eps=1e-5)
        np.testing.assert_allclose(out[a], ref.numpy(), rtol=0, atol=1e-12)
    assert np.array_equal(out[1, 3], b[1].numpy())


def test_add_layer_norm_adds_the_residual_in_place_then_normalises():
    rng = np.random.default_rng(5)
    x, y = (rng.standard_normal((2, 5, 64)).astype(np.float32) for _ in range(2))
    w, b = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    x0 = x.copy()
    out, ref = np.empty_like(x), np.empty_like(x)
    add_layer_norm(x, y, w, b, np.float32(1e-5), out)
    assert np.array_equal(x, x0 + y)  # the sum, as float32's +
    layer_norm(x, w, b, np.float32(1e-5), ref)
    assert np.array_equal(out, ref)
    torch.testing.assert_close(torch.from_numpy(out[0]),
                               F.layer_norm(torch.from_numpy(x[0]), (64,), torch.from_numpy(w[0]),
                                            torch.from_numpy(b[0])), rtol=0, atol=3e-6)


def test_layer_norm_bits_do_not_depend_on_the_layout_or_the_agent_axis():
    """The pair step normalises [2, B, d] with stacked weights; an agent's own step [1, B, d] (acting_layer_norm):
    the same bits for the same rows, also from a strided view."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 9, 64)).astype(np.float32)
    w, b = rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((2, 64)).astype(np.float32)
    pair = np.empty_like(x)
    layer_norm(x, w, b, np.float32(1e-5), pair)
    wide = np.zeros((9, 3, 64), np.float32)
    wide[:, 1] = x[1]
    own = np.empty((1, 9, 64), np.float32)
    layer_norm(wide[None, :, 1], w[1:], b[1:], np.float32(1e-5), own)
    assert np.array_equal(own[0], pair[1])
    norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w[0]))
        norm.bias.copy_(torch.from_numpy(b[0]))
        got = acting_layer_norm(norm, torch.from_numpy(x[0]).view(9, 1, 64))
    assert got.shape == (9, 1, 64) and np.array_equal(got.view(9, 64).numpy(), pair[0])
    graph = acting_layer_norm(norm, torch.from_numpy(x[0]).requires_grad_())  # with a gradient: torch's module
    assert graph.grad_fn is not None


def test_embed_step_sums_the_two_rows_and_adds_the_position():
    """Rows (r0, r1) = obs[a, at[b] (+ episode_offset[b])], e = table[r0] + table[r1] into emb, e + pos[a] into x."""
    table = np.arange(12, dtype=np.float32).reshape(6, 2)  # row r = (2r, 2r + 1)
    obs = np.array([[[0, 3], [1, 1], [2, 5]], [[5, 2], [4, 0], [3, 3]]])  # [agents 2, states 3, 2 rows]
    pos = np.array([[10.0, 20.0], [30.0, 40.0]], np.float32)
    emb, x = np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.float32)
    embed_step(table, obs, np.array([0, 1]), np.empty(0, np.int64), pos, emb, x)
    assert np.array_equal(emb, [[[6, 8], [4, 6]], [[14, 16], [8, 10]]])
    assert np.array_equal(x, emb + pos[:, None])
    embed_step(table, obs, np.array([0, 1]), np.array([2, 0]), pos, emb, x)  # episode 0 reads state 2
    assert np.array_equal(emb[:, 0], [[14, 16], [12, 14]]) and np.array_equal(emb[:, 1], [[4, 6], [8, 10]])
