"""`ssm`: two gated diagonal linear recurrence layers in the style of LRU/Mamba (SPEC §3.2, sizes §3.3).

Layer ℓ: ``u = Linear_in(x)``; ``a = sigmoid(Linear_decay(u))``; ``s_t = a ⊙ s_{t-1} + (1-a) ⊙ u`` with ``s_0 = 0``;
output ``ReLU(Linear_mix(s_t))``. Layer 2's output is ``hidden`` (the state is *not* ``hidden``, so
``carries_hidden`` is False). Gates depend on the input only, which makes each layer close to a minGRU.

- ``std``: width 256; in 200→256 / 256→256, mix 256→256  (381,701 parameters with the heads).
- ``matched``: width 128; in 200→128 / 128→128, layer-1 mix 128→128, layer-2 mix 128→256  (126,085).

Init (SPEC §3.2): Xavier-uniform in and mix maps (zero biases); decay map Xavier gain 0.5 with bias 1, so the
initial decay is ≈ sigmoid(1) = 0.73. Heads: :func:`interbrain.agents.base.init_heads`.

``sequence`` runs an exact chunked scan (:func:`chunked_linear_scan`): no division or logarithm is used, so it
equals the sequential loop up to float reassociation. The state is ``(s1, s2)``, each [B, width].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from interbrain.agents.base import HIDDEN, OBS_DIM, Agent, check_size, init_heads, register
from interbrain.agents.linear import Linear
from interbrain.config import AgentConfig

WIDTHS = {"std": 256, "matched": 128}  # internal width of both layers


def scan_chunk(T: int) -> int:
    """SPEC §3.2: the chunk length is the largest divisor of T that is <= sqrt(T)."""
    return max(c for c in range(1, math.isqrt(T) + 1) if T % c == 0)


def chunked_linear_scan(a: torch.Tensor, b: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """All states of ``s_t = a_t ⊙ s_{t-1} + b_t`` (t = 0..T-1, from ``s0``) for ``a, b`` [T, ...]: the chunked scan
    of :func:`_chunked_scan`; differentiated by :class:`LinearScan` (its gradient written out) when ``a``, ``b`` and
    the states have one shape, else by autograd through the scan."""
    if torch.is_grad_enabled() and a.shape == b.shape and s0.shape == a.shape[1:] and any(
            x.requires_grad for x in (a, b, s0)):
        return LinearScan.apply(a, b, s0)
    return _chunked_scan(a, b, s0)


class LinearScan(torch.autograd.Function):
    """:func:`_chunked_scan` with its gradient written out. The backward of a linear recurrence is the same
    recurrence run backwards in time: with G_t = dL/ds_t from later layers, the total
    ĝ_t = G_t + a_{t+1} ⊙ ĝ_{t+1} (ĝ_{T-1} = G_{T-1}); then dL/db_t = ĝ_t, dL/da_t = ĝ_t ⊙ s_{t-1} and
    dL/ds0 = a_0 ⊙ ĝ_0. The reverse scan is one in-place
    multiply-add per step: on a CPU, [100, 40, 256] in ~1 ms against ~21 ms for autograd's graph of the chunked
    forward (``ssm``, ``mingru`` and ``minlstm`` each run two such scans per agent and update). Checked against
    autograd through the sequential loop in float64 (``tests/test_agents.py``)."""

    @staticmethod
    def forward(ctx, a, b, s0):
        s = _chunked_scan(a, b, s0)
        ctx.save_for_backward(a, s, s0)
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, s, s0 = ctx.saved_tensors
        g = grad.clone(memory_format=torch.contiguous_format)
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        grad_a = grad_s0 = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.empty_like(g)
            torch.mul(g[1:], s[:-1], out=grad_a[1:])
            torch.mul(g[0], s0, out=grad_a[0])
        if ctx.needs_input_grad[2]:
            grad_s0 = a[0] * g[0]
        return grad_a, g if ctx.needs_input_grad[1] else None, grad_s0


def _chunked_scan(a: torch.Tensor, b: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """All states of ``s_t = a_t ⊙ s_{t-1} + b_t`` (t = 0..T-1, from ``s0``) for ``a, b`` [T, ...].

    With chunk C = :func:`scan_chunk` (T) and N = T / C chunks:
    1. inside every chunk, in parallel over chunks, the scan from a zero state (``local``) and the running
       decay product ``P`` (C sequential steps);
    2. the chunk-boundary states, sequentially over chunks: ``S_k = local_k[-1] + P_k[-1] ⊙ S_{k-1}`` (N steps);
    3. ``s = local + P ⊙ S_{k-1}``.
    About 2·sqrt(T) Python steps instead of T; only products and sums, hence exact up to rounding.
    """
    T = a.shape[0]
    C = scan_chunk(T)
    N = T // C
    a = a.reshape(N, C, *a.shape[1:])
    b = b.reshape(N, C, *b.shape[1:])
    # steps and chunks are taken with unbind, not indexing: an indexed slice's backward fills a zero tensor of the
    # whole input for every slice (here [N, C, B, H] per step), unbind's stacks the slices' gradients
    a_steps, b_steps = a.unbind(1), b.unbind(1)
    local = [b_steps[0]]
    for i in range(1, C):
        local.append(a_steps[i] * local[-1] + b_steps[i])
    local_last = local[-1].unbind(0)  # each chunk's state from a zero state
    local = torch.stack(local, dim=1)  # [N, C, ...]
    prod = torch.cumprod(a, dim=1)  # [N, C, ...]: prod_{j<=i} a_j inside the chunk
    prod_last = prod.select(1, C - 1).unbind(0)
    starts = [s0]  # the state entering each chunk
    for k in range(N - 1):
        starts.append(local_last[k] + prod_last[k] * starts[-1])
    starts = torch.stack(starts, dim=0).unsqueeze(1)  # [N, 1, ...]
    return (local + prod * starts).reshape(T, *a.shape[2:])


class GatedDiagonalLayer(nn.Module):
    """One input-gated diagonal linear recurrence with a nonlinear mix (SPEC §3.2)."""

    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.inp = Linear(d_in, width)
        self.decay = Linear(width, width)
        self.mix = Linear(width, d_out)
        for layer in (self.inp, self.mix):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.decay.weight, gain=0.5)
        nn.init.ones_(self.decay.bias)

    def _gates(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sigmoid(self.decay(u))
        return a, (1.0 - a) * u

    def step(self, x: torch.Tensor, s: torch.Tensor, *, u: torch.Tensor | None = None):
        """One step from input ``x``, or from its projection ``u = inp(x)`` when given (the index-gather path)."""
        a, b = self._gates(self.inp(x) if u is None else u)
        s = a * s + b
        return torch.relu(self.mix(s)), s

    def sequence(self, x: torch.Tensor, s0: torch.Tensor, *, u: torch.Tensor | None = None):
        a, b = self._gates(self.inp(x) if u is None else u)
        s = chunked_linear_scan(a, b, s0)
        return torch.relu(self.mix(s)), s[-1]


@register("ssm")
class SSMAgent(Agent):
    carries_hidden = False
    hidden_definition = "layer-2 mix output, post-ReLU (not the recurrent state)"
    memory_type = "gated diagonal linear recurrence (2 layers)"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, WIDTHS)
        self.width = WIDTHS[config.size]
        self.layer1 = GatedDiagonalLayer(OBS_DIM, self.width, self.width)
        self.layer2 = GatedDiagonalLayer(self.width, self.width, HIDDEN)
        init_heads(self)

    def initial_state(self, batch, device="cpu"):
        dtype = self.layer1.inp.weight.dtype
        return tuple(torch.zeros(batch, self.width, device=device, dtype=dtype) for _ in range(2))

    def step(self, obs, state, *, u1: torch.Tensor | None = None):
        s1, s2 = state
        y1, s1 = self.layer1.step(obs, s1, u=u1)
        hidden, s2 = self.layer2.step(y1, s2)
        logits, value = self.readout(hidden)
        return logits, value, hidden, (s1, s2)

    def sequence(self, obs, state0=None, *, u1: torch.Tensor | None = None):
        B = (obs if u1 is None else u1).shape[1]
        device = (obs if u1 is None else u1).device
        s1, s2 = self.initial_state(B, device) if state0 is None else state0
        y1, _ = self.layer1.sequence(obs, s1, u=u1)
        hidden, _ = self.layer2.sequence(y1, s2)
        logits, value = self.readout(hidden)
        return logits, value, hidden

    # --- observation indices: layer 1's input projection as a gather of two rows -----------------------
    def step_index(self, index, state):
        return self.step(None, state, u1=self.gather_linear(index, self.layer1.inp))

    def sequence_index(self, index, state0=None):
        return self.sequence(None, state0, u1=self.gather_linear(index, self.layer1.inp))

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.layer1.inp.weight)
