"""`mingru`: two stacked minGRU layers (Feng et al. 2024, "Were RNNs All We Needed?"; SPEC §3.4).

Layer ℓ (input x = the observation for layer 1, layer 1's h_t for layer 2):
``z_t = σ(W_z x_t + b_z)``, ``h̃_t = W_h x_t + b_h``, ``h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t``, ``h_0 = 0``.
The gates ignore h_{t-1} (contrast with `gru`, which isolates state-dependent gating); the recurrence is linear in h,
so layer 2's gate, which reads layer 1's state, is the only path by which the past shapes a gate.

- ``hidden`` = layer 2's h_t, as is: no activation and no mix, so it is the carried state (``carries_hidden``;
  ``with_hidden`` replaces layer 2's state). Nothing sits between the layers (no norm, residual or MLP).
- ``std``: widths 256 / 256; 200→256 and 256→256 maps  (235,781 parameters with the heads).
- ``matched``: widths 128 / 256 (the layer-1 width whose count is closest to 118,533; the `ssm` matched width);
  200→128 and 128→256 maps  (118,789, +0.2 %).

Init (our choice; the layer mirrors `ssm`): Xavier-uniform candidate maps W_h with zero bias; gate maps W_z Xavier
gain 0.5 with bias -1, so the initial retention 1 - z ≈ 1 - sigmoid(-1) = 0.73, the `ssm` decay. Heads
:func:`init_heads`; ``config.init`` is ignored. There is no recurrent weight (``recurrent_weight_norm`` = 0);
``input_weight_norm`` is the Frobenius norm of layer 1's stacked input maps [W_z; W_h].

Training: SPEC names the log-space scan of the paper, which needs positive candidates (its g(·) activation). We keep
h̃ = W_h x + b as specified and run the exact chunked scan of `ssm` (:func:`chunked_linear_scan`, products and sums
only) on a_t = 1 - z_t, b_t = z_t ⊙ h̃_t: it equals the sequential ``step`` up to float reassociation.
The state is ``(h1, h2)``: [B, width 1] and [B, 256].
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import HIDDEN, OBS_DIM, Agent, check_size, gather_index, index_table, init_heads, register
from interbrain.agents.linear import Linear, linear
from interbrain.agents.ssm import chunked_linear_scan
from interbrain.config import AgentConfig


class InputGatedLayer(nn.Module):
    """A layer ``h_t = a_t ⊙ h_{t-1} + b_t`` whose coefficients depend on the input only, through the Linear maps of
    :meth:`input_maps` (:meth:`coefficients_from` turns their outputs into (a, b)); shared by `mingru` and `minlstm`."""

    def input_maps(self) -> tuple[nn.Linear, ...]:
        raise NotImplementedError

    def coefficients_from(self, *pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def input_weight(self) -> torch.Tensor:
        return torch.cat([m.weight for m in self.input_maps()])

    def coefficients(self, x: torch.Tensor, pre: tuple[torch.Tensor, ...] | None = None):
        """(a, b) from the input ``x``, or from the input maps' outputs ``pre`` when given (the index-gather path)."""
        return self.coefficients_from(*(pre if pre is not None else [m(x) for m in self.input_maps()]))

    def step(self, x: torch.Tensor, h: torch.Tensor, pre: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        a, b = self.coefficients(x, pre)
        return a * h + b

    def sequence(self, x: torch.Tensor, h0: torch.Tensor, pre: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        a, b = self.coefficients(x, pre)
        return chunked_linear_scan(a, b, h0)


class MinGRULayer(InputGatedLayer):
    """``h_t = (1 - z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t`` with ``z_t = σ(W_z x_t + b_z)``, ``h̃_t = W_h x_t + b_h``."""

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.gate = Linear(d_in, width)
        self.cand = Linear(d_in, width)
        nn.init.xavier_uniform_(self.cand.weight)
        nn.init.zeros_(self.cand.bias)
        nn.init.xavier_uniform_(self.gate.weight, gain=0.5)
        nn.init.constant_(self.gate.bias, -1.0)

    def input_maps(self) -> tuple[nn.Linear, ...]:
        return (self.gate, self.cand)

    def coefficients_from(self, gate: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.sigmoid(gate)
        return 1.0 - z, z * cand


class StackedMinRNN(Agent):
    """Two input-gated linear recurrence layers (``layer_cls``), layer 2 of width 256; ``hidden`` = layer 2's h_t."""

    layer_cls: type[InputGatedLayer] = MinGRULayer
    widths: dict[str, int] = {}  # size -> layer-1 width
    carries_hidden = True

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, self.widths)
        self.width = self.widths[config.size]
        self.layer1 = self.layer_cls(OBS_DIM, self.width)
        self.layer2 = self.layer_cls(self.width, HIDDEN)
        init_heads(self)

    def initial_state(self, batch, device="cpu"):
        dtype = self.layer1.cand.weight.dtype
        return (torch.zeros(batch, self.width, device=device, dtype=dtype),
                torch.zeros(batch, HIDDEN, device=device, dtype=dtype))

    def step(self, obs, state, *, pre: tuple[torch.Tensor, ...] | None = None):
        """One step from ``obs``, or from layer 1's input-map outputs ``pre`` when given (index path)."""
        h1, h2 = state
        h1 = self.layer1.step(obs, h1, pre)
        h2 = self.layer2.step(h1, h2, self._layer2_pre(h1))
        logits, value = self.readout(h2)
        return logits, value, h2, (h1, h2)

    def sequence(self, obs, state0=None, *, pre: tuple[torch.Tensor, ...] | None = None):
        first = obs if pre is None else pre[0]
        h1, h2 = self.initial_state(first.shape[1], first.device) if state0 is None else state0
        seq1 = self.layer1.sequence(obs, h1, pre)
        hidden = self.layer2.sequence(seq1, h2, self._layer2_pre(seq1))
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def _layer2_pre(self, h1: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer 2's input maps of layer 1's states as one product with their stacked weights (cached while acting):
        one kernel, and one autograd node, instead of one per map."""
        maps = self.layer2.input_maps()
        params = tuple(p for m in maps for p in (m.weight, m.bias))
        weight, bias = self.cached("layer2_maps", params, lambda: (torch.cat([m.weight for m in maps]),
                                                                    torch.cat([m.bias for m in maps])))
        return linear(h1, weight, bias).split(HIDDEN, -1)

    # --- observation indices: layer 1's input maps as one gather of two rows of their joint table --------------
    def _layer1_pre(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self.layer1.input_maps()
        params = tuple(p for m in maps for p in (m.weight, m.bias))
        table = self.cached("input_table", params, lambda: torch.cat([index_table(m.weight, m.bias) for m in maps], 1))
        return gather_index(index, table).split(self.width, -1)

    def step_index(self, index, state):
        return self.step(None, state, pre=self._layer1_pre(index))

    def sequence_index(self, index, state0=None):
        return self.sequence(None, state0, pre=self._layer1_pre(index))

    def with_hidden(self, state, hidden):
        return (state[0], hidden)

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.layer1.input_weight())


@register("mingru")
class MinGRUAgent(StackedMinRNN):
    layer_cls = MinGRULayer
    widths = {"std": 256, "matched": 128}
    hidden_definition = "layer-2 minGRU state h_t (linear, no activation; carried)"
    memory_type = "input-gated linear recurrence (minGRU, 2 layers)"
