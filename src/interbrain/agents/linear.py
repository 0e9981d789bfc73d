"""Dense layers whose large CPU products run on oneDNN where that is the faster float32 kernel (issue 6).

torch runs float32 matrix products on CPU through MKL. On AMD processors MKL takes its AVX2 code path even where the
processor has AVX-512; oneDNN (bundled with torch) takes the AVX-512 one. On the development machine (AMD EPYC,
AVX-512, one thread) a 1024^3 product runs at ~106 GFLOP/s through MKL and ~250 GFLOP/s through oneDNN, and a
learning pass's [4000, 64] x [64, 192] products 2.3x faster (``benchmarks/train_throughput.py`` records both rates).

:func:`linear` is ``F.linear`` with that choice: on CPU, for float32 inputs of at least :data:`MIN_ROWS` rows (the
learning passes: below that, e.g. while acting on 40 episodes, MKL is as fast or faster), the forward product and
the input gradient run on oneDNN (``torch.ops.mkldnn._linear_pointwise``); the weight gradient stays one MKL product
(oneDNN would need two transposed copies first). :class:`Linear` is ``nn.Linear`` computed by it (same parameters,
names and initialisation). The RNN's own products (:mod:`interbrain.agents.rnn`) are not routed here. The batched
pair steps (``RNNPair``, ``TransformerPair``) keep torch's kernel, so they equal each agent's own step bit for bit for
acting batches under :data:`MIN_ROWS` episodes (the default 40); steps past an attention agent's window recompute
windows of B·W rows, which may take oneDNN.

The backend is fixed per process, so fixed seeds stay deterministic (a resume under another backend warns that it
is not bit for bit the uninterrupted run, :class:`interbrain.train.UnitOutput`): :func:`cpu_backend` reads
``INTERBRAIN_CPU_MATMUL`` = ``auto`` (default: oneDNN when torch has it and runs with AVX-512 kernels, else torch's
own), ``torch`` or ``onednn``. The two differ in float summation order only (results equal to float tolerance,
``tests/test_linear.py``).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from interbrain.errors import InterbrainError

ENV_VAR = "INTERBRAIN_CPU_MATMUL"
BACKENDS = ("auto", "torch", "onednn")
MIN_ROWS = 256  # oneDNN is faster from ~120 rows on (measured: 40 rows slower, 256 rows 1.5x, 4000 rows 2.3x)


def onednn_available() -> bool:
    """torch has oneDNN and its dense-layer kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def cpu_backend() -> str:
    """``torch`` or ``onednn``: the kernel of :func:`linear`'s large CPU products in this process (see the module)."""
    choice = os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise InterbrainError(f"{ENV_VAR}={choice!r} is not one of {list(BACKENDS)}")
    if choice == "onednn" and not onednn_available():
        raise InterbrainError(f"{ENV_VAR}=onednn, but this torch build has no oneDNN dense-layer kernel")
    if choice == "auto":
        choice = "onednn" if onednn_available() and torch.backends.cpu.get_cpu_capability() == "AVX512" else "torch"
    return choice


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] @ weight [out, in]^T (+ bias) on oneDNN (which reads every operand as dense: made contiguous)."""
    bias = None if bias is None else bias.contiguous()
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` on 2-D inputs: forward and input gradient on oneDNN, weight gradient g^T x and bias gradient as
    torch computes them."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_product(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = _onednn_product(grad, weight.t(), None) if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ x if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; large float32 CPU products on oneDNN when :func:`cpu_backend` says so."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2
            and x.numel() >= MIN_ROWS * x.shape[-1] > 0 and cpu_backend() == "onednn"):
        out = OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (same parameters, state-dict names and initialisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


__all__ = ["BACKENDS", "ENV_VAR", "Linear", "MIN_ROWS", "OneDNNLinear", "cpu_backend", "linear", "onednn_available"]
