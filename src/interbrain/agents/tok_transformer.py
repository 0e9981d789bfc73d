"""`tok_transformer`: a transformer over per-step token blocks, in the style of MOUSE's step embedder (SPEC §3.4).

MOUSE (micahr234/mouse-core) is GPL-3.0: its design is adopted here, none of its code.

Each step t contributes a block of S tokens, decoded from the observation (own = argmax of x[:100]; partner = argmax of
x[100:] when shown, else 100 = "not visible"; the index form ``step_index``/``sequence_index`` takes these directly):
- ``tok_mode="sum"`` (default): one observation token ``own_embed[own] + partner_embed[partner]``;
  ``tok_mode="concat"``: two tokens, ``own_embed[own]`` then ``partner_embed[partner]``;
- then K = ``config.tok_compute`` (default 2) learned compute tokens, the same every step;
- with ``tok_type_embedding``, a learned embedding per token type (observation or own/partner, compute) is added.
So S = 1 + K (sum) or 2 + K (concat). Every token of step t gets row t' of the learned step-position table (exactly W
rows), t' the step's index inside its window. The blocks are :class:`interbrain.agents.transformer.CausalBlock` (pre-LN,
4 heads, ReLU MLP), 2 layers, a final LayerNorm. Attention is causal over tokens: a token sees every token of the
earlier steps of its window and the tokens up to itself in its own block. ``hidden`` = the last token of the step's
block (the last compute token when K > 0), or ReLU(Linear(d→256)(·)) of it for ``matched``.

Context rule (SPEC §3.2, as `transformer`, counted in steps). Step t < W attends to the blocks of steps 0..t at step
positions 0..t (a per-token KV cache makes each step O(t·S)); step t >= W attends to the blocks of [t-W+1, t] at
positions 0..W-1, recomputed every step. ``sequence`` reproduces exactly this (one causal pass over the first
min(T, W) steps, then every later step from its own window, batched in chunks). A position outside 0..W-1 raises
:class:`InterbrainError`; ``max_position_used`` / ``max_context_used`` record the largest step position and window
length (in steps) ever processed.

Parameters (W = 100, K = 2, either mode, no type embedding; a type embedding adds (2 or 3)·d):
- ``std``: d 256, MLP 512: 1,133,573 (the `transformer`'s 1,133,061 with Linear(200→256) replaced by the own (100),
  partner (101) and compute (2) tokens).
- ``matched``: d 64, MLP 192, ``hidden`` = ReLU(Linear(64→256)(final LN)): 120,901 (+2.0 % of 118,533).

Init: the token tables Xavier-uniform as the `transformer`'s input map (bound √(6/(200+d))); compute tokens, type
embedding and position table N(0, 0.02); blocks as in `transformer` (our choice where SPEC is silent); the matched
projection Kaiming-uniform (ReLU); heads :func:`interbrain.agents.base.init_heads`. Previous-action/-reward tokens
(``tok_prev_action``/``tok_prev_reward``) are refused, as ``step`` receives the observation only; so is ``pos="rope"``.

Acting on CPU, both agents of a rollout step as one :class:`TokTransformerPair` (compiled attention and LayerNorms over
preallocated buffers; equal to each agent's ``step_index`` to float tolerance).

State: ``(t, ids, k_1, v_1, k_2, v_2)``: ``t`` the python-int step counter, ``ids`` [B, min(t, W-1), 2] (long) the
(own, partner) indices of the previous steps (the tokens are rebuilt from them with the current weights), and the
per-layer key/value caches [B, heads, t·S, d/heads] (empty once t >= W, when windows are recomputed).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from interbrain.agents.acting_kernels import add_layer_norm, attend_cached, embed_step, layer_norm, write_step
from interbrain.agents.base import (HIDDEN, N_CELLS, OBS_DIM, Agent, check_size, init_heads, register,
                                    stacked_row_offsets)
from interbrain.agents.linear import Linear
from interbrain.agents.transformer import (CHUNK_ELEMENTS, HEADS, LAYERS, SIZES, CausalBlock, StackedBlocks,
                                          WindowedContext, append_along, attend, compiled_acting)
from interbrain.config import AgentConfig
from interbrain.errors import InterbrainError
from interbrain.step_kernels import NO_OFFSETS

NOT_VISIBLE = N_CELLS  # partner index when the partner is not shown


def index_from_obs(obs: torch.Tensor) -> torch.Tensor:
    """(own cell, partner cell or 100) [..., 2] of float observations [..., 200] (SPEC §1.3)."""
    partner = obs[..., N_CELLS:]
    shown = partner.sum(-1) > 0
    return torch.stack([obs[..., :N_CELLS].argmax(-1),
                        torch.where(shown, partner.argmax(-1), torch.full_like(shown, NOT_VISIBLE, dtype=torch.long))],
                       dim=-1)


def cached_block(block: CausalBlock, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 capacity: int | None = None, last_only: bool = False):
    """A step's S new tokens ``x`` [N, S, d] through ``block``: token j attends to the cached keys/values and to the
    new tokens 0..j. Returns ``(out [N, S, d], k, v)`` with the caches extended (see ``append_along``); with
    ``last_only`` (the last block, whose other outputs nothing reads), out is the last token's only, [N, 1, d]."""
    q, k, v = block._qkv(x)
    S = x.shape[1]
    k = append_along(k_cache, k, 2, capacity)
    v = append_along(v_cache, v, 2, capacity)
    if last_only:  # the last token attends to every cached and new token
        return block._finish(x[:, -1:], attend(q[:, :, -1:], k, v)), k, v
    return block._finish(x, attend(q, k, v, block_mask(S, x.device))), k, v


_BLOCK_MASKS: dict = {}


def block_mask(S: int, device: torch.device) -> torch.Tensor:
    """bool [S, S]: new token j of a step's block sees new tokens 0..j (the cached tokens before them are all seen);
    one tensor per (S, device)."""
    key = (S, torch.device(device))
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        mask = _BLOCK_MASKS[key] = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    return mask


def last_tokens_block(block: CausalBlock, x: torch.Tensor, S: int) -> torch.Tensor:
    """The last block of a causal pass over n steps of S tokens (``x`` [N, n·S, d]) for the only tokens whose output
    is read, the last of each step: [N, n, d]. Every token's key and value are computed; the queries, the attention
    output and the MLP only for those n tokens, each attending to the tokens up to itself (what ``block.causal`` gives
    it: the same values to float tolerance, a third of the work for S = 3)."""
    if S == 1:  # every token is a step's last
        return block.causal(x)
    q, k, v = block._qkv(x)
    L = x.shape[1]
    ends = torch.arange(S, L + 1, S, device=x.device)  # token j of step i's last token ((i+1)·S - 1) sees keys < ends[i]
    allowed = torch.arange(L, device=x.device) < ends.unsqueeze(1)  # [n, L]
    return block._finish(x[:, S - 1::S], F.scaled_dot_product_attention(q[:, :, S - 1::S], k, v, attn_mask=allowed))


@register("tok_transformer")
class TokTransformerAgent(WindowedContext, Agent):
    carries_hidden = False
    memory_type = "causal attention over per-step token blocks in a bounded window (learned step positions)"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, SIZES)
        if config.pos == "rope":
            raise InterbrainError("pos='rope' is not implemented for tok_transformer")
        if config.tok_prev_action or config.tok_prev_reward:
            raise InterbrainError("tok_transformer previous-action/previous-reward tokens are not implemented (the "
                                  "agent contract passes only the observation to step); leave tok_prev_action and "
                                  "tok_prev_reward off")
        self.window = config.window
        self.d_model = d = SIZES[config.size]["d_model"]
        self.mlp_width = SIZES[config.size]["mlp"]
        self.mode, self.n_compute = config.tok_mode, config.tok_compute
        obs_slots = 1 if self.mode == "sum" else 2
        self.block_len = obs_slots + self.n_compute
        bound = math.sqrt(6.0 / (OBS_DIM + d))
        self.own_embed = nn.Embedding(N_CELLS, d)
        self.partner_embed = nn.Embedding(N_CELLS + 1, d)
        for table in (self.own_embed, self.partner_embed):
            nn.init.uniform_(table.weight, -bound, bound)
        self.compute_tokens = nn.Parameter(torch.randn(self.n_compute, d) * 0.02) if self.n_compute else None
        # token types per slot: observation (sum) or own, partner (concat); then one type for all compute tokens
        slot_types = list(range(obs_slots)) + [obs_slots] * self.n_compute
        self.register_buffer("slot_types", torch.tensor(slot_types), persistent=False)
        if config.tok_type_embedding:
            self.type_embed = nn.Parameter(torch.randn(obs_slots + (self.n_compute > 0), d) * 0.02)
        else:
            self.type_embed = None
        self.pos_table = nn.Parameter(torch.randn(self.window, d) * 0.02)
        out_gain = 0.5 / math.sqrt(2 * LAYERS)
        self.blocks = nn.ModuleList(CausalBlock(d, HEADS, self.mlp_width, out_gain) for _ in range(LAYERS))
        self.final_ln = nn.LayerNorm(d)
        if config.size == "matched":
            self.hidden_proj = Linear(d, HIDDEN)
            nn.init.kaiming_uniform_(self.hidden_proj.weight, nonlinearity="relu")
            nn.init.zeros_(self.hidden_proj.bias)
        else:
            self.hidden_proj = None
        init_heads(self)
        self.max_position_used = -1
        self.max_context_used = 0

    @property
    def hidden_definition(self) -> str:  # type: ignore[override]
        token = "last compute token" if self.n_compute else ("partner token" if self.mode == "concat" else "obs token")
        site = f"final-LayerNorm residual of step t's {token}"
        return site if self.hidden_proj is None else f"ReLU(Linear({self.d_model}->256)({site}))"

    # --- forward pieces -------------------------------------------------------------------------
    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token blocks [B, n, S, d] (without positions) of the (own, partner) indices ``ids`` [B, n, 2]."""
        own, partner = self.own_embed(ids[..., 0]), self.partner_embed(ids[..., 1])
        parts = [own + partner] if self.mode == "sum" else [own, partner]
        if self.n_compute:
            parts += list(self.compute_tokens.expand(*ids.shape[:2], -1, -1).unbind(2))
        tok = torch.stack(parts, dim=2)
        return tok if self.type_embed is None else tok + self.type_embed[self.slot_types]

    def _positioned(self, tok: torch.Tensor) -> torch.Tensor:
        """Blocks of steps 0..n-1 of a window [N, n, S, d] -> flat token sequence [N, n·S, d] with step positions."""
        n = tok.shape[1]
        self._note_context(n)
        return (tok + self.position_embedding(0, n).unsqueeze(1)).flatten(1, 2)

    def _causal_pass(self, tok: torch.Tensor) -> torch.Tensor:
        """Residual of every step's last token [N, n, d] for blocks [N, n, S, d] at step positions 0..n-1 (n <= W)."""
        x = self._positioned(tok)
        for block in self.blocks[:-1]:
            x = block.causal(x)
        return last_tokens_block(self.blocks[-1], x, self.block_len)

    def _window_last(self, tok: torch.Tensor) -> torch.Tensor:
        """Residual [N, d] of the last token of each window's blocks [N, n, S, d], positions 0..n-1."""
        x = self._positioned(tok)
        for block in self.blocks[:-1]:
            x = block.causal(x)
        return self.blocks[-1].last_query(x)[:, 0]

    def _emit(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final_ln(x)
        return h if self.hidden_proj is None else torch.relu(self.hidden_proj(h))

    def _check_history(self, t: int, ids: torch.Tensor) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise InterbrainError(f"tok_transformer state step counter must be a non-negative int, got {t!r}")
        if ids.shape[1] != min(t, self.window - 1):
            raise InterbrainError(f"tok_transformer state at step {t} holds {ids.shape[1]} steps of embeddings, "
                                  f"expected {min(t, self.window - 1)} (window={self.window})")

    # --- contract -------------------------------------------------------------------------------
    def initial_state(self, batch, device="cpu"):
        ids = torch.zeros(batch, 0, 2, dtype=torch.long, device=device)
        cache = torch.zeros(batch, HEADS, 0, self.d_model // HEADS, device=device, dtype=self.pos_table.dtype)
        return (0, ids) + (cache,) * (2 * LAYERS)

    def step(self, obs, state):
        return self.step_index(index_from_obs(obs), state)

    def sequence(self, obs, state0=None):
        return self.sequence_index(index_from_obs(obs), state0)

    def step_index(self, index, state):
        t, ids, *cache = state
        self._check_history(t, ids)
        history = torch.cat([ids, index.unsqueeze(1)], dim=1)
        W = self.window
        if t < W:
            self._note_context(t + 1)
            x = self.tokens(index.unsqueeze(1))[:, 0] + self.position_embedding(t, t + 1)  # [B, S, d]
            new_cache = []
            for i, block in enumerate(self.blocks):
                x, k, v = cached_block(block, x, cache[2 * i], cache[2 * i + 1], W * self.block_len,
                                       last_only=i == len(self.blocks) - 1)
                new_cache += [k, v]
            if t + 1 == W:  # from now on every step recomputes its window from `ids`
                new_cache = [c[:, :, :0] for c in new_cache]
            out = x[:, -1]
        else:
            out = self._window_last(self.tokens(history))
            new_cache = cache
        ids = history[:, max(0, history.shape[1] - (W - 1)):]  # the last min(t+1, W-1) steps
        hidden = self._emit(out)
        logits, value = self.readout(hidden)
        return logits, value, hidden, (t + 1, ids, *new_cache)

    def sequence_index(self, index, state0=None):
        T, B, _ = index.shape
        W, S, d = self.window, self.block_len, self.d_model
        t0, hist = (state0 if state0 is not None else self.initial_state(B, index.device))[:2]
        self._check_history(t0, hist)
        tok = self.tokens(torch.cat([hist, index.transpose(0, 1)], dim=1))  # [B, L, S, d], steps t0-n0 .. t0+T-1
        n0 = hist.shape[1]
        L = n0 + T
        outs = []
        if t0 < W:  # steps t0..min(t0+T, W)-1: one causal pass from step 0 (here n0 = t0)
            outs.append(self._causal_pass(tok[:, :min(L, W)])[:, n0:])
        if t0 + T > W:  # steps >= W: each from its own window of W steps, positions 0..W-1
            first = max(t0, W) - W + 1 - (t0 - n0)  # index in `tok` where the first such window starts
            windows = tok.unfold(1, W, 1)[:, first:]  # [B, n_windows, S, d, W]
            n_windows = windows.shape[1]
            per_chunk = max(1, CHUNK_ELEMENTS // (B * W * S * max(self.mlp_width, HEADS * W * S)))
            for c in range(0, n_windows, per_chunk):
                chunk = windows[:, c:c + per_chunk]
                n = chunk.shape[1]
                chunk = chunk.permute(0, 1, 4, 2, 3).reshape(B * n, W, S, d)
                outs.append(self._window_last(chunk).view(B, n, d))
        hidden = self._emit(torch.cat(outs, dim=1)).transpose(0, 1)  # [T, B, 256]
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def input_weight_norm(self):
        return torch.sqrt(self.own_embed.weight.square().sum() + self.partner_embed.weight.square().sum())

    def pair_with(self, partner: Agent, steps: int) -> TokTransformerPair | None:
        """Both agents as :class:`TokTransformerPair` while acting on CPU (float32/64, no gradient), for the
        default token layout (``tok_mode="sum"``, no type embedding) and episodes within the window; else None."""
        same = (type(partner) is TokTransformerAgent and steps <= self.window
                and all(getattr(partner, name) == getattr(self, name)
                        for name in ("window", "d_model", "mlp_width", "mode", "n_compute"))
                and self.mode == "sum" and self.type_embed is None and partner.type_embed is None
                and (self.hidden_proj is None) == (partner.hidden_proj is None)
                and compiled_acting(self.pos_table.detach(), partner.pos_table.detach())
                and self.pos_table.dtype == partner.pos_table.dtype)
        return TokTransformerPair(self, partner) if same else None


class TokTransformerPair(StackedBlocks):
    """Both tok_transformer agents acting as one batched step on CPU (issue 6), for the first ``window`` steps of an
    episode (the KV-cache phase; a training episode of horizon <= window never leaves it), after
    :class:`~interbrain.agents.transformer.TransformerPair`: per step one gather of both agents' observation tokens
    from their stacked (own, partner) tables, the compute tokens added to the step position, per block the products
    of both agents' S·B token rows as one ``baddbmm`` each, and everything between them as the compiled loops of
    :mod:`~interbrain.agents.acting_kernels` on buffers preallocated for the episode: the LayerNorms (with the
    residual sums), the cache writes and the attention, one compiled single-query call per token of the step's block
    over the keys the block mask allows it (:func:`attend_block`'s rule: cached steps and the block's tokens up to
    itself), with the key caches kept transposed (time contiguous). The last block computes only the last token's
    attention and MLP, as :func:`cached_block` does. The attention sums in another order than the agents' own step
    (:func:`~interbrain.agents.transformer.attend`), so the pair equals each agent's ``step_index`` to float
    tolerance, not bit for bit (``tests/test_fast_paths.py``). Built from the current weights (no gradient)."""

    replays = False  # the learning pass recomputes the episode (no first-epoch replay for this architecture)
    play = None  # collect_rollout's own loop drives step()

    def __init__(self, *agents: TokTransformerAgent):
        super().__init__(agents)
        self.block_len, self.n_compute = agents[0].block_len, agents[0].n_compute
        with torch.no_grad():
            # per agent 201 rows: own cells 0..99, then partner cells 0..99 and "not visible" (INDEX_OFFSETS' layout)
            self.table = torch.cat([torch.cat([a.own_embed.weight, a.partner_embed.weight]) for a in agents])
            self.pos = torch.stack([a.pos_table for a in agents])  # [n, W, d]
            self.compute = (torch.stack([a.compute_tokens for a in agents]) if self.n_compute
                            else None)  # [n, K, d]
        self.norms = self.norm_arrays()
        self.table_np, self.pos_np = self.table.numpy(), self.pos.numpy()
        self.compute_np = None if self.compute is None else self.compute.numpy()
        self.row_offsets = stacked_row_offsets(len(agents), self.table.device)

    def initial_state(self, batch: int) -> tuple:
        n, W, S, d = len(self.agents), self.window, self.block_len, self.d_model
        dh = d // HEADS
        new = lambda *shape: self.table.new_empty(shape)  # noqa: E731
        # per layer the key cache (stored transposed, time contiguous; this is a [n·B, heads, W·S, dh] view) and the
        # value cache
        caches = [new(n * batch, HEADS, dh, W * S).transpose(2, 3) if j % 2 == 0 else new(n * batch, HEADS, W * S, dh)
                  for j in range(2 * LAYERS)]
        ids = torch.empty(n, batch, W, 2, dtype=torch.long)  # each step's (own, partner) indices, for states()
        # per block the outputs of its products, attention and LayerNorms: for every token of the step ("all", rows
        # b·S + s), and for the last block, which computes the last token only ("last", rows b)
        rows = {part: {"att": new(n, r, d), "attn_out": new(n, r, d), "mlp_in": new(n, r, self.mlp_width),
                       "mlp_out": new(n, r, d), "normed": new(n, r, d)}
                for part, r in (("all", batch * S), ("last", batch))}
        buffers = {"x": new(n, batch, S, d),  # the residual stream of the step's tokens, token-minor per episode
                   "qkv": new(n, batch * S, 3 * d), **rows,
                   "emb": new(n, batch, d).numpy(), "scores": new(n * batch, HEADS, W * S).numpy(),
                   "lse": new(n * batch, HEADS).numpy(),
                   "kv": [(caches[2 * i].numpy().swapaxes(2, 3), caches[2 * i + 1].numpy()) for i in range(LAYERS)]}
        return (0, caches, ids, buffers)

    def step(self, rows: torch.Tensor, state: tuple, hidden_out: torch.Tensor, heads_out: torch.Tensor) -> tuple:
        """rows [2, B, 2]: the observation index plus :attr:`row_offsets` (``observation_index(offsets=)``)."""
        t, caches, ids, buf = state
        if t >= self.window:
            raise InterbrainError(f"the tok_transformer pair step covers steps 0..{self.window - 1}; got step {t}")
        torch.sub(rows, self.row_offsets, out=ids[:, :, t])
        self._emit_heads(self._compiled_step(rows.numpy(), t, buf), hidden_out, heads_out)
        self._note_steps(t + 1)
        return (t + 1, caches, ids, buf)

    def _compiled_step(self, rows: np.ndarray, t: int, buf: dict) -> torch.Tensor:
        """The blocks of step t; returns the final LayerNorm's output of each episode's last token [n, B, d]."""
        n, B, _ = rows.shape
        S, d, K = self.block_len, self.d_model, self.n_compute
        x = buf["x"].numpy()
        pos = self.pos_np[:, t]
        # the observation token: (own + partner) + position; the compute tokens: compute_k + position
        embed_step(self.table_np, rows, np.arange(B), NO_OFFSETS, pos, buf["emb"], x[:, :, 0])
        for k in range(K):
            np.add(self.compute_np[:, k, None], pos[:, None], out=x[:, :, 1 + k])
        x_rows = x.reshape(n, B * S, d)
        normed = buf["all"]["normed"]  # LN(x) of every token: the next block's qkv input
        layer_norm(x_rows, *self.norms[0], normed.numpy())
        scores, lse = buf["scores"], buf["lse"]
        for i, block in enumerate(self.blocks):
            kt, v = buf["kv"][i]
            qkv = torch.baddbmm(block["qkv"][1], normed, block["qkv"][0], out=buf["qkv"])
            qkv_np = qkv.numpy().reshape(n * B, S, 3, HEADS, d // HEADS)
            for s in range(S):
                write_step(qkv_np[:, s], kt, v, t * S + s)
            if i == len(self.blocks) - 1:  # only the last token's output is read
                out, resid = buf["last"], x[:, :, S - 1]
                attend_cached(qkv_np[:, S - 1, 0], kt, v, (t + 1) * S, scores,
                              out["att"].numpy().reshape(n * B, HEADS, d // HEADS), lse)
            else:
                out, resid = buf["all"], x_rows
                att_np = out["att"].numpy().reshape(n * B, S, HEADS, d // HEADS)
                for s in range(S):
                    attend_cached(qkv_np[:, s, 0], kt, v, t * S + s + 1, scores, att_np[:, s], lse)
            normed_np = out["normed"].numpy()
            torch.baddbmm(block["attn_out"][1], out["att"], block["attn_out"][0], out=out["attn_out"])
            add_layer_norm(resid, out["attn_out"].numpy(), *self.norms[2 * i + 1], normed_np)
            torch.baddbmm(block["mlp_in"][1], out["normed"], block["mlp_in"][0], out=out["mlp_in"]).relu_()
            torch.baddbmm(block["mlp_out"][1], out["mlp_in"], block["mlp_out"][0], out=out["mlp_out"])
            add_layer_norm(resid, out["mlp_out"].numpy(), *self.norms[2 * i + 2], normed_np)
        return buf["last"]["normed"]

    def states(self, state: tuple) -> list[tuple]:
        """Each agent's own state (:meth:`TokTransformerAgent.initial_state`'s layout) after the steps taken."""
        t, caches, ids = state[:3]
        W, S, B = self.window, self.block_len, ids.shape[1]
        kept = slice(max(0, t - (W - 1)), t)  # the last min(t, W-1) steps' indices
        out = []
        for i in range(len(self.agents)):
            rows = slice(i * B, (i + 1) * B)
            out.append((t, ids[i, :, kept], *(c[rows, :, :t * S if t < W else 0] for c in caches)))
        return out
