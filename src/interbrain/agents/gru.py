"""`gru`: a single-layer GRU, ``nn.GRU(200, w)`` (SPEC §3.4), the state-dependent-gating contrast to `mingru`.

PyTorch's GRU (gate order r, z, n in ``weight_ih_l0`` / ``weight_hh_l0``):
``r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)``, ``z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)``,
``n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))``, ``h_t = (1 - z_t) ⊙ n_t + z_t ⊙ h_{t-1}``, ``h_0 = 0``.

- ``std``: w = 256, ``hidden`` = h_t, the carried state (``carries_hidden``)  (353,029 parameters with the heads).
  State-dict names are nn.GRU's: ``rnn.weight_ih_l0`` [768, 200], ``rnn.weight_hh_l0`` [768, 256], ``rnn.bias_*_l0``.
- ``matched``: w = 101 (the width whose count is closest to the RNN's 118,533), ``hidden`` = ReLU(Linear(101→256)(h_t));
  ``hidden`` is then not the state, so ``carries_hidden`` is False  (119,206 parameters, +0.6 %).

Init: PyTorch's GRU default, U(-1/√w, 1/√w) for every weight and bias (``config.init`` is ignored, as for mlp/ssm/
transformer); the matched projection is Kaiming-uniform (ReLU) with zero bias; heads :func:`init_heads`.

Recurrent L2 (SPEC §3.4 "L2 option on ``weight_hh_l0``"): :meth:`recurrent_weight_norm` is ‖W_hh‖_F over all three
gate blocks, so the preset's ``recurrent_l2`` acts on it (set it to 0 to train without). ``input_weight_norm`` is
‖W_ih‖_F. ``sequence`` runs ``nn.GRU`` (MKL/cuDNN); ``step`` writes out one cell update with the same weights
(``step_index`` gathers the input gates from W_ih's columns, :meth:`TorchRNNAgent.step_index`).
The state is ``(h,)`` with ``h`` [B, w].
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import HIDDEN, OBS_DIM, TorchRNNAgent, check_size, init_heads, register
from interbrain.config import AgentConfig

WIDTHS = {"std": HIDDEN, "matched": 101}  # GRU state width


@register("gru")
class GRUAgent(TorchRNNAgent):
    memory_type = "gated nonlinear recurrence (GRU, state-dependent gates)"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, WIDTHS)
        self.width = WIDTHS[config.size]
        self.rnn = nn.GRU(input_size=OBS_DIM, hidden_size=self.width, num_layers=1)
        self._build_projection()
        if self.carries_hidden:
            self.hidden_definition = "GRU state h_t (tanh-bounded, carried)"
        else:
            self.hidden_definition = (f"ReLU(Linear({self.width}→256)(h_t)), h_t the {self.width}-d GRU state "
                                      "(not carried)")
        init_heads(self)

    def initial_state(self, batch, device="cpu"):
        return (torch.zeros(batch, self.width, device=device, dtype=self.rnn.weight_ih_l0.dtype),)

    def _cell(self, gates_in, state):
        (h,) = state
        r = self.rnn
        i_r, i_z, i_n = gates_in.chunk(3, dim=-1)
        h_r, h_z, h_n = torch.addmm(r.bias_hh_l0, h, r.weight_hh_l0.t()).chunk(3, dim=-1)
        reset = torch.sigmoid(i_r + h_r)
        update = torch.sigmoid(i_z + h_z)
        cand = torch.tanh(i_n + reset * h_n)
        h = (1.0 - update) * cand + update * h
        hidden = self._hidden(h)
        logits, value = self.readout(hidden)
        return logits, value, hidden, (h,)

    def sequence(self, obs, state0=None):
        h0 = self.initial_state(obs.shape[1], obs.device)[0] if state0 is None else state0[0]
        hs, _ = self.rnn(obs, h0.unsqueeze(0).contiguous())
        hidden = self._hidden(hs)
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def with_hidden(self, state, hidden):
        if not self.carries_hidden:
            return super().with_hidden(state, hidden)
        return (hidden,)
