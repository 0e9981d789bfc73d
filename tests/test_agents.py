"""Conformance of every architecture to the agent contract (SPEC §3.1–3.3) and to its own definition.

Ground truths used here: hand-written numpy forward passes (rnn, mlp, ssm, transformer, gru, lstm, mingru, minlstm),
the exact parameter tables of SPEC §3.2/§3.3/§3.4 (plus the matched counts documented in the §3.4 modules), the
step-vs-sequence identity of §3.1, and the transformer context rule of §3.2 (a step's output equals a fresh pass over
exactly its own window).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from agent_helpers import TOL, assert_parity, run_steps, two_hot_obs
from interbrain.agents import HIDDEN, build_agent, build_pair
from interbrain.agents.ssm import chunked_linear_scan, scan_chunk
from interbrain.config import AgentConfig
from interbrain.errors import InterbrainError

torch.set_num_threads(1)

ARCHS = ["rnn", "mlp", "ssm", "transformer", "gru", "lstm", "mingru", "minlstm"]
ARCH_SIZES = [("rnn", "std"), ("mlp", "std"), ("mlp", "matched"), ("ssm", "std"), ("ssm", "matched"),
              ("transformer", "std"), ("transformer", "matched"), ("gru", "std"), ("gru", "matched"),
              ("lstm", "std"), ("lstm", "matched"), ("mingru", "std"), ("mingru", "matched"),
              ("minlstm", "std"), ("minlstm", "matched")]
PARAMS = {("rnn", "std"): 118_533, ("rnn", "matched"): 118_533, ("mlp", "std"): 476_933, ("mlp", "matched"): 120_389,
          ("ssm", "std"): 381_701, ("ssm", "matched"): 126_085, ("transformer", "std"): 1_133_061,
          ("transformer", "matched"): 120_773, ("gru", "std"): 353_029, ("gru", "matched"): 119_206,
          ("lstm", "std"): 470_277, ("lstm", "matched"): 119_141, ("mingru", "std"): 235_781,
          ("mingru", "matched"): 118_789, ("minlstm", "std"): 353_029, ("minlstm", "matched"): 118_588}
# `hidden` is (part of) the carried state: SPEC §6.6 (rnn, gru, the h-part of lstm, mingru, minlstm). The matched
# gru/lstm read `hidden` through a projection of a narrower state, so there it is not carried.
CARRIES = {("rnn", "std"), ("rnn", "matched"), ("gru", "std"), ("lstm", "std"), ("mingru", "std"),
           ("mingru", "matched"), ("minlstm", "std"), ("minlstm", "matched")}


def make_agent(arch, size="std", seed=0, **kw):
    torch.manual_seed(seed)
    return build_agent(AgentConfig(arch=arch, size=size, **kw))


# --- sizes and construction ----------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", list(PARAMS))
def test_parameter_counts_match_spec_tables(arch, size):
    agent = make_agent(arch, size)
    assert agent.num_parameters() == PARAMS[(arch, size)]
    assert agent.card()["parameters_per_agent"] == PARAMS[(arch, size)]
    assert agent.action_head.weight.shape == (4, HIDDEN) and agent.value_head.weight.shape == (1, HIDDEN)
    card = agent.card()
    assert card["architecture"] == arch and card["size"] == size and card["hidden"] and card["memory"]
    assert card["context_limit"] == {"mlp": 8, "transformer": 100}.get(arch)
    assert card["carries_hidden"] is ((arch, size) in CARRIES)


def test_transformer_position_table_has_exactly_window_rows():
    for window in (100, 37):
        agent = make_agent("transformer", window=window)
        assert agent.pos_table.shape == (window, 256)
        assert agent.context_limit() == window and agent.card()["context_limit"] == window
    # the reproduction's 512-row table gave 1,238,533 (SPEC §3.2 table)
    assert make_agent("transformer", window=512).num_parameters() == 1_238_533


def test_rope_is_refused_with_a_named_error():
    with pytest.raises(InterbrainError, match="rope"):
        make_agent("transformer", pos="rope")


@pytest.mark.parametrize("arch", ARCHS)
def test_build_pair_is_reproducible_and_agents_are_independent(arch):
    chaser, explorer = build_pair(AgentConfig(arch=arch, size="matched"), seed=3)
    chaser2, explorer2 = build_pair(AgentConfig(arch=arch, size="matched"), seed=3)
    other, _ = build_pair(AgentConfig(arch=arch, size="matched"), seed=4)
    for a, b in ((chaser, chaser2), (explorer, explorer2)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    w = lambda m: torch.cat([p.flatten() for p in m.parameters()])  # noqa: E731
    assert not torch.equal(w(chaser), w(explorer))
    assert not torch.equal(w(chaser), w(other))


@pytest.mark.parametrize("arch", ["mlp", "ssm", "transformer", "mingru", "minlstm"])
def test_non_rnn_archs_have_no_recurrent_penalty(arch):
    agent = make_agent(arch)
    assert agent.recurrent_weight_norm().item() == 0.0
    assert agent.input_weight_norm().item() > 0.0
    if (arch, "std") not in CARRIES:
        assert agent.card()["carries_hidden"] is False
        with pytest.raises(InterbrainError):
            agent.with_hidden(agent.initial_state(1), torch.zeros(1, HIDDEN))


@pytest.mark.parametrize("arch,size", [(a, s) for a, s in ARCH_SIZES if a in ("gru", "lstm", "mingru", "minlstm")])
def test_with_hidden_replaces_exactly_hidden_or_is_refused(arch, size):
    """Carried: with_hidden(state', h) swaps in h where `hidden` lives and keeps the rest; else a named error."""
    agent = make_agent(arch, size)
    with torch.no_grad():
        (_, _, h), state = run_steps(agent, two_hot_obs(5, 2, seed=22))
    if (arch, size) not in CARRIES:
        with pytest.raises(InterbrainError, match="does not carry"):
            agent.with_hidden(state, h[-1])
        return
    where = {"gru": 0, "lstm": 0, "mingru": 1, "minlstm": 1}[arch]  # index of `hidden` in the state tuple
    torch.testing.assert_close(state[where], h[-1], atol=0, rtol=0)
    new = torch.randn(2, HIDDEN)
    swapped = agent.with_hidden(state, new)
    assert len(swapped) == len(state) and torch.equal(swapped[where], new)
    assert all(torch.equal(a, b) for i, (a, b) in enumerate(zip(swapped, state)) if i != where)


@pytest.mark.parametrize("arch", ["gru", "lstm"])
def test_gated_rnns_penalise_weight_hh_and_keep_torch_names(arch):
    agent = make_agent(arch)
    assert agent.recurrent_weight_norm().item() == pytest.approx(agent.rnn.weight_hh_l0.norm().item(), rel=1e-6)
    assert agent.input_weight_norm().item() == pytest.approx(agent.rnn.weight_ih_l0.norm().item(), rel=1e-6)
    gates = {"gru": 3, "lstm": 4}[arch]
    shapes = {"rnn.weight_ih_l0": (gates * 256, 200), "rnn.weight_hh_l0": (gates * 256, 256),
              "rnn.bias_ih_l0": (gates * 256,), "rnn.bias_hh_l0": (gates * 256,), "action_head.weight": (4, 256),
              "action_head.bias": (4,), "value_head.weight": (1, 256), "value_head.bias": (1,)}
    assert {k: tuple(v.shape) for k, v in agent.state_dict().items()} == shapes
    plain = (nn.GRU if arch == "gru" else nn.LSTM)(200, 256)
    agent.rnn.load_state_dict(plain.state_dict(), strict=True)  # an nn.GRU / nn.LSTM loads as is


# --- step == sequence (SPEC §3.1) -------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", ARCH_SIZES)
def test_step_equals_sequence_T100(arch, size):
    agent = make_agent(arch, size)
    h = assert_parity(agent, two_hot_obs(100, 3, seed=1))
    assert h.abs().sum() > 0


@pytest.mark.parametrize("arch,size", [("rnn", "std"), ("ssm", "matched"), ("mlp", "matched")]
                         + [(a, s) for a in ("gru", "lstm", "mingru", "minlstm") for s in ("std", "matched")])
def test_step_equals_sequence_from_a_nonzero_state(arch, size):
    agent = make_agent(arch, size)
    g = torch.Generator().manual_seed(5)
    state0 = tuple(torch.rand(s.shape, generator=g) for s in agent.initial_state(3))
    h_from_state = assert_parity(agent, two_hot_obs(40, 3, seed=2), state0)
    with torch.no_grad():
        h_from_zero = agent.sequence(two_hot_obs(40, 3, seed=2))[2]
    assert (h_from_state - h_from_zero).abs().max() > 1e-3  # the state really entered


@pytest.mark.parametrize("T", [1, 12, 97, 100, 500])
def test_chunked_scan_equals_the_sequential_loop(T):
    g = torch.Generator().manual_seed(T)
    a = torch.rand(T, 4, 8, generator=g)
    a[T // 2] = 0.0  # a hard reset must not break the scan (no division, no logarithm)
    b = torch.randn(T, 4, 8, generator=g)
    s0 = torch.randn(4, 8, generator=g)
    s, states = s0, []
    for t in range(T):
        s = a[t] * s + b[t]
        states.append(s)
    torch.testing.assert_close(chunked_linear_scan(a, b, s0), torch.stack(states), **TOL)


def test_chunked_scan_gradient_is_the_sequential_loops_in_float64():
    """LinearScan's hand-written backward (the reverse recurrence) against autograd through the sequential loop, in
    float64: the gradients of a, b and s0, with a hard reset in a and a loss that reaches every step."""
    g = torch.Generator().manual_seed(7)
    T = 100
    a = torch.rand(T, 4, 8, generator=g, dtype=torch.float64)
    a[T // 3] = 0.0
    b = torch.randn(T, 4, 8, generator=g, dtype=torch.float64)
    s0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(T, 4, 8, generator=g, dtype=torch.float64)
    grads = []
    for scan in (chunked_linear_scan, None):
        leaves = [x.clone().requires_grad_() for x in (a, b, s0)]
        if scan is None:
            s, states = leaves[2], []
            for t in range(T):
                s = leaves[0][t] * s + leaves[1][t]
                states.append(s)
            out = torch.stack(states)
        else:
            out = scan(*leaves)
            assert out.grad_fn.name().startswith("LinearScan")
        (out.tanh() * weight).sum().backward()
        grads.append([x.grad for x in leaves])
    for mine, ref, name in zip(*grads, "a b s0".split()):
        assert mine.shape == ref.shape
        torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12, msg=name)


def test_scan_chunk_is_the_largest_divisor_below_sqrt():
    assert [scan_chunk(T) for T in (1, 12, 97, 100, 500, 36)] == [1, 3, 1, 10, 20, 6]


@pytest.mark.parametrize("T", [97, 500])
def test_ssm_step_equals_sequence_long_and_prime(T):
    assert_parity(make_agent("ssm", "matched"), two_hot_obs(T, 2, seed=T))


@pytest.mark.parametrize("arch", ["mingru", "minlstm"])
@pytest.mark.parametrize("T", [97, 500])
def test_min_rnn_step_equals_sequence_long_and_prime(arch, T):
    assert_parity(make_agent(arch, "matched"), two_hot_obs(T, 2, seed=T))


@pytest.mark.parametrize("size", ["std", "matched"])
def test_transformer_T250_beyond_the_window(size):
    agent = make_agent("transformer", size)
    assert_parity(agent, two_hot_obs(250, 2, seed=4))
    assert agent.max_position_used == 99 and agent.max_context_used == 100


@pytest.mark.parametrize("t0", [3, 6, 7, 12])
def test_transformer_sequence_continues_any_state(t0):
    """A small window (W=7) hits every case: state inside/at/after the first window."""
    agent = make_agent("transformer", "matched", window=7)
    obs = two_hot_obs(t0 + 20, 2, seed=t0)
    with torch.no_grad():
        (_, _, h_all), _ = run_steps(agent, obs)
        _, state = run_steps(agent, obs[:t0])
    assert state[0] == t0 and state[1].shape[1] == min(t0, 6)
    h_tail = assert_parity(agent, obs[t0:], state)
    torch.testing.assert_close(h_tail, h_all[t0:], **TOL)


# --- causality and memory ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_is_causal(arch):
    agent = make_agent(arch, "matched", window=20)
    obs = two_hot_obs(30, 2, seed=7)
    changed = obs.clone()
    changed[15:] = two_hot_obs(15, 2, seed=8)
    with torch.no_grad():
        h, h2 = agent.sequence(obs)[2], agent.sequence(changed)[2]
    torch.testing.assert_close(h2[:15], h[:15], atol=0, rtol=0)
    assert (h2[15] - h[15]).abs().max() > 1e-4  # the change at t=15 is seen at t=15


def test_mlp_sees_exactly_eight_frames():
    agent = make_agent("mlp", "matched")
    obs = two_hot_obs(20, 2, seed=9)
    for lag, seen in ((7, True), (8, False)):
        changed = obs.clone()
        changed[12 - lag] = two_hot_obs(1, 2, seed=10)[0]
        with torch.no_grad():
            diff = (agent.sequence(changed)[2][12] - agent.sequence(obs)[2][12]).abs().max()
        assert (diff > 1e-4) == seen, lag


def test_transformer_step_after_window_forgets_older_steps():
    agent = make_agent("transformer", "matched", window=10)
    obs = two_hot_obs(25, 2, seed=11)
    changed = obs.clone()
    changed[4] = two_hot_obs(1, 2, seed=12)[0]
    with torch.no_grad():
        h, h2 = agent.sequence(obs)[2], agent.sequence(changed)[2]
    assert (h2[13] - h[13]).abs().max() > 1e-4  # window of t=13 is [4, 13]
    torch.testing.assert_close(h2[14:], h[14:], atol=0, rtol=0)  # windows from t=14 on start after 4


# --- transformer context rule (SPEC §3.2, pitfall 6) ------------------------------------------------
def test_transformer_each_step_equals_a_fresh_pass_over_its_own_window():
    """Step t < W sees 0..t at positions 0..t; step t >= W sees t-W+1..t re-indexed to 0..W-1."""
    W = 8
    agent = make_agent("transformer", "matched", window=W)
    obs = two_hot_obs(30, 2, seed=13)
    with torch.no_grad():
        (_, _, h), _ = run_steps(agent, obs)
        for t in (0, 5, 7, 8, 19, 29):
            fresh = agent.sequence(obs[max(0, t - W + 1): t + 1])[2][-1]
            torch.testing.assert_close(h[t], fresh, **TOL)


def test_transformer_context_never_exceeds_window_and_position_W_raises():
    W = 100
    agent = make_agent("transformer", "matched", window=W)
    assert agent.max_position_used == -1 and agent.max_context_used == 0
    with torch.no_grad():
        agent.sequence(two_hot_obs(250, 2, seed=14))
        (_, _, _), state = run_steps(agent, two_hot_obs(120, 1, seed=15))
    assert agent.max_position_used <= W - 1 and agent.max_context_used <= W
    assert state[0] == 120 and state[1].shape[1] == W - 1
    for start, stop in ((W, W + 1), (0, W + 1), (-1, 3)):
        with pytest.raises(InterbrainError, match="position"):
            agent.position_embedding(start, stop)
    assert agent.max_position_used == W - 1
    bad_state = (5,) + agent.initial_state(1)[1:]  # step counter 5 with no history
    with pytest.raises(InterbrainError, match="embeddings"):
        agent.step(two_hot_obs(1, 1)[0], bad_state)


def test_transformer_matches_a_numpy_forward_pass():
    """Pre-LN blocks, 4 heads, ReLU MLP, final LN and the matched projection, written out in float64."""
    agent = make_agent("transformer", "matched", window=10)
    obs = two_hot_obs(6, 1, seed=16)
    P = {k: v.double().numpy() for k, v in agent.state_dict().items()}

    def ln(x, w, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w + b

    x = obs[:, 0].double().numpy() @ P["inp.weight"].T + P["inp.bias"] + P["pos_table"][:6]
    T, d, H = 6, 64, 4
    for i in range(2):
        p = lambda name: P[f"blocks.{i}.{name}"]  # noqa: E731
        qkv = ln(x, p("ln_attn.weight"), p("ln_attn.bias")) @ p("qkv.weight").T + p("qkv.bias")
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        heads = []
        for h in range(H):
            sl = slice(h * 16, (h + 1) * 16)
            scores = q[:, sl] @ k[:, sl].T / 4.0 + np.triu(np.full((T, T), -np.inf), 1)
            att = np.exp(scores - scores.max(1, keepdims=True))
            heads.append((att / att.sum(1, keepdims=True)) @ v[:, sl])
        x = x + np.concatenate(heads, 1) @ p("attn_out.weight").T + p("attn_out.bias")
        m = np.maximum(ln(x, p("ln_mlp.weight"), p("ln_mlp.bias")) @ p("mlp_in.weight").T + p("mlp_in.bias"), 0)
        x = x + m @ p("mlp_out.weight").T + p("mlp_out.bias")
    hidden = np.maximum(ln(x, P["final_ln.weight"], P["final_ln.bias"]) @ P["hidden_proj.weight"].T
                        + P["hidden_proj.bias"], 0)
    with torch.no_grad():
        h = agent.sequence(obs)[2][:, 0].double().numpy()
    np.testing.assert_allclose(h, hidden, atol=1e-5)


# --- the other architectures against hand-written loops ------------------------------------------------
def test_mlp_matches_a_numpy_frame_stack():
    agent = make_agent("mlp", "matched")
    obs = two_hot_obs(12, 2, seed=17)
    P = {k: v.double().numpy() for k, v in agent.state_dict().items()}
    x = np.concatenate([np.zeros((7, 2, 200)), obs.double().numpy()])
    with torch.no_grad():
        h = agent.sequence(obs)[2].double().numpy()
    for t in range(12):
        stacked = np.concatenate([x[t + k] for k in range(8)], axis=1)  # x_{t-7} .. x_t, oldest first
        ref = np.maximum(np.maximum(stacked @ P["fc1.weight"].T + P["fc1.bias"], 0) @ P["fc2.weight"].T
                         + P["fc2.bias"], 0)
        np.testing.assert_allclose(h[t], ref, atol=1e-5)


def test_ssm_matches_a_numpy_recurrence():
    agent = make_agent("ssm", "matched")
    obs = two_hot_obs(15, 2, seed=18)
    P = {k: v.double().numpy() for k, v in agent.state_dict().items()}
    lin = lambda name, x: x @ P[f"{name}.weight"].T + P[f"{name}.bias"]  # noqa: E731
    s = [np.zeros((2, 128)), np.zeros((2, 128))]
    with torch.no_grad():
        h = agent.sequence(obs)[2].double().numpy()
    for t in range(15):
        y = obs[t].double().numpy()
        for i, layer in enumerate(("layer1", "layer2")):
            u = lin(f"{layer}.inp", y)
            a = 1.0 / (1.0 + np.exp(-lin(f"{layer}.decay", u)))
            s[i] = a * s[i] + (1 - a) * u
            y = np.maximum(lin(f"{layer}.mix", s[i]), 0)
        np.testing.assert_allclose(h[t], y, atol=1e-5)
    # SPEC init: decay bias 1, so the initial decay is about sigmoid(1) = 0.73
    assert torch.all(agent.layer1.decay.bias == 1) and torch.all(agent.layer2.decay.bias == 1)


def test_rnn_loads_released_weight_names_and_matches_numpy():
    g = torch.Generator().manual_seed(19)
    shapes = {"rnn.weight_ih_l0": (256, 200), "rnn.weight_hh_l0": (256, 256), "rnn.bias_ih_l0": (256,),
              "rnn.bias_hh_l0": (256,), "action_head.weight": (4, 256), "action_head.bias": (4,),
              "value_head.weight": (1, 256), "value_head.bias": (1,)}
    released = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    released["rnn.weight_hh_l0"] *= 0.4  # spectral radius ~0.6: stable, so float32 error stays small
    agent = make_agent("rnn")
    agent.load_state_dict(released, strict=True)
    P = {k: v.double().numpy() for k, v in released.items()}
    obs = two_hot_obs(30, 2, seed=20)
    with torch.no_grad():
        logits, value, hidden = agent.sequence(obs)
    h = np.zeros((2, 256))
    for t in range(30):
        x = obs[t].double().numpy()
        h = np.maximum(x @ P["rnn.weight_ih_l0"].T + P["rnn.bias_ih_l0"] + h @ P["rnn.weight_hh_l0"].T
                       + P["rnn.bias_hh_l0"], 0)
        np.testing.assert_allclose(hidden[t].numpy(), h, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits[t].numpy(), h @ P["action_head.weight"].T + P["action_head.bias"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(value[t].numpy(), (h @ P["value_head.weight"].T + P["value_head.bias"])[:, 0],
                                   rtol=1e-5, atol=1e-5)
    assert agent.recurrent_weight_norm().item() == pytest.approx(np.linalg.norm(P["rnn.weight_hh_l0"]), rel=1e-6)
    # the recurrent agent carries `hidden` (SPEC §3.1 carries_hidden): with_hidden sets the state
    state = agent.with_hidden(agent.initial_state(2), hidden[-1])
    torch.testing.assert_close(state[0], hidden[-1], atol=0, rtol=0)


def test_rnn_modern_init_norms():
    agent = make_agent("rnn", init="modern")
    assert agent.recurrent_weight_norm().item() == pytest.approx(12.8, rel=1e-5)
    assert torch.all(agent.rnn.bias_hh_l0 == 0) and torch.all(agent.rnn.bias_ih_l0 == 0)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_params(agent):
    return {k: v.double().numpy() for k, v in agent.state_dict().items()}


def _numpy_readout(P, h):
    hidden = np.maximum(h @ P["proj.weight"].T + P["proj.bias"], 0) if "proj.weight" in P else h
    return hidden, hidden @ P["action_head.weight"].T + P["action_head.bias"], \
        (hidden @ P["value_head.weight"].T + P["value_head.bias"])[:, 0]


def _compare(agent, obs, reference, state0=None):
    """`reference(P, x_t, state) -> (h, state)` in float64 numpy; checks `sequence`'s hidden/logits/value at every t."""
    P = _numpy_params(agent)
    with torch.no_grad():
        logits, value, hidden = agent.sequence(obs, state0)
    state = tuple(s.double().numpy() for s in (agent.initial_state(obs.shape[1]) if state0 is None else state0))
    for t in range(obs.shape[0]):
        h, state = reference(P, obs[t].double().numpy(), state)
        ref_hidden, ref_logits, ref_value = _numpy_readout(P, h)
        np.testing.assert_allclose(hidden[t].numpy(), ref_hidden, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits[t].numpy(), ref_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(value[t].numpy(), ref_value, rtol=1e-5, atol=1e-5)
    return state


def _gru_reference(P, x, state):
    """PyTorch's GRU written out: r, z, n blocks of W_ih / W_hh (in this order)."""
    (h,) = state
    gi = x @ P["rnn.weight_ih_l0"].T + P["rnn.bias_ih_l0"]
    gh = h @ P["rnn.weight_hh_l0"].T + P["rnn.bias_hh_l0"]
    w = h.shape[1]
    r = _sigmoid(gi[:, :w] + gh[:, :w])
    z = _sigmoid(gi[:, w:2 * w] + gh[:, w:2 * w])
    n = np.tanh(gi[:, 2 * w:] + r * gh[:, 2 * w:])
    h = (1 - z) * n + z * h
    return h, (h,)


def _lstm_reference(P, x, state):
    """PyTorch's LSTM written out: i, f, g, o blocks."""
    h, c = state
    a = x @ P["rnn.weight_ih_l0"].T + P["rnn.bias_ih_l0"] + h @ P["rnn.weight_hh_l0"].T + P["rnn.bias_hh_l0"]
    i, f, g, o = np.split(a, 4, axis=1)
    c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
    h = _sigmoid(o) * np.tanh(c)
    return h, (h, c)


def _min_reference(P, x, state):
    """Two stacked minGRU or minLSTM layers (SPEC §3.4 formulas); `hidden` = layer 2's h_t."""
    lin = lambda name, v: v @ P[f"{name}.weight"].T + P[f"{name}.bias"]  # noqa: E731
    out = []
    for layer, h in zip(("layer1", "layer2"), state):
        if f"{layer}.gate.weight" in P:  # minGRU
            z = _sigmoid(lin(f"{layer}.gate", x))
            h = (1 - z) * h + z * lin(f"{layer}.cand", x)
        else:  # minLSTM
            f, i = _sigmoid(lin(f"{layer}.forget", x)), _sigmoid(lin(f"{layer}.input", x))
            h = f / (f + i) * h + i / (f + i) * lin(f"{layer}.cand", x)
        out.append(h)
        x = h
    return x, tuple(out)


@pytest.mark.parametrize("size", ["std", "matched"])
def test_gru_matches_a_numpy_forward_pass(size):
    agent = make_agent("gru", size)
    g = torch.Generator().manual_seed(23)
    state0 = (0.5 * torch.randn(2, agent.width, generator=g),)
    _compare(agent, two_hot_obs(25, 2, seed=23), _gru_reference, state0)


@pytest.mark.parametrize("size", ["std", "matched"])
def test_lstm_matches_a_numpy_forward_pass_and_records_the_cell(size):
    agent = make_agent("lstm", size)
    obs = two_hot_obs(25, 2, seed=24)
    _compare(agent, obs, _lstm_reference)
    # the `cell` site after every step is nn.LSTM's own c_t (run one step at a time through nn.LSTM)
    state, hc = agent.initial_state(2), None
    with torch.no_grad():
        for t in range(25):
            state = agent.step(obs[t], state)[3]
            _, hc = agent.rnn(obs[t:t + 1], hc)
            sites = agent.extra_sites(state)
            assert set(sites) == {"cell"} and sites["cell"].shape == (2, agent.width)
            torch.testing.assert_close(sites["cell"], hc[1][0], **TOL)
            torch.testing.assert_close(state[0], hc[0][0], **TOL)
    assert sites["cell"].abs().max() > 0.1


@pytest.mark.parametrize("arch", ["mingru", "minlstm"])
@pytest.mark.parametrize("size", ["std", "matched"])
def test_min_rnns_match_a_numpy_recurrence(arch, size):
    agent = make_agent(arch, size)
    g = torch.Generator().manual_seed(25)
    state0 = tuple(torch.randn(s.shape, generator=g) for s in agent.initial_state(2))
    _compare(agent, two_hot_obs(15, 2, seed=25), _min_reference, state0)
    # documented init: initial retention ~ 0.73 (gate biases -1 for minGRU; +1 forget / -1 input for minLSTM)
    for layer in (agent.layer1, agent.layer2):
        if arch == "mingru":
            assert torch.all(layer.gate.bias == -1)
        else:
            assert torch.all(layer.forget.bias == 1) and torch.all(layer.input.bias == -1)


# --- training signal -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", ARCH_SIZES)
def test_gradients_reach_every_parameter(arch, size):
    agent = make_agent(arch, size, window=20)
    logits, value, hidden = agent.sequence(two_hot_obs(20, 2, seed=21))
    (logits.square().sum() + value.square().sum() + hidden.sum()).backward()
    for name, p in agent.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ARCHS + ["disrnn", "tok_transformer"])
def test_acting_steps_are_differentiable_and_equal_their_no_grad_values(arch):
    """``step`` under autograd (the acting fast paths, e.g. attention products on numpy, are taken only without a
    gradient) gives the no-grad step's values to float rounding, and its gradient reaches the weights."""
    agent = make_agent(arch, "matched", window=20)
    obs = two_hot_obs(6, 3, seed=41)
    with torch.no_grad():
        (_, _, want), _ = run_steps(agent, obs, agent.initial_state(3))
    (_, _, got), _ = run_steps(agent, obs, agent.initial_state(3))
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in agent.parameters()) > 0


def test_transformer_kv_buffers_survive_branching():
    """Acting appends into preallocated buffers; stepping twice from one state (a branch) must not corrupt either."""
    agent = make_agent("transformer", "matched", window=12)
    obs = two_hot_obs(8, 2, seed=31)
    other = two_hot_obs(8, 2, seed=32)
    with torch.no_grad():
        state = agent.initial_state(2)
        for t in range(4):
            state = agent.step(obs[t], state)[3]
        a = agent.step(obs[4], state)  # branch A
        b = agent.step(other[4], state)  # branch B from the same state
        a2 = agent.step(obs[5], a[3])
        ref = agent.sequence(obs[:6])[2]
    torch.testing.assert_close(a[2], ref[4], **TOL)
    torch.testing.assert_close(a2[2], ref[5], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(b[2], agent.sequence(torch.cat([obs[:4], other[4:5]]))[2][4], **TOL)
