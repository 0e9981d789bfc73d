"""The fast training paths (issue 6) against the plain, readable ones they replace.

Ground truths: PyTorch's own ``nn.RNN`` autograd (the custom recurrence and its backward), the float-observation
contract ``step``/``sequence`` (the index forms), the full ``ChaseEnv.step`` (the core step), and a plain per-step
rollout loop written here from SPEC §4.4 (``collect_rollout``)."""

from __future__ import annotations

import types

import pytest
import torch

from interbrain.agents import ARCHITECTURES, build_agent
from interbrain.agents.base import action_log_softmax, gather_index, param_key
from interbrain.agents.linear import small_products_on_numpy
from interbrain.agents.rnn import ReluRNNHeads, RNNAgent, RNNPair
from interbrain.config import AgentConfig, EnvConfig, make_train_config
from interbrain.errors import InterbrainError
from interbrain.env import ChaseEnv, obs_from_index
from interbrain.ppo import AGENTS, collect_rollout, policy_loss, sample_actions, update_clipped
from interbrain.train import Trainer

torch.set_num_threads(1)


def random_index(T, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(0, 100, (T, B), generator=g)
    partner = torch.randint(0, 101, (T, B), generator=g)  # 100 = not shown
    return torch.stack([own, partner], -1)


def test_obs_from_index_is_the_spec_two_hot():
    index = torch.tensor([[3, 100], [99, 0], [0, 57]])
    x = obs_from_index(index)
    expected = torch.zeros(3, 200)
    expected[0, 3] = 1
    expected[1, 99] = 1
    expected[1, 100] = 1
    expected[2, 0] = 1
    expected[2, 157] = 1
    assert torch.equal(x, expected)


def test_rnn_learning_pass_with_heads_matches_nn_rnn_autograd_in_float64():
    """ReluRNNHeads (recurrence in place + joint heads, the heads' gradient computed inside the step loop) against
    nn.RNN + two Linear heads under autograd, with a loss that also uses the hidden states directly: the hidden states,
    and the gradients of every weight and of the initial state, in float64."""
    torch.manual_seed(1)
    T, B = 20, 4
    rnn = torch.nn.RNN(200, 256, nonlinearity="relu").double()
    heads = torch.nn.Linear(256, 5).double()
    x = torch.randn(T, B, 200, dtype=torch.float64)
    h0 = torch.rand(B, 256, dtype=torch.float64, requires_grad=True)
    w_heads, w_hidden = torch.randn(T, B, 5, dtype=torch.float64), torch.randn(T, B, 256, dtype=torch.float64)
    params = list(rnn.parameters()) + list(heads.parameters()) + [h0]

    def loss_of(hidden, out):
        return (out * w_heads).sum() + 0.1 * (hidden * w_hidden).sum()

    ref, _ = rnn(x, h0.unsqueeze(0))
    loss_of(ref, heads(ref)).backward()
    ref_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    pre = torch.nn.functional.linear(x.reshape(T * B, 200), rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)
    hidden, out = ReluRNNHeads.apply(pre, h0, rnn.weight_hh_l0, heads.weight, heads.bias, T, None)
    torch.testing.assert_close(hidden.view(T, B, 256), ref, rtol=1e-12, atol=1e-12)
    loss_of(hidden.view(T, B, 256), out.view(T, B, 5)).backward()
    for p, want in zip(params, ref_grads):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-10)
    assert (ref == 0).any() and (ref > 0).any()


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_stacked_recurrence_steps_on_either_backend_match_float64(small_matmul, backend):
    """The stacked ReLU recurrence and its backward with the per-step products on torch's or numpy's BLAS (the rllib
    learner's 7-row minibatches, :func:`interbrain.agents.linear.small_backend`), in place in a unit-major buffer as
    StackedReluRNNHeads runs it: hidden states, dL/dpre and dL/dh0 against the same recurrence in float64 (where the
    numpy steps never run), and against nn.RNN's autograd for one unit."""
    from interbrain.agents.rnn import numpy_steps, relu_recurrence, relu_recurrence_backward

    assert small_matmul(backend) == backend
    torch.manual_seed(4)
    E, T, B, H = 2, 20, 7, 256
    w = torch.randn(E, H, H) / 16
    pre, h0, grad = torch.randn(E, T, B, H), torch.rand(E, B, H), torch.randn(E, T, B, H)
    assert numpy_steps(pre.transpose(0, 1), w) == (backend == "numpy")
    assert not numpy_steps(pre.transpose(0, 1).double(), w.double())  # float64 keeps torch's kernel
    assert not numpy_steps(torch.empty(T, E, 17, H), w) and not numpy_steps(pre[0], w[0])  # > 16 rows; one unit

    def run(dtype):
        buf = pre.to(dtype).clone()
        out = relu_recurrence(buf.transpose(0, 1), h0.to(dtype), w.to(dtype))
        g = grad.to(dtype).clone()
        dpre, dh0, _ = relu_recurrence_backward(g.transpose(0, 1), out, None, w.to(dtype), True, False)
        return buf, g, dh0

    (hid, dpre, dh0), (hid64, dpre64, dh064) = run(torch.float32), run(torch.float64)
    torch.testing.assert_close(hid.double(), hid64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpre.double(), dpre64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh0.double(), dh064, rtol=1e-5, atol=1e-4)
    assert (hid64 == 0).any() and (hid64 > 0).any() and (dpre64 == 0).any()  # the ReLU mask is exercised
    rnn = torch.nn.RNN(H, H, nonlinearity="relu", bias=False).double()  # unit 1 under autograd: input = pre
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.eye(H))
        rnn.weight_hh_l0.copy_(w[1])
    x, h = pre[1].double().requires_grad_(), h0[1].double().unsqueeze(0).requires_grad_()
    ref, _ = rnn(x, h)
    torch.testing.assert_close(hid64[1], ref, rtol=1e-12, atol=1e-12)
    (ref * grad[1].double()).sum().backward()
    torch.testing.assert_close(dpre64[1], x.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dh064[1], h.grad[0], rtol=1e-10, atol=1e-10)


def test_two_row_gather_gradient_is_the_two_hot_linear_gradient():
    """gather_index under autograd (TwoRowGather: index_add_ backward) = Linear(two_hot(x)) autograd, in float64."""
    torch.manual_seed(2)
    layer = torch.nn.Linear(200, 7).double()
    index = random_index(30, 6, seed=3)
    w_out = torch.randn(30, 6, 7, dtype=torch.float64)
    (layer(obs_from_index(index).double()) * w_out).sum().backward()
    want_w, want_b = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.zero_grad()
    table = torch.cat([layer.weight.t()[:100] + layer.bias, layer.weight.t()[100:], layer.weight.new_zeros(1, 7)])
    (gather_index(index, table) * w_out).sum().backward()
    torch.testing.assert_close(layer.weight.grad, want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, want_b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_action_log_softmax_is_bitwise_torch_log_softmax(dtype):
    """The leading-dimension form gives torch.log_softmax's bits over the 4 actions, forward and backward: on a
    rollout's strided logits view (heads[..., :4]), across scales, with a row of huge and tiny logits, and for row
    counts on and off the 64-byte grid (1, 7, 120 and 140: the rllib learner's minibatches; 200; 4,000 and 8,000)."""
    g = torch.Generator().manual_seed(5)
    shapes = [(50, 2, 40), (1,), (7,), (20, 6), (20, 7), (20, 2, 7), (200,), (100, 40), (100, 2, 40)]
    for shape in shapes:
        for scale in (1e-3, 1.0, 30.0, 1e4):
            heads = torch.randn(*shape, 5, generator=g, dtype=dtype) * scale
            heads.view(-1, 5)[0, :4] = torch.tensor([1e30, -1e30, 0.0, 3.0], dtype=dtype)
            a = heads[..., :4].clone().requires_grad_()
            b = heads[..., :4].clone().requires_grad_()
            want, got = torch.log_softmax(a, -1), action_log_softmax(b)
            assert torch.equal(got, want) and got.shape == want.shape, (shape, scale)
            grad = torch.randn(want.shape, generator=g, dtype=dtype)
            want.backward(grad)
            got.backward(grad)
            assert torch.equal(b.grad, a.grad), (shape, scale)
        assert torch.equal(action_log_softmax(heads[..., :4]), torch.log_softmax(heads[..., :4], -1))  # strided


def test_rnn_pair_step_is_bitwise_the_two_agents_own_steps():
    """Both RNN agents as one batched call (RNNPair) give the same bits as each agent's step_index."""
    torch.manual_seed(0)
    agents = [build_agent(AgentConfig(arch="rnn")) for _ in range(2)]
    pair = agents[0].pair_with(agents[1], 12)
    assert isinstance(pair, RNNPair) and build_agent(AgentConfig(arch="mlp")).pair_with(agents[1], 12) is None
    B = 6
    h, states = pair.initial_state(B), [a.initial_state(B) for a in agents]
    hidden, heads = torch.empty(12, 2, B, 256), torch.empty(12, 2, B, 5)
    with torch.no_grad():
        for t in range(12):
            index = torch.stack([random_index(1, B, seed=10 * t + i)[0] for i in range(2)])
            h = pair.step(index + pair.row_offsets, h, hidden[t], heads[t])  # as observation_index(offsets=) gives it
            for i, agent in enumerate(agents):
                logits, value, h_i, states[i] = agent.step_index(index[i], states[i])
                assert torch.equal(hidden[t, i], h_i) and torch.equal(h[i], h_i)
                assert torch.equal(heads[t, i, :, :4], logits) and torch.equal(heads[t, i, :, 4], value)
    assert (hidden == 0).any() and (hidden > 0).any()


def _two_envs(T: int, B: int, per_episode: bool) -> list:
    """Two identical environments of B episodes of T steps (per-episode visibility modes and tasks, or the default)."""
    episodes = [EnvConfig(horizon=T, visibility=("partial", "full", "none")[b % 3], task=("social", "non_social")[b % 2])
                for b in range(B)] if per_episode else None
    return [ChaseEnv(EnvConfig(horizon=T), batch=B, episodes=episodes) for _ in range(2)]


def _play_or_step(pair, env, noise, way: str, **play_options):
    """Drive ``pair`` through ``env`` for the ``len(noise)`` steps of ``noise`` [T, 2, B, 4]: by its written-out loop
    (``way == "play"``) or by the loop it replaces (``pair.step``, then ``act_and_move``, each step). Returns the
    final state and the heads, actions, pairs and hidden states written on the way."""
    from interbrain.ppo import act_and_move

    T, _, B, _ = noise.shape
    heads, actions = torch.empty(T, 2, B, 5), torch.empty(T, 2, B, dtype=torch.long)
    pairs, hidden = torch.empty(T + 1, B, dtype=torch.long), torch.empty(2, T, B, 256)
    pairs[0] = env.pair
    with torch.no_grad():
        if way == "play":
            state = pair.play(env, noise, heads, actions, pairs, hidden, **play_options)
        else:
            state = pair.initial_state(B)
            for t in range(T):
                state = pair.step(env.observation_index(offsets=pair.row_offsets), state, hidden[:, t], heads[t])
                act_and_move(env, heads[t, ..., :4], noise[t], actions[t], pairs[t + 1])
    return state, heads, actions, pairs, hidden


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("per_episode", [False, True])
def test_rnn_pair_play_is_bitwise_the_stepped_loop(per_episode, compiled):
    """RNNPair.play (the acting loop written out) gives the bits of the loop it replaces: pair.step, then
    act_and_move, each step; also with per-episode visibility modes (the observation table's episode offsets); in
    both its forms (the CPU one with step_kernels' compiled loops, and the torch calls of the CUDA one)."""
    from interbrain.ppo import gumbel_noise

    torch.manual_seed(1)
    agents = [build_agent(AgentConfig(arch="rnn")) for _ in range(2)]
    T, B = 30, 6
    noise = gumbel_noise((T, 2, B, 4), torch.Generator().manual_seed(7), torch.device("cpu"))
    out = []
    for way, env in zip(("play", "step"), _two_envs(T, B, per_episode)):
        env.reset(torch.Generator().manual_seed(3))
        pair = agents[0].pair_with(agents[1], T)
        h, heads, actions, pairs, hidden = _play_or_step(pair, env, noise, way, compiled=compiled)
        core = env.settle(pairs, actions)
        out.append((heads, actions, pairs, hidden, h.clone(), core.rewards, env.t))
    for a, b in zip(*out):
        assert a == b if isinstance(a, int) else torch.equal(a, b)
    assert len(out[0][2].unique()) > 5  # the agents moved


@pytest.mark.parametrize("size", ["std", "matched"])
@pytest.mark.parametrize("noisy", ["neither", "both", "explorer"])
def test_disrnn_pair_step_is_bitwise_the_two_agents_own_steps(size, noisy):
    """Both disRNN agents as one numpy call per step (a two-agent DisRNNActing) give the same bits as each agent's
    step_index (a one-agent one: the stacked products and elementwise calls must not change a bit), with
    the bottleneck noise off, on, or on for one agent only (the same draws from the global torch RNG in the same
    order), and hand back states that continue as the agents' own; offered only to a disRNN partner of the same shape
    on the numpy path."""
    from interbrain.agents.disrnn import DisRNNActing

    torch.manual_seed(0)
    agents = [build_agent(AgentConfig(arch="disrnn", size=size)) for _ in range(2)]
    for agent, on in zip(agents, {"neither": (0, 0), "both": (1, 1), "explorer": (0, 1)}[noisy]):
        agent.set_progress(agent.warmup + 1 if on else 0)
    assert [a.bottlenecks_active for a in agents] == [noisy == "both", noisy != "neither"]
    T, B = 12, 7
    pair = agents[0].pair_with(agents[1], T)
    if not small_products_on_numpy(agents[0].obs_weight):  # torch runs the small steps here (Intel: small_backend)
        assert pair is None
        pytest.skip("the numpy acting path is not this machine's")
    assert isinstance(pair, DisRNNActing)
    assert agents[0].pair_with(build_agent(AgentConfig(arch="disrnn", size="std" if size == "matched" else "matched")),
                               T) is None
    assert agents[0].pair_with(build_agent(AgentConfig(arch="rnn")), T) is None
    assert agents[0].pair_with(build_agent(AgentConfig(arch="disrnn", size=size)).double(), T) is None
    indices = [torch.stack([random_index(1, B, seed=10 * t + i)[0] for i in range(2)]) for t in range(T)]
    hidden, heads = torch.empty(2, T, B, 256), torch.empty(T, 2, B, 5)
    with torch.no_grad():
        torch.manual_seed(5)
        z = pair.initial_state(B)
        for t in range(T):
            z = pair.step(indices[t] + pair.row_offsets, z, hidden[:, t], heads[t])  # observation_index(offsets=)
        after_pair = torch.randn(3)  # the stream continues where the agents' own steps leave it
        torch.manual_seed(5)
        states = [a.initial_state(B) for a in agents]
        for t in range(T):
            for i, agent in enumerate(agents):
                logits, value, h_i, states[i] = agent.step_index(indices[t][i], states[i])
                assert torch.equal(hidden[i, t], h_i), (t, i)
                assert torch.equal(heads[t, i, :, :4], logits) and torch.equal(heads[t, i, :, 4], value), (t, i)
        assert torch.equal(torch.randn(3), after_pair)
        index = random_index(1, B, seed=99)[0]
        for i, (mine, own) in enumerate(zip(pair.states(z), states)):  # a bootstrap step from the pair's states
            torch.manual_seed(6)
            a = agents[i].step_index(index, mine)
            torch.manual_seed(6)
            b = agents[i].step_index(index, own)
            assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
    assert (hidden == 0).any() and (hidden > 0).any()


def test_softmax_keys_is_the_softmax_over_the_unpadded_keys():
    """The acting attention pads 3..15 keys with -inf (torch's vectorised softmax kernel): the result is a view of the
    first L columns, equal to ``torch.softmax`` to float rounding, rows summing to 1, masked keys exactly 0, for every
    key count around the padding width and with the queries of tok_transformer's steps (S = 3, a causal block mask)."""
    from interbrain.agents.transformer import SOFTMAX_PAD, softmax_keys

    g = torch.Generator().manual_seed(3)
    for S in (1, 3):
        for L in range(1, SOFTMAX_PAD + 5):
            scores = 4 * torch.randn(6, 4, S, L, generator=g)
            if S == 3 and L >= 3:  # query j of the step's block sees the block's first j + 1 tokens
                scores[..., L - 3:].masked_fill_(~torch.ones(3, 3, dtype=torch.bool).tril(), float("-inf"))
            got, ref = softmax_keys(scores), torch.softmax(scores, -1)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.sum(-1), torch.ones(6, 4, S), rtol=0, atol=1e-6)
            assert torch.equal(got == 0, ref == 0)


def perturbed_norms(agent):
    """The agent with every LayerNorm's weight and bias drawn at random (initialised, they are all 1 and 0: a step
    that used one LayerNorm's weights for another's would go unnoticed)."""
    with torch.no_grad():
        for module in agent.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return agent


def _step_pair_and_twins(pair, twins, steps: int, B: int, check, dtype=torch.float32):
    """``steps`` steps from the zero state of ``pair`` and of each of its agents' ``twins`` (the same weights) on the
    same random observation indices; ``check(got, want)`` on each agent's hidden state and heads (4 logits, then the
    value) at every step. Returns the pair's final state, the twins' states and the last step's indices."""
    state, own = pair.initial_state(B), [a.initial_state(B) for a in twins]
    hidden, heads = torch.empty(steps, 2, B, 256, dtype=dtype), torch.empty(steps, 2, B, 5, dtype=dtype)
    with torch.no_grad():
        for t in range(steps):
            index = torch.stack([random_index(1, B, seed=10 * t + i)[0] for i in range(2)])
            state = pair.step(index + pair.row_offsets, state, hidden[t], heads[t])  # observation_index(offsets=)
            for i, twin in enumerate(twins):
                logits, value, h_i, own[i] = twin.step_index(index[i], own[i])
                check(hidden[t, i], h_i)
                check(heads[t, i], torch.cat([logits, value[:, None]], 1))
    return state, own, index


@pytest.mark.parametrize("size", ["std", "matched"])
def test_transformer_pair_step_is_bitwise_the_two_agents_own_steps(size):
    """Both transformer agents as one batched call (TransformerPair) give the same bits as each agent's step_index over
    a whole window (KV caches, the context bookkeeping), and the per-agent states it hands back (a bootstrap step)
    continue exactly as the agents' own states do; a pair is offered only while the episode fits the window."""
    from interbrain.agents.transformer import TransformerPair

    W, B = 9, 5
    torch.manual_seed(1)
    agents = [perturbed_norms(build_agent(AgentConfig(arch="transformer", size=size, window=W))) for _ in range(2)]
    pair = agents[0].pair_with(agents[1], W)
    assert isinstance(pair, TransformerPair) and agents[0].pair_with(agents[1], W + 1) is None
    twins = [build_agent(AgentConfig(arch="transformer", size=size, window=W)) for _ in range(2)]
    for twin, agent in zip(twins, agents):
        twin.load_state_dict(agent.state_dict())

    def bitwise(got, want):
        assert torch.equal(got, want)

    state, own, index = _step_pair_and_twins(pair, twins, W, B, bitwise)
    with torch.no_grad():
        with pytest.raises(InterbrainError, match="covers steps 0..8"):
            pair.step(index, state, torch.empty(2, B, 256), torch.empty(2, B, 5))
        index = random_index(1, B, seed=99)[0]
        for i, (agent_state, twin) in enumerate(zip(pair.states(state), twins)):  # step W: the first window recompute
            mine, ref = twins[i].step_index(index, agent_state), twin.step_index(index, own[i])
            assert all(torch.equal(x, y) for x, y in zip(mine[:3], ref[:3]))
    for agent, twin in zip(agents, twins):
        assert (agent.max_position_used, agent.max_context_used) == (W - 1, W)


@pytest.mark.parametrize("size,dtype,steps", [("std", torch.float32, 9), ("matched", torch.float32, 9),
                                              ("matched", torch.float64, 9), ("matched", torch.float32, 4)])
def test_tok_transformer_pair_step_equals_the_two_agents_own_steps(size, dtype, steps):
    """Both tok_transformer agents as one batched step (TokTransformerPair: compiled attention per token of a step's
    block, compiled LayerNorms) give each agent's step_index to float tolerance (in float64 to 1e-12: the same
    function, summed in another order) over a whole window or part of one (KV caches, the context bookkeeping), and
    the per-agent states it hands back continue as the agents' own do (the next step: a cached one, or at the window
    the first recompute); offered only for the default token layout, a partner of the same shape and episodes
    within the window."""
    from interbrain.agents.tok_transformer import TokTransformerPair

    W, B = 9, 5
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.manual_seed(1)
    agents = [perturbed_norms(build_agent(AgentConfig(arch="tok_transformer", size=size, window=W))).to(dtype)
              for _ in range(2)]
    with torch.no_grad():  # the compute tokens and positions at their init are small: make each token count
        for a in agents:
            a.compute_tokens.normal_(0, 0.5)
            a.pos_table.normal_(0, 0.5)
    pair = agents[0].pair_with(agents[1], W)
    assert isinstance(pair, TokTransformerPair) and agents[0].pair_with(agents[1], W + 1) is None
    for other in (AgentConfig(arch="tok_transformer", size=size, window=W, tok_mode="concat"),
                  AgentConfig(arch="tok_transformer", size=size, window=W, tok_type_embedding=True),
                  AgentConfig(arch="tok_transformer", size="std" if size == "matched" else "matched", window=W),
                  AgentConfig(arch="tok_transformer", size=size, window=W + 1), AgentConfig(arch="transformer")):
        assert agents[0].pair_with(build_agent(other).to(dtype), W) is None
    twins = [build_agent(AgentConfig(arch="tok_transformer", size=size, window=W)).to(dtype) for _ in range(2)]
    for twin, agent in zip(twins, agents):
        twin.load_state_dict(agent.state_dict())

    def close(got, want):
        torch.testing.assert_close(got, want, rtol=0, atol=tol)

    state, own, index = _step_pair_and_twins(pair, twins, steps, B, close, dtype)
    with torch.no_grad():
        if steps == W:
            with pytest.raises(InterbrainError, match="covers steps 0..8"):
                pair.step(index, state, torch.empty(2, B, 256, dtype=dtype), torch.empty(2, B, 5, dtype=dtype))
        index = random_index(1, B, seed=99)[0]
        for i, (agent_state, twin) in enumerate(zip(pair.states(state), twins)):
            assert agent_state[0] == own[i][0] and torch.equal(agent_state[1], own[i][1])  # step count, indices
            for got, want in zip(agent_state[2:], own[i][2:]):  # the KV caches
                torch.testing.assert_close(got, want, rtol=0, atol=tol)
            mine, ref = twin.step_index(index, agent_state), twin.step_index(index, own[i])
            for got, want in zip(mine[:3], ref[:3]):
                torch.testing.assert_close(got, want, rtol=0, atol=tol)
    for agent in agents:
        assert (agent.max_position_used, agent.max_context_used) == (steps - 1, steps)


@pytest.mark.parametrize("per_episode", [False, True])
def test_transformer_pair_play_is_bitwise_the_stepped_loop(per_episode):
    """TransformerPair.play (the acting loop written out, on CPU) gives the bits of the loop it replaces: pair.step,
    then act_and_move, each step (the observation rows from the environment's table, with per-episode visibility
    modes too), and the same context bookkeeping; collect_rollout takes it."""
    from interbrain.ppo import gumbel_noise

    torch.manual_seed(4)
    T, B = 12, 6
    agents = [perturbed_norms(build_agent(AgentConfig(arch="transformer", window=T))) for _ in range(2)]
    noise = gumbel_noise((T, 2, B, 4), torch.Generator().manual_seed(8), torch.device("cpu"))
    out = []
    for way, env in zip(("play", "step"), _two_envs(T, B, per_episode)):
        env.reset(torch.Generator().manual_seed(3))
        pair = agents[0].pair_with(agents[1], T)
        assert pair.play is not None
        for a in agents:
            a.max_position_used, a.max_context_used = -1, 0
        state, heads, actions, pairs, hidden = _play_or_step(pair, env, noise, way)
        core = env.settle(pairs, actions)
        records = pair.records(state, hidden)
        out.append((heads, actions, pairs, hidden, core.rewards, env.t, [a.max_position_used for a in agents],
                    [a.max_context_used for a in agents], [r["layers"][1]["att"].clone() for r in records],
                    [s[1].clone() for s in pair.states(state)]))
    for a, b in zip(*out):
        if isinstance(a, list):
            assert all(x == y if isinstance(x, int) else torch.equal(x, y) for x, y in zip(a, b))
        else:
            assert a == b if isinstance(a, int) else torch.equal(a, b)
    assert out[0][6] == [T - 1, T - 1] and out[0][7] == [T, T]
    assert len(out[0][2].unique()) > 5  # the agents moved


@pytest.mark.parametrize("size", ["std", "matched"])
def test_transformer_pair_compiled_step_equals_its_torch_step(size):
    """The pair step on CPU runs its LayerNorms, residual sums, cache writes and attention as compiled loops
    (acting_kernels); its torch form (the CUDA path: torch's LayerNorm, copies and batched products) gives the same
    hidden states, heads, records and per-agent states to float tolerance over a whole window, on CPU."""
    W, B = 12, 6
    torch.manual_seed(2)
    agents = [perturbed_norms(build_agent(AgentConfig(arch="transformer", size=size, window=W))) for _ in range(2)]
    compiled, plain = agents[0].pair_with(agents[1], W), agents[0].pair_with(agents[1], W)
    assert compiled.compiled
    plain.compiled, plain.arrays = False, None
    states = [compiled.initial_state(B), plain.initial_state(B)]
    assert states[0][-1] is not None and states[1][-1] is None
    hidden, heads = torch.empty(2, W, 2, B, 256), torch.empty(2, W, 2, B, 5)
    with torch.no_grad():
        for t in range(W):
            index = torch.stack([random_index(1, B, seed=7 * t + i)[0] for i in range(2)]) + compiled.row_offsets
            states = [pair.step(index, state, hidden[j, t], heads[j, t])
                      for j, (pair, state) in enumerate(zip((compiled, plain), states))]
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-5, atol=1e-5)
    records = [pair.records(state, h.transpose(0, 1)) for pair, state, h in zip((compiled, plain), states, hidden)]
    for mine, ref in zip(*records):
        for layer_mine, layer_ref in zip(mine["layers"], ref["layers"]):
            for name in layer_ref:
                torch.testing.assert_close(layer_mine[name], layer_ref[name], rtol=1e-5, atol=1e-5, msg=name)
    for mine, ref in zip(compiled.states(states[0]), plain.states(states[1])):
        assert mine[0] == ref[0] == W
        for x, y in zip(mine[1:], ref[1:]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_replayed_first_epoch_is_bitwise_the_recomputed_one(tiny_overrides, monkeypatch):
    """The rollout records each RNN agent's hidden states; the first learning epoch replays them instead of running
    the recurrence again, and on CPU without gathering the step inputs either (their gradient is scattered into the
    input table inside the recurrence's backward). Replay and recomputation give the same loss, statistics and
    gradients, bit for bit; a record taken under other weights is not used."""
    import interbrain.agents.rnn as rnn_module

    gathers = []
    gather_rows = rnn_module.gather_rows
    monkeypatch.setattr(rnn_module, "gather_rows", lambda *args: gathers.append(1) or gather_rows(*args))
    cfg = make_train_config("rnn", "social", 0, "paper", 2, overrides=tiny_overrides)
    tr = Trainer(cfg, torch.device("cpu"))
    batch = collect_rollout(tr.env, tr.agents, tr.env_gen, tr.action_gens)
    assert set(batch.replay) == set(AGENTS)
    adv = {a: torch.randn(batch.rewards[a].shape, generator=torch.Generator().manual_seed(5)) for a in AGENTS}
    for a in AGENTS:
        agent = tr.agents[a]
        results = []
        for replay in (batch.replay[a], None):
            agent.zero_grad()
            gathers.clear()
            loss, stats = policy_loss(agent, batch.obs_index[a], batch.actions[a], batch.logp[a], adv[a],
                                      batch.rewards[a], cfg.ppo, replay=replay)
            assert len(gathers) == (0 if replay is not None else 1)
            loss.backward()
            results.append((loss.detach(), {k: v.detach() for k, v in stats.items()},
                            [p.grad.clone() for p in agent.parameters()]))
        (l1, s1, g1), (l2, s2, g2) = results
        assert torch.equal(l1, l2) and all(torch.equal(s1[k], s2[k]) for k in s1)
        assert all(torch.equal(x, y) for x, y in zip(g1, g2))
        key, hidden = batch.replay[a]
        assert key == param_key(agent)
        with torch.no_grad():  # a record from other weights: policy_loss recomputes (equals the fresh forward)
            agent.rnn.weight_hh_l0.mul_(0.5)
        assert param_key(agent) != key
        loss_stale, _ = policy_loss(agent, batch.obs_index[a], batch.actions[a], batch.logp[a], adv[a],
                                    batch.rewards[a], cfg.ppo, replay=batch.replay[a])
        loss_fresh, _ = policy_loss(agent, batch.obs_index[a], batch.actions[a], batch.logp[a], adv[a],
                                    batch.rewards[a], cfg.ppo)
        assert torch.equal(loss_stale, loss_fresh)


def test_update_with_replay_equals_update_without(tiny_overrides, monkeypatch):
    """A whole paper-preset update (4 epochs, Adam) from the replayed first epoch equals one that recomputes it; the
    replay really ran (once per agent, in the first epoch only) in the one and not at all in the other."""
    cfg = make_train_config("rnn", "non_social", 3, "paper", 2, overrides=tiny_overrides)
    a, b = Trainer(cfg, torch.device("cpu")), Trainer(cfg, torch.device("cpu"))
    batch_a = collect_rollout(a.env, a.agents, a.env_gen, a.action_gens)
    batch_b = collect_rollout(b.env, b.agents, b.env_gen, b.action_gens)
    batch_b.replay = {}
    calls = []
    replay = RNNAgent.replay_index
    monkeypatch.setattr(RNNAgent, "replay_index", lambda self, *args: calls.append(self) or replay(self, *args))
    stats_a = update_clipped(a.agents, a.optimizers, batch_a, cfg.ppo, 1)
    assert calls == [a.agents[name] for name in AGENTS]
    stats_b = update_clipped(b.agents, b.optimizers, batch_b, cfg.ppo, 1)
    assert len(calls) == 2
    assert stats_a == stats_b
    for name in AGENTS:
        for p, q in zip(a.agents[name].parameters(), b.agents[name].parameters()):
            assert torch.equal(p, q)


def _transformer_batch(tiny_overrides, preset="fast", seed=0):
    cfg = make_train_config("transformer", "social", seed, preset, 2, size="matched", overrides=tiny_overrides)
    tr = Trainer(cfg, torch.device("cpu"))
    return cfg, tr, collect_rollout(tr.env, tr.agents, tr.env_gen, tr.action_gens)


def _loss_and_grads(agent, batch, a, adv, cfg, replay):
    agent.zero_grad()
    loss, stats = policy_loss(agent, batch.obs_index[a], batch.actions[a], batch.logp[a], adv, batch.rewards[a],
                              cfg.ppo, replay=replay)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in agent.parameters()]


def test_transformer_replayed_first_epoch_equals_the_recomputed_one(tiny_overrides):
    """The transformer pair records, while acting, each block's product and attention outputs and each query's own-
    token weight; the first learning epoch replays them (only the backward is computed for the products and the
    attention, the flash kernel's from the log-sum-exp rebuilt from that weight). Loss and every gradient equal the
    recomputed pass's to float32 tolerance, and a gradient the replay got wrong by one block or the attention would
    differ at the percent level (checked: dropping the attention's gradient fails); a record taken under other
    weights is not used."""
    from interbrain.agents.transformer import TransformerPair

    cfg, tr, batch = _transformer_batch(tiny_overrides)
    assert set(batch.replay) == set(AGENTS)
    adv = torch.randn(batch.rewards[AGENTS[0]].shape, generator=torch.Generator().manual_seed(5))
    for a in AGENTS:
        agent = tr.agents[a]
        assert batch.replay[a][0] == param_key(agent)
        (l1, g1), (l2, g2) = (_loss_and_grads(agent, batch, a, adv, cfg, r) for r in (batch.replay[a], None))
        assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-6)
        # float32: a ReLU pre-activation within float rounding of 0 may fall on either side of the kink in the acting
        # pass and the recomputation (one unit of one step here), so gradients agree to 1e-2, not 1e-6 (the float64
        # test below, driven through the pair step, holds them to 1e-9)
        for (name, _), x, y in zip(agent.named_parameters(), g1, g2):
            assert (x - y).norm() <= 1e-2 * y.norm() + 1e-7, name
        with torch.no_grad():  # a record from other weights: policy_loss recomputes (equals the fresh forward)
            agent.blocks[0].qkv.weight.mul_(0.5)
        stale = _loss_and_grads(agent, batch, a, adv, cfg, batch.replay[a])[0]
        assert torch.equal(stale, _loss_and_grads(agent, batch, a, adv, cfg, None)[0])
    # the pair's record is made on CPU only (the replay's attention backward is the CPU flash kernel)
    assert TransformerPair(*tr.agents.values()).replays


@pytest.mark.parametrize("size", ["std", "matched"])
def test_transformer_replay_equals_the_recomputed_pass_in_float64(size):
    """Driven through the pair step in float64 (no ReLU lands within rounding of its kink): the replayed pass's
    outputs and the gradients of a random functional of logits, value and hidden states with respect to every
    parameter equal the recomputed pass's to 1e-9, for both agents, over a window shorter than W and a whole one."""
    W, B = 9, 5
    for T in (6, W):
        torch.manual_seed(2)
        agents = [build_agent(AgentConfig(arch="transformer", size=size, window=W)).double() for _ in range(2)]
        pair = agents[0].pair_with(agents[1], T)
        assert pair.replays
        state = pair.initial_state(B)
        # agent-major hidden states, as collect_rollout keeps them
        hidden, heads = torch.empty(2, T, B, 256, dtype=torch.float64), torch.empty(T, 2, B, 5, dtype=torch.float64)
        index = torch.stack([random_index(T, B, seed=7 + i) for i in range(2)], 1)  # [T, 2, B, 2]
        with torch.no_grad():
            for t in range(T):
                state = pair.step(index[t] + pair.row_offsets, state, hidden[:, t], heads[t])
        records = pair.records(state, hidden, heads)
        for i, agent in enumerate(agents):
            weights = [torch.randn(x.shape, generator=torch.Generator().manual_seed(30 + j), dtype=torch.float64)
                       for j, x in enumerate((heads[:, i, :, :4], heads[:, i, :, 4], hidden[i]))]
            results = []
            for replay in (True, False):
                agent.zero_grad()
                out = agent.replay_index(index[:, i], records[i]) if replay else agent.sequence_index(index[:, i])
                sum((w * o).sum() for w, o in zip(weights, out)).backward()
                results.append(([o.detach() for o in out], [p.grad.clone() for p in agent.parameters()]))
            (o1, g1), (o2, g2) = results
            assert all(torch.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in zip(o1, o2))
            for (name, _), x, y in zip(agent.named_parameters(), g1, g2):
                assert (x - y).norm() <= 1e-9 * y.norm() + 1e-13, (T, i, name)


def test_transformer_replay_detects_a_wrong_attention_gradient(tiny_overrides, monkeypatch):
    """The equality above is tight enough to catch an error in the replayed attention: with the attention's
    gradient for q zeroed, the replayed gradients of the qkv weights no longer match."""
    from interbrain.agents import transformer as tf

    cfg, tr, batch = _transformer_batch(tiny_overrides)
    grads = tf.causal_attention_grads
    monkeypatch.setattr(tf, "causal_attention_grads", lambda *args: (lambda g: (g[0] * 0, *g[1:]))(grads(*args)))
    a, agent = AGENTS[0], tr.agents[AGENTS[0]]
    adv = torch.randn(batch.rewards[a].shape, generator=torch.Generator().manual_seed(5))
    (_, g1), (_, g2) = (_loss_and_grads(agent, batch, a, adv, cfg, r) for r in (batch.replay[a], None))
    wrong = [name for (name, _), x, y in zip(agent.named_parameters(), g1, g2) if (x - y).norm() > 1e-4 * y.norm()]
    assert "blocks.0.qkv.weight" in wrong


def test_transformer_records_the_attentions_log_sum_exp(tiny_overrides):
    """Each layer's recorded log-sum-exp (what the replayed attention's backward takes) equals the log-sum-exp of the
    causal scores of the recorded q and k, checked by hand for every step, episode and head of a rollout."""
    from interbrain.agents.transformer import step_major_heads

    cfg, tr, batch = _transformer_batch(tiny_overrides)
    for a in AGENTS:
        agent, (_, record) = tr.agents[a], batch.replay[a]
        for block, layer in zip(agent.blocks, record["layers"]):
            q, k, _ = step_major_heads(layer["qkv"], block.heads)
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            L = scores.shape[-1]
            scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
            torch.testing.assert_close(layer["lse"], torch.logsumexp(scores, -1), rtol=0, atol=2e-5)


def test_transformer_update_replays_its_first_epoch_only(tiny_overrides, monkeypatch):
    """A `paper` update (4 epochs) replays each transformer agent's record once, in the first epoch; the later
    epochs recompute (their weights changed). An update without the record replays nothing and ends within float
    tolerance of Adam's first step (its moments normalise the float32-level gradient differences, so a few
    near-zero-gradient weights move by up to the learning rate: compared in norm)."""
    from interbrain.agents.transformer import TransformerAgent

    cfg, a_tr, batch_a = _transformer_batch(tiny_overrides, "paper", seed=3)
    _, b_tr, batch_b = _transformer_batch(tiny_overrides, "paper", seed=3)
    batch_b.replay = {}
    calls = []
    replay = TransformerAgent.replay_index
    monkeypatch.setattr(TransformerAgent, "replay_index", lambda self, *args: calls.append(self) or replay(self, *args))
    update_clipped(a_tr.agents, a_tr.optimizers, batch_a, cfg.ppo, 1)
    assert calls == [a_tr.agents[name] for name in AGENTS]
    update_clipped(b_tr.agents, b_tr.optimizers, batch_b, cfg.ppo, 1)
    assert len(calls) == 2
    for name in AGENTS:
        moved = [(p - q).norm() / (q - p0).norm() for p, q, p0 in
                 zip(a_tr.agents[name].parameters(), b_tr.agents[name].parameters(),
                     Trainer(a_tr.config, torch.device("cpu")).agents[name].parameters())]
        assert max(moved) < 0.05


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_index_forms_equal_the_float_observation_contract(arch):
    torch.manual_seed(1)
    agent = build_agent(AgentConfig(arch=arch, size="matched", window=20))
    agent.eval()
    index = random_index(25, 3, seed=2)
    obs = obs_from_index(index)
    with torch.no_grad():
        for got, want in zip(agent.sequence_index(index), agent.sequence(obs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        s1, s2 = agent.initial_state(3), agent.initial_state(3)
        for t in range(25):
            a = agent.step_index(index[t], s1)
            b = agent.step(obs[t], s2)
            for got, want in zip(a[:3], b[:3]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            s1, s2 = a[3], b[3]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_index_forms_have_the_float_forms_gradients(arch):
    """Training runs on observation indices (the input-weight gathers): every parameter gets the gradient it gets
    from the two-hot float observations."""
    torch.manual_seed(1)
    agent = build_agent(AgentConfig(arch=arch, size="matched", window=20))
    index = random_index(25, 3, seed=2)
    grads = []
    for forward, x in ((agent.sequence_index, index), (agent.sequence, obs_from_index(index))):
        agent.zero_grad(set_to_none=True)
        logits, value, hidden = forward(x)
        (logits.square().sum() + value.sum() + hidden.square().mean()).backward()
        grads.append({n: p.grad for n, p in agent.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, got in grads[0].items():
        want = grads[1][name]
        assert (got is None) == (want is None), name
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_learning_pass_on_cuda_equals_the_cpu_one(arch):
    """The index-form learning pass on CUDA, where some architectures take another route than on CPU (gru runs
    cuDNN's nn.GRU there instead of its written-out steps; the numpy paths are CPU-only), gives the CPU pass's
    outputs and every parameter's gradient to float32 tolerance: each tensor within 1e-4 of its norm (the two
    devices sum in other orders, so single small elements may differ by more than an element-wise 1e-4)."""
    from interbrain.provenance import resolve_device

    torch.manual_seed(1)
    device = resolve_device("cuda")  # turns cuDNN's TF32 off: gru's and lstm's gradients moved by up to 4e-3 with it
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    cpu = build_agent(AgentConfig(arch=arch, size="matched", window=20))
    gpu = build_agent(AgentConfig(arch=arch, size="matched", window=20)).to(device)
    gpu.load_state_dict(cpu.state_dict())
    index = random_index(25, 3, seed=2)
    results = []
    for agent, idx in ((cpu, index), (gpu, index.to(device))):
        logits, value, hidden = agent.sequence_index(idx)
        (logits.square().sum() + value.sum() + hidden.square().mean()).backward()
        results.append(([logits, value, hidden], {n: p.grad for n, p in agent.named_parameters()}))
    (want_out, want_grad), (got_out, got_grad) = results
    for name, got, want in zip(("logits", "value", "hidden"), got_out, want_out):
        assert (got.cpu() - want).norm() <= 1e-4 * want.norm(), name
    assert got_grad.keys() == want_grad.keys()
    for name, want in want_grad.items():
        got = got_grad[name]
        assert (got is None) == (want is None), name
        if got is not None:
            assert (got.cpu() - want).norm() <= 1e-4 * want.norm(), name


def test_joint_readout_equals_the_two_heads():
    agent = build_agent(AgentConfig(arch="rnn", init="modern"))
    h = torch.randn(7, 256)
    logits, value = agent.readout(h)
    torch.testing.assert_close(logits, agent.action_head(h))
    torch.testing.assert_close(value, agent.value_head(h).squeeze(-1))
    with torch.no_grad():  # cached while the weights are unchanged, rebuilt after an in-place update
        agent.readout(h)
        agent.action_head.weight.add_(1.0)
        torch.testing.assert_close(agent.readout(h)[0], agent.action_head(h))


@pytest.mark.parametrize("visibility", ["partial", "full", "none"])
def test_core_step_equals_the_full_step(visibility):
    cfg = EnvConfig(task="social", visibility=visibility)
    full, core = ChaseEnv(cfg, 64), ChaseEnv(cfg, 64)
    g = torch.Generator().manual_seed(3)
    full.reset(torch.Generator().manual_seed(4))
    core.reset(torch.Generator().manual_seed(4))
    for _ in range(cfg.horizon):
        assert torch.equal(full.observation_index(), core.observation_index())
        ca, ea = torch.randint(0, 4, (64,), generator=g), torch.randint(0, 4, (64,), generator=g)
        info, c = full.step(ca, ea), core.step_core(ca, ea)
        for k, v in (("chaser_reward", c.rewards[0]), ("explorer_reward", c.rewards[1]), ("collision", c.collision),
                     ("chaser_collision", c.blocked[0]), ("explorer_collision", c.blocked[1]),
                     ("chaser_new_field", c.new_field[0]), ("explorer_new_field", c.new_field[1])):
            assert torch.equal(getattr(info, k), v), k
        assert torch.equal(full.chaser_pos, core.chaser_pos) and torch.equal(full.explorer_pos, core.explorer_pos)


def _move_settle_vs_step_core(cfg, B, episodes=None, seed=3, core_steps=0, T=None, envs=None):
    """T moves then one settle against step_core step by step, from the same spawns and actions; ``core_steps`` steps
    of step_core on both first (cells visited before the moves), ``envs`` to continue from a previous call."""
    if envs is None:
        core, lazy = ChaseEnv(cfg, B, episodes=episodes), ChaseEnv(cfg, B, episodes=episodes)
        core.reset(torch.Generator().manual_seed(seed + 1))
        lazy.reset(torch.Generator().manual_seed(seed + 1))
    else:
        core, lazy = envs
    g = torch.Generator().manual_seed(seed)
    for _ in range(core_steps):
        ca, ea = torch.randint(0, 4, (B,), generator=g), torch.randint(0, 4, (B,), generator=g)
        core.step_core(ca, ea)
        lazy.step_core(ca, ea)
    T = cfg.horizon - core.t if T is None else T
    actions = torch.randint(0, 4, (T, 2, B), generator=g)
    pairs = torch.empty(T + 1, B, dtype=torch.long)
    pairs[0] = lazy.pair
    steps, obs, fov_post = [], [], []
    for t in range(T):
        assert torch.equal(lazy.observation_index(), core.observation_index())
        obs.append(core.observation_index())
        steps.append(core.step_core(actions[t, 0], actions[t, 1]))
        fov_post.append(core.fov())
        assert lazy.move(actions[t], pairs[t + 1]).data_ptr() == pairs[t + 1].data_ptr()  # written in place
        assert torch.equal(lazy.pair, core.pair) and lazy.t == core.t
    settled = lazy.settle(pairs, actions)
    for i, name in enumerate(settled._fields):
        assert torch.equal(settled[i], torch.stack([s[i] for s in steps])), name
    assert torch.equal(lazy.visited, core.visited) and torch.equal(lazy.cells, core.cells)
    assert torch.equal(lazy.chaser_pos, core.chaser_pos) and torch.equal(lazy.explorer_pos, core.explorer_pos)
    assert torch.equal(lazy.observation_index(pairs[:-1]), torch.stack(obs, 1))  # agent-major [2, T, B, 2]
    assert torch.equal(lazy.fov(pairs[1:]), torch.stack(fov_post))
    return settled, (core, lazy)


@pytest.mark.parametrize("visibility", ["partial", "full", "none"])
@pytest.mark.parametrize("task", ["social", "non_social"])
def test_move_then_settle_equals_the_core_step_by_step(task, visibility):
    """The rollout's environment path (issue 6): only the moves inside the loop (``move``), rewards, collisions, new
    fields and visited cells for the whole rollout afterwards (``settle``); the same values as ``step_core`` step by
    step, which ``test_core_step_equals_the_full_step`` ties to the full step and test_env to the scalar reference."""
    settled, _ = _move_settle_vs_step_core(EnvConfig(task=task, visibility=visibility), 64)
    assert settled.collision.any() and settled.new_field.any() and (~settled.new_field).any()


def test_move_then_settle_with_per_episode_configs():
    combos = [("social", "partial"), ("non_social", "none"), ("mutual", "full"), ("social_alt", "partial")]
    episodes = [EnvConfig(task=combos[i % 4][0], visibility=combos[i % 4][1]) for i in range(32)]
    _move_settle_vs_step_core(EnvConfig(), 32, episodes=episodes, seed=5)


def test_settle_after_core_steps_one_move_and_twice_in_a_row():
    """Cells visited before the first move count as visited; a single move settles; settles follow one another."""
    cfg = EnvConfig(task="social", visibility="partial")
    _, envs = _move_settle_vs_step_core(cfg, 48, seed=7, core_steps=30, T=1)
    _, envs = _move_settle_vs_step_core(cfg, 48, seed=8, T=25, envs=envs)
    settled, _ = _move_settle_vs_step_core(cfg, 48, seed=9, core_steps=4, envs=envs)  # to the horizon
    assert envs[1].done and settled.rewards.shape == (cfg.horizon - 60, 2, 48)


def test_settle_new_field_and_rewards_by_hand():
    """One scripted episode: the chaser spawns on (0,0) and goes right, left, right, up (a wall bump): only its first
    move lands on a new cell. The explorer spawns on (5,5) and goes down, down, up, up: new, new, then (6,5) and its
    spawn cell again, both visited. Social rewards (SPEC §2): chaser 0.1, then -0.1 x3; explorer 1, 1, -0.5, -0.5."""
    env = ChaseEnv(EnvConfig(task="social", visibility="full", horizon=4), 1)
    env.reset(None, chaser_pos=torch.tensor([[0, 0]]), explorer_pos=torch.tensor([[5, 5]]))
    actions = torch.tensor([[1, 2], [3, 2], [1, 0], [0, 0]]).view(4, 2, 1)  # (chaser, explorer) per step
    pairs = torch.empty(5, 1, dtype=torch.long)
    pairs[0] = env.pair
    for t in range(4):
        env.move(actions[t], pairs[t + 1])
    cells = [(p // 100, p % 100) for p in pairs.view(-1).tolist()]
    assert cells == [(0, 55), (1, 65), (0, 75), (1, 65), (1, 55)]
    settled = env.settle(pairs, actions)
    assert settled.new_field[:, 0, 0].tolist() == [True, False, False, False]
    assert settled.new_field[:, 1, 0].tolist() == [True, True, False, False]
    assert settled.rewards[:, 0, 0].tolist() == pytest.approx([0.1, -0.1, -0.1, -0.1])
    assert settled.rewards[:, 1, 0].tolist() == pytest.approx([1.0, 1.0, -0.5, -0.5])
    assert not settled.collision.any() and not settled.blocked.any()
    assert env.visited[0, 0].nonzero().view(-1).tolist() == [0, 1]
    assert env.visited[1, 0].nonzero().view(-1).tolist() == [55, 65, 75]


def test_stale_environment_refuses_reads_until_settled():
    env = ChaseEnv(EnvConfig(), 4)
    env.reset(torch.Generator().manual_seed(0))
    pairs = torch.empty(3, 4, dtype=torch.long)
    pairs[0] = env.pair
    actions = torch.zeros(2, 2, 4, dtype=torch.long)
    env.move(actions[0], pairs[1])
    for read in (lambda: env.chaser_pos, lambda: env.explorer_visited,
                 lambda: env.step_core(actions[0, 0], actions[0, 1]), lambda: env.step(actions[0, 0], actions[0, 1])):
        with pytest.raises(InterbrainError, match="without settle"):
            read()
    env.move(actions[1], pairs[2])
    with pytest.raises(InterbrainError, match="settle needs"):
        env.settle(pairs[:2], actions[:1])  # one move short
    env.settle(pairs, actions)
    assert env.chaser_pos.shape == (4, 2)
    with pytest.raises(InterbrainError, match="settle needs"):
        env.settle(pairs, actions)  # nothing moved since


def test_observation_index_with_offsets():
    """observation_index(offsets=) is the index plus the offsets, contiguous; the table follows the offsets' values."""
    env = ChaseEnv(EnvConfig(visibility="partial"), 16)
    env.reset(torch.Generator().manual_seed(2))
    for offsets in (torch.tensor([0, 100, 201, 301]).view(2, 1, 2), torch.tensor([5, 6, 7, 8]).view(2, 1, 2)):
        for _ in range(2):  # the second call reads the table cached by identity
            got = env.observation_index(offsets=offsets)
            assert got.is_contiguous() and torch.equal(got, env.observation_index() + offsets)
    offsets.add_(1)  # changed in place: looked up again, not the cached table
    assert torch.equal(env.observation_index(offsets=offsets), env.observation_index() + offsets)


@torch.no_grad()
def plain_rollout(env, agents, env_gen, action_gens):
    """SPEC §4.4 step 1 written plainly: float observations, ``step``, per-step sampling, the full env step."""
    env.reset(env_gen)
    states = {a: agents[a].initial_state(env.batch) for a in AGENTS}
    out = {k: [] for k in ("actions", "logits", "values", "rewards", "collision")}
    for _ in range(env.horizon):
        obs = dict(zip(AGENTS, env.observations()))
        acts, lgs, vals = [], [], []
        for a in AGENTS:
            lg, v, _, states[a] = agents[a].step(obs[a], states[a])
            acts.append(sample_actions(lg, action_gens[a]))
            lgs.append(lg)
            vals.append(v)
        info = env.step(*acts)
        out["actions"].append(torch.stack(acts))
        out["logits"].append(torch.stack(lgs))
        out["values"].append(torch.stack(vals))
        out["rewards"].append(torch.stack([info.chaser_reward, info.explorer_reward]))
        out["collision"].append(info.collision)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("arch", ["rnn", "mlp", "transformer", "tok_transformer"])
def test_collect_rollout_equals_the_plain_loop(arch, tiny_overrides):
    cfg = make_train_config(arch, "social", 0, "fast", 1, size="matched", overrides=tiny_overrides)
    fast, plain = Trainer(cfg, torch.device("cpu")), Trainer(cfg, torch.device("cpu"))
    batch = collect_rollout(fast.env, fast.agents, fast.env_gen, fast.action_gens)
    ref = plain_rollout(plain.env, plain.agents, plain.env_gen, plain.action_gens)
    for i, a in enumerate(AGENTS):
        assert torch.equal(batch.actions[a], ref["actions"][:, i])
        torch.testing.assert_close(batch.logits[a], ref["logits"][:, i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.values[a], ref["values"][:, i], rtol=1e-5, atol=1e-5)
        assert torch.equal(batch.rewards[a], ref["rewards"][:, i])
        logp = torch.log_softmax(ref["logits"][:, i], -1).gather(-1, ref["actions"][:, i, :, None]).squeeze(-1)
        torch.testing.assert_close(batch.logp[a], logp, rtol=1e-5, atol=1e-5)
    assert torch.equal(batch.events["collision"], ref["collision"])
    assert batch.done[-1].all() and not batch.done[:-1].any()


# ------------------------------------------------------------------------------------------------ the rllib learner
def _kl_penalty_data(T, E, B, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([random_index(T, B, seed + e) for e in range(E)], 1)  # [T, E, B, 2]
    actions = torch.randint(0, 4, (T, E, B), generator=g)
    old_logits = torch.randn(T, E, B, 4, generator=g, dtype=dtype)
    # old log-probabilities a little off the current policy's, so some ratios leave the clip range either way
    old_logp = torch.log_softmax(old_logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    old_logp = old_logp + 0.4 * torch.randn(T, E, B, generator=g, dtype=dtype)
    adv = torch.randn(T, E, B, generator=g, dtype=dtype)
    returns = 3 * torch.randn(T, E, B, generator=g, dtype=dtype)  # some (V - R)^2 above the cap
    h0 = torch.rand(E, B, 256, generator=g, dtype=dtype)
    return index, actions, old_logp, adv, returns, old_logits, h0


@pytest.mark.parametrize("entropy_coef", [0.0, 0.01])
def test_stacked_kl_penalty_loss_equals_policy_loss_per_agent_in_float64(entropy_coef):
    """The rllib learner's stacked pass (the stacked RNN's recurrence and heads with their hand-written backward, and
    the KL-penalty loss with its hand-derived gradient) against policy_loss's autograd for each agent alone, from
    stored initial states: per-unit loss, statistics and every parameter's gradient, in float64."""
    from interbrain.agents.rnn import StackedRNN
    from interbrain.ppo import stacked_kl_penalty_loss

    cfg = make_train_config("rnn", "social", 0, "rllib", 1).ppo
    cfg = type(cfg)(**{**cfg.__dict__, "entropy_coef": entropy_coef, "input_l2": 0.05})
    torch.manual_seed(0)
    agents = [RNNAgent(AgentConfig("rnn", "matched", "modern")).double() for _ in range(2)]
    T, E, B = 20, 2, 6
    index, actions, old_logp, adv, returns, old_logits, h0 = _kl_penalty_data(T, E, B, seed=3)
    kl_coef = torch.tensor([0.2, 0.45], dtype=torch.float64)
    stack = StackedRNN(agents)
    loss, stats = stacked_kl_penalty_loss(stack, index, actions, old_logp, adv, returns, cfg, state0=(h0,),
                                          old_logits=old_logits, kl_coef=kl_coef)
    loss.sum().backward()
    ratio = (torch.log_softmax(stack.sequence_index(index, (h0,))[0], -1).gather(-1, actions[..., None]).squeeze(-1)
             - old_logp).exp()
    assert (ratio > 1 + cfg.clip_eps).any() and (ratio < 1 - cfg.clip_eps).any()  # both clip branches exercised
    for e, agent in enumerate(agents):
        ref, ref_stats = policy_loss(agent, index[:, e], actions[:, e], old_logp[:, e], adv[:, e], returns[:, e], cfg,
                                     state0=(h0[e],), old_logits=old_logits[:, e], kl_coef=float(kl_coef[e]))
        ref.backward()
        torch.testing.assert_close(loss[e], ref, rtol=1e-12, atol=1e-12)
        for k, v in ref_stats.items():
            torch.testing.assert_close(stats[k][e], v.detach().to(stats[k].dtype), rtol=1e-12, atol=1e-12, msg=k)
        for name, source in StackedRNN.SOURCES.items():
            mine = StackedRNN._layout(name, getattr(stack, name).grad[e])
            torch.testing.assert_close(mine, dict(agent.named_parameters())[source].grad, rtol=1e-9, atol=1e-12,
                                       msg=name)


def test_stacked_rllib_pass_is_the_same_on_either_small_step_backend(small_matmul):
    """The rllib learner's whole stacked pass in float32 (7-row minibatch: the recurrence's steps on numpy's BLAS or
    torch's): per-unit loss, statistics and every parameter's gradient equal to float tolerance."""
    from interbrain.agents.rnn import StackedRNN
    from interbrain.ppo import stacked_kl_penalty_loss

    cfg = make_train_config("rnn", "social", 0, "rllib", 1).ppo
    torch.manual_seed(0)
    agents = [RNNAgent(AgentConfig("rnn", "matched", "modern")) for _ in range(2)]
    index, actions, old_logp, adv, returns, old_logits, h0 = _kl_penalty_data(20, 2, 7, seed=5, dtype=torch.float32)
    results = []
    for backend in ("torch", "numpy"):
        assert small_matmul(backend) == backend
        stack = StackedRNN(agents)
        loss, stats = stacked_kl_penalty_loss(stack, index, actions, old_logp, adv, returns, cfg, state0=(h0,),
                                              old_logits=old_logits, kl_coef=torch.tensor([0.2, 0.45]))
        loss.sum().backward()
        results.append((loss.detach(), {k: v.detach() for k, v in stats.items()},
                        {n: p.grad.clone() for n, p in stack.named_parameters()}))
    (l1, s1, g1), (l2, s2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-6, msg=k)
    for n in g1:
        assert g1[n].abs().max() > 0, n
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5 * g1[n].abs().max().item(), msg=n)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_stacked_rllib_update_equals_the_agent_by_agent_loop(tiny_overrides, monkeypatch, small_matmul, backend):
    """A whole rllib update (30 epochs of minibatches, both agents as one stacked graph, fused Adam over the stacked
    tensors, stepped by FusedAdamSteps) against RLlib's agent-by-agent loop on the same rollout: the same statistics
    and KL-coefficient steps and, relative to what the update learned, the same weights and Adam moments (float32;
    summation order differs). With the numpy small-step backend the stacked minibatch steps are the hand-written
    ones (KLPenaltyMinibatches), with torch's the torch graph."""
    from interbrain.agents.rnn_numpy import KLPenaltyMinibatches
    from interbrain.ppo import update_rllib

    import interbrain.ppo as ppo

    assert small_matmul(backend) == backend
    cfg = make_train_config("rnn", "social", 1, "rllib", 2, overrides=tiny_overrides)
    n_mb = -(-cfg.env.horizon * cfg.ppo.num_envs // cfg.ppo.minibatch_steps)
    calls, stacked_update = [], ppo._update_rllib_stacked
    monkeypatch.setattr(ppo, "_update_rllib_stacked", lambda *args: calls.append(1) or stacked_update(*args))
    hand_steps, hand_step = [], KLPenaltyMinibatches.step
    monkeypatch.setattr(KLPenaltyMinibatches, "step", lambda *a, **k: hand_steps.append(1) or hand_step(*a, **k))
    runs = []
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(RNNAgent, "stacked", classmethod(lambda cls, agents: None))
        tr = Trainer(cfg, torch.device("cpu"))
        before = {a: {k: v.clone() for k, v in tr.agents[a].state_dict().items()} for a in AGENTS}
        for update in (1, 2):  # the second starts from Adam moments (stacked from and stored back into each agent's)
            batch = collect_rollout(tr.env, tr.agents, tr.env_gen, tr.action_gens, seq_len=cfg.ppo.seq_len)
            stats = update_rllib(tr.agents, tr.optimizers, batch, cfg.ppo, update, tr.kl_coefs, tr.minibatch_gen)
        runs.append((tr, before, stats))
    (s_tr, before, s_stats), (p_tr, _, p_stats) = runs
    assert calls == [1, 1]  # the first run took the stacked path, the second the loop
    assert len(hand_steps) == (2 * cfg.ppo.epochs * n_mb if backend == "numpy" else 0)
    assert s_tr.kl_coefs == p_tr.kl_coefs
    for a in AGENTS:
        assert s_stats[a].keys() == p_stats[a].keys()
        for k in p_stats[a]:
            assert s_stats[a][k] == pytest.approx(p_stats[a][k], rel=1e-4, abs=1e-6), (a, k)
        for (name, p), q in zip(p_tr.agents[a].named_parameters(), s_tr.agents[a].parameters()):
            learned = (p - before[a][name]).norm()
            assert learned > 0
            assert (p - q).norm() < 1e-3 * learned, (a, name)
            m_p, m_s = p_tr.optimizers[a].state[p], s_tr.optimizers[a].state[q]
            assert float(m_p["step"]) == float(m_s["step"]) == 2 * cfg.ppo.epochs * n_mb
            # entrywise, rarely visited cells' near-zero moments carry float noise: 1.1e-3 of the norm for W_ih's
            # first moment on an Intel Xeon with torch 2.11 (the GPU machine's host), under 1e-3 here; a swapped or
            # shared unit would differ by the moments' whole size
            for k in ("exp_avg", "exp_avg_sq"):
                assert (m_s[k] - m_p[k]).norm() < 3e-3 * m_p[k].norm(), (a, name, k)


@pytest.mark.parametrize("step_products", ["compiled", "torch"])
@pytest.mark.parametrize("entropy_coef, input_l2", [(0.0, 0.0), (0.01, 0.05)])
def test_hand_written_rllib_minibatch_equals_policy_loss_per_agent_in_float64(entropy_coef, input_l2, step_products):
    """KLPenaltyMinibatches, the rllib learner's minibatch step written out in numpy, against policy_loss's autograd
    for each agent alone on the sequences the minibatch picks (each unit its own) from their stored initial states:
    per-unit loss, statistics and every parameter's gradient, in float64, with both clip branches, the value cap and
    "partner not shown" rows exercised, the recurrence's step products compiled and on torch's BLAS. With
    stats=False: the same gradients bit for bit, the same approx_kl, the other statistics NaN."""
    import numpy as np

    from interbrain.agents.rnn import StackedRNN
    from interbrain.agents.rnn_numpy import STATS, KLPenaltyMinibatches

    cfg = make_train_config("rnn", "social", 0, "rllib", 1).ppo
    cfg = type(cfg)(**{**cfg.__dict__, "entropy_coef": entropy_coef, "input_l2": input_l2})
    torch.manual_seed(0)
    agents = [RNNAgent(AgentConfig("rnn", "matched", "modern")).double() for _ in range(2)]
    L, E, S = 20, 2, 9
    index, actions, old_logp, adv, returns, old_logits, h0 = _kl_penalty_data(L, E, S, seed=3)
    assert (index[..., 1] == 100).any()
    kl_coef, idx = np.array([0.2, 0.45]), np.array([[3, 1, 7, 0], [5, 8, 2, 4]])
    stack = StackedRNN(agents)
    hand = KLPenaltyMinibatches(stack, cfg, index, actions, old_logp, adv, returns, old_logits, h0,
                                step_products=step_products)
    assert hand.step_products == step_products
    stats = hand.step(idx, kl_coef)
    grads = {n: p.grad.clone() for n, p in stack.named_parameters()}
    for e, agent in enumerate(agents):
        cols = torch.from_numpy(idx[e])
        pick = lambda x: x[:, e, cols]  # noqa: E731
        ref, ref_stats = policy_loss(agent, pick(index), pick(actions), pick(old_logp), pick(adv), pick(returns), cfg,
                                     state0=(h0[e, cols],), old_logits=pick(old_logits), kl_coef=float(kl_coef[e]))
        ref.backward()
        logits, value, _ = agent.sequence_index(pick(index), (h0[e, cols],))
        ratio = (torch.log_softmax(logits, -1).gather(-1, pick(actions)[..., None]).squeeze(-1) - pick(old_logp)).exp()
        assert (ratio > 1 + cfg.clip_eps).any() and (ratio < 1 - cfg.clip_eps).any()
        assert ((value - pick(returns)) ** 2 > cfg.value_cap).any()
        assert set(ref_stats) <= set(STATS)
        for k, v in ref_stats.items():  # policy_loss's clip fraction is a float32 mean
            tol = 1e-7 if k == "clip_fraction" else 1e-12
            assert stats[STATS.index(k)][e] == pytest.approx(float(torch.as_tensor(v).detach()), rel=tol, abs=tol), k
        for name, source in StackedRNN.SOURCES.items():
            mine = StackedRNN._layout(name, grads[name][e])
            torch.testing.assert_close(mine, dict(agent.named_parameters())[source].grad, rtol=1e-9, atol=1e-12,
                                       msg=name)
    other = np.array([[6, 2, 8], [0, 3, 1]])  # a minibatch of another size in between: its own buffers
    hand.step(other, kl_coef)
    assert not torch.equal(stack.weight_hh.grad, grads["weight_hh"])
    quiet = hand.step(idx, kl_coef, stats=False)
    for n, p in stack.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    kl_row = STATS.index("approx_kl")
    assert np.array_equal(quiet[kl_row], stats[kl_row])
    assert np.isnan(np.delete(quiet, kl_row, 0)).all()


@pytest.mark.parametrize("step_products, weight_grad_on_onednn",
                         [("compiled", True), ("compiled", False), ("torch", True), ("torch", False)])
def test_hand_written_rllib_minibatch_equals_the_torch_graph_in_float32(step_products, weight_grad_on_onednn):
    """The same step in float32 (the learner's dtype) against the torch graph it replaces
    (stacked_kl_penalty_loss and its backward) on a 7-sequence minibatch: loss, statistics and gradients equal to float
    tolerance, with the step products compiled or on torch's BLAS, the recurrent weight's gradient on oneDNN or
    OpenBLAS."""
    from interbrain.agents.linear import onednn_available

    if weight_grad_on_onednn and not onednn_available():
        pytest.skip("this torch build has no oneDNN dense-layer kernel")
    import numpy as np

    from interbrain.agents.rnn import StackedRNN
    from interbrain.agents.rnn_numpy import STATS, KLPenaltyMinibatches
    from interbrain.ppo import stacked_kl_penalty_loss

    cfg = make_train_config("rnn", "social", 0, "rllib", 1).ppo
    torch.manual_seed(1)
    agents = [RNNAgent(AgentConfig("rnn", "matched", "modern")) for _ in range(2)]
    L, E, S = 20, 2, 12
    index, actions, old_logp, adv, returns, old_logits, h0 = _kl_penalty_data(L, E, S, seed=5, dtype=torch.float32)
    kl_coef, idx = torch.tensor([0.2, 0.45]), torch.tensor([[3, 1, 7, 0, 11, 6, 9], [5, 8, 2, 4, 10, 0, 1]])
    pick = lambda x: torch.stack([x[:, e, idx[e]] for e in range(E)], 1)  # noqa: E731
    stack = StackedRNN(agents)
    loss, ref = stacked_kl_penalty_loss(stack, pick(index), pick(actions), pick(old_logp), pick(adv), pick(returns),
                                        cfg, state0=(torch.stack([h0[e, idx[e]] for e in range(E)]),),
                                        old_logits=pick(old_logits), kl_coef=kl_coef)
    loss.sum().backward()
    ref = {k: v.detach().numpy() for k, v in ref.items()}
    hand_stack = StackedRNN(agents)
    hand = KLPenaltyMinibatches(hand_stack, cfg, index, actions, old_logp, adv, returns, old_logits, h0,
                                step_products=step_products, weight_grad_on_onednn=weight_grad_on_onednn)
    assert (hand.step_products, hand.weight_grad_on_onednn) == (step_products, weight_grad_on_onednn)
    stats = hand.step(idx.numpy(), kl_coef.numpy())
    for k in STATS:
        np.testing.assert_allclose(stats[STATS.index(k)], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for (n, p), q in zip(stack.named_parameters(), hand_stack.parameters()):
        assert p.grad.abs().max() > 0, n
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=n)


@pytest.mark.parametrize("openblas", [True, False])
def test_transpose_into_and_add_at_b(monkeypatch, openblas):
    """The two BLAS helpers of the hand-written step, through numpy's OpenBLAS and through their fallbacks, against
    numpy: per-unit transposes, and out += a^T b with a's and b's rows strided as the step's buffers are."""
    import numpy as np

    from interbrain.agents import rnn_numpy

    if openblas:
        if rnn_numpy._openblas() is None:
            pytest.skip("this numpy ships no scipy-openblas library (the fallbacks are tested)")
    else:
        monkeypatch.setattr(rnn_numpy, "_openblas", lambda: None)
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        src = rng.standard_normal((2, 6, 6)).astype(dtype)
        dst = np.empty_like(src)
        rnn_numpy.transpose_into(dst, src)
        assert np.array_equal(dst, src.transpose(0, 2, 1))
        big = rng.standard_normal((2, 9, 5, 6)).astype(dtype)  # rows of unit e: big[e, :8] as [40, 6], stride 6
        a, b = big[:, :8].reshape(2, 40, 6), big[:, 1:].reshape(2, 40, 6)
        out = rng.standard_normal((2, 6, 6)).astype(dtype)
        want = out + np.einsum("eki,ekj->eij", a.astype(np.float64), b.astype(np.float64))
        rnn_numpy.add_at_b(out, a, b)
        np.testing.assert_allclose(out, want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
        # rectangular, from rows strided as the step's buffers (unit e's rows big[e, :8] as [40, 6]), and from rows
        # padded apart (row stride 9 for 6 columns)
        dst = np.empty((2, 6, 40), dtype)
        rnn_numpy.transpose_into(dst, a)
        assert np.array_equal(dst, a.transpose(0, 2, 1))
        padded = rng.standard_normal((2, 40, 9)).astype(dtype)[:, :, :6]
        rnn_numpy.transpose_into(dst, padded)
        assert np.array_equal(dst, padded.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="transpose_into"):
        rnn_numpy.transpose_into(np.empty((2, 6, 6)), np.empty((2, 6, 6))[:, ::-1])
    with pytest.raises(ValueError, match="transpose_into"):
        rnn_numpy.transpose_into(np.empty((2, 6, 5)), np.empty((2, 6, 5)))


def test_add_at_b_onednn():
    """out[e] += a[e]^T b[e] on oneDNN from rows strided as the step's buffers, against float64 (float32 sums)."""
    import numpy as np

    from interbrain.agents import rnn_numpy
    from interbrain.agents.linear import onednn_available

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN dense-layer kernel")
    rng = np.random.default_rng(1)
    big = rng.standard_normal((2, 21, 7, 64)).astype(np.float32)
    a, b = big[:, :20].reshape(2, 140, 64), big[:, 1:].reshape(2, 140, 64)
    out = torch.from_numpy(rng.standard_normal((2, 64, 64)).astype(np.float32))
    want = out.double() + torch.from_numpy(np.einsum("eki,ekj->eij", a.astype(np.float64), b.astype(np.float64)))
    a_t, b_t = np.empty((2, 64, 140), np.float32), np.empty((2, 64, 140), np.float32)
    rnn_numpy.add_at_b_onednn(out, a, b, a_t, b_t)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    assert np.array_equal(a_t, a.transpose(0, 2, 1)) and np.array_equal(b_t, b.transpose(0, 2, 1))


@pytest.mark.parametrize("start", ["fresh", "loaded"])
def test_fused_adam_steps_are_adam_steps_bit_for_bit(start):
    """FusedAdamSteps (the fused Adam kernel called directly, one step count shared) against Adam.step on the same
    gradients: parameters, both moments and the step count bit for bit, from no state and from a state with steps
    taken; optimizers it cannot stand in for are refused."""
    from interbrain.ppo import FusedAdamSteps

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*shape)) for shape in ((2, 200, 8), (2, 8, 8), (2, 8), (2, 1))]
        return params, torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.01, fused=True)

    (ref_params, ref_opt), (params, opt) = make(), make()
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(7)]
    if start == "loaded":
        for o, ps in ((ref_opt, ref_params), (opt, params)):
            for k in range(3):
                for p, gr in zip(ps, grads[k]):
                    p.grad = gr.clone()
                o.step()
    fast = FusedAdamSteps(opt)
    for k in range(3 if start == "loaded" else 0, 7):
        for p, q, gr in zip(ref_params, params, grads[k]):
            p.grad, q.grad = gr.clone(), gr.clone()
        ref_opt.step()
        fast.step()
    fast.finish()
    for p, q in zip(ref_params, params):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt.state[p][key], opt.state[q][key]), key
        assert float(opt.state[q]["step"]) == 7
    from interbrain.errors import InterbrainError

    with pytest.raises(InterbrainError, match="fused Adam"):
        FusedAdamSteps(torch.optim.Adam(params, lr=1e-3))
    with pytest.raises(InterbrainError, match="fused Adam"):
        FusedAdamSteps(torch.optim.Adam(params, lr=1e-3, amsgrad=True, fused=True))
    with pytest.raises(InterbrainError, match="one dtype"):
        FusedAdamSteps(torch.optim.Adam([params[0], torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], fused=True))
    moved = FusedAdamSteps(opt)
    for _ in range(2):
        moved.step()
    params[1].data = params[1].data.clone()
    with pytest.raises(InterbrainError, match="storage changed"):
        moved.finish()


def test_rllib_rollout_through_the_pair_step_equals_the_per_agent_loop(tiny_overrides, monkeypatch):
    """The rllib learner's rollout (sequence starts recorded) through the RNN pair's batched step, the sequences'
    initial states taken from the hidden states it records, against the per-agent loop that stores them as it goes:
    the same bits on CPU (actions, logits, values, every stored state)."""
    cfg = make_train_config("rnn", "social", 0, "rllib", 1, overrides=tiny_overrides)
    L = cfg.ppo.seq_len
    paired, plain = Trainer(cfg, torch.device("cpu")), Trainer(cfg, torch.device("cpu"))
    batch = collect_rollout(paired.env, paired.agents, paired.env_gen, paired.action_gens, seq_len=L)
    monkeypatch.setattr(RNNAgent, "pair_with", lambda self, partner, steps: None)
    ref = collect_rollout(plain.env, plain.agents, plain.env_gen, plain.action_gens, seq_len=L)
    assert batch.replay and not ref.replay  # the pair path ran, then the loop
    for a in AGENTS:
        for key in ("actions", "logits", "values", "logp"):
            assert torch.equal(getattr(batch, key)[a], getattr(ref, key)[a]), (a, key)
        assert len(batch.seq_states[a]) == len(ref.seq_states[a]) == cfg.env.horizon // L
        for mine, want in zip(batch.seq_states[a], ref.seq_states[a]):
            assert len(mine) == len(want) == 1 and torch.equal(mine[0], want[0])
        assert not batch.seq_states[a][0][0].any() and batch.seq_states[a][1][0].any()


def test_stacked_adam_state_round_trip_copies():
    """StackedRNN.load_adam/store_adam move Adam's moments between the agents' optimizers and the stacked one (W_ih
    transposed) as copies: a later stacked step leaves the agents' stored state alone, and loading it back gives the
    stacked state it came from."""
    from interbrain.agents.rnn import StackedRNN

    torch.manual_seed(0)
    agents = [RNNAgent(AgentConfig("rnn")) for _ in range(2)]
    stack = StackedRNN(agents)
    opt = torch.optim.Adam(stack.parameters(), lr=1e-3, fused=True)
    for _ in range(2):
        opt.zero_grad()
        sum(p.square().sum() for p in stack.parameters()).backward()
        opt.step()
    unit_opts = [torch.optim.Adam(a.parameters(), lr=1e-3) for a in agents]
    stack.store_adam(opt, unit_opts, agents)
    w_ih = agents[1].rnn.weight_ih_l0
    stored = {k: v.clone() for k, v in unit_opts[1].state[w_ih].items()}
    assert torch.equal(stored["exp_avg"], opt.state[stack.input_rows]["exp_avg"][1].t())
    assert stored["step"].device.type == "cpu" and float(stored["step"]) == 2
    opt.step()  # must not reach the agents' copies
    assert all(torch.equal(unit_opts[1].state[w_ih][k], v) for k, v in stored.items())
    fresh = StackedRNN(agents)
    again = torch.optim.Adam(fresh.parameters(), lr=1e-3, fused=True)
    fresh.load_adam(again, unit_opts, agents)
    assert torch.equal(again.state[fresh.input_rows]["exp_avg"][1], stored["exp_avg"].t())


def test_frobenius_norm_matches_matrix_norm_and_its_gradient():
    from interbrain.agents.base import FrobeniusNorm

    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        w[1] = 0  # an all-zero matrix: gradient 0, as torch.linalg.matrix_norm gives
    g = torch.randn(3, dtype=torch.float64)
    mine = torch.autograd.grad(FrobeniusNorm.apply(w), w, g)[0]
    ref = torch.autograd.grad(torch.linalg.matrix_norm(w), w, g)[0]
    torch.testing.assert_close(FrobeniusNorm.apply(w), torch.linalg.matrix_norm(w), rtol=1e-14, atol=0)
    torch.testing.assert_close(mine, ref, rtol=1e-14, atol=0)
    assert torch.isfinite(mine).all() and (mine[1] == 0).all()


@pytest.mark.parametrize("k", [2, 16])
def test_bag_sum_is_embedding_bag_with_its_offsets_made_once(k):
    """bag_sum calls embedding_bag's kernel with cached offsets: the functional form's values and table gradient, bit
    for bit, for 2 rows per bag (the observation gathers) and 16 (the mlp's 8 frames)."""
    from interbrain.agents.base import bag_sum

    g = torch.Generator().manual_seed(k)
    table = torch.randn(201, 32, generator=g, requires_grad=True)
    for n in (5, 40, 5):  # a new size, then a cached one again
        rows = torch.randint(0, 201, (n, k), generator=g)
        want = torch.nn.functional.embedding_bag(rows, table, mode="sum")
        got = bag_sum(table, rows)
        assert torch.equal(got, want)
        assert torch.allclose(got, table[rows].sum(1), atol=1e-5)  # what the bags mean
        w = torch.randn(n, 32, generator=g)
        gw, = torch.autograd.grad((want * w).sum(), table)
        gg, = torch.autograd.grad((got * w).sum(), table)
        assert torch.equal(gg, gw)


def test_rllib_step_products_follow_the_processor(monkeypatch):
    """The rllib minibatch's step products are compiled where the processor runs AVX-512 and the hidden width is a
    multiple of the kernels' column block, else MKL through torch; an unknown choice is refused, and so is the weight
    gradient on oneDNN in float64. numpy_blas_kernels (provenance) reports threadpoolctl's kernels for numpy's
    library."""
    from threadpoolctl import threadpool_info

    from interbrain.agents import linear as L
    from interbrain.agents import rnn_numpy
    from interbrain.agents.rnn import StackedRNN

    numpy_libs = [lib for lib in threadpool_info() if lib.get("internal_api") == "openblas"
                  and "numpy" in lib.get("filepath", "")]
    assert L.numpy_blas_kernels() == (numpy_libs[0]["architecture"] if numpy_libs else None)
    for capability, hidden, expected in [("AVX512", 256, "compiled"), ("AVX512", 96, "compiled"),
                                         ("AVX512", 250, "torch"), ("AVX2", 256, "torch"), ("DEFAULT", 256, "torch")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert rnn_numpy.default_step_products(hidden) == expected, (capability, hidden)
    with pytest.raises(ValueError, match="step_products='mkl'"):
        rnn_numpy.KLPenaltyMinibatches(None, None, None, None, None, None, None, None, None, step_products="mkl")
    stack = StackedRNN([RNNAgent(AgentConfig("rnn", "matched", "modern")).double() for _ in range(2)])
    with pytest.raises(ValueError, match="float32"):
        rnn_numpy.KLPenaltyMinibatches(stack, None, None, None, None, None, None, None, None,
                                       weight_grad_on_onednn=True)
    narrow = types.SimpleNamespace(weight_hh=torch.zeros(2, 50, 50))  # a hidden width the kernels do not take
    with pytest.raises(ValueError, match="multiple of 32"):
        rnn_numpy.KLPenaltyMinibatches(narrow, None, None, None, None, None, None, None, None,
                                       step_products="compiled")
