"""The rllib learner's compiled step products (interbrain.agents.small_products) against their definition computed
in numpy in the same order of operations: each output's sum over k in order, then the step's input added, then the
ReLU (forward) or the mask (backward). numpy's float ops round as the kernels' do, so the two agree bit for bit; a
sum in another order, a dropped term or a wrong row would not."""

from __future__ import annotations

import numpy as np
import pytest

from interbrain.agents import small_products as sp


def _ordered_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a[e] @ b[e] with each output summed over k = 0, 1, ... in order, from zero, in a's dtype."""
    acc = np.zeros(a.shape[:2] + b.shape[2:], a.dtype)
    for k in range(a.shape[2]):
        acc = acc + a[:, :, k, None] * b[:, k, None, :]
    return acc


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows", [1, 3, 7, 8, 9, 17])
def test_step_relu_and_its_backward_equal_their_definition(dtype, rows):
    """With a and out rows of one [E, steps, rows, H] buffer at two steps, as the minibatch step lays them out."""
    rng = np.random.default_rng(rows)
    buf = rng.standard_normal((2, 5, rows, 64)).astype(dtype)
    b = rng.standard_normal((2, 64, 64)).astype(dtype)
    b0 = b.copy()
    a, out = buf[:, 1], buf[:, 2]  # strided views: each unit's rows contiguous, units apart
    x, before = out.copy(), buf.copy()
    sp.step_relu(a, b, out)
    want = x + _ordered_products(a, b)
    assert np.array_equal(out, np.where(want < 0, 0, want))
    assert (out == 0).any() and (out > 0).any()
    assert np.array_equal(np.delete(buf, 2, 1), np.delete(before, 2, 1))  # only `out` written

    grad, h = buf[:, 3], buf[:, 4]
    h[:, :, :5] = 0  # the mask is h > 0: a zero state passes no gradient
    g0 = grad.copy()
    before = buf.copy()
    sp.step_relu_grad(a, b, grad, h)
    assert np.array_equal(grad, np.where(h > 0, g0 + _ordered_products(a, b), 0))
    assert np.array_equal(np.delete(buf, 3, 1), np.delete(before, 3, 1))
    assert np.array_equal(b, b0)


@pytest.mark.parametrize("rows", [2, 7])
def test_step_products_of_other_widths(rows):
    """K = 48 inner and N = 96 output columns (three column blocks): a kernel that mixed up K and N, or one column
    block with another, fails."""
    rng = np.random.default_rng(10 + rows)
    a = rng.standard_normal((3, 4, rows, 48))[:, 1]
    b = rng.standard_normal((3, 48, 96))
    out = rng.standard_normal((3, 4, rows, 96))[:, 2]
    x = out.copy()
    sp.step_relu(a, b, out)
    want = x + _ordered_products(a, b)
    assert np.array_equal(out, np.where(want < 0, 0, want))
    g, h = rng.standard_normal(out.shape), rng.standard_normal(out.shape)
    g0 = g.copy()
    sp.step_relu_grad(a, b, g, h)
    assert np.array_equal(g, np.where(h > 0, g0 + _ordered_products(a, b), 0))


def test_nan_handling_is_numpys_relu_and_torchs_threshold_backward():
    """A NaN input stays NaN through the ReLU (np.maximum's rule); the backward's mask zeroes whatever it masks,
    NaN included (torch's threshold_backward), and a NaN state masks (NaN > 0 is false)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 2, 32)).astype(np.float32), rng.standard_normal((2, 32, 32)).astype(np.float32)
    out = rng.standard_normal((2, 2, 32)).astype(np.float32)
    out[0, 1, 3] = np.nan
    sp.step_relu(a, b, out)
    assert np.isnan(out[0, 1, 3]) and np.isnan(out).sum() == 1
    g = rng.standard_normal((2, 2, 32)).astype(np.float32)
    g[1, 0, 7] = g[1, 0, 8] = np.nan
    h = np.abs(rng.standard_normal((2, 2, 32))).astype(np.float32) + 1
    h[1, 0, 7], h[0, 0, 0] = 0, np.nan
    sp.step_relu_grad(a, b, g, h)
    assert g[1, 0, 7] == 0 and g[0, 0, 0] == 0 and np.isnan(g[1, 0, 8]) and np.isnan(g).sum() == 1


def test_what_the_kernels_take():
    assert sp.applies(7, 256) and sp.applies(1, 32)
    assert not sp.applies(7, 250) and not sp.applies(7, 16) and not sp.applies(0, 256)
    # the kernels index without bounds checks: shapes they would read or write past are refused before they run
    a, b, out = np.zeros((2, 3, 64)), np.zeros((2, 64, 48)), np.zeros((2, 3, 48))
    wide = np.zeros((2, 3, 96))
    for args in [(a, b, out),  # N = 48: not a multiple of 32
                 (a, np.zeros((2, 64, 64)), wide[:, :, :64][:, :2]),  # out's rows
                 (a[:, :, :32], np.zeros((2, 64, 64)), wide[:, :, :64]),  # a's K
                 (a, np.zeros((1, 64, 64)), wide[:, :, :64]),  # units
                 (a.astype(np.float32), np.zeros((2, 64, 64)), wide[:, :, :64])]:  # dtypes
        with pytest.raises(ValueError, match="step products need"):
            sp.step_relu(*args)
    with pytest.raises(ValueError, match="step products need"):
        sp.step_relu_grad(a, np.zeros((2, 64, 64)), wide[:, :, :64], np.zeros((2, 3, 32)))
    assert not wide.any()
    # one cached kernel per (rows, epilogue, dtype), however the dtype is named
    assert sp.step_kernel(2, "relu", np.float32) is sp.step_kernel(2.0, "relu", np.dtype("float32"))
    for rows, epilogue in [(0, "relu"), (sp.MAX_ROWS + 1, "relu"), (4, "gelu")]:
        with pytest.raises(ValueError, match="no step kernel"):
            sp._source(rows, epilogue)
    with pytest.raises(ValueError, match="float32 or float64"):
        sp.step_kernel(4, "relu", np.dtype(np.float16))
    # compiled for one signature only: float64 arrays are refused by the float32 kernel, not compiled for
    kernel = sp.step_kernel(2, "relu", np.dtype(np.float32))
    with pytest.raises(TypeError):
        kernel(np.zeros((1, 2, 32)), np.zeros((1, 32, 32)), np.zeros((1, 2, 32)))
