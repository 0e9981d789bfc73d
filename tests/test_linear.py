"""`interbrain.agents.linear`: the oneDNN dense layer equals torch's (values and every gradient, to float tolerance),
small inputs keep torch's kernel bit for bit, and the backend choice is fixed, validated and overridable."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from interbrain.agents import linear as L
from interbrain.errors import InterbrainError

needs_onednn = pytest.mark.skipif(not L.onednn_available(), reason="this torch has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("shape,bias", [((300, 64), True), ((3, 100, 64), True), ((4000, 64), False), ((7, 40, 64), True)])
def test_onednn_linear_equals_torch_values_and_gradients(cpu_matmul, shape, bias):
    assert cpu_matmul("onednn") == "onednn"
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(192, 64, requires_grad=True)
    b = torch.randn(192, requires_grad=True) if bias else None
    params = [x, w] + ([b] if bias else [])
    g = torch.randn(*shape[:-1], 192)
    ref = F.linear(x, w, b)
    ref_grads = torch.autograd.grad((ref * g).sum(), params)
    out = L.linear(x, w, b)
    grads = torch.autograd.grad((out * g).sum(), params)
    assert out.shape == ref.shape and out.grad_fn is not None
    assert "OneDNNLinear" in type(out.grad_fn).__name__ or any(
        "OneDNNLinear" in type(f[0]).__name__ for f in out.grad_fn.next_functions if f[0] is not None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-3)


@needs_onednn
def test_non_contiguous_bias_is_read_as_its_values(cpu_matmul):
    """oneDNN reads a bias as dense memory: a strided or broadcast bias must give F.linear's values."""
    cpu_matmul("onednn")
    torch.manual_seed(2)
    x, w = torch.randn(300, 64), torch.randn(192, 64)
    for bias in (torch.randn(384)[::2], torch.randn(1).expand(192), torch.randn(192, 2)[:, 1]):
        assert not bias.is_contiguous()
        torch.testing.assert_close(L.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_small_inputs_and_other_dtypes_keep_torchs_kernel_bit_for_bit(cpu_matmul):
    cpu_matmul("onednn")
    torch.manual_seed(1)
    w, b = torch.randn(192, 64), torch.randn(192)
    small = torch.randn(L.MIN_ROWS - 1, 64)  # acting sizes: e.g. 40 episodes
    assert torch.equal(L.linear(small, w, b), F.linear(small, w, b))
    big64 = torch.randn(L.MIN_ROWS, 64, dtype=torch.float64)
    assert torch.equal(L.linear(big64, w.double(), b.double()), F.linear(big64, w.double(), b.double()))


@needs_onednn
def test_the_torch_backend_is_torchs_kernel(cpu_matmul):
    assert cpu_matmul("torch") == "torch"
    x, w = torch.randn(4000, 64), torch.randn(192, 64)
    assert torch.equal(L.linear(x, w), F.linear(x, w))


@needs_onednn
def test_double_backward_is_refused(cpu_matmul):
    cpu_matmul("onednn")
    x = torch.randn(L.MIN_ROWS, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(L.linear(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


def test_backend_choice_is_validated(cpu_matmul):
    with pytest.raises(InterbrainError, match="INTERBRAIN_CPU_MATMUL='blas' is not one of"):
        cpu_matmul("blas")
    assert cpu_matmul("auto") in ("torch", "onednn")
    expected = "onednn" if L.onednn_available() and torch.backends.cpu.get_cpu_capability() == "AVX512" else "torch"
    assert cpu_matmul("auto") == expected


def test_small_backend_choice_is_validated(small_matmul):
    with pytest.raises(InterbrainError, match="INTERBRAIN_CPU_SMALL_MATMUL='mkl' is not one of"):
        small_matmul("mkl")
    assert small_matmul("torch") == "torch" and small_matmul("numpy") == "numpy"
    from interbrain.provenance import cpu_info

    expected = ("numpy" if "openblas" in L.numpy_blas().lower() and cpu_info()["cpu_vendor"] == "AuthenticAMD"
                and torch.backends.cpu.get_cpu_capability() == "AVX512" else "torch")
    assert small_matmul("auto") == expected


def test_set_cpu_threads_sets_torch_and_numpys_blas():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before, blas_before = torch.get_num_threads(), blas_threads()
    assert blas_before  # numpy's BLAS is visible to threadpoolctl
    try:
        L.set_cpu_threads(2)
        assert torch.get_num_threads() == 2 and set(blas_threads()) == {2}
        L.set_cpu_threads(1)
        assert torch.get_num_threads() == 1 and set(blas_threads()) == {1}
    finally:
        torch.set_num_threads(before)
        threadpool_limits(limits=max(blas_before), user_api="blas")


def test_linear_module_is_nn_linear_with_the_same_parameters_and_init():
    torch.manual_seed(3)
    mine = L.Linear(200, 64)
    torch.manual_seed(3)
    theirs = nn.Linear(200, 64)
    assert isinstance(mine, nn.Linear)
    assert mine.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(mine.state_dict()[k], theirs.state_dict()[k]) for k in theirs.state_dict())
    x = torch.randn(10, 200)
    assert torch.equal(mine(x), theirs(x))  # 10 rows: torch's kernel


@pytest.mark.parametrize("bias", [True, False])
def test_narrow_products_on_numpy_equal_the_float64_product(small_matmul, bias):
    """The heads' narrow products (5 columns) on numpy: :func:`linear` takes :class:`NarrowLinear` at MIN_ROWS rows
    and more, and its value and all three gradients equal the float64 product; below MIN_ROWS (acting) or under the
    torch small backend it is F.linear itself, bit for bit."""
    assert small_matmul("numpy") == "numpy"
    torch.manual_seed(4)
    x = torch.randn(4000, 256).relu_().requires_grad_()
    w = (0.1 * torch.randn(5, 256)).requires_grad_()
    b = torch.randn(5, requires_grad=True) if bias else None
    params = [x, w] + ([b] if bias else [])
    g = torch.randn(4000, 5)
    out = L.linear(x, w, b)
    assert "NarrowLinear" in type(out.grad_fn).__name__ or any(
        "NarrowLinear" in type(f[0]).__name__ for f in out.grad_fn.next_functions if f[0] is not None)
    grads = torch.autograd.grad((out * g).sum(), params)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref = F.linear(ref_params[0], ref_params[1], ref_params[2] if bias else None)
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_params)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for mine, want in zip(grads, ref_grads):
        torch.testing.assert_close(mine.double(), want, rtol=1e-5, atol=1e-3)
    small = x.detach()[: L.MIN_ROWS - 1]
    assert torch.equal(L.linear(small, w.detach(), None), F.linear(small, w.detach()))
    assert small_matmul("torch") == "torch"
    assert not L.narrow_on_numpy(x, 5)
    wide = torch.randn(L.NARROW_COLS + 1, 256)
    assert small_matmul("numpy") == "numpy" and not L.narrow_on_numpy(x, wide.shape[0])


def test_narrow_helpers_compute_the_product_and_its_gradients(small_matmul):
    """narrow_product, narrow_input_grad (also into a given buffer) and narrow_weight_grad on numpy against float64
    ground truth: x W^T + b, g W and g^T x."""
    assert small_matmul("numpy") == "numpy"
    torch.manual_seed(5)
    x, w, b, g = torch.randn(500, 256), torch.randn(5, 256), torch.randn(5), torch.randn(500, 5)
    torch.testing.assert_close(L.narrow_product(x, w, b).double(), x.double() @ w.double().t() + b.double(),
                               rtol=1e-5, atol=1e-4)
    buf = torch.full((500, 256), float("nan"))
    assert L.narrow_input_grad(g, w, out=buf) is buf
    torch.testing.assert_close(buf.double(), g.double() @ w.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(L.narrow_weight_grad(g, x).double(), g.double().t() @ x.double(), rtol=1e-5, atol=1e-3)
