"""`rnn`: the paper's network (official model ``simple_rnn_v2_3_2``), SPEC §3.2.

h_t = ReLU(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh), h_0 = 0; logits = W_a h_t + b_a; value = W_v h_t + b_v.
The state-dict names (``rnn.weight_ih_l0`` ... ``value_head.bias``) match the paper's released weights.
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import HIDDEN, OBS_DIM, Agent, register
from interbrain.config import AgentConfig


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

    def step(self, obs, state):
        (h,) = state
        r = self.rnn
        h = torch.relu(torch.addmm(r.bias_ih_l0 + r.bias_hh_l0, obs, r.weight_ih_l0.t()) + h @ r.weight_hh_l0.t())
        logits, value = self.readout(h)
        return logits, value, h, (h,)

    def sequence(self, obs, state0=None):
        T, B, _ = obs.shape
        h0 = self.initial_state(B, obs.device)[0] if state0 is None else state0[0]
        hidden, _ = self.rnn(obs, h0.unsqueeze(0))
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def with_hidden(self, state, hidden):
        return (hidden,)

    def recurrent_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_hh_l0)

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_ih_l0)
