"""The training benchmark's FLOP count (benchmarks/train_throughput.py) against the hand count of its docstring."""

import importlib.util
from pathlib import Path

import pytest
import torch

from interbrain.config import make_train_config
from interbrain.train import Trainer

_spec = importlib.util.spec_from_file_location(
    "train_throughput", Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_counted_rnn_flops_match_the_hand_count(preset):
    """Counted = 2 agents x N steps x (2H^2 + 10H) x (1 + 3·epochs), less the first epoch's recurrence forward (the
    rollout's, replayed: 2 agents x N x 2H^2) and the dh of t = 0 the backward skips."""
    cfg = make_train_config("rnn", "social", 0, preset, 2, overrides={"num_envs": 8})
    tr = Trainer(cfg, torch.device("cpu"))
    with bench.flop_counter() as counter:
        bench.one_update(tr, 1)
    n, h, epochs = 8 * 100, 256, cfg.ppo.epochs
    skipped = 2 * epochs * 8 * 2 * h * h  # per agent and epoch: no gradient g_0 W for the (constant) zero state
    analytic = bench.rnn_analytic_gflop(epochs, steps=n) * 1e9
    assert analytic == 2 * n * (2 * h * h + 10 * h) * (1 + 3 * epochs) - 2 * n * 2 * h * h
    assert counter.get_total_flops() == pytest.approx(analytic - skipped, rel=2e-3)


def test_rllib_small_steps_are_counted_on_either_backend(small_matmul):
    """The rllib learner's step products are counted although numpy's BLAS may run them (linear.small_backend): the
    same count under both backends, and the backend restored afterwards."""
    cfg = make_train_config("rnn", "social", 0, "rllib", 2, overrides={"num_envs": 8})
    counts = []
    for backend in ("torch", "numpy"):
        small_matmul(backend)
        torch.manual_seed(0)
        tr = Trainer(cfg, torch.device("cpu"))
        with bench.flop_counter() as counter:
            bench.one_update(tr, 1)
        counts.append(counter.get_total_flops())
        from interbrain.agents.linear import small_backend
        assert small_backend() == backend
    assert counts[0] == counts[1] > 0


def test_cpu_attention_is_counted():
    """The CPU kernels of scaled_dot_product_attention count as the two products QK^T and PV (2·2·B·H·Lq·Lk·d), their
    backward as torch counts it (five such products: 2.5 times the forward)."""
    B, H, Lq, Lk, d = 3, 4, 7, 11, 16
    q = torch.randn(B, H, Lq, d, requires_grad=True)
    k, v = torch.randn(B, H, Lk, d), torch.randn(B, H, Lk, d)
    with bench.flop_counter() as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    forward = 2 * 2 * B * H * Lq * Lk * d
    assert counter.get_total_flops() == forward
    with bench.flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 5 * forward // 2


def test_onednn_peak_is_measured_on_cpu_only():
    """The oneDNN rate times the product a b^T (checked against torch.mm inside) on CPU; other devices get None."""
    assert bench.onednn_matmul_gflops(torch.device("cuda"), n=8, repeats=1) is None
    rate = bench.onednn_matmul_gflops(torch.device("cpu"), n=64, repeats=2)
    if torch.backends.mkldnn.is_available():
        assert rate is not None and rate > 0
    linear = torch.ops.mkldnn._linear_pointwise
    a, b = torch.randn(5, 7), torch.randn(3, 7)
    torch.testing.assert_close(linear(a, b, None, "none", [], ""), a @ b.t())


@pytest.mark.parametrize("backend", ["torch", "onednn"])
def test_dense_layer_flops_are_counted_on_either_kernel(cpu_matmul, backend):
    """A Linear's forward and backward count 3 x 2·M·K·N (product, input gradient, weight gradient) whichever kernel
    runs them (interbrain.agents.linear), so the counted work of an update does not depend on the backend."""
    from interbrain.agents import linear as L

    if backend == "onednn" and not L.onednn_available():
        pytest.skip("this torch has no oneDNN")
    assert cpu_matmul(backend) == backend
    M, K, N = 300, 64, 192
    x = torch.randn(M, K, requires_grad=True)
    layer = L.Linear(K, N)
    with bench.flop_counter() as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * M * K * N


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch's CPU LSTM runs on oneDNN only with it")
def test_cpu_lstm_is_counted():
    """torch's CPU LSTM (oneDNN's recurrent layer where torch uses it) counts its gate products: 2·T·B·4H·(I + H)
    forward, twice that backward; torch's own counter leaves the kernel out."""
    T, B, I, H = 6, 5, 7, 3
    lstm = torch.nn.LSTM(I, H)
    x = torch.randn(T, B, I, requires_grad=True)
    with bench.flop_counter() as counter:
        out = lstm(x)[0]
    forward = 2 * T * B * 4 * H * (I + H)
    assert counter.get_total_flops() == forward
    with bench.flop_counter() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * forward


@pytest.fixture
def one_thread():
    """One torch thread and one BLAS thread, as the benchmark measures (numpy's BLAS would otherwise take both cores,
    and on a loaded 2-core machine a 2-thread product's time swings by several times between calls); restored
    afterwards."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(threads)


def test_matrix_kernel_time_is_the_products_share(one_thread):
    """A function of nothing but large products spends (nearly) all its time in matrix kernels; one of elementwise
    work none; a mix in between, with the products' part close to their time alone (each the fastest of five calls,
    alternating: the machine may be shared)."""
    import time

    a, b = torch.randn(512, 512), torch.randn(512, 512)
    x = torch.randn(4_000_000)

    def products():
        for _ in range(10):
            torch.mm(a, b)

    def elementwise():
        for _ in range(10):
            x.mul(1.5).add_(2.0)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    products(), elementwise()  # warm-up
    assert bench.matrix_kernel_seconds(elementwise) == 0.0
    # alone and inside alternate, so a burst of another tenant's load reaches both minima alike
    alone, inside, mixed = (min(times) for times in zip(*(
        (timed(products), bench.matrix_kernel_seconds(products),
         bench.matrix_kernel_seconds(lambda: (products(), elementwise()))) for _ in range(5))))
    assert 0.5 * alone < inside < 2 * alone  # loose: the machine may be shared
    assert 0.5 * alone < mixed < 2 * alone


def test_matrix_kernel_time_counts_numpy_products(one_thread):
    """The numpy paths' np.matmul products count as matrix work too (numpy's elementwise work does not), and
    np.matmul is left as it was."""
    import time

    import numpy as np

    a, b = np.random.rand(512, 512).astype(np.float32), np.random.rand(512, 512).astype(np.float32)
    x = np.random.rand(4_000_000).astype(np.float32)

    def products():
        for _ in range(10):
            np.matmul(a, b)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    products()
    real = np.matmul
    assert bench.matrix_kernel_seconds(lambda: np.multiply(x, 1.5, out=x)) == 0.0
    # alone and inside alternate, so a burst of another tenant's load reaches both minima alike
    alone, inside = (min(times) for times in zip(*((timed(products), bench.matrix_kernel_seconds(products))
                                                  for _ in range(5))))
    assert 0.5 * alone < inside < 2 * alone
    assert np.matmul is real


def test_ensemble_sizes_are_parsed_or_refused_in_one_line():
    import argparse

    assert bench.ensemble_sizes("0") == [] and bench.ensemble_sizes("20,80") == [20, 80]
    for bad in ("4,x", "4,,", "-1", "20,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="unit counts"):
            bench.ensemble_sizes(bad)


def test_cpu_info_names_this_processor():
    """The benchmark records which processor it ran on, read from /proc/cpuinfo: on Linux its family and model numbers
    (processors of one name differ twofold in speed) and the cores this process may use."""
    import os
    import platform

    from interbrain.provenance import cpu_info

    info = cpu_info()
    assert info["cores_visible"] == os.cpu_count()
    assert info["cores_usable"] == len(os.sched_getaffinity(0))
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
        assert f"model name\t: {info['cpu_model']}" in text
        assert f"cpu family\t: {info['cpu_family']}\n" in text and f"model\t\t: {info['cpu_model_number']}\n" in text
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
        assert info["avx512f"] == ("avx512f" in flags)


def test_interleaved_ratio_is_per_round_and_immune_to_a_load_burst(monkeypatch):
    """time_interleaved alternates the architectures update by update (rnn first in each round; the same update
    numbers for all, past disrnn's noiseless warm-up) and takes the median of per-round ratios: planted times where
    the mlp always takes 3x the same round's RNN update, and a burst slows the machine tenfold in some rounds, give
    exactly 3 with no spread, and the warm-up rounds are not timed."""
    calls = []
    load = [1.0, 1.0, 10.0, 10.0, 1.0, 10.0, 1.0]  # per round, warm-up rounds included
    cost = {"rnn": 1.0, "mlp": 3.0}

    def fake_update(tr, update):
        arch = tr.config.agent.arch
        rnd = sum(1 for a, _ in calls if a == arch)
        calls.append((arch, update))
        return 0.0, cost[arch] * load[rnd] * (1 + 0.01 * rnd)

    monkeypatch.setattr(bench, "one_update", fake_update)
    out = bench.time_interleaved(["mlp", "rnn"], "matched", "fast", warmup=2, rounds=5, device=torch.device("cpu"))
    assert [a for a, _ in calls] == ["rnn", "mlp"] * 7
    first = make_train_config("mlp", "social", 0, "fast", 2, size="matched").agent.bottleneck_warmup
    assert [u for a, u in calls if a == "rnn"] == [u for a, u in calls if a == "mlp"] == list(range(first + 1, first + 8))
    rows = {r["arch"]: r for r in out["updates"]}
    assert rows["rnn"]["vs_rnn_interleaved"] == 1.0
    assert rows["mlp"]["vs_rnn_interleaved"] == pytest.approx(3.0)
    assert rows["mlp"]["vs_rnn_interleaved_range"] == pytest.approx([3.0, 3.0])
    assert rows["mlp"]["seconds_per_update"] == pytest.approx(3 * 10 * 1.02)  # rounds 2..6: 30.6, 30.9, 3.12, 31.5, 3.18
    assert out["rounds"] == 5 and out["preset"] == "fast"
