"""`lstm`: a single-layer LSTM, ``nn.LSTM(200, w)`` (SPEC §3.4); the cell state c_t is a second analysis site.

PyTorch's LSTM (gate order i, f, g, o in ``weight_ih_l0`` / ``weight_hh_l0``), with
``a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh``: ``i, f, o = σ(a_i), σ(a_f), σ(a_o)``, ``g = tanh(a_g)``,
``c_t = f ⊙ c_{t-1} + i ⊙ g``, ``h_t = o ⊙ tanh(c_t)``, ``h_0 = c_0 = 0``.

- ``std``: w = 256, ``hidden`` = h_t, the h-part of the carried state (``carries_hidden``; ``with_hidden`` replaces h
  and keeps c)  (470,277 parameters with the heads). State-dict names are nn.LSTM's (``rnn.weight_ih_l0`` [1024, 200],
  ``rnn.weight_hh_l0`` [1024, 256], ``rnn.bias_*_l0``).
- ``matched``: w = 84 (the width whose count is closest to the RNN's 118,533), ``hidden`` = ReLU(Linear(84→256)(h_t));
  ``hidden`` is then not the state, so ``carries_hidden`` is False  (119,141 parameters, +0.5 %).

Second site: :meth:`extra_sites` returns ``{"cell": c_t}`` [B, w] (rollouts record it as ``{agent}_cell``).
Init: PyTorch's LSTM default, U(-1/√w, 1/√w) for every weight and bias (no forget-gate bias offset; ``config.init`` is
ignored); the matched projection is Kaiming-uniform (ReLU) with zero bias; heads :func:`init_heads`.
:meth:`recurrent_weight_norm` is ‖W_hh‖_F (all four gate blocks), as for `rnn` and `gru`: the preset's ``recurrent_l2``
acts on it. ``sequence`` runs ``nn.LSTM``; ``step`` writes out one cell update (``step_index`` gathers the input
gates from W_ih's columns). The state is ``(h, c)``, each [B, w].
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import HIDDEN, OBS_DIM, TorchRNNAgent, check_size, init_heads, register
from interbrain.config import AgentConfig

WIDTHS = {"std": HIDDEN, "matched": 84}  # LSTM state width


@register("lstm")
class LSTMAgent(TorchRNNAgent):
    memory_type = "gated nonlinear recurrence with a cell state (LSTM)"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, WIDTHS)
        self.width = WIDTHS[config.size]
        self.rnn = nn.LSTM(input_size=OBS_DIM, hidden_size=self.width, num_layers=1)
        self._build_projection()
        if self.carries_hidden:
            self.hidden_definition = "LSTM output h_t = o_t ⊙ tanh(c_t) (carried; c_t is the `cell` site)"
        else:
            self.hidden_definition = (f"ReLU(Linear({self.width}→256)(h_t)), h_t the {self.width}-d LSTM output "
                                      "(not carried; c_t is the `cell` site)")
        init_heads(self)

    def initial_state(self, batch, device="cpu"):
        dtype = self.rnn.weight_ih_l0.dtype
        return tuple(torch.zeros(batch, self.width, device=device, dtype=dtype) for _ in range(2))

    def _cell(self, gates_in, state):
        h, c = state
        r = self.rnn
        gates = gates_in + torch.addmm(r.bias_hh_l0, h, r.weight_hh_l0.t())
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        hidden = self._hidden(h)
        logits, value = self.readout(hidden)
        return logits, value, hidden, (h, c)

    def sequence(self, obs, state0=None):
        h0, c0 = self.initial_state(obs.shape[1], obs.device) if state0 is None else state0
        hs, _ = self.rnn(obs, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        hidden = self._hidden(hs)
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def with_hidden(self, state, hidden):
        if not self.carries_hidden:
            return super().with_hidden(state, hidden)
        return (hidden, state[1])

    def extra_sites(self, state):
        return {"cell": state[1]}
