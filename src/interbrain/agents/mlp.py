"""`mlp`: the frame-stack control, the "common-input floor" (SPEC §3.2, sizes §3.3).

``hidden_t = ReLU(L2(ReLU(L1([x_{t-7}, ..., x_t]))))``: the last 8 observations concatenated oldest first
(1,600-d), zero-padded at episode start. There is no memory beyond the 8-frame window.

- ``std``: Linear(1600→256) + ReLU, Linear(256→256) + ReLU  (476,933 parameters with the heads).
- ``matched``: Linear(1600→64) + ReLU, Linear(64→256) + ReLU  (120,389 parameters).

Init (SPEC §3.2): Kaiming-uniform (ReLU gain) weights, zero biases. SPEC fixes no head init for this
architecture; the heads use :func:`init_heads` (the reproduction's and the `modern` RNN's head init).
The state is ``(frames,)`` with ``frames`` [B, 7, 200] = the previous 7 observations, oldest first.
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import (HIDDEN, N_CELLS, OBS_DIM, Agent, bag_sum, check_size, index_offsets, index_table,
                                    init_heads, register)
from interbrain.agents.linear import Linear
from interbrain.config import AgentConfig

FRAMES = 8
WIDTHS = {"std": 256, "matched": 64}  # width of the first hidden layer
_EMPTY = 2 * N_CELLS + 1  # the zero row standing for a padded frame
_SLOT = (torch.arange(FRAMES) * (2 * N_CELLS + 2))[:, None]  # first row of each slot's table


@register("mlp")
class MLPAgent(Agent):
    carries_hidden = False
    hidden_definition = "2nd hidden layer of the frame-stack MLP, post-ReLU"
    memory_type = "none; last 8 observations"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, WIDTHS)
        width = WIDTHS[config.size]
        self.fc1 = Linear(FRAMES * OBS_DIM, width)
        self.fc2 = Linear(width, HIDDEN)
        for layer in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        init_heads(self)

    def initial_state(self, batch, device="cpu"):
        return (torch.zeros(batch, FRAMES - 1, OBS_DIM, device=device, dtype=self.fc1.weight.dtype),)

    def _hidden(self, stacked: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(stacked))))

    def step(self, obs, state):
        (frames,) = state
        window = torch.cat([frames, obs.unsqueeze(1)], dim=1)  # [B, 8, 200], oldest first
        hidden = self._hidden(window.flatten(1))
        logits, value = self.readout(hidden)
        return logits, value, hidden, (window[:, 1:],)

    def sequence(self, obs, state0=None):
        T, B, _ = obs.shape
        frames = self.initial_state(B, obs.device)[0] if state0 is None else state0[0]
        padded = torch.cat([frames.transpose(0, 1).to(obs.dtype), obs], dim=0)  # [T+7, B, 200]
        windows = padded.unfold(0, FRAMES, 1)  # [T, B, 200, 8]: window t covers padded[t .. t+7]
        stacked = windows.transpose(-1, -2).reshape(T, B, FRAMES * OBS_DIM)
        hidden = self._hidden(stacked)
        logits, value = self.readout(hidden)
        return logits, value, hidden

    # --- observation indices: fc1 over the 8-frame window as one summed gather of 16 rows --------------------------
    def _frame_tables(self) -> torch.Tensor:
        """[8 * 202, w]: per window slot k (oldest first) the :func:`index_table` rows of fc1's slot-k columns plus a
        zero row 201 for the zero-padded frames before the episode start; fc1's bias sits on the newest slot's own-cell
        rows (the newest frame is always a real observation)."""
        w = self.fc1.weight
        tables = []
        for k in range(FRAMES):
            rows = index_table(w[:, k * OBS_DIM:(k + 1) * OBS_DIM], self.fc1.bias if k == FRAMES - 1 else None)
            tables += [rows, rows.new_zeros(1, rows.shape[1])]
        return torch.cat(tables)

    def sequence_index(self, index, state0=None):
        if state0 is not None:  # a carried float frame window: the two-hot path
            return super().sequence_index(index, state0)
        T, B, _ = index.shape
        local = index + index_offsets(index.device)                               # rows within one slot's table
        padded = torch.cat([local.new_full((FRAMES - 1, B, 2), _EMPTY), local])  # [T+7, B, 2]
        windows = padded.unfold(0, FRAMES, 1).transpose(-1, -2)                  # [T, B, 8, 2], oldest first
        rows = windows + _SLOT.to(index.device)
        table = self.cached("frame_tables", (self.fc1.weight, self.fc1.bias), self._frame_tables)
        pre = bag_sum(table, rows.reshape(-1, 2 * FRAMES))
        hidden = torch.relu(self.fc2(torch.relu(pre.view(T, B, -1))))
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def context_limit(self) -> int:
        return FRAMES

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.fc1.weight)
