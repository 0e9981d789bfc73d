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
(``step_index`` gathers the input gates from W_ih's columns, :meth:`TorchRNNAgent.step_index`), and so does
``sequence_index`` for all steps at once before running the same cell update step by step (the learning pass on
CPU; on CUDA it runs ``nn.GRU``).
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

    def _update(self, gates_in: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h_t from the input's gate pre-activations W_ih x_t + b_ih [B, 3w] and h_{t-1} [B, w]: the reset and update
        gates as one sigmoid over their 2w columns, then h_t = lerp(n_t, h_{t-1}, z_t) = (1 - z)·n + z·h."""
        r = self.rnn
        w = self.width
        hidden_gates = torch.addmm(r.bias_hh_l0, h, r.weight_hh_l0.t())
        reset, update = torch.sigmoid(gates_in[..., :2 * w] + hidden_gates[..., :2 * w]).chunk(2, dim=-1)
        cand = torch.tanh(torch.addcmul(gates_in[..., 2 * w:], reset, hidden_gates[..., 2 * w:]))
        return torch.lerp(cand, h, update)

    def _cell(self, gates_in, state):
        (h,) = state
        h = self._update(gates_in, h)
        hidden = self._hidden(h)
        logits, value = self.readout(hidden)
        return logits, value, hidden, (h,)

    def sequence_index(self, index, state0=None):
        """:meth:`sequence` from observation indices [T, B, 2]: the input gates gathered from W_ih's columns for all
        steps at once, then the steps of :meth:`_update`. ``nn.GRU`` would multiply the two-hot [T·B, 200] inputs by
        W_ih^T forward and backward instead (≈ 33 ms of a ``matched`` `fast` update's 110 ms of learning, session
        23); its per-step gates are the same ops. On CUDA the sequence runs ``nn.GRU`` (cuDNN's fused kernels):
        the steps written out launch ~10 small kernels per step forward and backward, and a `paper` update took
        0.67 s there instead of ≈ 0.2 (H100, session 25)."""
        if index.device.type == "cuda":
            return super().sequence_index(index, state0)
        h = self.initial_state(index.shape[1], index.device)[0] if state0 is None else state0[0]
        steps = []
        for gates_in in self.gather_weights(index, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0).unbind(0):
            h = self._update(gates_in, h)
            steps.append(h)
        hidden = self._hidden(torch.stack(steps))
        logits, value = self.readout(hidden)
        return logits, value, hidden

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
