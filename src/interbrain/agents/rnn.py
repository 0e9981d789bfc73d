"""`rnn`: the paper's network (official model ``simple_rnn_v2_3_2``), SPEC §3.2.

h_t = ReLU(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), h_0 = 0; logits = W_a h_t + b_a; value = W_v h_t + b_v.
The state-dict names (``rnn.weight_ih_l0`` ... ``value_head.bias``) match the paper's released weights.

Speed (issue 6), with the arithmetic unchanged:
- ``step_index`` / ``sequence_index`` gather W_ih's columns instead of multiplying the two-hot x_t (SPEC §3.2 "input
  gather"): row r < 100 of :meth:`input_table` is W_ih[:, r] + b_ih + b_hh (own cell), row 100 + c is W_ih[:, 100 + c]
  (partner cell), row 200 is zero (partner not shown).
- :class:`ReluRecurrence` runs the recurrence as one ``addmm`` + in-place ReLU per step into a preallocated output; its
  backward is one matmul per step (dh_{t-1} = g_t W_hh, fused with the add) plus a single large matmul for dW_hh = sum_t g_t h_{t-1}^T,
  instead of autograd's per-step graph.
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import HIDDEN, OBS_DIM, Agent, gather_index, index_table, register
from interbrain.config import AgentConfig


class ReluRecurrence(torch.autograd.Function):
    """H[t] = ReLU(pre[t] + H[t-1] W^T) for t = 0..T-1 from H[-1] = h0; pre [T,B,H], h0 [B,H], w [H,H] -> H [T,B,H].
    Also E independent recurrences at once (:mod:`interbrain.ensemble`): pre [T,E,B,H], h0 [E,B,H], w [E,H,H], the
    same arithmetic with ``baddbmm`` in place of ``addmm``."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, h0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(pre)
        mm = torch.baddbmm if w.dim() == 3 else torch.addmm
        wt, h = w.transpose(-1, -2), h0
        for t in range(pre.shape[0]):
            h = mm(pre[t], h, wt, out=out[t]).relu_()
        ctx.save_for_backward(out, h0, w)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, h0, w = ctx.saved_tensors
        T, H = out.shape[0], out.shape[-1]
        mm = torch.baddbmm if w.dim() == 3 else torch.addmm
        alive = (out > 0).to(out.dtype)  # ReLU'(pre): 0 exactly where the output is 0
        # g[t] = dL/dpre[t] = (grad_out[t] + g[t+1] W) * alive[t]; the add is fused into the addmm
        g = torch.empty_like(out)
        torch.mul(grad_out[T - 1], alive[T - 1], out=g[T - 1])
        for t in range(T - 1, 0, -1):
            mm(grad_out[t - 1], g[t], w, out=g[t - 1]).mul_(alive[t - 1])
        grad_h0 = g[0] @ w if ctx.needs_input_grad[1] else None
        grad_w = None
        if ctx.needs_input_grad[2]:
            grad_w = g[0].transpose(-1, -2) @ h0
            if T > 1:  # sum_t g_t^T h_{t-1} as one large product over all steps (per unit)
                if w.dim() == 3:
                    E = w.shape[0]
                    grad_w = grad_w.baddbmm_(g[1:].permute(1, 3, 0, 2).reshape(E, H, -1),
                                             out[:-1].permute(1, 0, 2, 3).reshape(E, -1, H))
                else:
                    grad_w = grad_w.addmm_(g[1:].reshape(-1, H).t(), out[:-1].reshape(-1, H))
        return g, grad_h0, grad_w


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
        return self._recur(torch.nn.functional.linear(obs, r.weight_ih_l0, r.bias_ih_l0 + r.bias_hh_l0), state0)

    # --- observation indices -------------------------------------------------------------------------
    def input_table(self) -> torch.Tensor:
        """[201, 256]: rows 0..99 own cell (+ both biases), 100..199 partner cell, 200 partner not shown (zeros)."""
        r = self.rnn
        return index_table(r.weight_ih_l0, r.bias_ih_l0 + r.bias_hh_l0)

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        """W_ih x + b_ih + b_hh for observation indices [..., 2], as one summed gather of two table rows."""
        r = self.rnn
        return gather_index(index, self.cached("input_table", (r.weight_ih_l0, r.bias_ih_l0, r.bias_hh_l0),
                                               self.input_table))

    def step_index(self, index, state):
        (h,) = state
        h = torch.addmm(self._gather(index), h, self.rnn.weight_hh_l0.t()).relu_()
        logits, value = self.readout(h)
        return logits, value, h, (h,)

    def sequence_index(self, index, state0=None):
        return self._recur(self._gather(index), state0)

    def _recur(self, pre: torch.Tensor, state0):
        h0 = self.initial_state(pre.shape[1], pre.device)[0] if state0 is None else state0[0]
        hidden = ReluRecurrence.apply(pre, h0.to(pre.dtype), self.rnn.weight_hh_l0)
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def with_hidden(self, state, hidden):
        return (hidden,)

    def recurrent_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_hh_l0)

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_ih_l0)
