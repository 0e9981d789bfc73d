"""`minlstm`: two stacked minLSTM layers (Feng et al. 2024, "Were RNNs All We Needed?"; SPEC §3.4).

Layer ℓ (input x = the observation for layer 1, layer 1's h_t for layer 2):
``f_t = σ(W_f x_t + b_f)``, ``i_t = σ(W_i x_t + b_i)``, normalised ``f′_t = f_t / (f_t + i_t)``,
``i′_t = i_t / (f_t + i_t)``; ``h̃_t = W_h x_t + b_h``; ``h_t = f′_t ⊙ h_{t-1} + i′_t ⊙ h̃_t``, ``h_0 = 0``. Gates
ignore h_{t-1}. Since f′ + i′ = 1 this is a minGRU with z = i′ under another gate parameterisation (two gate maps, not one).

- ``hidden`` = layer 2's h_t, as is (no activation; the carried state, ``carries_hidden``). Nothing between layers.
- ``std``: widths 256 / 256; 200→256 and 256→256 maps  (353,029 parameters with the heads; by coincidence = `gru`).
- ``matched``: widths 85 / 256 (the layer-1 width whose count is closest to 118,533); 200→85 and 85→256 maps
  (118,588, +0.05 %).

Init (our choice; mirrors `mingru` and `ssm`): Xavier-uniform candidate maps W_h with zero bias; gate maps W_f, W_i
Xavier gain 0.5 with biases +1 (forget) and -1 (input), so the initial retention f′ ≈ σ(1) / (σ(1) + σ(-1)) = 0.73.
Heads :func:`init_heads`; ``config.init`` is ignored. No recurrent weight (``recurrent_weight_norm`` = 0);
``input_weight_norm`` is the Frobenius norm of layer 1's stacked input maps [W_f; W_i; W_h].

Training: the exact chunked scan of `ssm` on a_t = f′_t, b_t = i′_t ⊙ h̃_t (see `mingru`; no log-space scan, so h̃
needs no positivity). The state is ``(h1, h2)``: [B, width 1] and [B, 256].
"""

from __future__ import annotations

import torch
from torch import nn

from interbrain.agents.base import register
from interbrain.agents.linear import Linear
from interbrain.agents.mingru import InputGatedLayer, StackedMinRNN


class MinLSTMLayer(InputGatedLayer):
    """``h_t = f′_t ⊙ h_{t-1} + i′_t ⊙ h̃_t`` with input-only gates normalised to f′ + i′ = 1."""

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.forget = Linear(d_in, width)
        self.input = Linear(d_in, width)
        self.cand = Linear(d_in, width)
        nn.init.xavier_uniform_(self.cand.weight)
        nn.init.zeros_(self.cand.bias)
        for gate, bias in ((self.forget, 1.0), (self.input, -1.0)):
            nn.init.xavier_uniform_(gate.weight, gain=0.5)
            nn.init.constant_(gate.bias, bias)

    def input_maps(self) -> tuple[nn.Linear, ...]:
        return (self.forget, self.input, self.cand)

    def coefficients_from(self, forget: torch.Tensor, in_gate: torch.Tensor,
                          cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.sigmoid(forget)
        i = torch.sigmoid(in_gate)
        total = f + i
        return f / total, (i / total) * cand


@register("minlstm")
class MinLSTMAgent(StackedMinRNN):
    layer_cls = MinLSTMLayer
    widths = {"std": 256, "matched": 85}
    hidden_definition = "layer-2 minLSTM state h_t (linear, no activation; carried)"
    memory_type = "input-gated linear recurrence (minLSTM, 2 layers)"
