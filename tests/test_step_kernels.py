"""Compiled loops against the torch calls they replace: the written-out acting loops' steps
(interbrain/step_kernels.py: the input rows as index_select + embedding_bag, the Gumbel-max actions as argmax of
logits + noise with the first maximum and NaN as the largest, the environment's move as ChaseEnv.next_pair) and the
RNN learning pass's per-step ReLU and ReLU mask (agents/rnn.py), and the disRNN update nets' hidden layer."""

from __future__ import annotations

import numpy as np
import torch

from interbrain.env import ChaseEnv, EnvConfig
from interbrain.step_kernels import gather_inputs, sample_and_move


def test_sample_and_move_is_argmax_then_the_transition_table():
    env = ChaseEnv(EnvConfig(horizon=10), batch=7)
    env.reset(torch.Generator().manual_seed(0))
    _, _, next_pair = env.acting_tables(torch.zeros(2, 1, 2, dtype=torch.long))
    g = torch.Generator().manual_seed(1)
    logits, noise = torch.randn(2, 7, 4, generator=g), torch.randn(2, 7, 4, generator=g)
    logits[0, 0] = torch.tensor([1.0, 3.0, 3.0, 0.0])  # a tie: the first maximum
    noise[0, 0] = 0.0
    logits[1, 1, 2] = float("nan")  # NaN counts as the largest
    logits[1, 2, 1:3] = float("nan")  # the first NaN
    actions, pair_out = np.empty((2, 7), np.int64), np.empty(7, np.int64)
    sample_and_move(logits.numpy(), noise.numpy(), env.pair.numpy(), next_pair.numpy(), actions, pair_out)
    ref = torch.argmax(logits + noise, dim=-1)
    assert torch.equal(torch.from_numpy(actions), ref)
    assert actions[0, 0] == 1 and actions[1, 1] == 2 and actions[1, 2] == 1
    expected = env.next_pair(env.pair, ref, torch.empty(7, dtype=torch.long))
    assert torch.equal(torch.from_numpy(pair_out), expected)


def test_gather_inputs_is_the_observation_rows_embedding_bag():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(2 * 201, 8, generator=g)
    obs = torch.randint(0, 2 * 201, (2, 50, 2), generator=g)
    at, offsets = torch.randint(0, 25, (5,), generator=g), torch.tensor([0, 25, 0, 25, 25])
    out = np.empty((2, 5, 8), np.float32)
    for episode_offset in (None, offsets):
        rows = at if episode_offset is None else at + episode_offset
        gather_inputs(obs.numpy(), at.numpy(), np.empty(0, np.int64) if episode_offset is None else
                      episode_offset.numpy(), table.numpy(), out)
        picked = torch.index_select(obs, 1, rows).reshape(-1)
        ref = torch.embedding_bag(table, picked, torch.arange(0, picked.numel(), 2), False, 0, False, None, False,
                                  None)[0].view(2, 5, 8)
        assert torch.equal(torch.from_numpy(out), ref)


def test_rnn_relu_loops_equal_torchs_relu_and_threshold_backward():
    """The RNN learning pass's per-step ReLU and ReLU mask (agents/rnn.py's compiled loops) against torch's relu_ and
    threshold_backward, NaN included (the ReLU keeps it; the mask keeps a gradient where the output is NaN)."""
    from interbrain.agents.rnn import relu_grad_rows, relu_rows

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 256, generator=g)
    x[0, :3] = torch.tensor([float("nan"), 0.0, -0.0])
    mine = x.clone()
    relu_rows(mine.numpy())
    assert torch.equal(torch.nan_to_num(mine, nan=7.0), torch.nan_to_num(torch.relu(x), nan=7.0))
    grad, out = torch.randn(40, 256, generator=g), torch.relu(torch.randn(40, 256, generator=g))
    out[1, :2] = torch.tensor([float("nan"), 0.0])
    mine = grad.clone()
    relu_grad_rows(mine.numpy(), out.numpy())
    assert torch.equal(mine, torch.ops.aten.threshold_backward(grad, out, 0))
    assert mine[1, 0] == grad[1, 0] and mine[1, 1] == 0


def test_disrnn_leaky_residual_is_the_numpy_layer_bit_for_bit():
    """The update nets' hidden layer as one compiled pass (agents/disrnn.py) against the numpy calls it replaced
    (a += bias; slope = max(sign(a), LEAK); s + max(a, LEAK·a)), bit for bit, with a bias per net or per net and
    episode, NaN and zeros included; without a slope record it writes none."""
    from interbrain.agents.disrnn import LEAK, NO_SLOPES, leaky_residual

    rng = np.random.default_rng(4)
    s, a = (rng.standard_normal((10, 40, 38)).astype(np.float32) for _ in range(2))
    a[0, 0, :3] = [np.nan, 0.0, -0.0]
    for bias in (rng.standard_normal((10, 1, 38)).astype(np.float32), rng.standard_normal((10, 40, 38)).astype(np.float32)):
        ref_a = a + bias
        ref_slope = np.maximum(np.sign(ref_a), LEAK)
        ref_out = s + np.maximum(ref_a, LEAK * ref_a)
        out, slope = np.empty_like(s), np.empty_like(s)
        leaky_residual(s, a, bias, slope, out)
        assert np.array_equal(out, ref_out, equal_nan=True) and np.array_equal(slope, ref_slope, equal_nan=True)
        assert np.isnan(out[0, 0, 0]) and np.isnan(slope[0, 0, 0])
        again = np.empty_like(s)
        leaky_residual(s, a, bias, NO_SLOPES, again)
        assert np.array_equal(again, out, equal_nan=True)
