"""The ``rllib`` learner's recurrence step products as compiled loops with the step's ReLU fused in (issue 6).

Each of the ``rllib`` update's 960 minibatch steps runs, per unit, 20 forward products [n, 256] x [256, 256] and 19
backward ones, n = 6-7 sequences. BLAS libraries are tuned for larger row counts: on session 26's Zen 5 both units'
products took 34-38 µs on MKL (AVX2 kernels on AMD processors), 53 µs on numpy's OpenBLAS with the AVX2 kernels the
host's ``OPENBLAS_CORETYPE=Haswell`` selects, 16.5 µs with OpenBLAS's AVX-512 kernels; oneDNN 44 µs. The loop here
holds a block of ``rows`` x 32 outputs in registers (``rows`` <= 8: 16 AVX-512 registers in float32) while it runs
through k, each output's sum in the order k = 0, 1, ..., K-1: 9.2 µs for both units' 8-row products.

numba compiles one function per row count from the source :func:`_source` writes (a name per output of the block,
which LLVM's SLP vectorizer packs into vector registers; numba runs that pass only when ``numba.config.SLP_VECTORIZE``
is set, which :func:`step_kernel` sets while it compiles, and restores). No fast-math: every output is one sequential
sum, so a result does not depend on how the arrays lie in memory.

- ``relu``: ``out = max(out + a b, 0)`` (the forward step: ``out`` holds the step's input x_t, ``a`` h_{t-1},
  ``b`` W_hh^T); NaN stays NaN, as ``np.maximum``;
- ``relu_grad``: ``out = (out + a b) if h > 0 else 0`` (the backward step: ``out`` holds dL/dh_t from the heads,
  ``a`` dL/dx_{t+1}, ``b`` W_hh, ``h`` = h_t), as torch's ``threshold_backward``.

Arrays: ``a`` [E, rows, K] with unit-stride rows (any other strides), ``b`` [E, K, N] C-contiguous, ``out`` and
``h`` [E, rows, N] with unit-stride rows; N a multiple of :data:`COLS`; float32 or float64 (float64 spills registers:
the tests' dtype, not a fast one).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import njit, types

#: outputs per row of a register block (two AVX-512 registers of float32)
COLS = 32
#: the most rows one compiled loop takes (8 x 32 float32 outputs: 16 of AVX-512's 32 registers)
MAX_ROWS = 8
EPILOGUES = ("relu", "relu_grad")


def _source(rows: int, epilogue: str) -> str:
    """Python source of the kernel for ``rows`` rows: per unit e and block of COLS columns, the outputs c{i}_{j}
    accumulate a[e, i, k] * b[e, k, j] over k in order; they are stored into the block ``acc`` (consecutive stores,
    from which the SLP vectorizer builds its vectors), and the epilogue adds ``acc`` into ``out``. ``zero`` and ``dtype``
    are globals of the kernel's dtype."""
    if not 1 <= rows <= MAX_ROWS or epilogue not in EPILOGUES:
        raise ValueError(f"no step kernel for rows={rows!r}, epilogue={epilogue!r}")
    block = range(COLS)
    relu = epilogue == "relu"
    lines = [f"def kernel(a, b, out{'' if relu else ', h'}):",
             "    E, K, N = b.shape",
             f"    acc = np.empty(({rows}, {COLS}), dtype)",
             "    for e in range(E):",
             f"        for jb in range(0, N, {COLS}):"]
    lines += ["            " + "; ".join(f"c{i}_{j} = zero" for j in block) for i in range(rows)]
    lines += ["            for k in range(K):",
              f"                bk = b[e, k, jb:jb + {COLS}]",
              "                " + "; ".join(f"a{i} = a[e, {i}, k]" for i in range(rows)),
              "                " + "; ".join(f"b{j} = bk[{j}]" for j in block)]
    lines += ["                " + "; ".join(f"c{i}_{j} += a{i} * b{j}" for j in block) for i in range(rows)]
    lines += ["            " + "; ".join(f"acc[{i}, {j}] = c{i}_{j}" for j in block) for i in range(rows)]
    lines += [f"            for i in range({rows}):",
              f"                for j in range({COLS}):",
              "                    v = out[e, i, jb + j] + acc[i, j]"]
    lines += (["                    out[e, i, jb + j] = zero if v < 0 else v"] if relu else
              ["                    out[e, i, jb + j] = v if h[e, i, jb + j] > 0 else zero"])
    return "\n".join(lines) + "\n"


def _signature(dtype: np.dtype, epilogue: str):
    t = numba.from_dtype(np.dtype(dtype))
    strided, contiguous = types.Array(t, 3, "A"), types.Array(t, 3, "C")
    return (strided, contiguous, strided) + ((strided,) if epilogue == "relu_grad" else ())


def step_kernel(rows: int, epilogue: str, dtype) -> numba.core.registry.CPUDispatcher:
    """The compiled kernel for ``rows`` rows (1..:data:`MAX_ROWS`), ``epilogue`` and ``dtype`` (float32, float64),
    compiled on the first call with numba's SLP vectorizer on; no other signature is compiled afterwards."""
    return _step_kernel(int(rows), epilogue, np.dtype(dtype))


@functools.cache
def _step_kernel(rows: int, epilogue: str, dtype: np.dtype):
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"step kernels take float32 or float64, got {dtype}")
    namespace = {"np": np, "dtype": dtype.type, "zero": dtype.type(0)}  # numba takes globals as typed constants
    exec(compile(_source(rows, epilogue), f"<step kernel rows={rows} {epilogue}>", "exec"), namespace)  # noqa: S102
    kernel = njit(boundscheck=False)(namespace["kernel"])
    saved = numba.config.SLP_VECTORIZE
    numba.config.SLP_VECTORIZE = 1
    try:
        kernel.compile(_signature(dtype, epilogue))
    finally:
        numba.config.SLP_VECTORIZE = saved
    kernel.disable_compile()
    return kernel


def applies(n_rows: int, cols: int) -> bool:
    """Whether :func:`step_relu` and :func:`step_relu_grad` take products of ``n_rows`` rows and ``cols`` columns."""
    return n_rows >= 1 and cols >= COLS and cols % COLS == 0


def _check(a: np.ndarray, b: np.ndarray, out: np.ndarray, h: np.ndarray | None = None) -> None:
    """The kernels index without bounds checks: refuse shapes they would read or write past."""
    E, K, N = b.shape
    if not (applies(a.shape[1], N) and a.shape == (E, a.shape[1], K) and out.shape == (E, a.shape[1], N)
            and (h is None or h.shape == out.shape) and a.dtype == b.dtype == out.dtype):
        raise ValueError(f"step products need a [E, rows, K], b [E, K, N] with N a multiple of {COLS}, out (and h) "
                         f"[E, rows, N] of one dtype; got a {a.shape}, b {b.shape}, out {out.shape}"
                         + ("" if h is None else f", h {h.shape}"))


def _in_row_blocks(epilogue: str, a: np.ndarray, b: np.ndarray, out: np.ndarray, *mask: np.ndarray) -> None:
    """The ``epilogue`` kernel over the rows of a, out (and the mask h) in blocks of at most :data:`MAX_ROWS`."""
    _check(a, b, out, *mask)
    for r in range(0, a.shape[1], MAX_ROWS):
        rows = slice(r, r + MAX_ROWS)
        block = a[:, rows]
        step_kernel(block.shape[1], epilogue, a.dtype)(block, b, out[:, rows], *(m[:, rows] for m in mask))


def step_relu(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = max(out + a b, 0) per unit (see the module), in blocks of at most :data:`MAX_ROWS` rows."""
    _in_row_blocks("relu", a, b, out)


def step_relu_grad(a: np.ndarray, b: np.ndarray, out: np.ndarray, h: np.ndarray) -> None:
    """out = (out + a b) where h > 0, else 0, per unit (see the module), in blocks of at most :data:`MAX_ROWS` rows."""
    _in_row_blocks("relu_grad", a, b, out, h)
