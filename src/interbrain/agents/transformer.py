"""`transformer`: 2-layer causal pre-LayerNorm transformer with a bounded window (SPEC §3.2, §3.3).

- Input: Linear(200→d) plus a learned position table with exactly W rows (W = ``config.window``, default
  100 = H_train), initialised N(0, 0.02). Looking up a position >= W raises :class:`InterbrainError`.
- Blocks: ``x += Attn(LN(x)); x += MLP(LN(x))``; 4 heads; MLP d→m→d with ReLU. A final LayerNorm follows.
- ``std``: d 256, m 512, ``hidden`` = final-LN output (1,133,061 parameters with the heads).
- ``matched``: d 64, m 192, ``hidden`` = ReLU(Linear(64→256)(final LN)) (120,773 parameters).
- Init: Xavier-uniform input, qkv and MLP-in weights; attention-out and MLP-out Xavier with gain
  0.5/sqrt(2·layers) = 0.25; zero biases. Our choices where SPEC is silent: the matched projection is
  Kaiming-uniform (ReLU), the heads use :func:`interbrain.agents.base.init_heads`.

Context rule (SPEC §3.2, pitfall 6). Step t < W attends to steps 0..t at absolute positions 0..t (a KV cache
makes each such step O(t)). Step t >= W attends to [t-W+1, t] with positions re-indexed 0..W-1 from the window
start; the window is recomputed every step. ``sequence`` reproduces exactly this: one causal pass over the first
min(T, W) steps, then the later steps from their own windows, batched in chunks. ``max_position_used`` and
``max_context_used`` record the largest position index and context length ever processed.

State: ``(t, emb, k_1, v_1, k_2, v_2)`` with ``t`` the python-int step counter, ``emb`` [B, min(t, W-1), d] the
input embeddings (without positions) of the previous steps, and the per-layer key/value caches
[B, heads, t, d/heads] (empty once t >= W, when windows are recomputed from ``emb``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from interbrain.agents.base import (HIDDEN, N_ACTIONS, OBS_DIM, Agent, bag_sum, check_size, index_table, init_heads,
                                    param_key, register, stacked_row_offsets)
from interbrain.agents.acting_kernels import add_layer_norm, attend_cached, embed_step, layer_norm, write_step
from interbrain.agents.linear import Linear, known_linear, small_products_on_numpy
from interbrain.config import AgentConfig
from interbrain.errors import InterbrainError
from interbrain.step_kernels import NO_OFFSETS, loop_arrays, sample_and_move

LAYERS = 2
HEADS = 4
SIZES = {"std": {"d_model": 256, "mlp": 512}, "matched": {"d_model": 64, "mlp": 192}}
CHUNK_ELEMENTS = 2**24  # activation budget per window chunk in `sequence` (elements of the widest tensor)


def append_along(prefix: torch.Tensor, new: torch.Tensor, dim: int, capacity: int | None) -> torch.Tensor:
    """``torch.cat([prefix, new], dim)`` without copying ``prefix`` when acting: outside autograd, the result is a prefix
    view of a buffer of ``capacity`` along ``dim`` and ``new`` is written into its next free slots. A buffer remembers
    how far it is filled, so appending twice to the same state (branching) copies instead of overwriting the other
    branch. Under autograd, without or beyond ``capacity``, it is a plain ``cat``."""
    n, m = prefix.shape[dim], new.shape[dim]
    if capacity is None or torch.is_grad_enabled() or n + m > capacity:
        return torch.cat([prefix, new], dim)
    base = prefix._base
    if (base is None or getattr(base, "_filled", -1) != n or base.shape[dim] != capacity
            or base.data_ptr() != prefix.data_ptr() or base.stride() != prefix.stride()):
        shape = list(prefix.shape)
        shape[dim] = capacity
        base = prefix.new_empty(shape)
        base.narrow(dim, 0, n).copy_(prefix)
    base.narrow(dim, n, m).copy_(new)
    base._filled = n + m
    return base.narrow(dim, 0, n + m)


SOFTMAX_PAD = 16  # on CPU, torch's softmax over a last dim of 2..15 keys takes a scalar path: ~5 µs per key at [80, 4, 1, L]


def softmax_keys(scores: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(scores, -1)``. On CPU, 3..15 keys (an episode's first steps) are padded with -inf to
    :data:`SOFTMAX_PAD` columns, which takes torch's vectorised kernel, and the first columns of the result are
    returned (a strided view): the padding's weights are exactly 0, so the values are the softmax's to float rounding
    (≤ 4e-7 apart). On the development machine, padding included: 17 against 22-83 µs for a pair step's
    [80, 4, 1, 3..15] scores, 32 against 62-246 µs for tok_transformer's [80, 4, 3, 3..15]; at 2 keys it gains
    nothing."""
    L = scores.shape[-1]
    if scores.device.type != "cpu" or not 2 < L < SOFTMAX_PAD:
        return torch.softmax(scores, -1)
    padded = scores.new_full((*scores.shape[:-1], SOFTMAX_PAD), float("-inf"))
    padded[..., :L] = scores
    return torch.softmax(padded, -1)[..., :L]


def compiled_acting(*tensors: torch.Tensor) -> bool:
    """Whether acting over these tensors (the attention, the LayerNorms) runs as
    :mod:`~interbrain.agents.acting_kernels`' compiled loops: on CPU, in float32 or float64, with no gradient asked
    for (the loops build no graph)."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return False
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))


def acting_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` while acting (no gradient) on CPU: as :func:`~interbrain.agents.acting_kernels.layer_norm`, which
    the transformer pair step runs (the same bits; 6 against 15 µs at [2, 40, 64]); otherwise the module."""
    if not compiled_acting(x, norm.weight):
        return norm(x)
    d = x.shape[-1]
    rows = x.detach().reshape(1, -1, d).numpy()
    out = np.empty_like(rows)
    layer_norm(rows, norm.weight.detach().numpy()[None], norm.bias.detach().numpy()[None], rows.dtype.type(norm.eps),
               out)
    return torch.from_numpy(out).view(x.shape)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None = None,
           lse_out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of a step's few queries over a KV cache (acting): q [N, heads, S, dh], k and v
    [N, heads, L, dh], ``allowed`` (bool [S, L'], None: all) for the last L' <= L keys (every earlier key is allowed:
    a block's causal mask only touches its own new tokens) -> [N, heads, S, dh], as two batched products around a
    softmax. On CPU, for S of 1 or 3 and dh 16 this is faster than ``scaled_dot_product_attention``'s flash kernel,
    whose per-(row, head) set-up dominates there (issue 6); the result equals it to float tolerance, and both
    attention agents' own step and their pair step use it, so these stay bit for bit equal. The two products run on
    numpy's BLAS where :func:`~interbrain.agents.linear.small_backend` says ``numpy`` (CPU, float32): a
    ``matched`` transformer's rollout then takes ~20 ms less (121 against 144 ms, interleaved runs). With
    ``lse_out`` ([N, heads], S = 1) the log-sum-exp of each query's scaled scores is written there (what
    :class:`KnownAttention`'s backward takes); the result is the same. A single query (S = 1, no mask) on CPU without a gradient goes to the
    compiled loops of :mod:`~interbrain.agents.acting_kernels` instead (:func:`compiled_acting`), as the
    transformer pair step does: the same bits, faster."""
    if q.shape[2] == 1 and allowed is None and compiled_acting(q, k, v):
        N, H, _, dh = q.shape
        q, k, v = q.detach().numpy(), k.detach().numpy(), v.detach().numpy()
        out = np.empty((N, H, dh), q.dtype)
        lse = np.empty((N, H), out.dtype) if lse_out is None else lse_out.numpy()
        attend_cached(q[:, :, 0], k.swapaxes(2, 3), v, k.shape[2],
                      np.empty((N, H, k.shape[2]), out.dtype), out, lse)
        return torch.from_numpy(out).unsqueeze(2)
    # the two products as numpy's (OpenBLAS) where no gradient is asked for: ~107 µs a call against ~146 through
    # torch's batched products (MKL) for a pair step's [80, 4, 1, 16] queries over 1-100 cached steps on the
    # development machine (AMD EPYC)
    numpy = small_products_on_numpy(q) and not (torch.is_grad_enabled()
                                                and (q.requires_grad or k.requires_grad or v.requires_grad))
    if numpy:
        scores = torch.from_numpy(np.matmul(q.numpy(), k.numpy().swapaxes(2, 3))).mul_(q.shape[-1] ** -0.5)
    else:
        scores = torch.matmul(q, k.transpose(2, 3)).mul_(q.shape[-1] ** -0.5)
    if allowed is not None:
        scores[..., scores.shape[-1] - allowed.shape[-1]:].masked_fill_(~allowed, float("-inf"))
    weights = softmax_keys(scores)
    if lse_out is not None:
        torch.logsumexp(scores[:, :, 0], -1, out=lse_out)
    return torch.from_numpy(np.matmul(weights.numpy(), v.numpy())) if numpy else torch.matmul(weights, v)


def step_major_heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [N, heads, L, dh] (views) of step-major qkv outputs [L, N, 3d]."""
    L, N, d3 = qkv.shape
    return qkv.view(L, N, 3, heads, d3 // (3 * heads)).permute(2, 1, 3, 0, 4).unbind(0)


def causal_attention_grads(grad, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of causal attention's output ``out`` = sdpa(q, k, v, is_causal=True) ([N, heads, L, dh]) with the
    log-sum-exp ``lse`` [N, heads, L], from the output's gradient: the CPU flash kernel's backward."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(grad, q, k, v, out, lse, 0.0, True)


class KnownAttention(torch.autograd.Function):
    """Causal ``scaled_dot_product_attention(q, k, v)`` of step-major qkv outputs [L, N, 3d] (q, k, v
    :func:`step_major_heads`) whose output and log-sum-exp are already known (``known`` = (out [N, heads, L, dh], lse
    [N, heads, L]), recorded by the acting pass from the same q, k, v to float tolerance): the forward returns the output
    without computing it; the backward is :func:`causal_attention_grads`, which recomputes the attention weights from
    q, k and the log-sum-exp (the first learning epoch's replay), written straight into the gradient of qkv (split into
    q, k and v by autograd, it would be stacked into a new [3, N, heads, L, dh] buffer first: ≈ 1.5 ms of a `fast`
    update)."""

    @staticmethod
    def forward(ctx, qkv, heads, known):
        out, lse = known
        ctx.save_for_backward(qkv, out, lse)
        ctx.heads = heads
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        qkv, out, lse = ctx.saved_tensors
        grad_qkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        for part, value in zip(step_major_heads(grad_qkv, ctx.heads),
                               causal_attention_grads(grad, *step_major_heads(qkv, ctx.heads), out, lse)):
            part.copy_(value)
        return grad_qkv, None, None


class CausalBlock(nn.Module):
    """One pre-LN block: ``x += Attn(LN(x)); x += MLP(LN(x))``."""

    def __init__(self, d_model: int, heads: int, mlp: int, out_gain: float):
        super().__init__()
        self.heads = heads
        self.ln_attn = nn.LayerNorm(d_model)
        self.qkv = Linear(d_model, 3 * d_model)
        self.attn_out = Linear(d_model, d_model)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp_in = Linear(d_model, mlp)
        self.mlp_out = Linear(mlp, d_model)
        for layer, gain in ((self.qkv, 1.0), (self.mlp_in, 1.0), (self.attn_out, out_gain), (self.mlp_out, out_gain)):
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            nn.init.zeros_(layer.bias)

    def _qkv(self, x: torch.Tensor, acting: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of LN(x); ``acting``: the LayerNorm as :func:`acting_layer_norm` (the pair step's)."""
        N, L, d = x.shape
        normed = acting_layer_norm(self.ln_attn, x) if acting else self.ln_attn(x)
        qkv = self.qkv(normed).view(N, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [N, heads, L, d/heads] (unbind: its backward stacks, no zero-filled buffers)
        return q, k, v

    def _finish(self, x: torch.Tensor, attended: torch.Tensor, acting: bool = False) -> torch.Tensor:
        N, H, Lq, dh = attended.shape
        x = x + self.attn_out(attended.transpose(1, 2).reshape(N, Lq, H * dh))
        normed = acting_layer_norm(self.ln_mlp, x) if acting else self.ln_mlp(x)
        return x + self.mlp_out(torch.relu(self.mlp_in(normed)))

    def causal(self, x: torch.Tensor) -> torch.Tensor:
        """Every token attends to itself and the tokens before it."""
        q, k, v = self._qkv(x)
        return self._finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def replayed(self, x: torch.Tensor, record: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`causal` for a step-major x [L, N, d] whose products' and attention's outputs were recorded by the
        acting pass under the same weights (:meth:`TransformerPair.records`, this block's part: [L, N, width], and the
        attention's log-sum-exp ``lse`` [N, heads, L]): only the LayerNorms
        and the residual sums are recomputed; the products (the MLP's first with its ReLU: the record holds its output
        after the ReLU) and the attention are taken from the record with their backward built
        (:func:`~interbrain.agents.linear.known_linear`, :class:`KnownAttention`)."""
        L, N, d = x.shape
        qkv = known_linear(self.ln_attn(x), self.qkv, record["qkv"])
        att = KnownAttention.apply(qkv, self.heads, (record["att"].view(L, N, self.heads, d // self.heads)
                                                     .permute(1, 2, 0, 3), record["lse"]))
        x = x + known_linear(att.permute(2, 0, 1, 3).reshape(L, N, d), self.attn_out, record["attn_out"])
        inner = known_linear(self.ln_mlp(x), self.mlp_in, record["mlp_in"], relu=True)  # recorded after its ReLU
        return x + known_linear(inner, self.mlp_out, record["mlp_out"])

    def last_query(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last token only (it attends to all tokens), shape [N, 1, d]."""
        q, k, v = self._qkv(x)
        return self._finish(x[:, -1:], F.scaled_dot_product_attention(q[:, :, -1:], k, v))

    def cached(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, capacity: int | None = None):
        """One new token [N, 1, d] attending to the cached keys/values and itself (caches hold up to ``capacity``).
        Acting on CPU, its LayerNorms and attention are the compiled loops the transformer pair step runs."""
        acting = compiled_acting(x, self.ln_attn.weight)
        q, k, v = self._qkv(x, acting)
        k = append_along(k_cache, k, 2, capacity)
        v = append_along(v_cache, v, 2, capacity)
        return self._finish(x, attend(q, k, v), acting), k, v


class WindowedContext:
    """The SPEC §3.2 context rule's bookkeeping, shared by the attention agents (`transformer`, `tok_transformer`):
    a learned position table ``pos_table`` with exactly ``window`` rows, and the largest position and context ever
    used (``max_position_used``, ``max_context_used``). Positions and contexts count steps."""

    def context_limit(self) -> int:
        return self.window

    def position_embedding(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start .. stop-1`` of the position table; anything outside 0..W-1 raises."""
        if start < 0 or stop > self.window or start >= stop:
            raise InterbrainError(
                f"{self.arch} position range {start}..{stop - 1} is outside the learned table 0..{self.window - 1} "
                f"(window={self.window}); SPEC §3.2 context rule")
        if stop - 1 > self.max_position_used:  # assigned only when it grows (nn.Module's __setattr__ costs ~5 µs)
            self.max_position_used = stop - 1
        return self.pos_table[start:stop]

    def _note_context(self, steps: int) -> None:
        if steps > self.window:
            raise InterbrainError(f"{self.arch} context of {steps} steps exceeds window={self.window}")
        if steps > self.max_context_used:
            self.max_context_used = steps


@register("transformer")
class TransformerAgent(WindowedContext, Agent):
    carries_hidden = False
    memory_type = "causal attention over a bounded window (learned positions)"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, SIZES)
        if config.pos == "rope":
            raise InterbrainError("pos='rope' is not implemented yet")
        self.window = config.window
        self.d_model = SIZES[config.size]["d_model"]
        mlp = SIZES[config.size]["mlp"]
        self.mlp_width = mlp
        self.inp = Linear(OBS_DIM, self.d_model)
        nn.init.xavier_uniform_(self.inp.weight)
        nn.init.zeros_(self.inp.bias)
        self.pos_table = nn.Parameter(torch.empty(self.window, self.d_model))
        nn.init.normal_(self.pos_table, std=0.02)
        out_gain = 0.5 / math.sqrt(2 * LAYERS)
        self.blocks = nn.ModuleList(CausalBlock(self.d_model, HEADS, mlp, out_gain) for _ in range(LAYERS))
        self.final_ln = nn.LayerNorm(self.d_model)
        if config.size == "matched":
            self.hidden_proj = Linear(self.d_model, HIDDEN)
            nn.init.kaiming_uniform_(self.hidden_proj.weight, nonlinearity="relu")
            nn.init.zeros_(self.hidden_proj.bias)
        else:
            self.hidden_proj = None
        init_heads(self)
        self.max_position_used = -1
        self.max_context_used = 0

    @property
    def hidden_definition(self) -> str:  # type: ignore[override]
        if self.hidden_proj is None:
            return "final-LayerNorm residual at step t"
        return "ReLU(Linear(64->256)(final-LayerNorm residual at step t))"

    # --- forward pieces -------------------------------------------------------------------------
    def _emit(self, x: torch.Tensor, known: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden state from the residual stream x; with ``known``, the ``matched`` projection's output (after its
        ReLU) as an acting pass recorded it (the replay: :func:`~interbrain.agents.linear.known_linear`). Acting on
        CPU, the final LayerNorm is :func:`acting_layer_norm` (the pair step's)."""
        h = acting_layer_norm(self.final_ln, x)
        if self.hidden_proj is None:
            return h
        if known is not None:
            return known_linear(h, self.hidden_proj, known, relu=True)
        return torch.relu(self.hidden_proj(h))

    def _causal_pass(self, emb: torch.Tensor) -> torch.Tensor:
        """Residual stream of every token of ``emb`` [N, L, d] at positions 0..L-1 (L <= W)."""
        L = emb.shape[1]
        x = emb + self.position_embedding(0, L)
        self._note_context(L)
        for block in self.blocks:
            x = block.causal(x)
        return x

    def _window_last(self, emb: torch.Tensor) -> torch.Tensor:
        """Residual stream [N, d] of the last token of each window ``emb`` [N, L, d], positions 0..L-1."""
        L = emb.shape[1]
        x = emb + self.position_embedding(0, L)
        self._note_context(L)
        for block in self.blocks[:-1]:
            x = block.causal(x)
        return self.blocks[-1].last_query(x)[:, 0]

    def _check_history(self, t: int, emb: torch.Tensor) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InterbrainError(f"transformer state step counter must be a non-negative int, got {t!r}")
        if emb.shape[1] != min(t, self.window - 1):
            raise InterbrainError(f"transformer state at step {t} holds {emb.shape[1]} embeddings, "
                                  f"expected {min(t, self.window - 1)} (window={self.window})")

    # --- contract -------------------------------------------------------------------------------
    def initial_state(self, batch, device="cpu"):
        dtype = self.inp.weight.dtype
        emb = torch.zeros(batch, 0, self.d_model, device=device, dtype=dtype)
        cache = torch.zeros(batch, HEADS, 0, self.d_model // HEADS, device=device, dtype=dtype)
        return (0, emb) + (cache,) * (2 * LAYERS)

    def step(self, obs, state, *, e: torch.Tensor | None = None):
        """One step from ``obs``, or from its input embedding ``e = inp(obs)`` [B, d] when given (index path)."""
        t, emb, *cache = state
        self._check_history(t, emb)
        e = (self.inp(obs) if e is None else e).unsqueeze(1)  # [B, 1, d]
        history = append_along(emb, e, 1, self.window - 1)
        if t < self.window:
            x = e + self.position_embedding(t, t + 1)
            self._note_context(t + 1)
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, k, v = block.cached(x, cache[2 * i], cache[2 * i + 1], self.window)
                new_cache += [k, v]
            if t + 1 == self.window:  # from now on every step recomputes its window from `emb`
                new_cache = [c[:, :, :0] for c in new_cache]
            out = x[:, 0]
        else:
            out = self._window_last(history)
            new_cache = cache
        emb = history[:, max(0, history.shape[1] - (self.window - 1)):]  # the last min(t+1, W-1) steps
        hidden = self._emit(out)
        logits, value = self.readout(hidden)
        return logits, value, hidden, (t + 1, emb, *new_cache)

    def sequence(self, obs, state0=None, *, e: torch.Tensor | None = None):
        e = self.inp(obs) if e is None else e  # [T, B, d] input embeddings
        T, B, _ = e.shape
        W = self.window
        t0, hist = (state0 if state0 is not None else self.initial_state(B, e.device))[:2]
        self._check_history(t0, hist)
        stream = torch.cat([hist, e.transpose(0, 1)], dim=1)  # [B, L, d], global steps g0..t0+T-1
        n0 = hist.shape[1]
        L = n0 + T
        outs = []
        if t0 < W:  # steps t0..min(t0+T, W)-1: one causal pass from step 0 (here g0 = 0, n0 = t0)
            outs.append(self._causal_pass(stream[:, :min(L, W)])[:, n0:])
        if t0 + T > W:  # steps >= W: each from its own window of W steps, positions 0..W-1
            first = max(t0, W) - W + 1 - (t0 - n0)  # stream index where the first such window starts
            windows = stream.unfold(1, W, 1)[:, first:]  # [B, n_windows, d, W]
            n_windows = windows.shape[1]
            per_chunk = max(1, CHUNK_ELEMENTS // (B * W * max(self.mlp_width, HEADS * W)))
            for c in range(0, n_windows, per_chunk):
                chunk = windows[:, c:c + per_chunk]
                n = chunk.shape[1]
                chunk = chunk.permute(0, 1, 3, 2).reshape(B * n, W, self.d_model)
                outs.append(self._window_last(chunk).view(B, n, self.d_model))
        hidden = self._emit(torch.cat(outs, dim=1))  # [B, T, 256]; the heads read it in this layout (no transposed copy)
        logits, value = self.readout(hidden)
        return logits.transpose(0, 1), value.transpose(0, 1), hidden.transpose(0, 1)  # [T, B, ...] views

    def replay_index(self, index, record):
        """:meth:`sequence_index` from the zero state over T <= W steps when ``record`` holds what
        :class:`TransformerPair` recorded over those steps while acting under the same weights
        (:meth:`TransformerPair.records`): the
        blocks' products and attention are not recomputed, their backward is built on the recorded outputs
        (:meth:`CausalBlock.replayed`); nor is the ``matched`` hidden layer's product and ReLU, whose output is the
        recorded hidden state. The values equal the recomputed ones to float tolerance (the acting pass
        multiplies step by step), not bit for bit."""
        T, B, _ = index.shape
        layers = record["layers"]
        shapes = [rec["qkv"].shape[:2] for rec in layers] + [record["hidden"].shape[:2]]
        wrong = [shape for shape in shapes if shape != (T, B)]
        if T > self.window or wrong:
            raise InterbrainError(f"a transformer record of {tuple((wrong or shapes)[0])} (steps, episodes) "
                                  f"cannot replay {T} steps of {B} episodes (window={self.window})")
        x = self.gather_linear(index, self.inp) + self.position_embedding(0, T).unsqueeze(1)  # [T, B, d]
        self._note_context(T)
        for block, rec in zip(self.blocks, layers):
            x = block.replayed(x, rec)
        hidden = self._emit(x, known=record["hidden"])
        logits, value = self.readout(hidden, known=record.get("heads"))
        return logits, value, hidden

    # --- observation indices: the input embedding as a gather of two rows ------------------------------
    def step_index(self, index, state):
        return self.step(None, state, e=self.gather_linear(index, self.inp))

    def sequence_index(self, index, state0=None):
        return self.sequence(None, state0, e=self.gather_linear(index, self.inp))

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.inp.weight)

    def pair_with(self, partner: Agent, steps: int) -> TransformerPair | None:
        same = type(partner) is TransformerAgent and partner.window == self.window and partner.d_model == self.d_model
        return TransformerPair(self, partner) if same and steps <= self.window else None


class StackedBlocks:
    """What both attention agents' pair steps (:class:`TransformerPair`,
    :class:`~interbrain.agents.tok_transformer.TokTransformerPair`) take from their agents, stacked agent-major:
    each block's products (W^T [n, in, out] and bias [n, 1, out], one ``baddbmm`` for all agents) and LayerNorms,
    the final LayerNorm, the ``matched`` projection and the joint heads (no gradient); then the heads' outputs and
    the context rule's bookkeeping after a step. Built from the current weights."""

    def __init__(self, agents):
        self.agents = agents
        first = agents[0]
        self.window, self.d_model, self.mlp_width = first.window, first.d_model, first.mlp_width
        with torch.no_grad():
            self.blocks = [{name: self._linear([getattr(a.blocks[i], name) for a in agents])
                            for name in ("qkv", "attn_out", "mlp_in", "mlp_out")}
                           | {name: self._norm([getattr(a.blocks[i], name) for a in agents])
                              for name in ("ln_attn", "ln_mlp")} for i in range(LAYERS)]
            self.final_ln = self._norm([a.final_ln for a in agents])
            self.proj = None if first.hidden_proj is None else self._linear([a.hidden_proj for a in agents])
            heads = [a._joint_heads() for a in agents]
            self.heads = (torch.stack([w for w, _ in heads]).transpose(1, 2), torch.stack([b for _, b in heads]).unsqueeze(1))
        self.keys = [param_key(a) for a in agents]

    @staticmethod
    def _linear(layers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked W^T [n, in, out] and bias [n, 1, out]: x W^T + b per agent as one ``baddbmm``."""
        return (torch.stack([m.weight for m in layers]).transpose(1, 2),
                torch.stack([m.bias for m in layers]).unsqueeze(1))

    @staticmethod
    def _norm(layers: list[nn.LayerNorm]) -> tuple[torch.Tensor, torch.Tensor, float]:
        return (torch.stack([m.weight for m in layers]).unsqueeze(1), torch.stack([m.bias for m in layers]).unsqueeze(1),
                layers[0].eps)

    def norm_arrays(self) -> list[tuple]:
        """Every LayerNorm's weight and bias [n, d] and eps as the compiled loops take them, in the order a step meets
        them: per block ln_attn, ln_mlp; then the final one."""
        norms = [block[name] for block in self.blocks for name in ("ln_attn", "ln_mlp")] + [self.final_ln]
        return [(w[:, 0].numpy(), b[:, 0].numpy(), w.numpy().dtype.type(eps)) for w, b, eps in norms]

    def _emit_heads(self, h: torch.Tensor, hidden_out: torch.Tensor, heads_out: torch.Tensor) -> None:
        """The hidden states (the ``matched`` projection and its ReLU) and the joint heads from the final LayerNorm's
        output h."""
        if self.proj is None:
            hidden_out.copy_(h)
        else:
            torch.baddbmm(self.proj[1], h, self.proj[0], out=hidden_out).relu_()
        torch.baddbmm(self.heads[1], hidden_out, self.heads[0], out=heads_out)

    def _note_steps(self, steps: int) -> None:
        """The context rule's bookkeeping after ``steps`` steps from 0, as each agent's own steps keep it."""
        for a in self.agents:
            if steps - 1 > a.max_position_used:  # assigned only when it grows (nn.Module's __setattr__ costs ~5 µs)
                a.max_position_used = steps - 1
            if steps > a.max_context_used:
                a.max_context_used = steps


class TransformerPair(StackedBlocks):
    """Both transformer agents acting as one batched call (issue 6), for the first ``window`` steps of an episode (the
    KV-cache phase: a training episode of horizon <= window never leaves it). Per step: one gather from the two
    stacked input tables; per block, the products of both agents as one ``baddbmm`` each (the same bits as each
    agent's ``Linear``: ``addmm`` per batch on CPU), each LayerNorm as the plain normalisation followed by one
    ``addcmul`` with the stacked affine weights (the same bits as the affine kernel), and one :func:`attend` over
    both agents' 2·B rows (batched products per row and head, so the same bits); the KV caches and the
    input-embedding history are preallocated for the whole episode. ``tests/test_fast_paths.py`` checks the bits
    against each agent's ``step_index``. Built from the current weights (no gradient); rebuild it after they
    change."""

    def __init__(self, *agents: TransformerAgent):
        super().__init__(agents)
        first = agents[0]
        n = len(agents)
        # on CPU the steps record every product's and attention's output for the first learning epoch's replay
        # (TransformerAgent.replay_index, whose attention backward is the CPU flash kernel's)
        self.replays = first.inp.weight.device.type == "cpu"
        # on CPU the attention runs as compiled loops (acting_kernels) over a key cache kept transposed
        self.compiled = self.replays and first.inp.weight.dtype in (torch.float32, torch.float64)
        with torch.no_grad():
            self.table = torch.cat([index_table(a.inp.weight, a.inp.bias) for a in agents])  # [n·201, d]
            self.pos = torch.stack([a.pos_table for a in agents])  # [n, W, d]
        self.arrays = None
        if self.compiled:  # the compiled loops' views: the input table, positions and the LayerNorms
            self.arrays = {"table": self.table.numpy(), "pos": self.pos.numpy(), "norms": self.norm_arrays()}
        self.row_offsets = stacked_row_offsets(n, self.table.device)  # each agent's rows in the stacked table
        # the acting loop written out where the steps are compiled (collect_rollout runs it; None: its own loop)
        self.play = self._play if self.compiled else None

    def _layer_norm(self, x: torch.Tensor, norm) -> torch.Tensor:
        weight, bias, eps = norm
        return torch.addcmul(bias, F.layer_norm(x, (self.d_model,), eps=eps), weight)

    def initial_state(self, batch: int) -> tuple:
        n, W, d, dh = len(self.agents), self.window, self.d_model, self.d_model // HEADS
        new = lambda *shape: self.table.new_empty(shape)  # noqa: E731
        # per layer the key and the value cache, [n·B, heads, W, dh]; with compiled attention the keys are stored
        # transposed (time contiguous) and this is a view
        caches = [new(n * batch, HEADS, dh, W).transpose(2, 3) if self.compiled and j % 2 == 0
                  else new(n * batch, HEADS, W, dh) for j in range(2 * LAYERS)]
        record = None
        if self.replays:  # per layer, step-major [W, n, B, width] (lse [W, n·B, heads]): a step's slot is dense
            widths = {"qkv": 3 * d, "att": d, "attn_out": d, "mlp_in": self.mlp_width, "mlp_out": d}
            record = [{name: new(W, n, batch, w) for name, w in widths.items()}
                      | {"lse": new(W, n * batch, HEADS)} for _ in range(LAYERS)]
        # each step's slots per layer ({name: record[i][name][t]}), built once per episode, not per step
        slots = [[{}] * W] * LAYERS if record is None else [
            [dict(zip(layer, views)) for views in zip(*(buf.unbind(0) for buf in layer.values()))] for layer in record]
        emb = new(n, batch, W, d)
        acting = None
        if self.compiled:  # the numpy views the compiled loops read and write: the residual stream, its LayerNorm,
            # and per layer and step the record's slots, the caches (keys transposed) and the scores' scratch
            normed, scores = new(n, batch, d), new(n * batch, HEADS, W).numpy()
            acting = {"x": new(n, batch, d).numpy(), "normed": normed, "normed_np": normed.numpy(),
                      "emb": emb.numpy(), "layers": [
                          [(slot["qkv"].numpy().reshape(n * batch, 3, HEADS, dh), caches[2 * i].numpy().swapaxes(2, 3),
                            caches[2 * i + 1].numpy(), slot["att"].numpy().reshape(n * batch, HEADS, dh),
                            slot["lse"].numpy(), scores, slot["attn_out"].numpy(), slot["mlp_out"].numpy())
                           for slot in slots[i]] for i in range(LAYERS)]}
        return (0, emb, caches, record, slots, acting)

    def step(self, rows: torch.Tensor, state: tuple, hidden_out: torch.Tensor, heads_out: torch.Tensor) -> tuple:
        """rows [2, B, 2]: the observation index plus :attr:`row_offsets` (``observation_index(offsets=)``)."""
        t, emb, caches, record, slots, acting = state
        if t >= self.window:
            raise InterbrainError(f"the transformer pair step covers steps 0..{self.window - 1}; got step {t}")
        if acting is not None:
            rows = rows.numpy()  # the step's rows as their own observation table: obs = rows, at = 0..B-1
            h = self._compiled_step(rows, np.arange(rows.shape[1]), NO_OFFSETS, t, slots, acting)
        else:
            h = self._torch_step(rows, t, emb, caches, slots)
        self._emit_heads(h, hidden_out, heads_out)
        self._note_steps(t + 1)
        return (t + 1, emb, caches, record, slots, acting)

    def _compiled_step(self, obs: np.ndarray, at: np.ndarray, episode_offset: np.ndarray, t: int, slots: list,
                       acting: dict) -> torch.Tensor:
        """The blocks of step t on CPU, the final LayerNorm's output returned: the products as torch's (``baddbmm``,
        into the record), everything between them as :mod:`~interbrain.agents.acting_kernels`' loops on the
        preallocated buffers (the embedding of the observation rows ``obs[:, at + episode_offset]``, each residual sum
        with the LayerNorm after it, the cache writes and the attention), so no step allocates."""
        x, normed, normed_np = acting["x"], acting["normed"], acting["normed_np"]
        embed_step(self.arrays["table"], obs, at, episode_offset, self.arrays["pos"][:, t], acting["emb"][:, :, t], x)
        layer_norm(x, *self.arrays["norms"][0], normed_np)
        for i, block in enumerate(self.blocks):
            slot = slots[i][t]
            qkv_rows, keys_t, values, att_rows, lse, scores, attn_out, mlp_out = acting["layers"][i][t]
            torch.baddbmm(block["qkv"][1], normed, block["qkv"][0], out=slot["qkv"])
            write_step(qkv_rows, keys_t, values, t)
            attend_cached(qkv_rows[:, 0], keys_t, values, t + 1, scores, att_rows, lse)
            torch.baddbmm(block["attn_out"][1], slot["att"], block["attn_out"][0], out=slot["attn_out"])
            add_layer_norm(x, attn_out, *self.arrays["norms"][2 * i + 1], normed_np)
            torch.baddbmm(block["mlp_in"][1], normed, block["mlp_in"][0], out=slot["mlp_in"]).relu_()
            torch.baddbmm(block["mlp_out"][1], slot["mlp_in"], block["mlp_out"][0], out=slot["mlp_out"])
            add_layer_norm(x, mlp_out, *self.arrays["norms"][2 * i + 2], normed_np)  # the next block's or the final
        return normed

    def _play(self, env, noise: torch.Tensor, heads: torch.Tensor, actions: torch.Tensor, pairs: torch.Tensor,
              hidden: torch.Tensor) -> tuple:
        """:func:`interbrain.ppo.collect_rollout`'s acting loop written out (on CPU: :attr:`play`): per step the
        observation rows straight from the environment's table into the embedding, :meth:`step`'s blocks, heads and
        bookkeeping, and the Gumbel-max actions with the move as one compiled loop
        (:func:`interbrain.step_kernels.sample_and_move`); the same bits as the loop of ``pair.step`` and
        ``act_and_move``. Buffers as :meth:`interbrain.agents.rnn.RNNPair.play`'s; returns the pair's state."""
        obs_np, offsets, next_np = loop_arrays(*env.acting_tables(self.row_offsets))
        T, B = noise.shape[0], noise.shape[2]
        nz_np, act_np, pr_np, logits_np = noise.numpy(), actions.numpy(), pairs.numpy(), heads.numpy()[..., :N_ACTIONS]
        hid, hd = hidden.unbind(1), heads.unbind(0)
        if T > self.window:
            raise InterbrainError(f"the transformer pair step covers steps 0..{self.window - 1}; got {T} steps")
        _, emb, caches, record, slots, acting = self.initial_state(B)
        for t in range(T):
            h = self._compiled_step(obs_np, pr_np[t], offsets, t, slots, acting)
            self._emit_heads(h, hid[t], hd[t])
            sample_and_move(logits_np[t], nz_np[t], pr_np[t], next_np, act_np[t], pr_np[t + 1])
        self._note_steps(T)
        env.moved(pairs[T], T)
        return (T, emb, caches, record, slots, acting)

    def _torch_step(self, rows: torch.Tensor, t: int, emb: torch.Tensor, caches: list, slots: list) -> torch.Tensor:
        """The blocks of step t as torch ops (on CUDA), the final LayerNorm's output returned."""
        n, B, _ = rows.shape
        d, dh = self.d_model, self.d_model // HEADS
        e = bag_sum(self.table, rows.view(-1, 2)).view(n, B, d)
        emb[:, :, t] = e
        x = e + self.pos[:, t].unsqueeze(1)
        for i, block in enumerate(self.blocks):
            # with a record, each product writes into its step's slot of the record (the same kernel, the same bits)
            slot = slots[i][t]
            qkv = torch.baddbmm(block["qkv"][1], self._layer_norm(x, block["ln_attn"]), block["qkv"][0],
                                out=slot.get("qkv"))
            q, k, v = qkv.view(n * B, 1, 3, HEADS, dh).permute(2, 0, 3, 1, 4)
            k_cache, v_cache = caches[2 * i], caches[2 * i + 1]
            k_cache[:, :, t] = k[:, :, 0]
            v_cache[:, :, t] = v[:, :, 0]
            attended = attend(q, k_cache[:, :, :t + 1], v_cache[:, :, :t + 1], lse_out=slot.get("lse"))
            attended = attended.transpose(1, 2).reshape(n, B, d)
            if slot:
                slot["att"].copy_(attended)
            x = x + torch.baddbmm(block["attn_out"][1], attended, block["attn_out"][0], out=slot.get("attn_out"))
            inner = torch.baddbmm(block["mlp_in"][1], self._layer_norm(x, block["ln_mlp"]), block["mlp_in"][0],
                                  out=slot.get("mlp_in")).relu_()
            x = x + torch.baddbmm(block["mlp_out"][1], inner, block["mlp_out"][0], out=slot.get("mlp_out"))
        return self._layer_norm(x, self.final_ln)

    def states(self, state: tuple) -> list[tuple]:
        """Each agent's own state (:meth:`TransformerAgent.initial_state`'s layout) after the steps taken."""
        t, emb, caches = state[:3]
        W, B = self.window, emb.shape[1]
        kept = slice(max(0, t - (W - 1)), t)  # the last min(t, W-1) input embeddings
        out = []
        for i in range(len(self.agents)):
            rows = slice(i * B, (i + 1) * B)
            cache = [c[rows, :, :t if t < W else 0] for c in caches]
            out.append((t, emb[i, :, kept], *cache))
        return out

    def records(self, state: tuple, hidden: torch.Tensor, heads: torch.Tensor | None = None) -> list[dict]:
        """Each agent's record of the episode's t <= ``window`` steps for :meth:`TransformerAgent.replay_index`:
        ``layers``, per layer the outputs of its products and attention, step-major views [t, B, width], and each
        log-sum-exp of each query's scaled scores (``lse``, [B, heads, t]);
        ``hidden``, its hidden states [t, B, 256] from the rollout's ``hidden`` [2, T, B, 256] (agent-major, as the
        steps wrote them); and with the rollout's ``heads`` [T, 2, B, 5], ``heads``: its joint heads' outputs [t, B, 5]
        (4 logits, then the value)."""
        t, emb, _, record = state[:4]
        if record is None:
            raise InterbrainError("this transformer pair keeps no record (it records when acting on CPU)")
        B = emb.shape[1]
        return [{"layers": [{name: value[:t, i] if name != "lse" else value[:t, i * B:(i + 1) * B].permute(1, 2, 0)
                             for name, value in layer.items()} for layer in record],
                 "hidden": hidden[i, :t]} | ({} if heads is None else {"heads": heads[:t, i]})
                for i in range(len(self.agents))]
