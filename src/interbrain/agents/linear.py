"""Dense layers whose large CPU products run on oneDNN where that is the faster float32 kernel (issue 6).

torch runs float32 matrix products on CPU through MKL. On AMD processors MKL takes its AVX2 code path even where the
processor has AVX-512; oneDNN (bundled with torch) takes the AVX-512 one. On the development machines (AMD EPYC,
AVX-512, one thread) a 1024^3 product runs at 85-110 GFLOP/s through MKL and through oneDNN at ~105 GFLOP/s on a Zen 4
core (whose AVX-512 units are 256 bits wide) and ~250 on a Zen 5 core, where a learning pass's [4000, 64] x [64, 192]
products run 2.3x faster (``benchmarks/train_throughput.py`` records both rates and the processor).

:func:`linear` is ``F.linear`` with that choice: on CPU, for float32 inputs of at least :data:`MIN_ROWS` rows (the
learning passes: below that, e.g. while acting on 40 episodes, MKL is as fast or faster), the forward product and
the input gradient run on oneDNN (``torch.ops.mkldnn._linear_pointwise``); the weight gradient stays one MKL product
(oneDNN would need two transposed copies first). :class:`Linear` is ``nn.Linear`` computed by it (same parameters,
names and initialisation). The RNN's own products (:mod:`interbrain.agents.rnn`) are not routed here. The batched
pair steps (``RNNPair``, ``TransformerPair``) keep torch's kernel, so they equal each agent's own step bit for bit for
acting batches under :data:`MIN_ROWS` episodes (the default 40); steps past an attention agent's window recompute
windows of B·W rows, which may take oneDNN.

:func:`small_backend` is a second, separate choice: whether the stacked ReLU recurrence's small per-step products (the
``rllib`` learner's 7-row minibatch steps, :func:`interbrain.agents.rnn.relu_recurrence`) run on numpy's BLAS; with
``numpy`` the ``rllib`` learner's whole minibatch step runs as numpy calls written out by hand
(:mod:`interbrain.agents.rnn_numpy`). The same choice sends the narrow products of the learning passes to numpy
(:func:`narrow_product`, :func:`narrow_input_grad`, :func:`narrow_weight_grad`: the joint heads' 5 columns, 4 logits
and the value, over [T·B, 256] hidden states; :class:`NarrowLinear` in :func:`linear`): MKL and oneDNN are slow at a
5-wide product (per agent and epoch at 4000 rows, caches cold after the step loops: the forward 0.40 ms on MKL,
0.59 on oneDNN, 0.35 on numpy; the input gradient 0.53 / 0.36 / 0.15 ms; the weight gradient 0.44 / 0.28 ms on
MKL / numpy; session 21).

The backend is fixed per process, so fixed seeds stay deterministic (a resume under another backend warns that it
is not bit for bit the uninterrupted run, :class:`interbrain.train.UnitOutput`): :func:`cpu_backend` reads
``INTERBRAIN_CPU_MATMUL`` = ``auto`` (default: oneDNN when torch has it and runs with AVX-512 kernels, else torch's
own), ``torch`` or ``onednn``. The two differ in float summation order only (results equal to float tolerance,
``tests/test_linear.py``).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from interbrain.errors import InterbrainError

ENV_VAR = "INTERBRAIN_CPU_MATMUL"
BACKENDS = ("auto", "torch", "onednn")
MIN_ROWS = 256  # oneDNN is faster from ~120 rows on (measured: 40 rows slower, 256 rows 1.5x, 4000 rows 2.3x)
SMALL_ENV_VAR = "INTERBRAIN_CPU_SMALL_MATMUL"
SMALL_BACKENDS = ("auto", "torch", "numpy")
SMALL_ROWS = 16  # the stacked recurrence's step products with at most this many rows per unit may go to numpy's BLAS
NARROW_COLS = 8  # products of at least MIN_ROWS rows with at most this many output columns may go to numpy's BLAS


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


def numpy_blas() -> str:
    """The BLAS numpy was built with (e.g. ``scipy-openblas``; ``unknown`` when numpy does not say)."""
    import numpy as np

    try:
        return str(np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"])
    except Exception:  # noqa: BLE001  (older numpy or a build without the record)
        return "unknown"


@functools.cache
def numpy_blas_kernels() -> str | None:
    """The kernels numpy's OpenBLAS runs in this process, as ``threadpoolctl`` reports them (``SkylakeX``,
    ``Haswell``, ...; ``None`` where numpy's BLAS is not OpenBLAS). OpenBLAS picks them by processor when it loads,
    unless ``OPENBLAS_CORETYPE`` names them (session 24's host set ``Haswell``, its AVX2 kernels, on a Zen 5 processor
    with AVX-512): the processor alone does not tell which ran."""
    import numpy  # noqa: F401  (loaded, so that threadpoolctl sees its library)
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("internal_api") == "openblas" and "numpy" in lib.get("filepath", ""):
            return lib.get("architecture")
    return None


@functools.cache
def small_backend() -> str:
    """``torch`` or ``numpy``: who runs the stacked ReLU recurrence's per-step products when a unit has at most
    :data:`SMALL_ROWS` rows (the ``rllib`` learner's minibatches: 6-7 sequences of 20 steps per agent;
    :func:`interbrain.agents.rnn.relu_recurrence`). For a [7, 256] x [256, 256] product MKL (torch's CPU BLAS) takes
    ~22 µs on the development machine (AMD EPYC, Zen 4: MKL runs its AVX2 kernel on AMD processors), numpy's
    OpenBLAS ~12 µs (its AVX-512 small-matrix kernel); the ``rllib`` update then took 0.4-1.1 s less in paired runs
    (3.8-4.5 -> 2.95-3.4 s), and with the whole minibatch step written out in numpy
    (:class:`interbrain.agents.rnn_numpy.KLPenaltyMinibatches`, chosen by this backend too) 1.8-1.9 s. The same choice
    sends disrnn's recurrence and acting step (:mod:`interbrain.agents.disrnn`), the attention agents' acting
    products (:func:`interbrain.agents.transformer.attend`) and the learning passes' narrow heads products
    (:func:`narrow_on_numpy`) to numpy. ``INTERBRAIN_CPU_SMALL_MATMUL`` = ``auto``
    (default: numpy on AMD processors where numpy's BLAS is OpenBLAS and torch runs AVX-512 kernels, else torch: on
    Intel processors MKL runs AVX-512 kernels itself, and the comparison is not measured there), ``torch`` or
    ``numpy``. Fixed per process; recorded in every artifact's provenance (``cpu_small_matmul``) with
    :func:`cpu_backend`'s choice. The two differ in float summation order and in the sign of zeros
    (``tests/test_fast_paths.py``; a non-finite gradient where the ReLU is off stays non-finite on numpy, where torch
    zeroes it, :func:`interbrain.agents.rnn.relu_recurrence_backward`)."""
    from interbrain.provenance import cpu_info

    choice = os.environ.get(SMALL_ENV_VAR, "auto")
    if choice not in SMALL_BACKENDS:
        raise InterbrainError(f"{SMALL_ENV_VAR}={choice!r} is not one of {list(SMALL_BACKENDS)}")
    if choice == "auto":
        choice = ("numpy" if "openblas" in numpy_blas().lower() and cpu_info()["cpu_vendor"] == "AuthenticAMD"
                  and torch.backends.cpu.get_cpu_capability() == "AVX512" else "torch")
    return choice


def small_products_on_numpy(x: torch.Tensor) -> bool:
    """Small products on tensors like ``x`` go to numpy: float32 on CPU where :func:`small_backend` says ``numpy``
    (the one test behind every numpy path: the ``rllib`` minibatch step, disrnn's recurrence and acting step, the
    attention agents' acting products)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and small_backend() == "numpy"


def narrow_on_numpy(x: torch.Tensor, cols: int) -> bool:
    """A product of ``x`` [N, k] (2-D, N >= :data:`MIN_ROWS`) with at most :data:`NARROW_COLS` output columns, or its
    transposed forms, runs on numpy's BLAS (:func:`small_products_on_numpy`; the module explains why)."""
    return cols <= NARROW_COLS and x.dim() == 2 and x.shape[0] >= MIN_ROWS and small_products_on_numpy(x)


def narrow_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x [N, k] and a narrow ``weight`` [n, k] (n <= :data:`NARROW_COLS`): on numpy
    where :func:`narrow_on_numpy` says so (the product, then the bias added), else ``F.linear``. No graph: the callers'
    backward uses :func:`narrow_input_grad` and :func:`narrow_weight_grad`."""
    if not narrow_on_numpy(x, weight.shape[0]):
        return F.linear(x, weight, bias)
    out = torch.from_numpy(np.matmul(x.detach().numpy(), weight.detach().numpy().T))
    return out if bias is None else out.add_(bias.detach())


def narrow_input_grad(grad: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """grad [N, n] @ weight [n, k]: the input gradient of :func:`narrow_product` (written into ``out`` [N, k] when
    given: contiguous)."""
    if not narrow_on_numpy(grad, weight.shape[0]):
        return torch.mm(grad, weight, out=out)
    if out is None:
        return torch.from_numpy(np.matmul(grad.numpy(), weight.detach().numpy()))
    np.matmul(grad.numpy(), weight.detach().numpy(), out=out.numpy())
    return out


def narrow_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad [N, n]^T @ x [N, k]: the weight gradient of :func:`narrow_product`."""
    if not narrow_on_numpy(grad, grad.shape[1]):
        return grad.t() @ x
    return torch.from_numpy(np.matmul(grad.numpy().T, x.detach().numpy()))


class NarrowLinear(torch.autograd.Function):
    """``F.linear`` on 2-D inputs with a narrow weight, every product on numpy (:func:`narrow_product` and its two
    gradients; :func:`linear` chooses it where :func:`narrow_on_numpy` holds)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return narrow_product(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _linear_grads(ctx, grad, "numpy")


def set_cpu_threads(threads: int) -> None:
    """torch's CPU threads and numpy's BLAS threads (:func:`small_backend`), for this process: ``threads`` = 1 is one
    training job per core, as Snakemake schedules them."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


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
        return _linear_grads(ctx, grad, "onednn")


def _linear_grads(ctx, grad: torch.Tensor, kernel: str) -> tuple:
    """Gradients of ``x W^T + b`` (x, W saved on ``ctx``; 2-D) on :func:`_kernel`'s ``kernel``: the input's as
    ``grad W`` (on oneDNN for ``onednn``), the weight's as ``grad^T x`` (both on numpy for ``numpy``: the narrow
    products), the bias's as the column sums."""
    x, weight = ctx.saved_tensors[:2]
    if kernel == "numpy":
        grad = grad.contiguous()  # numpy's BLAS takes dense (or transposed) arrays; other strides take its slow loop
    grad_x = grad_weight = None
    if ctx.needs_input_grad[0]:
        if kernel == "onednn":
            grad_x = _onednn_product(grad, weight.t(), None)
        else:
            grad_x = narrow_input_grad(grad, weight) if kernel == "numpy" else grad @ weight
    if ctx.needs_input_grad[1]:
        grad_weight = narrow_weight_grad(grad, x) if kernel == "numpy" else grad.t() @ x
    grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


class KnownLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` whose output is already known (``known[0]``, x's shape but the last dim, any
    strides: computed from the same x and weights by an acting pass and recorded): the forward returns it without the
    product; the backward is :func:`linear`'s. With ``relu`` the layer is followed by a ReLU and ``known[0]`` is the
    ReLU's output: the backward first masks the gradient where it is 0 (``threshold_backward``, as ``torch.relu``'s
    own backward does from its output), so the ReLU costs no forward pass either."""

    @staticmethod
    def forward(ctx, x, weight, bias, known, relu=False):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x2, weight, *known[:1] if relu else ())  # the ReLU's output: its mask
        ctx.x_shape, ctx.has_bias, ctx.kernel, ctx.relu = x.shape, bias is not None, _kernel(x2, weight), relu
        return known[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.relu:  # d relu(z) / dz = 1 where relu(z) > 0
            grad = torch.ops.aten.threshold_backward(grad, ctx.saved_tensors[2], 0)
        grad_x, grad_weight, grad_bias = _linear_grads(ctx, grad.reshape(-1, grad.shape[-1]), ctx.kernel)
        return (None if grad_x is None else grad_x.view(ctx.x_shape)), grad_weight, grad_bias, None, None


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32 and x.dim() >= 2
            and x.numel() >= MIN_ROWS * x.shape[-1] > 0 and cpu_backend() == "onednn")


def _kernel(x2: torch.Tensor, weight: torch.Tensor) -> str:
    """The kernel of :func:`linear`'s product of x2 [N, in] (2-D) with ``weight``: ``numpy`` (narrow,
    :func:`narrow_on_numpy`), ``onednn`` (large, :func:`cpu_backend`) or ``torch``."""
    if narrow_on_numpy(x2, weight.shape[0]):
        return "numpy"
    return "onednn" if _onednn_applies(x2, weight) else "torch"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; large float32 CPU products on oneDNN when :func:`cpu_backend` says so, narrow
    ones (at most :data:`NARROW_COLS` outputs: the heads) on numpy when :func:`small_backend` says so."""
    if x.dim() < 2 or not x.numel():
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    kernel = _kernel(x2, weight)
    if kernel == "torch":
        return F.linear(x, weight, bias)
    out = (NarrowLinear if kernel == "numpy" else OneDNNLinear).apply(x2, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def known_linear(x: torch.Tensor, layer: nn.Linear, known: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """``layer(x)`` (``torch.relu(layer(x))`` with ``relu``) when its value ``known`` (x's shape but the last dim, the
    layer's output width) was recorded by an acting pass from the same x and weights (to float tolerance): the value
    is not recomputed, only the backward is built (the first learning epoch's replay, issue 6)."""
    return KnownLinear.apply(x, layer.weight, layer.bias, (known,), relu)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (same parameters, state-dict names and initialisation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


__all__ = ["BACKENDS", "ENV_VAR", "KnownLinear", "Linear", "MIN_ROWS", "NARROW_COLS", "NarrowLinear", "OneDNNLinear",
           "SMALL_BACKENDS", "SMALL_ENV_VAR", "SMALL_ROWS",
           "cpu_backend", "known_linear", "linear", "narrow_input_grad", "narrow_on_numpy", "narrow_product",
           "narrow_weight_grad", "numpy_blas", "numpy_blas_kernels", "onednn_available",
           "set_cpu_threads", "small_backend"]
