"""`rnn`: the paper's network (official model ``simple_rnn_v2_3_2``), SPEC §3.2.

h_t = ReLU(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), h_0 = 0; logits = W_a h_t + b_a; value = W_v h_t + b_v.
The state-dict names (``rnn.weight_ih_l0`` ... ``value_head.bias``) match the paper's released weights.

Speed (issue 6), with the arithmetic unchanged (up to float summation order where noted):
- ``step_index`` / ``sequence_index`` gather W_ih's columns instead of multiplying the two-hot x_t (SPEC §3.2 "input
  gather"): row r < 100 of :meth:`input_table` is W_ih[:, r] + b_ih + b_hh (own cell), row 100 + c is W_ih[:, 100 + c]
  (partner cell), row 200 is zero (partner not shown). The gather's backward is two ``index_add_`` (summation order).
- :func:`relu_recurrence` runs the recurrence as one in-place ``addmm_`` + ReLU per step; its backward
  (:func:`relu_recurrence_backward`) is one matmul per step (dh_{t-1} = g_t W_hh, accumulated in place) plus a single
  large matmul for dW_hh = sum_t g_t h_{t-1}^T, instead of autograd's per-step graph. :class:`ReluRNNHeads`, the
  learning pass of one agent, adds the joint heads and computes their gradient for all steps as one product;
  :class:`StackedReluRNNHeads` runs the same loops for E stacked units.
- :class:`RNNPair`: while acting, both agents step as one batched call (same bits as two ``step_index`` calls), in a
  written-out acting loop (:meth:`RNNPair.play`), and the hidden states it records let the first learning epoch skip
  the recurrence's forward (:meth:`replay_index`).
- :class:`StackedRNN`: E agents as stacked parameters, one batched product per step for all of them. The ensemble
  (:mod:`interbrain.ensemble`) stacks E training units; the ``rllib`` learner stacks a pair's two agents, so each of
  its 960 minibatch steps per update is one graph (:class:`StackedReluRNNHeads`, :class:`StackedInputTable`) instead
  of two; where the small steps go to numpy (:func:`numpy_steps`), the whole minibatch step is written out in numpy
  (:meth:`StackedRNN.hand_written_minibatches`, :mod:`interbrain.agents.rnn_numpy`).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import nn

from interbrain.agents.base import (HIDDEN, N_ACTIONS, N_CELLS, OBS_DIM, Agent, FrobeniusNorm, gather_index, gather_rows,
                                    index_table, param_key, register, scatter_two_rows, stacked_row_offsets, sum_rows,
                                    table_rows)
from interbrain.agents.linear import (SMALL_ROWS, narrow_input_grad, narrow_product, narrow_weight_grad,
                                      small_products_on_numpy)
from interbrain.config import AgentConfig
from interbrain.errors import InterbrainError
from interbrain.step_kernels import gather_inputs, loop_arrays, sample_and_move


def numpy_steps(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the recurrence over x [T, E, B, H] (stacked units: ``w`` [E, H, H]) takes its step products on numpy's
    BLAS: float32 on CPU, at most :data:`~interbrain.agents.linear.SMALL_ROWS` rows per unit, and
    :func:`~interbrain.agents.linear.small_backend` says ``numpy`` (the ``rllib`` learner's minibatches). One unit's
    recurrence (``w`` [H, H]) keeps torch's kernel: the first learning epoch replays the acting pass's hidden states,
    which must equal a recomputation bit for bit."""
    return w.dim() == 3 and small_steps_on_numpy(x, x.shape[-2])


def small_steps_on_numpy(x: torch.Tensor, rows: int) -> bool:
    """Stacked products of ``rows`` rows per unit on tensors like ``x`` go to numpy: float32 on CPU, at most
    :data:`~interbrain.agents.linear.SMALL_ROWS` rows, and :func:`~interbrain.agents.linear.small_backend` says
    ``numpy`` (:func:`~interbrain.agents.linear.small_products_on_numpy`)."""
    return rows <= SMALL_ROWS and small_products_on_numpy(x)


def relu_recurrence(pre: torch.Tensor, h0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """H[t] = ReLU(pre[t] + H[t-1] W^T) for t = 0..T-1 from H[-1] = h0, computed in place in ``pre`` (which becomes
    H and is returned): one in-place ``addmm_`` (``baddbmm_`` for stacked units) and ReLU per step, so each step's input
    is read and overwritten while it is in cache (no second [T,B,H] buffer, no copy per step). Small stacked steps
    (:func:`numpy_steps`) run the same loop on numpy views of the same memory."""
    if numpy_steps(pre, w):
        return _relu_recurrence_numpy(pre, h0, w)
    wt, h = w.transpose(-1, -2), h0
    step = torch.Tensor.baddbmm_ if w.dim() == 3 else torch.Tensor.addmm_
    if compiled_elementwise(pre, w):  # the ReLU as a compiled loop on a numpy view of the step
        rows = pre.detach().numpy()
        for t, pt in enumerate(pre.unbind(0)):
            h = step(pt, h, wt)
            relu_rows(rows[t])
        return pre
    for pt in pre.unbind(0):  # each step's view made in one call (an index per step costs a dispatch each)
        h = step(pt, h, wt).relu_()
    return pre


def compiled_elementwise(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the recurrence's per-step ReLU and its mask run as the compiled loops :func:`relu_rows` and
    :func:`relu_grad_rows` (one unit's [B, H] steps on CPU in float32 or float64): a call costs ≈ 1 µs where torch's
    ``relu_`` and ``threshold_backward`` cost 2-4 µs each, ≈ 4 ms of a ``paper`` update's 1,400 steps (in-process
    A/B, 20 rounds, session 23)."""
    return x.device.type == "cpu" and w.dim() == 2 and x.dtype in (torch.float32, torch.float64)


@njit(cache=True, boundscheck=False)
def relu_rows(x):
    """ReLU in place on x [B, H]: negative values become 0 (NaN stays NaN, as torch's ``relu_``)."""
    for i in range(x.shape[0]):
        row = x[i]
        for j in range(row.shape[0]):
            if row[j] < 0:
                row[j] = 0


@njit(cache=True, boundscheck=False)
def relu_grad_rows(g, out):
    """The ReLU's backward in place on g [B, H] from its output ``out``: 0 where out <= 0, as torch's
    ``threshold_backward(g, out, 0)``."""
    for i in range(g.shape[0]):
        grow, orow = g[i], out[i]
        for j in range(grow.shape[0]):
            if orow[j] <= 0:
                grow[j] = 0


def _relu_recurrence_numpy(pre: torch.Tensor, h0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`relu_recurrence` with numpy's ``matmul`` (one BLAS call per unit and step) on views of ``pre``."""
    steps = pre.detach().numpy()
    wt = w.detach().transpose(-1, -2).contiguous().numpy()
    h = h0.detach().contiguous().numpy()
    product, zero = np.empty(steps.shape[1:], dtype=steps.dtype), steps.dtype.type(0)
    for pt in steps:
        np.matmul(h, wt, out=product)
        np.add(pt, product, out=pt)
        np.maximum(pt, zero, out=pt)  # ReLU (NaN stays NaN, as torch's)
        h = pt
    return pre


def _relu_recurrence_backward_numpy(out: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> None:
    """The step loop of :func:`relu_recurrence_backward` (``g`` holding dL/dH, becoming dL/dpre) with numpy's
    ``matmul`` on views of ``g``. The ReLU mask multiplies by [out > 0], built for all steps at once (0 where the output
    is 0, as torch's ``threshold_backward``; a non-finite gradient there would stay non-finite, where torch's zeroes
    it: the trainer's health check stops on it either way)."""
    grads, outs = g.numpy(), out.detach().numpy()
    wc = w.detach().contiguous().numpy()
    product = np.empty(grads.shape[1:], dtype=grads.dtype)
    keep = np.greater(outs, 0).astype(grads.dtype)
    for t in range(grads.shape[0] - 1, -1, -1):
        gt = grads[t]
        if t < grads.shape[0] - 1:
            np.matmul(grads[t + 1], wc, out=product)
            np.add(gt, product, out=gt)
        np.multiply(gt, keep[t], out=gt)


def relu_recurrence_backward(g: torch.Tensor, out: torch.Tensor, h0: torch.Tensor, w: torch.Tensor, needs_h0: bool,
                             needs_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dL/dpre, dL/dh0, dL/dW) of :func:`relu_recurrence` from ``g`` = dL/dH [T, ...], which becomes dL/dpre in place
    (and is returned). Per step, newest first: g[t] = (dL/dH[t] + g[t+1] W) · ReLU'(pre[t]), as an in-place ``addmm_``
    (``baddbmm_`` for stacked units) and the ReLU mask (0 exactly where the output is 0) applied in place from out[t]
    (no [T,B,H] mask tensor; the numpy steps of :func:`numpy_steps` build one, [out > 0] for all steps at once); then
    dW = sum_t g_t^T h_{t-1} as one large product over all steps (one unit only: stacked units, whose step-major rows
    would need copies here, compute it from their own layout, :class:`StackedReluRNNHeads`)."""
    T, H = out.shape[0], out.shape[-1]
    mask = torch.ops.aten.threshold_backward.grad_input
    if numpy_steps(out, w):
        _relu_recurrence_backward_numpy(out, w, g)
    else:
        step = torch.Tensor.baddbmm_ if w.dim() == 3 else torch.Tensor.addmm_
        grads, outs = g.unbind(0), out.unbind(0)  # each step's views in one call each (3 µs a step less than indexing)
        compiled = compiled_elementwise(g, w)
        if compiled:
            grad_rows, out_rows = g.detach().numpy(), out.detach().numpy()
        later = None  # g[t + 1]
        for t in range(T - 1, -1, -1):
            gt = grads[t]
            if later is not None:
                step(gt, later, w)
            if compiled:
                relu_grad_rows(grad_rows[t], out_rows[t])
            else:
                mask(gt, outs[t], 0, grad_input=gt)
            later = gt
    grad_h0 = g[0] @ w if needs_h0 else None
    grad_w = None
    if needs_w:
        if w.dim() == 3:
            raise ValueError("relu_recurrence_backward computes dW of one unit only")
        grad_w = g[0].transpose(-1, -2) @ h0
        if T > 1:
            grad_w = grad_w.addmm_(g[1:].reshape(-1, H).t(), out[:-1].reshape(-1, H))
    return g, grad_h0, grad_w


class ReluRNNHeads(torch.autograd.Function):
    """The RNN's learning pass in one function, on step-major flattened rows (pre [T·B, H], ``steps`` = T): H =
    :func:`relu_recurrence`, then the joint heads H·head_w^T + head_b ([T·B, 5]: 4 logits, then the value). The
    recurrence runs in place in ``pre``, which must be a fresh non-leaf, non-view tensor (:meth:`RNNAgent._recur`
    passes its gather) and is returned as H. The backward computes the heads' dL/dH for all steps as one product into
    the recurrence's gradient buffer before its step loop (800 calls fewer per ``paper`` update than one product per
    step inside the loop, which it replaced; the same bits on the development machine). The heads' three products
    are narrow (5 columns) and may run on numpy (:func:`~interbrain.agents.linear.narrow_product`). With ``known``
    (the H this forward would compute, recorded by :class:`RNNPair` while acting with the same weights) the recurrence
    is not run again and ``pre`` is left as it is; a replay may then pass, instead of ``pre``, the input table [201, H] and ``rows`` (the
    [T·B, 2] table rows each step sums, pre = table[rows[:, 0]] + table[rows[:, 1]]): the step inputs, which a replay
    never reads, are not gathered, and their gradient is scattered into the table's (:func:`scatter_two_rows`, as
    :class:`TwoRowGather`'s backward: the same bits; the gather took ~0.7 ms per agent and update). H's own gradient,
    if a loss uses it, is added to the heads'."""

    @staticmethod
    def forward(ctx, pre, h0, w, head_w, head_b, steps: int, known=None, rows=None):
        ctx.rows, ctx.table_shape = rows, pre.shape
        if known is None:
            if rows is not None:
                raise ValueError("ReluRNNHeads takes table rows only with a known recurrence output (a replay)")
            out = pre
            relu_recurrence(pre.view(steps, -1, pre.shape[-1]), h0, w)
            ctx.mark_dirty(pre)
        else:
            out = known.reshape(-1, known.shape[-1])
        heads = narrow_product(out, head_w, head_b)
        ctx.save_for_backward(out, h0, w, head_w)
        ctx.steps = steps
        ctx.set_materialize_grads(False)
        return out, heads

    @staticmethod
    def backward(ctx, grad_hidden, grad_heads):
        out, h0, w, head_w = ctx.saved_tensors
        T, H = ctx.steps, out.shape[-1]
        g = torch.empty(T, out.shape[0] // T, H, dtype=out.dtype, device=out.device)  # dL/dH, then dL/dpre
        if grad_heads is None:
            g.zero_()
        else:  # the heads' dL/dH for all steps as one product
            narrow_input_grad(grad_heads, head_w, out=g.view(-1, H))
        if grad_hidden is not None:
            g.add_(grad_hidden.view(g.shape))
        g, grad_h0, grad_w = relu_recurrence_backward(g, out.view(T, -1, H), h0, w, ctx.needs_input_grad[1],
                                                      ctx.needs_input_grad[2])
        grad_head_w = grad_head_b = None
        if grad_heads is not None:
            grad_head_w, grad_head_b = narrow_weight_grad(grad_heads, out), grad_heads.sum(0)
        g = g.view(out.shape)
        if ctx.rows is not None and ctx.needs_input_grad[0]:
            g = scatter_two_rows(g, ctx.rows, ctx.table_shape)
        return g, grad_h0, grad_w, grad_head_w, grad_head_b, None, None, None


class StackedReluRNNHeads(torch.autograd.Function):
    """:class:`ReluRNNHeads` for E stacked units (:class:`StackedRNN`), rows unit-major: pre [E·T·B, H] (unit, step,
    row), h0 [E, B, H], w [E, H, H], head_w [E, 5, H], head_b [E, 5] -> H [E, T, B, H] and heads [E, T·B, 5].
    H lives in a buffer [E, T+1, B, H] whose step 0 is h0, so each unit's H and its previous states are contiguous
    [T·B, H] blocks: the heads and dW are one batched product each, without copies; the heads' dL/dH for all steps is
    one product written into the gradient buffer before the step loop (the minibatches of the ``rllib`` learner are
    6-7 sequences of 20 steps, so every op saved counts). ``pre`` is left as it is."""

    @staticmethod
    def forward(ctx, pre, h0, w, head_w, head_b, steps: int):
        E, H = w.shape[0], w.shape[-1]
        B = pre.shape[0] // (E * steps)
        buf = torch.empty(E, steps + 1, B, H, dtype=pre.dtype, device=pre.device)
        buf[:, 0] = h0
        buf[:, 1:] = pre.view(E, steps, B, H)
        out = buf[:, 1:]
        relu_recurrence(out.transpose(0, 1), h0, w)  # in place, step by step over the unit-major buffer
        heads = torch.baddbmm(head_b.unsqueeze(1), out.reshape(E, -1, H), head_w.transpose(1, 2))
        ctx.save_for_backward(buf, w, head_w)
        ctx.set_materialize_grads(False)
        return out, heads

    @staticmethod
    def backward(ctx, grad_hidden, grad_heads):
        buf, w, head_w = ctx.saved_tensors
        E, T, B, H = buf.shape[0], buf.shape[1] - 1, buf.shape[2], buf.shape[3]
        out = buf[:, 1:]
        g = torch.empty(E, T, B, H, dtype=buf.dtype, device=buf.device)
        if grad_heads is None:
            g.zero_()
        else:
            torch.bmm(grad_heads.reshape(E, T * B, -1), head_w, out=g.view(E, T * B, H))
        if grad_hidden is not None:
            g.add_(grad_hidden)
        _, grad_h0, _ = relu_recurrence_backward(g.transpose(0, 1), out.transpose(0, 1), None, w,
                                                 ctx.needs_input_grad[1], False)
        flat = g.view(E, T * B, H)
        grad_w = torch.bmm(flat.transpose(1, 2), buf[:, :-1].reshape(E, T * B, H)) if ctx.needs_input_grad[2] else None
        grad_head_w = grad_head_b = None
        if grad_heads is not None:
            gh = grad_heads.reshape(E, T * B, -1)
            grad_head_w, grad_head_b = torch.bmm(gh.transpose(1, 2), out.reshape(E, T * B, H)), gh.sum(1)
        return g.view(-1, H), grad_h0, grad_w, grad_head_w, grad_head_b, None


@register("rnn")
class RNNAgent(Agent):
    carries_hidden = True
    hidden_definition = "post-ReLU recurrent state h_t"
    memory_type = "nonlinear recurrence"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        if config.size not in ("std", "matched"):  # the RNN is the reference size of both presets
            raise ValueError(config.size)
        self.rnn = nn.RNN(input_size=OBS_DIM, hidden_size=HIDDEN, num_layers=1, nonlinearity="relu")
        if config.init == "modern":
            nn.init.kaiming_uniform_(self.rnn.weight_ih_l0, nonlinearity="relu")
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=0.8)
            nn.init.zeros_(self.rnn.bias_ih_l0)
            nn.init.zeros_(self.rnn.bias_hh_l0)
            nn.init.xavier_uniform_(self.action_head.weight, gain=0.1)
            nn.init.zeros_(self.action_head.bias)
            nn.init.xavier_uniform_(self.value_head.weight, gain=1.0)
            nn.init.zeros_(self.value_head.bias)

    def initial_state(self, batch, device="cpu"):
        return (torch.zeros(batch, HIDDEN, device=device),)

    # --- float observations ------------------------------------------------------------------------
    def step(self, obs, state):
        (h,) = state
        r = self.rnn
        h = torch.relu(torch.addmm(r.bias_ih_l0 + r.bias_hh_l0, obs, r.weight_ih_l0.t()) + h @ r.weight_hh_l0.t())
        logits, value = self.readout(h)
        return logits, value, h, (h,)

    def sequence(self, obs, state0=None):
        r = self.rnn
        pre = torch.nn.functional.linear(obs.reshape(-1, obs.shape[-1]), r.weight_ih_l0, r.bias_ih_l0 + r.bias_hh_l0)
        return self._recur(pre, state0, obs.shape[0])

    # --- observation indices -------------------------------------------------------------------------
    def input_table(self) -> torch.Tensor:
        """[201, 256]: rows 0..99 own cell (+ both biases), 100..199 partner cell, 200 partner not shown (zeros)."""
        r = self.rnn
        return index_table(r.weight_ih_l0, r.bias_ih_l0 + r.bias_hh_l0)

    def _table(self) -> torch.Tensor:
        r = self.rnn
        return self.cached("input_table", (r.weight_ih_l0, r.bias_ih_l0, r.bias_hh_l0), self.input_table)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """W_ih x + b_ih + b_hh for observation indices [..., 2], as one summed gather of two table rows."""
        return gather_index(index, self._table())

    def step_index(self, index, state):
        (h,) = state
        h = torch.addmm(self._gather(index), h, self.rnn.weight_hh_l0.t()).relu_()
        logits, value = self.readout(h)
        return logits, value, h, (h,)

    def sequence_index(self, index, state0=None):
        return self._recur(gather_rows(index, self._table()), state0, index.shape[0])

    def replay_index(self, index, hidden):
        """:meth:`sequence_index` from the zero state when ``hidden`` [T, B, 256] is the recurrence output it would
        compute (recorded by :class:`RNNPair` under unchanged weights; on CPU the same gather and the same product per
        step, so the same bits): the backward is built without running the forward again. On CPU the inputs' gather is
        not run either (:class:`ReluRNNHeads` scatters their gradient into the table); on CUDA the gather's own
        deterministic backward is kept (``index_add_`` adds atomically there)."""
        table = self._table()
        if table.device.type != "cpu":
            return self._recur(gather_rows(index, table), None, index.shape[0], known=hidden)
        return self._recur(table, None, index.shape[0], known=hidden, rows=table_rows(index))

    @classmethod
    def stacked(cls, agents: list[Agent]) -> StackedRNN | None:
        return StackedRNN(agents) if all(type(a) is RNNAgent for a in agents) else None

    def pair_with(self, partner: Agent, steps: int) -> RNNPair | None:
        return RNNPair(self, partner) if isinstance(partner, RNNAgent) else None

    def _recur(self, pre: torch.Tensor, state0, steps: int, known: torch.Tensor | None = None,
               rows: torch.Tensor | None = None):
        """pre: W_ih x + biases as fresh step-major rows [T·B, 256] (overwritten with h) -> logits, value, hidden. With
        ``known`` and ``rows`` (a CPU replay), pre is the input table and ``rows`` the rows each step sums
        (:class:`ReluRNNHeads`)."""
        B = (pre.shape[0] if rows is None else rows.shape[0]) // steps
        if rows is None and pre._base is not None:  # ReluRNNHeads overwrites pre: it must own its storage
            pre = pre.clone()
        h0 = self.initial_state(B, pre.device)[0] if state0 is None else state0[0]
        head_w, head_b = self.cached("heads", (self.action_head.weight, self.action_head.bias, self.value_head.weight,
                                               self.value_head.bias), self._joint_heads)
        hidden, heads = ReluRNNHeads.apply(pre, h0.to(pre.dtype), self.rnn.weight_hh_l0, head_w, head_b, steps, known,
                                           rows)
        heads = heads.view(steps, B, -1)
        return heads[..., :N_ACTIONS], heads[..., N_ACTIONS], hidden.view(steps, B, -1)

    def with_hidden(self, state, hidden):
        return (hidden,)

    def recurrent_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_hh_l0)

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_ih_l0)


def step_rows(rows: torch.Tensor, h: torch.Tensor, table: torch.Tensor, weight_hh_t: torch.Tensor, heads,
              hidden_out: torch.Tensor | None = None, heads_out: torch.Tensor | None = None):
    """One acting step of E stacked units from their input-table rows: rows [E, B, 2] (the observation index plus each
    unit's row offset), h [E, B, 256], ``table`` the stacked input table, ``weight_hh_t`` W_hh^T [E, 256, 256],
    ``heads`` the joint heads (weight^T [E, 256, 5], bias [E, 1, 5]) -> (the joint heads [E, B, 5]: 4 logits, then
    the value; the new h [E, B, 256]), written into ``heads_out``/``hidden_out`` when given (``hidden_out`` must not
    share memory with h). Each unit's products are those of :meth:`RNNAgent.step_index` (``baddbmm`` with the bias: on
    CPU the same bits)."""
    h = torch.baddbmm(sum_rows(table, rows.reshape(-1, 2)).view(h.shape), h, weight_hh_t, out=hidden_out).relu_()
    weight, bias = heads
    return torch.baddbmm(bias, h, weight, out=heads_out), h


class RNNPair:
    """Both agents of a pair acting as one batched call (issue 6): the tensors of a :class:`StackedRNN` of the two,
    stepped as :meth:`StackedRNN.step_index` steps it (:func:`step_rows`; :meth:`play` calls the same kernels in its
    written-out loop: one gather from the two stacked input tables, one ``baddbmm`` for the two recurrences and one for
    the two joint heads). The environment adds :attr:`row_offsets`
    to the observation index (``observation_index(offsets=...)``), so the step gets the table rows directly. On CPU
    ``baddbmm`` runs each agent's product as the ``addmm`` of :meth:`RNNAgent.step_index` does, so the results are
    the same bits (``tests/test_fast_paths.py``); on CUDA the batched kernel may round differently, and the first
    learning epoch then replays the states the agents actually acted on. Built from the current weights (no
    gradient); rebuild it after they change."""

    replays = True  # the recorded hidden states feed RNNAgent.replay_index

    def __init__(self, *agents: RNNAgent):
        with torch.no_grad():  # StackedRNN's tensors, built without the module (~0.1 ms instead of ~0.6 per rollout)
            self.table = torch.cat([a.input_table() for a in agents])
            heads = [a._joint_heads() for a in agents]
            self.heads = torch.stack([w for w, _ in heads]).transpose(1, 2), torch.stack([b for _, b in heads]).unsqueeze(1)
            self.weight_hh = torch.stack([a.rnn.weight_hh_l0 for a in agents]).transpose(1, 2)
        self.row_offsets = stacked_row_offsets(2, self.table.device)  # each agent's rows in the stacked table
        self.keys = [param_key(a) for a in agents]

    def initial_state(self, batch: int) -> torch.Tensor:
        return self.table.new_zeros(len(self.keys), batch, HIDDEN)

    def step(self, rows: torch.Tensor, h: torch.Tensor, hidden_out: torch.Tensor,
             heads_out: torch.Tensor) -> torch.Tensor:
        """rows [2, B, 2] (the observation index plus :attr:`row_offsets`, contiguous), h [2, B, 256] -> the new h,
        written into ``hidden_out`` [2, B, 256] (which must not share memory with ``h``) and returned; the joint heads
        (4 logits, then the value) written into ``heads_out`` [2, B, 5]."""
        return step_rows(rows, h, self.table, self.weight_hh, self.heads, hidden_out, heads_out)[1]

    def play(self, env, noise: torch.Tensor, heads: torch.Tensor, actions: torch.Tensor, pairs: torch.Tensor,
             hidden: torch.Tensor, compiled: bool | None = None) -> torch.Tensor:
        """The whole acting loop of :func:`interbrain.ppo.collect_rollout`, written out: per step the calls of
        ``observation_index(offsets=)``, :meth:`step` and ``act_and_move`` (the same kernels on the same operands,
        so the same bits), without their Python layers (the loop's non-matrix time, issue 6). ``noise`` [T, 2, B, 4];
        writes ``heads`` [T, 2, B, 5], ``actions`` [T, 2, B], ``pairs`` [T + 1, B] (row 0 given: s_0) and ``hidden``
        [2, T, B, 256]; records the moves in ``env`` (``ChaseEnv.moved``) and returns the last h [2, B, 256]. On CPU
        (``compiled``: default, on CPU) the work between the products is two compiled loops
        (:mod:`interbrain.step_kernels`: the input rows written straight into h_t's slot, then ``baddbmm_`` in place;
        the Gumbel-max actions with the move), the same values as the torch calls of the other form (CUDA)."""
        obs, episode_offset, next_pair = env.acting_tables(self.row_offsets)
        T, E, B = noise.shape[0], len(self.keys), noise.shape[2]
        table, w = self.table, self.weight_hh
        head_w, head_b = self.heads
        h = self.initial_state(B)
        hid, hd, nz, act, pr = hidden.unbind(1), heads.unbind(0), noise.unbind(0), actions.unbind(0), pairs.unbind(0)
        logits = heads[..., :N_ACTIONS].unbind(0)
        if compiled is None:
            compiled = table.device.type == "cpu"
        if compiled:  # between the products, step_kernels' two compiled loops on numpy views of the same buffers
            obs_np, offsets, next_np = loop_arrays(obs, episode_offset, next_pair)
            table_np = table.numpy()
            hid_np, nz_np, act_np, pr_np = hidden.numpy(), noise.numpy(), actions.numpy(), pairs.numpy()
            logits_np = heads.numpy()[..., :N_ACTIONS]
            for t in range(T):
                gather_inputs(obs_np, pr_np[t], offsets, table_np, hid_np[:, t])  # the step's input rows, into h_t
                h = hid[t].baddbmm_(h, w).relu_()  # step_rows: x + h W (baddbmm's beta 1), then the ReLU
                torch.baddbmm(head_b, h, head_w, out=hd[t])
                sample_and_move(logits_np[t], nz_np[t], pr_np[t], next_np, act_np[t], pr_np[t + 1])
            env.moved(pr[T], T)
            return h
        bags = torch.arange(0, 2 * E * B, 2, device=table.device)  # bag_sum's offsets: two rows per bag
        for t in range(T):
            at = pr[t] if episode_offset is None else pr[t] + episode_offset
            rows = torch.index_select(obs, 1, at).view(-1)  # observation_index(offsets=): [2, B, 2]
            x = torch.embedding_bag(table, rows, bags, False, 0, False, None, False, None)[0].view(E, B, HIDDEN)
            h = torch.baddbmm(x, h, w, out=hid[t]).relu_()  # step_rows
            torch.baddbmm(head_b, h, head_w, out=hd[t])
            a = act[t]  # act_and_move: Gumbel-max actions, then ChaseEnv.next_pair
            torch.argmax(torch.add(logits[t], nz[t]), dim=-1, out=a)
            torch.index_select(next_pair, 0, torch.add(torch.add(a[1], a[0], alpha=N_ACTIONS), pr[t],
                                                       alpha=N_ACTIONS * N_ACTIONS), out=pr[t + 1])
        env.moved(pr[T], T)
        return h

    def states(self, h: torch.Tensor) -> list[tuple]:
        return [(h[i],) for i in range(len(self.keys))]

    def records(self, h: torch.Tensor, hidden: torch.Tensor, heads: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each agent's record for :meth:`RNNAgent.replay_index`: its hidden states [T, B, 256] as recorded (not the
        heads: the learning pass recomputes them, on another kernel than the acting one, to keep its replay bit for
        bit)."""
        return list(hidden.unbind(0))

    def sequence_states(self, hidden: torch.Tensor, seq_len: int) -> list[list[tuple]]:
        """Each agent's state at the start of every ``seq_len``-step sequence (the ``rllib`` learner's stored initial
        states: zero, then h_{kL-1}) from the hidden states [2, T, B, 256] the rollout recorded; views."""
        zero = hidden.new_zeros(hidden.shape[2:])
        return [[(zero if t == 0 else hidden[i, t - 1],) for t in range(0, hidden.shape[1], seq_len)]
                for i in range(len(self.keys))]


def _adam_step(step: torch.Tensor, opt: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """A copy of Adam's step count where ``opt`` keeps it: on the parameters' device for a fused or capturable Adam,
    else a CPU float32 scalar (``torch.optim.Adam``'s own placement)."""
    on_device = opt.defaults.get("fused") or opt.defaults.get("capturable")
    return step.detach().to(device if on_device else "cpu", torch.float32, copy=True)


class StackedInputTable(torch.autograd.Function):
    """input_rows [E, 200, H] (W_ih^T per unit), b_ih, b_hh [E, H] -> the units' input tables [E·201, H] (:func:`index_table`
    per unit: own-cell rows plus both biases, partner-cell rows, a zero row), built in place and differentiated in one
    node (autograd's slice-and-cat backward allocates and adds three [E, 200, H] buffers)."""

    @staticmethod
    def forward(ctx, input_rows, bias_ih, bias_hh):
        E, H = input_rows.shape[0], input_rows.shape[-1]
        table = input_rows.new_empty(E, 2 * N_CELLS + 1, H)
        torch.add(input_rows[:, :N_CELLS], (bias_ih + bias_hh).unsqueeze(1), out=table[:, :N_CELLS])
        table[:, N_CELLS:2 * N_CELLS] = input_rows[:, N_CELLS:]
        table[:, 2 * N_CELLS] = 0
        return table.view(-1, H)

    @staticmethod
    def backward(ctx, grad):
        g = grad.view(-1, 2 * N_CELLS + 1, grad.shape[-1])
        grad_bias = g[:, :N_CELLS].sum(1)
        return g[:, :2 * N_CELLS].contiguous(), grad_bias, grad_bias.clone()


class StackedRNN(nn.Module):
    """E :class:`RNNAgent` s as stacked parameters (unit e = index e): one module whose products are batched over the
    units. Used by the ensemble (E training units of one role, :mod:`interbrain.ensemble`) and by the ``rllib`` learner
    (a pair's two agents, :func:`interbrain.ppo.update_rllib`). Its learning pass is :class:`StackedReluRNNHeads` over all
    units; the loss's ``mean`` must then be per unit (each unit's gradient stays its own: disjoint parameters)."""

    #: stacked parameter -> the RNNAgent parameter it stacks; ``input_rows`` is W_ih transposed ([E, 200, 256]: the
    #: input table's rows are contiguous, so building it and its gradient need no transposed copy)
    SOURCES = {"input_rows": "rnn.weight_ih_l0", "weight_hh": "rnn.weight_hh_l0", "bias_ih": "rnn.bias_ih_l0",
               "bias_hh": "rnn.bias_hh_l0", "action_weight": "action_head.weight", "action_bias": "action_head.bias",
               "value_weight": "value_head.weight", "value_bias": "value_head.bias"}

    def __init__(self, agents: list[nn.Module]):
        super().__init__()
        self.units = len(agents)
        named = [dict(a.named_parameters()) for a in agents]
        for name, source in self.SOURCES.items():
            params = [self._layout(name, n[source].detach()) for n in named]
            self.register_parameter(name, nn.Parameter(torch.stack(params).contiguous()))
        # row of (unit e, own cell r) = 201 e + r, of (unit e, partner cell c or 100) = 201 e + 100 + c; a buffer, so
        # it lives on the device (no host-to-device copy per step)
        self.register_buffer("row_offsets", stacked_row_offsets(self.units, self.weight_hh.device), persistent=False)

    @staticmethod
    def _layout(name: str, x: torch.Tensor) -> torch.Tensor:
        """A unit's tensor in the stacked layout and back (a transpose for ``input_rows``; a view)."""
        return x.transpose(-1, -2) if name == "input_rows" else x

    def write_to(self, agents: list[nn.Module]) -> None:
        """Copy unit e's slice of every stacked parameter into ``agents[e]``."""
        with torch.no_grad():
            for name, source in self.SOURCES.items():
                stacked = getattr(self, name)
                for e, agent in enumerate(agents):
                    dict(agent.named_parameters())[source].copy_(self._layout(name, stacked[e]))

    def load_adam(self, opt: torch.optim.Optimizer, unit_opts: list[torch.optim.Optimizer],
                  agents: list[nn.Module]) -> None:
        """Stack the units' Adam moments into ``opt`` (an Adam over this module's parameters); the units must have
        taken the same number of steps (or none). Copies: later steps of ``opt`` leave the units' state alone."""
        if not any(o.state for o in unit_opts):
            return
        for name, source in self.SOURCES.items():
            per_unit = [o.state[dict(a.named_parameters())[source]] for o, a in zip(unit_opts, agents)]
            steps = {float(s["step"]) for s in per_unit}
            if len(steps) != 1:
                raise InterbrainError(f"stacked units have taken different numbers of Adam steps: {sorted(steps)}")
            stacked = getattr(self, name)
            moments = {k: torch.stack([self._layout(name, s[k]) for s in per_unit]).to(stacked.device)
                       for k in ("exp_avg", "exp_avg_sq")}
            opt.state[stacked] = {"step": _adam_step(per_unit[0]["step"], opt, stacked.device)} | moments

    def store_adam(self, opt: torch.optim.Optimizer, unit_opts: list[torch.optim.Optimizer],
                   agents: list[nn.Module]) -> None:
        """The inverse of :meth:`load_adam`: copies of unit e's slice of ``opt``'s moments into ``unit_opts[e]``."""
        for name, source in self.SOURCES.items():
            st = opt.state.get(getattr(self, name))
            if not st:
                continue
            for e, (o, a) in enumerate(zip(unit_opts, agents)):
                p = dict(a.named_parameters())[source]
                o.state[p] = {"step": _adam_step(st["step"], o, p.device)} | {
                    k: self._layout(name, st[k][e]).clone(memory_format=torch.contiguous_format)
                    for k in ("exp_avg", "exp_avg_sq")}

    def input_table(self) -> torch.Tensor:
        """[E·201, 256]: unit e's :meth:`RNNAgent.input_table` in rows 201 e .. 201 e + 200."""
        return StackedInputTable.apply(self.input_rows, self.bias_ih, self.bias_hh)

    def _joint_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint heads per unit (4 logits, then the value): weight [E, 5, 256], bias [E, 5]."""
        return (torch.cat([self.action_weight, self.value_weight], 1),
                torch.cat([self.action_bias, self.value_bias], 1))

    def heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_joint_heads` for the acting step's ``baddbmm``: weight^T [E, 256, 5] and bias [E, 1, 5]."""
        weight, bias = self._joint_heads()
        return weight.transpose(1, 2), bias.unsqueeze(1)

    def step_index(self, index: torch.Tensor, h: torch.Tensor, table, heads, hidden_out: torch.Tensor | None = None,
                   heads_out: torch.Tensor | None = None):
        """One step of every unit while acting: index [E, B, 2], h [E, B, 256] -> logits, value, h (written into
        ``hidden_out``/``heads_out`` when given: [E, B, 256] not sharing memory with h, [E, B, 5]). ``table`` and
        ``heads`` are :meth:`input_table` and :meth:`heads`, built once per rollout. Each unit's products are those of
        :meth:`RNNAgent.step_index` (:func:`step_rows`)."""
        out, h = step_rows(index + self.row_offsets, h, table, self.weight_hh.transpose(1, 2), heads, hidden_out,
                           heads_out)
        return out[..., :N_ACTIONS], out[..., N_ACTIONS], h

    def sequence_index(self, index: torch.Tensor, state0=None):
        """Teacher-forced sequences of every unit: index [T, E, B, 2] from ``state0`` ((h0 [E, B, 256],); zero state
        when None) -> logits [T, E, B, 4], value [T, E, B], hidden [T, E, B, 256] (:class:`StackedReluRNNHeads`; the
        results are views of unit-major tensors)."""
        T, E, B = index.shape[:3]
        rows = index.transpose(0, 1) + self.row_offsets.unsqueeze(1)  # unit-major [E, T, B, 2]
        pre = sum_rows(self.input_table(), rows.reshape(-1, 2))  # [E·T·B, H]
        h0 = pre.new_zeros(E, B, HIDDEN) if state0 is None else state0[0].to(pre.dtype)
        hidden, heads = StackedReluRNNHeads.apply(pre, h0, self.weight_hh, *self._joint_heads(), T)
        heads = heads.view(E, T, B, -1).transpose(0, 1)
        return heads[..., :N_ACTIONS], heads[..., N_ACTIONS], hidden.transpose(0, 1)

    def hand_written_minibatches(self, cfg, rows: int, index, actions, old_logp, adv, returns, old_logits, states0):
        """The ``rllib`` learner's minibatch steps written out in numpy (:class:`~interbrain.agents.rnn_numpy.
        KLPenaltyMinibatches`, on this update's data: [L, E, S, ...] per unit, ``states0`` [E, S, 256]) where the
        recurrence's small steps go to numpy (CPU, float32, at most ``rows`` = :data:`~interbrain.agents.linear.
        SMALL_ROWS` sequences per minibatch, the ``numpy`` small-step backend: :func:`small_steps_on_numpy`); else
        None, and the learner runs the torch graph (:func:`interbrain.ppo.stacked_kl_penalty_loss`)."""
        if not small_steps_on_numpy(self.weight_hh, rows):
            return None
        from interbrain.agents.rnn_numpy import KLPenaltyMinibatches

        return KLPenaltyMinibatches(self, cfg, index, actions, old_logp, adv, returns, old_logits, states0)

    def clip_grad_norms(self, max_norm: float | None) -> torch.Tensor:
        """Each unit's global gradient norm over its parameters [E]; with ``max_norm``, scale unit e's gradients by
        min(1, max_norm / (norm_e + 1e-6)) (``torch.nn.utils.clip_grad_norm_`` per unit)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norms = torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads]).sum(0).sqrt()
        if max_norm is not None:
            coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
            for g in grads:
                g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))
        return norms

    def recurrent_weight_norm(self) -> torch.Tensor:
        return FrobeniusNorm.apply(self.weight_hh)  # [E]

    def input_weight_norm(self) -> torch.Tensor:
        return FrobeniusNorm.apply(self.input_rows)  # [E] (a transpose keeps the norm)

    def aux_loss(self) -> torch.Tensor:
        return self.weight_hh.new_zeros(self.units)  # an RNN has no auxiliary loss
