"""`disrnn`: a disentangled RNN (SPEC §3.4), ported from disRNN.

Design from Miller, Eckstein, Botvinick & Kurth-Nelson, "Cognitive model discovery via disentangled RNNs", NeurIPS 2023,
and its reference implementation google-deepmind/disentangled_rnns (``library/disrnn.py``, Copyright DeepMind
Technologies Limited, Apache License 2.0). This is a PyTorch re-implementation of that design, not a copy of its code.

Dynamics, per step, with observation x_t (200-d), carried latents z_{t-1} (L = 10 values) and, for each latent i, its
own update network (a residual MLP, :data:`LAYERS` = 2 hidden layers of ``n`` units, leaky ReLU as in disRNN):

- inputs through Gaussian bottlenecks, one per (input, net): ``a_{j,i} = m_{j,i} x_j + σ_{j,i} ε`` for the 200
  observation inputs and ``b_{j,i} = m'_{j,i} z_{t-1,j} + σ'_{j,i} ε`` for the L latent inputs (multipliers ``m``
  start at 1, as in disRNN);
- ``s = W_in,i [a_{·,i}; b_{·,i}] + c_i``; twice ``s += leaky_relu(W_ℓ,i s + c_ℓ,i)``; ``(g, v) = W_out,i s + c_out,i``;
- gate ``w = sigmoid(g)``, target ``u = 2·tanh(v/2)``, ``μ_i = (1 − w)·z_{t-1,i} + w·u``;
- latent bottleneck ``z_{t,i} = μ_i + σ''_i ε`` (the carried latent); ``hidden = ReLU(Linear(L→256)(z_t))``.

Every σ = |p| + 1e-5 with p ~ U(0, 0.05) at init, so the bottlenecks start open. The input bottlenecks reach net i
only through its first layer, as Σ_j ε_j σ_{j,i} W_i[j], a Gaussian with covariance Σ_j σ_{j,i}² W_i[j] W_i[j]^T; it is
drawn as n normals times a factor of that covariance (:func:`noise_factor`), the same distribution as 200 + L draws
(the same model and expected gradient; 5.5x fewer draws and products for ``matched``). The noise (ε ~ N(0, 1) from the
global torch RNG, which the trainer seeds and checkpoints) is on only while ``self.training`` and after the warm-up:
``set_progress(update)`` with ``update > config.bottleneck_warmup``. Then ``sequence`` also records the penalty
``β·KL`` (β = ``config.bottleneck_beta``), KL = Σ over all bottlenecks of KL(N(μ, σ²) ‖ N(0, 1)) =
½ Σ (μ² + σ² − 1 − log σ²), per step, averaged over the T × B steps of the call; :meth:`aux_loss` returns it (0 during
the warm-up and in eval mode). Eval mode (``.eval()``, as every analysis loads checkpoints) is noiseless and
deterministic. In training mode after the warm-up the rollouts' ``step`` calls are noisy too: the behaviour policy
is the noisy network being trained (their draws differ from those of the loss's ``sequence`` pass).

The recurrence runs in :func:`latent_recurrence`; under autograd its gradient is written out
(:class:`LatentRecurrence`), and on CPU in float32 it runs as numpy calls where
:func:`~interbrain.agents.linear.small_backend` says ``numpy`` (issue 6): its per-step products, [L, B, n] x [L, n, n]
(10 nets, 40 episodes, n = 38 for ``matched``), take ~15 µs on numpy's OpenBLAS against ~22 µs as torch's batched
product (MKL) on the development machine (AMD EPYC, Zen 4), and numpy's elementwise calls on such small arrays cost
less per call than torch's. Fixed per process, so fixed seeds stay deterministic; the two backends agree to float
rounding (``tests/test_disrnn_tok.py``). On that path a training rollout steps both agents as one :class:`DisRNNActing`
(:meth:`DisRNNAgent.pair_with`), the same bits as their own acting steps.

Parameters (L = 10): update nets ``obs_weight`` [L,200,n], ``latent_weight`` [L,L,n], ``in_bias`` [L,n],
``layer_weight`` [2,L,n,n], ``layer_bias`` [2,L,n], ``out_weight`` [L,n,2] (column 0 gate, 1 target), ``out_bias``
[L,2]; bottlenecks ``obs_sigma_param``/``obs_multiplier`` [200,L], ``latent_in_sigma_param``/``latent_in_multiplier``
[L,L] (input j, net i), ``latent_sigma_param`` [L]; ``latent_init`` [L]; ``hidden_proj`` Linear(L→256); the heads.

- ``std`` (disRNN defaults, n = 10): 31,841 parameters with the heads.
- ``matched`` (update nets widened to n = 38, L = 10 kept): 118,921 (+0.3 % of the RNN's 118,533).

Init as in disRNN's ResMLP: input weights N(0, 1/(200+L)), hidden N(0, 1/(n·layers)), output N(0, 1/n) (variances),
zero biases; ``latent_init`` ~ U(−0.1, 0.1). Our choices where SPEC is silent: ``hidden_proj`` Kaiming-uniform (ReLU),
zero bias; heads :func:`interbrain.agents.base.init_heads`. Left out of disRNN: the choice network and its
bottleneck (``hidden`` and the heads take its place) and the L2 penalty on the update nets' hidden weights.

``recurrent_weight_norm`` is 0: there is no single recurrent matrix (the recurrence runs through each update net's
latent inputs and the gated update), so the PPO recurrent L2 does not apply; the bottleneck KL is this model's
regulariser. ``input_weight_norm`` is ‖obs_weight‖_F. The state is ``(z,)`` with ``z`` [B, L] the carried latents;
``extra_sites`` records them as ``latents``. ``hidden`` is not carried (``carries_hidden`` False).
:func:`bottleneck_summary` reports the learned σ, SPEC §6.7's open/partial/closed counts and optional per-latent KLs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit
from scipy.special import expit
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from interbrain.agents.base import (HIDDEN, N_ACTIONS, N_CELLS, OBS_DIM, Agent, check_size, gather_index, init_heads,
                                    param_key, register, stacked_row_offsets)
from interbrain.agents.linear import Linear, small_products_on_numpy
from interbrain.config import AgentConfig

LATENTS = 10
LAYERS = 2
WIDTHS = {"std": 10, "matched": 38}  # units per update-net layer
MAX_LATENT = 2.0  # u = MAX_LATENT·tanh(v / MAX_LATENT)
MIN_SIGMA = 1e-5
LEAK = 0.01  # leaky ReLU slope (disRNN, F.leaky_relu's default)
OPEN, PARTIAL, CLOSED = 0.1, 0.25, 0.9  # SPEC §6.7 (disRNN's log_bottlenecks thresholds)


def reparameterize_sigma(param: torch.Tensor) -> torch.Tensor:
    """σ = |p| + 1e-5 (disRNN)."""
    return param.abs() + MIN_SIGMA


def noise_factor(scaled: torch.Tensor) -> torch.Tensor:
    """Upper-triangular R [..., n, n] with R^T R = scaled^T scaled for scaled [..., k, n] (k = 200 + L bottlenecked inputs,
    rows σ_j W[j]): ε [k] @ scaled, the input bottlenecks' noise after an update net's first layer, and ε' [n] @ R are
    the same Gaussian, N(0, scaled^T scaled), so the noise is drawn as n normals instead of k (the local
    reparameterisation of Kingma, Salimans & Welling 2015, with the full covariance since the n pre-activations share
    the k noises). The expected loss and therefore the expected gradient are unchanged; each sample's pathwise
    gradient reaches σ and W through R (a Cholesky factor, computed in float64; a jitter of 1e-12 of the mean
    variance, 1e-300 at least, keeps it defined for a singular covariance, e.g. zero weights: a variance change far
    below float32 resolution)."""
    x = scaled.double()
    cov = x.transpose(-1, -2) @ x
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    jitter = 1e-12 * cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-288)
    # cholesky_ex: no host sync for the error flag (on CUDA); with the jitter it fails only on non-finite weights,
    # which the trainer's health check reports
    return torch.linalg.cholesky_ex(cov + jitter[..., None, None] * eye).L.transpose(-1, -2).to(scaled.dtype)


def kl_constant(sigma: torch.Tensor) -> torch.Tensor:
    """Σ (σ² − 1 − log σ²) over a bottleneck's entries: the mean-independent part of 2·KL(N(μ, σ²) ‖ N(0, 1))."""
    var = sigma.square()
    return (var - 1.0 - var.log()).sum()


def _array(x, contiguous: bool = False) -> np.ndarray:
    """A numpy view of a CPU tensor (contiguous if asked), or the array itself."""
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x) if contiguous else x
    return (x.detach().contiguous() if contiguous else x.detach()).numpy()


def _latent_steps(drive, z, noise, latent_table, layers, out_bias, out_weight, record=None):
    """The update nets' T steps in torch (see :func:`latent_recurrence`); with ``record`` (a dict) it also keeps
    what the gradient needs (:func:`_record_buffers`)."""
    T, L, B, n = drive.shape
    zs = drive.new_empty(T, B, L)
    means = zs if noise is None else drive.new_empty(T, B, L)
    for t in range(T):
        s = drive[t] + (z @ latent_table).view(B, L, n).transpose(0, 1)  # [L, B, n]
        for k, (bias, weight) in enumerate(layers):
            a = torch.baddbmm(bias, s, weight)
            if record is not None:
                record["s"][k][t], record["a"][k][t] = s, a
            s = s + F.leaky_relu(a, LEAK)
        if record is not None:
            record["s"][-1][t] = s
        gate, target = torch.baddbmm(out_bias, s, out_weight).unbind(-1)  # each [L, B]; target = v / MAX_LATENT
        w = torch.sigmoid(gate).t()
        u = MAX_LATENT * torch.tanh(target.t())
        if record is not None:
            record["w"][t], record["u"][t] = w, u
        mean = torch.lerp(z, u, w)  # (1 - w)·z + w·u
        if noise is None:
            zs[t] = z = mean
        else:
            means[t] = mean
            z = torch.add(mean, noise[t], out=zs[t])
    return zs, means


def _latent_steps_numpy(drive, z, noise, latent_table, layers, out_bias, out_weight, record=None):
    """:func:`_latent_steps` as numpy calls on the tensors' memory (CPU; :func:`small_products_on_numpy`); takes tensors
    or arrays."""
    T, L, B, n = drive.shape
    d, nz, z = _array(drive), None if noise is None else _array(noise), _array(z)
    table = _array(latent_table, contiguous=True)
    layers = [(_array(b), _array(w, contiguous=True)) for b, w in layers]
    out_b, out_w = _array(out_bias), _array(out_weight, contiguous=True)
    zs = np.empty((T, B, L), d.dtype)
    means = zs if nz is None else np.empty((T, B, L), d.dtype)
    # over many steps a contiguous add beats a broadcast one
    layers = [(np.broadcast_to(b, (L, B, n)).copy() if T > 1 else b, w) for b, w in layers]
    for t in range(T):
        s = np.add(d[t], np.matmul(z, table).reshape(B, L, n).transpose(1, 0, 2),
                   out=None if record is None else record["s"][0][t])
        _update_nets(s, z[None], layers, out_b, out_w, means[t][None], record, t)
        if nz is not None:
            np.add(means[t], nz[t], out=zs[t])
        z = zs[t]
    return torch.from_numpy(zs), torch.from_numpy(means)


NO_SLOPES = np.empty((0, 0, 0), np.float32)  # leaky_residual without the derivative's record


@njit(cache=True, boundscheck=False)
def leaky_residual(s, a, bias, slopes, out):
    """One hidden layer of the update nets after its product ``a`` = s W ([nets, B, n]): a + bias (bias [nets, 1 or B,
    n]), then out = s + leaky_relu(a + bias); with ``slopes`` [nets, B, n] (not empty) the leaky ReLU's derivative
    there too, 1 or LEAK (NaN where a + bias is NaN). One pass, where the numpy form took six calls (``+=``, ``sign``,
    ``maximum``, a product by LEAK, ``maximum``, ``add``: ≈ 25 µs a layer and step for a ``matched`` agent); the same
    values, element by element."""
    leak = a.dtype.type(LEAK)
    one = a.dtype.type(1.0)
    keep = slopes.shape[0] > 0
    per_row = bias.shape[1] > 1
    for i in range(s.shape[0]):
        for b in range(s.shape[1]):
            c = bias[i, b] if per_row else bias[i, 0]
            for j in range(s.shape[2]):
                x = a[i, b, j] + c[j]
                y = leak * x
                out[i, b, j] = s[i, b, j] + (x if x >= y else y)
                if keep:
                    slopes[i, b, j] = one if x > 0 else (x if x != x else leak)


def _update_nets(s, z, layers, out_bias, out_weight, mean_out, record=None, t=None):
    """One step of E agents' update nets as numpy calls (the body of :func:`_latent_steps`): ``s`` [E·L, B, n] the
    first pre-activations' inputs (observation drive plus latent product), nets stacked latent-major (net l of agent e
    at row l·E + e), ``z`` [E, B, L] the latents before the step, ``layers`` [(bias, weight [E·L, n, n])] and the
    output layer likewise; writes the noiseless update (1 - w)·z + w·u into ``mean_out`` [E, B, L]. With ``record``
    (E = 1: :func:`_latent_steps_numpy`'s buffers) it writes step ``t``'s later layer inputs, the leaky ReLU's
    derivative and the gate and target into them."""
    E, B, L = z.shape
    for k, (bias, weight) in enumerate(layers):
        a = np.matmul(s, weight)
        out = np.empty_like(s) if record is None else record["s"][k + 1][t]
        leaky_residual(s, a, bias, NO_SLOPES if record is None else record["a"][k][t], out)
        s = out
    o = np.matmul(s, out_weight)
    o += out_bias
    o = o.reshape(L, E, B, 2)
    w = expit(o[..., 0].transpose(1, 2, 0), out=None if record is None else record["w"][t][None])  # [E, B, L]
    u = np.tanh(o[..., 1].transpose(1, 2, 0), out=None if record is None else record["u"][t][None])
    u *= MAX_LATENT
    mean = np.subtract(u, z, out=mean_out)
    mean *= w
    mean += z


class NoiseProduct(torch.autograd.Function):
    """``eps @ factor`` for the input noise's normals ``eps`` [L, R, n] (no gradient) and the factors [L, n, n], as
    numpy products (:func:`small_products_on_numpy`): for a ``matched`` learning pass (R = 4,000 rows) OpenBLAS takes ~1
    ms forward and ~2.3 ms for the factor's gradient, MKL (``torch.bmm``) ~2.7 and ~3.2 on the development machine."""

    @staticmethod
    def forward(ctx, eps, factor):
        ctx.save_for_backward(eps)
        return torch.from_numpy(np.matmul(eps.numpy(), factor.detach().numpy()))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (eps,) = ctx.saved_tensors
        return None, torch.from_numpy(np.matmul(eps.numpy().transpose(0, 2, 1), grad.numpy()))


def _record_buffers(drive: torch.Tensor, layers: int) -> dict:
    """What :class:`LatentRecurrence`'s gradient needs from the forward, for a drive [T, L, B, n]: every layer's input
    ``s`` (``layers`` + 1, the last the output layer's) and pre-activation ``a`` ([T, L, B, n] each), the gates ``w``
    and targets ``u`` ([T, B, L])."""
    T, L, B, n = drive.shape
    if small_products_on_numpy(drive):
        dtype = torch.empty((), dtype=drive.dtype).numpy().dtype
        new = lambda *shape: np.empty(shape, dtype)  # noqa: E731
    else:
        new = lambda *shape: drive.new_empty(shape)  # noqa: E731
    return {"s": [new(T, L, B, n) for _ in range(layers + 1)], "a": [new(T, L, B, n) for _ in range(layers)],
            "w": new(T, B, L), "u": new(T, B, L)}


def latent_recurrence(drive, z0, noise, latent_table, layers, out):
    """The carried latents z_t and the pre-noise means μ_t [T, B, L] of the update nets' recurrence, from the drive
    [T, L, B, n] (observation terms, input bias and input noise), the initial latents ``z0`` [B, L], the latent noise
    [T, B, L] or None and :meth:`DisRNNAgent._recurrent_weights`. Differentiated by :class:`LatentRecurrence` (the
    gradient written out) under autograd, else run plainly; as numpy calls where :func:`small_products_on_numpy`."""
    layer_params = [p for layer in layers for p in layer]
    tensors = (drive, z0, noise, latent_table, *out, *layer_params)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        return LatentRecurrence.apply(*tensors)
    steps = _latent_steps_numpy if small_products_on_numpy(drive) else _latent_steps
    return steps(drive, z0, noise, latent_table, layers, *out)


class LatentRecurrence(torch.autograd.Function):
    """:func:`latent_recurrence` with its gradient written out, without autograd's graph of ~15 nodes per step: the
    forward records every layer's input, the leaky ReLU's pre-activation (torch) or derivative (numpy), the gates and
    targets; the backward runs the steps in reverse (per step: the output layer's and each hidden layer's input gradient
    and the latent table's product back to z_{t-1}); the gates' elementwise factors are computed for all steps at once;
    the weights' gradients come after the loop as one product per layer over all T·B rows (torch) or are summed step by
    step on rows still in cache (numpy). Inputs: drive, z0, noise (or None), latent_table, out bias, out weight, then
    each layer's bias and weight. As numpy calls where :func:`small_products_on_numpy`. Checked against autograd through
    the plain loop in float64, for both (``tests/test_disrnn_tok.py``). On the development machine (``matched``, 100
    steps x 40 episodes, one core) forward and backward take ~30 ms on numpy against ~50 ms for autograd through the
    loop."""

    @staticmethod
    def forward(ctx, drive, z0, noise, latent_table, out_bias, out_weight, *layer_params):
        layers = list(zip(layer_params[0::2], layer_params[1::2]))
        record = _record_buffers(drive, len(layers))
        numpy = small_products_on_numpy(drive)
        steps = _latent_steps_numpy if numpy else _latent_steps
        zs, means = steps(drive, z0, noise, latent_table, layers, out_bias, out_weight, record)
        if means is zs:  # noiseless: two outputs of one tensor would alias
            means = zs.clone()
        ctx.record, ctx.numpy, ctx.noisy = record, numpy, noise is not None
        ctx.save_for_backward(z0, zs, latent_table, out_weight, *layer_params[1::2])
        return zs, means

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_zs, grad_means):
        z0, zs, latent_table, out_weight, *weights = ctx.saved_tensors
        record = ctx.record  # only read: a second backward (retain_graph) gets the same gradient
        if grad_zs is None:
            grad_zs = torch.zeros_like(zs)
        prev = torch.cat([z0.unsqueeze(0), zs[:-1]])  # z_{t-1} [T, B, L]
        args = (grad_zs, grad_means, prev, latent_table, out_weight, weights, record, ctx.noisy)
        return (_latent_backward_numpy if ctx.numpy else _latent_backward)(*args)


def _latent_backward(grad_zs, grad_means, prev, latent_table, out_weight, weights, record, noisy):
    """:class:`LatentRecurrence`'s gradient in torch: (drive, z0, noise, latent_table, out bias, out weight, then each
    layer's bias and weight)."""
    S, A, w, u = record["s"], record["a"], record["w"], record["u"]
    K = len(weights)
    T, L, B, n = S[0].shape
    # μ = z_{t-1} + w·(u − z_{t-1}) with w = sigmoid(gate), u = MAX·tanh(target): per unit of dL/dμ, the gate's
    # and the target's pre-activation gradients, for all steps at once
    d_out = torch.stack([(u - prev) * w * (1 - w), w * (MAX_LATENT - u.square() / MAX_LATENT)], -1)  # [T, B, L, 2]
    keep = 1 - w  # dμ/dz_{t-1}
    out_t = out_weight.transpose(1, 2).contiguous()
    weights_t = [x.transpose(1, 2) for x in weights]
    table_t = latent_table.t()
    grad_noise = torch.empty_like(prev) if noisy else None
    grad_drive = S[0].new_empty(T, B, L, n)  # dL/ds_0 per step, as [B, L, n] rows for the latent table's product
    G = [S[0].new_empty(T, L, B, n) for _ in range(K)]  # dL/da per layer
    carry = torch.zeros_like(prev[0])  # dL/dz_t through step t+1
    for t in range(T - 1, -1, -1):
        dz = grad_zs[t] + carry
        if grad_noise is not None:
            grad_noise[t] = dz
        dmean = dz if grad_means is None else dz + grad_means[t]
        d_out[t].mul_(dmean.unsqueeze(-1))  # [B, L, 2]: dL/d(gate, target)
        ds = torch.bmm(d_out[t].transpose(0, 1), out_t)  # [L, B, n]
        for k in range(K - 1, -1, -1):
            g = torch.ops.aten.leaky_relu_backward(ds, A[k][t], LEAK, False)
            G[k][t] = g
            ds = torch.baddbmm(ds, g, weights_t[k])
        grad_drive[t] = ds.transpose(0, 1)
        carry = torch.addmm(dmean * keep[t], grad_drive[t].view(B, L * n), table_t)
    rows = lambda x: x.transpose(0, 1).reshape(L, T * B, x.shape[-1])  # noqa: E731  [T,L,B,m] -> [L,T·B,m]
    grads_layers = []
    for k in range(K):
        g = rows(G[k])
        grads_layers += [g.sum(1, keepdim=True), torch.bmm(rows(S[k]).transpose(1, 2), g)]
    d_out_rows = d_out.permute(2, 0, 1, 3).reshape(L, T * B, 2)
    grad_table = prev.reshape(T * B, L).t() @ grad_drive.view(T * B, L * n)
    return (grad_drive.transpose(1, 2), carry, grad_noise, grad_table, d_out_rows.sum(1, keepdim=True),
            torch.bmm(rows(S[K]).transpose(1, 2), d_out_rows), *grads_layers)


def _latent_backward_numpy(grad_zs, grad_means, prev, latent_table, out_weight, weights, record, noisy):
    """:func:`_latent_backward` as numpy calls (:func:`small_products_on_numpy`), with the weights' gradients summed
    step by step inside the loop ([L, n, B] x [L, B, n] products on the step's rows, which are still in cache: numpy's
    strided passes over all T·B rows cost more than the products)."""
    S, slopes, w, u = record["s"], record["a"], record["w"], record["u"]  # "a": the leaky ReLU's derivative
    K = len(weights)
    T, L, B, n = S[0].shape
    gz = grad_zs.numpy()
    gm = None if grad_means is None else grad_means.numpy()
    prev = prev.numpy()
    d_out = np.stack([(u - prev) * w * (1 - w), w * (MAX_LATENT - u * u / MAX_LATENT)], -1)  # [T, B, L, 2]
    keep = 1 - w
    out_t = np.ascontiguousarray(out_weight.numpy().transpose(0, 2, 1))
    weights_t = [np.ascontiguousarray(x.numpy().transpose(0, 2, 1)) for x in weights]
    table_t = np.ascontiguousarray(latent_table.numpy().T)
    grad_noise = np.empty_like(prev) if noisy else None
    grad_drive = np.empty((T, B, L, n), prev.dtype)
    grad_w = [np.zeros((L, n, n), prev.dtype) for _ in range(K)]
    grad_b = [np.zeros((L, 1, n), prev.dtype) for _ in range(K)]
    grad_out_w = np.zeros((L, n, 2), prev.dtype)
    scratch = np.empty((L, n, n), prev.dtype)
    carry = np.zeros_like(prev[0])
    for t in range(T - 1, -1, -1):
        dz = np.add(gz[t], carry, out=None if grad_noise is None else grad_noise[t])
        dmean = dz if gm is None else dz + gm[t]
        d_out[t] *= dmean[..., None]
        d_o = d_out[t].transpose(1, 0, 2)  # [L, B, 2]
        ds = np.matmul(d_o, out_t)
        grad_out_w += np.matmul(S[K][t].transpose(0, 2, 1), d_o)
        for k in range(K - 1, -1, -1):
            g = np.multiply(ds, slopes[k][t])
            ds += np.matmul(g, weights_t[k])
            grad_w[k] += np.matmul(S[k][t].transpose(0, 2, 1), g, out=scratch)
            grad_b[k] += g.sum(1, keepdims=True)
        grad_drive[t] = ds.transpose(1, 0, 2)
        carry = np.matmul(grad_drive[t].reshape(B, L * n), table_t)
        carry += dmean * keep[t]
    grads_layers = [x for k in range(K) for x in (grad_b[k], grad_w[k])]
    grad_table = np.matmul(prev.reshape(T * B, L).T, grad_drive.reshape(T * B, L * n))
    grads = (grad_drive.transpose(0, 2, 1, 3), carry, grad_noise, grad_table, d_out.sum((0, 1))[:, None],
             grad_out_w, *grads_layers)
    return tuple(None if x is None else torch.from_numpy(x) for x in grads)


@register("disrnn")
class DisRNNAgent(Agent):
    carries_hidden = False
    hidden_definition = f"ReLU(Linear({LATENTS}->256)(latents z_t))"
    memory_type = "10 disentangled latents; gated per-latent updates through Gaussian bottlenecks"

    def __init__(self, config: AgentConfig):
        super().__init__(config)
        check_size(config, WIDTHS)
        L, D, n = LATENTS, OBS_DIM, WIDTHS[config.size]
        self.latents, self.width = L, n
        self.beta, self.warmup = float(config.bottleneck_beta), config.bottleneck_warmup
        self.progress = 0  # the trainer's 1-based update number (set_progress); 0 = not training yet
        self.obs_weight = nn.Parameter(torch.randn(L, D, n) / math.sqrt(D + L))
        self.latent_weight = nn.Parameter(torch.randn(L, L, n) / math.sqrt(D + L))
        self.in_bias = nn.Parameter(torch.zeros(L, n))
        self.layer_weight = nn.Parameter(torch.randn(LAYERS, L, n, n) / math.sqrt(n * LAYERS))
        self.layer_bias = nn.Parameter(torch.zeros(LAYERS, L, n))
        self.out_weight = nn.Parameter(torch.randn(L, n, 2) / math.sqrt(n))
        self.out_bias = nn.Parameter(torch.zeros(L, 2))
        self.obs_sigma_param = nn.Parameter(torch.rand(D, L) * 0.05)
        self.obs_multiplier = nn.Parameter(torch.ones(D, L))
        self.latent_in_sigma_param = nn.Parameter(torch.rand(L, L) * 0.05)
        self.latent_in_multiplier = nn.Parameter(torch.ones(L, L))
        self.latent_sigma_param = nn.Parameter(torch.rand(L) * 0.05)
        self.latent_init = nn.Parameter(torch.rand(L) * 0.2 - 0.1)
        self.hidden_proj = Linear(L, HIDDEN)
        nn.init.kaiming_uniform_(self.hidden_proj.weight, nonlinearity="relu")
        nn.init.zeros_(self.hidden_proj.bias)
        init_heads(self)
        self._aux: torch.Tensor | None = None  # β·KL of the latest `sequence` call while the bottlenecks are active

    # --- bottleneck schedule --------------------------------------------------------------------
    def set_progress(self, update: int) -> None:
        self.progress = int(update)

    @property
    def bottlenecks_active(self) -> bool:
        """Noise and penalty are on in training mode after the warm-up (updates 1..warmup are noiseless)."""
        return self.training and self.progress > self.warmup

    def sigmas(self) -> dict[str, torch.Tensor]:
        """The bottleneck σ: ``obs`` [200, L] and ``latent_in`` [L, L] (input j, net i), ``latent`` [L]."""
        return {"obs": reparameterize_sigma(self.obs_sigma_param),
                "latent_in": reparameterize_sigma(self.latent_in_sigma_param),
                "latent": reparameterize_sigma(self.latent_sigma_param)}

    # --- forward pieces -------------------------------------------------------------------------
    def _obs_terms(self, obs: torch.Tensor | None = None, index: torch.Tensor | None = None, mu2: bool = True):
        """Noise-free drive of the update nets [..., L, n]: the observation through the multipliers plus the input
        bias; and Σ_{j,i} μ_{j,i}² [...] of the observation bottlenecks (None without ``mu2``: acting needs no KL),
        from a float observation [..., 200] or an index [..., 2]."""
        L, n = self.latents, self.width
        if index is None:
            table, m2 = self._obs_table()
            drive = F.linear(obs, table.reshape(OBS_DIM, L * n).t(), self.in_bias.reshape(L * n))
            return drive.unflatten(-1, (L, n)), obs.square() @ m2 if mu2 else None
        # index: x is two-hot (own cell, partner cell or none), so gathering rows is exact; row 200 = not shown
        table, m2 = self.cached("obs_index_table", (self.obs_multiplier, self.obs_weight, self.in_bias),
                                self._obs_index_table)
        # one summed gather of the two rows, differentiated by two index_add_ (gather_index; ~0.15 against ~0.9 ms for
        # two advanced-index gathers and their index_put backward on a fast update's [100, 40] indices)
        drive = gather_index(index, table.reshape(table.shape[0], L * n)).unflatten(-1, (L, n))
        own, partner = index[..., 0], index[..., 1] + N_CELLS
        return drive, m2[own] + m2[partner] if mu2 else None

    def _obs_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[200, L, n]: input j's multiplied weights into every update net; [200]: Σ_i m_{j,i}²."""
        table = (self.obs_multiplier.t().unsqueeze(-1) * self.obs_weight).transpose(0, 1)
        return table, self.obs_multiplier.square().sum(1)

    def _obs_index_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_obs_table` for index gathers: the input bias added to the own-cell rows 0..99 (every observation
        shows the own cell once), the partner rows 100..199 as they are, a zero row 200 ("partner not shown")."""
        table, m2 = self._obs_table()
        return (torch.cat([table[:N_CELLS] + self.in_bias, table[N_CELLS:], table.new_zeros(1, *table.shape[1:])]),
                torch.cat([m2, m2.new_zeros(1)]))

    def _recurrent_weights(self) -> tuple:
        """What every step of :meth:`_run` multiplies by: the latent inputs' multiplied weights [L(j), L·n], the
        hidden layers' (bias [L, 1, n], weight [L, n, n]) and the output layer's (bias [L, 1, 2], weight [L, n, 2]), whose
        target column is divided by MAX_LATENT, so a step's u = MAX_LATENT·tanh(output) (cached while acting)."""
        L, n = self.latents, self.width
        latent_table = (self.latent_in_multiplier.t().unsqueeze(-1) * self.latent_weight).transpose(0, 1)  # [L(j),L,n]
        layers = [(b.unsqueeze(1), w) for b, w in zip(self.layer_bias.unbind(0), self.layer_weight.unbind(0))]
        scale = self.out_weight.new_tensor([1.0, 1.0 / MAX_LATENT])  # the target's 1/MAX_LATENT folded into its column
        return latent_table.reshape(L, L * n), layers, ((self.out_bias * scale).unsqueeze(1), self.out_weight * scale)

    def _input_factor(self) -> torch.Tensor:
        """[L, n, n]: :func:`noise_factor` of each update net's scaled input weights (cached while acting)."""
        def build():
            sig = self.sigmas()
            scaled = torch.cat([sig["obs"].t().unsqueeze(-1) * self.obs_weight,
                                sig["latent_in"].t().unsqueeze(-1) * self.latent_weight], dim=1)  # [L, 200+L, n]
            return noise_factor(scaled)
        return self.cached("input_noise_factor", (self.obs_sigma_param, self.obs_weight, self.latent_in_sigma_param,
                                                  self.latent_weight), build)

    def _input_noise(self, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """[L, rows, n]: the input bottlenecks' noise as it reaches each update net's first pre-activation, for ``rows``
        independent (step, episode) rows: Σ_j ε_j σ_{j,i} W_i[j] over net i's 200 + L inputs, drawn as n normals times
        the net's :func:`noise_factor` (the same distribution; see :func:`noise_factor`)."""
        factor = self._input_factor().to(dtype)
        eps = torch.randn(self.latents, rows, self.width, device=factor.device, dtype=dtype)
        return NoiseProduct.apply(eps, factor) if small_products_on_numpy(eps) else torch.bmm(eps, factor)

    def _run(self, drive: torch.Tensor, z: torch.Tensor, noisy: bool):
        """Latents for T steps from ``z`` [B, L] and the drive [T, B, L, n] of :meth:`_obs_terms`.
        Returns the carried latents z_t and the pre-noise means μ_t, each [T, B, L]."""
        T, B = drive.shape[:2]
        L, n = self.latents, self.width
        drive = drive.transpose(1, 2)  # [T, L, B, n]: one residual stream per update net
        noise = None
        if noisy:  # all the noise of the call, drawn up front from the global torch RNG
            # noise first: the sum then takes the noise's net-major layout, whose step slices the recurrence reads
            # faster than the drive's episode-major one
            drive = self._input_noise(T * B, drive.dtype).view(L, T, B, n).transpose(0, 1) + drive
            sigma = self.cached("latent_sigma", (self.latent_sigma_param,),
                                lambda: reparameterize_sigma(self.latent_sigma_param))
            noise = torch.randn(T, B, L, device=drive.device, dtype=drive.dtype) * sigma
        weights = self.cached("recurrent_weights", (self.latent_in_multiplier, self.latent_weight, self.layer_bias,
                                                    self.layer_weight, self.out_bias, self.out_weight),
                              self._recurrent_weights)
        return latent_recurrence(drive, z, noise, *weights)

    def _kl(self, mu2: torch.Tensor, prev: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """Σ over all bottlenecks of KL(N(μ, σ²) ‖ N(0, 1)) per step [T, B]; ``mu2``: Σ μ² of the observation inputs."""
        sig = self.sigmas()
        m2_in = self.latent_in_multiplier.square().sum(1)  # [L(j)]
        return 0.5 * (mu2 + kl_constant(sig["obs"]) + prev.square() @ m2_in + kl_constant(sig["latent_in"])
                      + mean.square().sum(-1) + kl_constant(sig["latent"]))

    def _outputs(self, z_all: torch.Tensor):
        hidden = torch.relu(self.hidden_proj(z_all))
        logits, value = self.readout(hidden)
        return logits, value, hidden

    def _acting_arrays(self) -> dict:
        """numpy copies of what :class:`DisRNNActing` multiplies by: the index table (input bias included) as
        [L, 201, n], the recurrent weights, the hidden layer's and the joint heads' transposed weights, the latent
        bottleneck's σ."""
        table = self._obs_index_table()[0].transpose(0, 1)
        latent_table, layers, out = self._recurrent_weights()
        heads_w, heads_b = self._joint_heads()
        arr = lambda x: _array(x, contiguous=True)  # noqa: E731
        return {"table": arr(table), "latent_table": arr(latent_table), "layers": [tuple(map(arr, x)) for x in layers],
                "out": tuple(map(arr, out)), "proj_w": arr(self.hidden_proj.weight.t()),
                "proj_b": arr(self.hidden_proj.bias), "heads_w": arr(heads_w.t()), "heads_b": arr(heads_b),
                "latent_sigma": arr(reparameterize_sigma(self.latent_sigma_param))}

    def _act_numpy(self, index: torch.Tensor, z: torch.Tensor):
        """:meth:`step_index` as numpy calls, for acting (no autograd; CPU float32 where
        :func:`small_products_on_numpy`): a one-agent :class:`DisRNNActing`, kept while the weights stay (the key:
        every parameter as it is now; a Parameter replaced, e.g. ``load_state_dict(assign=True)``, rebuilds it)."""
        acting = self.cached("acting", tuple(self.parameters()), lambda: DisRNNActing(self))
        B = index.shape[0]
        hidden, heads = z.new_empty(1, B, HIDDEN), z.new_empty(1, B, N_ACTIONS + 1)
        z = acting.step(index + acting.row_offsets, z.numpy()[None], hidden, heads)  # rows [1, B, 2]
        return heads[0, :, :N_ACTIONS], heads[0, :, N_ACTIONS], hidden[0], (torch.from_numpy(z[0]),)

    def _step(self, drive, mu2, state):
        z = self._run(drive.unsqueeze(0), state[0], self.bottlenecks_active)[0][0]
        logits, value, hidden = self._outputs(z)
        return logits, value, hidden, (z,)

    def _sequence(self, drive, mu2, state0):
        z0 = self.latent_init.expand(drive.shape[1], -1) if state0 is None else state0[0]
        noisy = self.bottlenecks_active
        z_all, mean = self._run(drive, z0, noisy)
        prev = torch.cat([z0.unsqueeze(0), z_all[:-1]])  # z_{t-1}
        self._aux = self.beta * self._kl(mu2, prev, mean).mean() if noisy else None
        return self._outputs(z_all)

    # --- contract -------------------------------------------------------------------------------
    def initial_state(self, batch, device="cpu"):
        """``(z_0,)``: the learned initial latents (detached; ``sequence`` without a state uses the parameter)."""
        return (self.latent_init.detach().to(device).expand(batch, -1).clone(),)

    def step(self, obs, state):
        return self._step(*self._obs_terms(obs=obs, mu2=False), state)

    def sequence(self, obs, state0=None):
        return self._sequence(*self._obs_terms(obs=obs), state0)

    def step_index(self, index, state):
        if not torch.is_grad_enabled() and index.device.type == "cpu" and small_products_on_numpy(state[0]):
            return self._act_numpy(index, state[0])
        return self._step(*self._obs_terms(index=index, mu2=False), state)

    def sequence_index(self, index, state0=None):
        return self._sequence(*self._obs_terms(index=index), state0)

    def pair_with(self, partner: Agent, steps: int) -> DisRNNActing | None:
        same = (type(partner) is DisRNNAgent and (partner.latents, partner.width) == (self.latents, self.width)
                and small_products_on_numpy(self.obs_weight) and small_products_on_numpy(partner.obs_weight))
        return DisRNNActing(self, partner) if same else None

    def extra_sites(self, state):
        return {"latents": state[0]}

    def aux_loss(self):
        """β·KL of the latest ``sequence`` call (0 during the warm-up and in eval mode)."""
        return super().aux_loss() if self._aux is None else self._aux

    def input_weight_norm(self):
        return torch.linalg.vector_norm(self.obs_weight)


class DisRNNActing:
    """E disRNN agents of one shape acting as one numpy call per step (issue 6; CPU float32 where
    :func:`small_products_on_numpy`): E = 1 is an agent's own acting step (:meth:`DisRNNAgent.step_index` without
    autograd, kept by the agent while its weights stay), E = 2 both agents of a rollout
    (:meth:`DisRNNAgent.pair_with`) in place of two such steps. The acting arrays are fetched once, not every step
    (the cache's key alone, a walk over 19 parameters, cost ~45 µs a step), and each product and elementwise call is
    made once for the E agents' E·L update nets, stacked latent-major (net l of agent e is row l·E + e: the
    observation gather then lands in that order without a copy; :func:`_update_nets`). numpy's stacked products run
    each net's product as a one-agent call does and the elementwise calls are the same per element, so each agent
    gets the bits of its own steps; the noise is drawn from the global torch RNG in the calls and order of
    :meth:`DisRNNAgent._run` (per agent the input noise [L, B, n], then the latent noise; agent after agent), so the
    stream is that of the separate steps too (``tests/test_fast_paths.py``). The sums run in another order than the
    torch step's (equal to float rounding, ``tests/test_disrnn_tok.py``). Built from the current weights (no
    gradient); rebuild it after they change. Whether an agent's bottlenecks are noisy is read at every step (the
    warm-up and eval mode change it, not the weights)."""

    replays = False  # nothing to replay: the learning pass runs its own (noisy) recurrence

    def __init__(self, *agents: DisRNNAgent):
        self.agents = agents
        E, L = len(agents), agents[0].latents
        self.latents, self.width = L, agents[0].width
        with torch.no_grad():
            arrays = [a._acting_arrays() for a in agents]
            self.factors = [None] * E  # the input noise's factors, taken at an agent's first noisy step
            self.z0 = np.stack([_array(a.latent_init) for a in agents])  # [E, L]
        self.latent_sigma = [P["latent_sigma"] for P in arrays]
        merge = lambda x: np.ascontiguousarray(x.reshape(E * L, *x.shape[2:]))  # noqa: E731  [L, E, ...] -> [E·L, ...]
        stacked = lambda get: merge(np.stack([get(P) for P in arrays], 1))  # noqa: E731
        self.table = np.concatenate([P["table"] for P in arrays], 1)  # [L, E·201, n]: agent e's rows at 201 e
        self.latent_table = np.stack([P["latent_table"] for P in arrays])  # [E, L(j), L·n]
        self.layers = [(stacked(lambda P: P["layers"][k][0]), stacked(lambda P: P["layers"][k][1]))
                       for k in range(len(arrays[0]["layers"]))]
        self.out_bias, self.out_weight = stacked(lambda P: P["out"][0]), stacked(lambda P: P["out"][1])
        self.proj_w, self.proj_b = np.stack([P["proj_w"] for P in arrays]), np.stack([P["proj_b"] for P in arrays])[:, None]
        self.heads_w, self.heads_b = np.stack([P["heads_w"] for P in arrays]), np.stack([P["heads_b"] for P in arrays])[:, None]
        self.row_offsets = stacked_row_offsets(E, agents[0].obs_weight.device)
        self.keys = [param_key(a) for a in agents]

    def initial_state(self, batch: int) -> np.ndarray:
        """The carried latents of the agents, [E, B, L] (each agent's learned initial latents)."""
        return np.repeat(self.z0[:, None], batch, 1)

    def step(self, rows: torch.Tensor, z: np.ndarray, hidden_out: torch.Tensor, heads_out: torch.Tensor) -> np.ndarray:
        """rows [E, B, 2] (the observation index plus :attr:`row_offsets`), z [E, B, L] -> the new z; writes the
        agents' hidden [E, B, 256] and joint heads [E, B, 5] into ``hidden_out``/``heads_out``."""
        L, n = self.latents, self.width
        r = rows.numpy()
        E, B = r.shape[:2]
        drive = self.table[:, r[..., 0]]  # [L, E, B, n]
        drive += self.table[:, r[..., 1]]
        noise = [None] * E
        for e, agent in enumerate(self.agents):  # the draws of DisRNNAgent._run, agent after agent
            if agent.bottlenecks_active:
                if self.factors[e] is None:
                    with torch.no_grad():
                        self.factors[e] = agent._input_factor().numpy()
                eps = torch.randn(L, B, n, dtype=torch.float32)
                drive[:, e] += np.matmul(eps.numpy(), self.factors[e])
                noise[e] = torch.randn(1, B, L, dtype=torch.float32).numpy() * self.latent_sigma[e]
        drive += np.matmul(z, self.latent_table).reshape(E, B, L, n).transpose(2, 0, 1, 3)
        mean = np.empty((E, B, L), np.float32)
        _update_nets(drive.reshape(E * L, B, n), z, self.layers, self.out_bias, self.out_weight, mean)
        for e, nz in enumerate(noise):
            if nz is not None:
                np.add(mean[e], nz[0], out=mean[e])
        hidden = hidden_out.numpy()
        np.matmul(mean, self.proj_w, out=hidden)
        hidden += self.proj_b
        np.maximum(hidden, 0, out=hidden)
        heads = heads_out.numpy()
        np.matmul(hidden, self.heads_w, out=heads)
        heads += self.heads_b
        return mean

    def states(self, z: np.ndarray) -> list[tuple]:
        """Each agent's own state, ``(z,)`` with z [B, L], as :meth:`DisRNNAgent.step_index` returns it."""
        return [(torch.from_numpy(z[e]),) for e in range(len(self.agents))]


@torch.no_grad()
def bottleneck_summary(agent: DisRNNAgent, obs: torch.Tensor | None = None) -> dict:
    """Plain-python summary of a disRNN's bottlenecks, for reports.

    Always:
      - ``thresholds``: {"open": 0.1, "partial": 0.25, "closed": 0.9} (SPEC §6.7).
      - ``latent_sigma`` [L]: σ of each latent's bottleneck.
      - ``update_obs_sigma`` [L][200] and ``update_latent_sigma`` [L][L]: σ of update net i's input j.
      - ``counts``: for ``latent``, ``update_obs``, ``update_latent``: {"open": #σ<0.1, "partial": #σ<0.25 (includes
        the open ones, as disRNN counts), "closed": #σ>0.9}.
      - ``open_latents``: indices of the latents whose bottleneck is open (σ < 0.1): the latents that stay in use.
    With ``obs`` [T, B, 200] (a noiseless pass from the learned initial latents):
      - ``latent_kl`` [L], ``update_obs_kl`` [L], ``update_latent_kl`` [L]: mean KL(N(μ, σ²) ‖ N(0, 1)) per step of
        latent i's bottleneck, and of update net i's observation / latent inputs summed over inputs.
    """
    sig = agent.sigmas()
    summary = {
        "thresholds": {"open": OPEN, "partial": PARTIAL, "closed": CLOSED},
        "latent_sigma": sig["latent"].tolist(),
        "update_obs_sigma": sig["obs"].t().tolist(),
        "update_latent_sigma": sig["latent_in"].t().tolist(),
        "counts": {name: {"open": int((s < OPEN).sum()), "partial": int((s < PARTIAL).sum()),
                          "closed": int((s > CLOSED).sum())}
                   for name, s in (("latent", sig["latent"]), ("update_obs", sig["obs"]),
                                   ("update_latent", sig["latent_in"]))},
        "open_latents": [i for i, s in enumerate(sig["latent"].tolist()) if s < OPEN],
    }
    if obs is not None:
        drive, _ = agent._obs_terms(obs=obs)
        z0 = agent.latent_init.expand(obs.shape[1], -1)
        z_all = agent._run(drive, z0, noisy=False)[0]  # z = μ
        prev = torch.cat([z0.unsqueeze(0), z_all[:-1]])
        half_kl = lambda mu2, s: 0.5 * (mu2 + s.square() - 1.0 - s.square().log())  # noqa: E731
        obs_mu2 = torch.einsum("tbj,ji->tbji", obs.square(), agent.obs_multiplier.square())
        lat_mu2 = torch.einsum("tbj,ji->tbji", prev.square(), agent.latent_in_multiplier.square())
        summary["latent_kl"] = half_kl(z_all.square(), sig["latent"]).mean((0, 1)).tolist()
        summary["update_obs_kl"] = half_kl(obs_mu2, sig["obs"]).sum(2).mean((0, 1)).tolist()
        summary["update_latent_kl"] = half_kl(lat_mu2, sig["latent_in"]).sum(2).mean((0, 1)).tolist()
    return summary
