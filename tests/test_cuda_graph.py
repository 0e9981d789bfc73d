"""interbrain.cuda_graph.Captured: a replayed graph computes its function of the new inputs (CUDA only)."""

import pytest
import torch

from interbrain.cuda_graph import Captured

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_replay_computes_the_function_of_each_new_input():
    def loop(x, y):  # 50 small kernels: a running sum that depends on every step
        acc = torch.zeros_like(x)
        for t in range(50):
            acc = acc * 0.5 + x * t - y
        return acc, acc.sum()

    g = torch.Generator(device="cuda").manual_seed(0)
    x0, y0 = torch.randn(64, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
    graph = Captured(loop, (x0, y0))
    for _ in range(3):
        x, y = torch.randn(64, device="cuda", generator=g), torch.randn(64, device="cuda", generator=g)
        want, want_sum = loop(x, y)
        got, got_sum = graph(x, y)
        assert torch.equal(got, want) and torch.equal(got_sum, want_sum)
    with pytest.raises(ValueError, match="captured for"):
        graph(x0[:10], y0[:10])


def test_a_captured_backward_overwrites_the_gradient():
    w = torch.nn.Parameter(torch.randn(8, device="cuda"))

    def loss_backward(x):
        loss = (w * x).square().sum()
        loss.backward()
        return loss

    x0 = torch.randn(8, device="cuda")
    graph = Captured(loss_backward, (x0,), before_capture=lambda: setattr(w, "grad", None))
    for _ in range(3):  # replays, not accumulation: dL/dw = 2 w x^2 each time
        x = torch.randn(8, device="cuda")
        loss = graph(x)
        assert torch.allclose(loss, (w * x).square().sum())
        assert torch.allclose(w.grad, 2 * w.detach() * x.square())
