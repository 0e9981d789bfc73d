"""The fast training paths (issue 6) against the plain, readable ones they replace.

Ground truths: PyTorch's own ``nn.RNN`` autograd (the custom recurrence and its backward), the float-observation
contract ``step``/``sequence`` (the index forms), the full ``ChaseEnv.step`` (the core step), and a plain per-step
rollout loop written here from SPEC §4.4 (``collect_rollout``)."""

from __future__ import annotations

import pytest
import torch

from interbrain.agents import ARCHITECTURES, build_agent
from interbrain.agents.rnn import ReluRecurrence
from interbrain.config import AgentConfig, EnvConfig, make_train_config
from interbrain.env import ChaseEnv, obs_from_index
from interbrain.ppo import AGENTS, collect_rollout, sample_actions
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


def test_relu_recurrence_matches_nn_rnn_autograd_in_float64():
    torch.manual_seed(0)
    rnn = torch.nn.RNN(200, 256, nonlinearity="relu").double()
    x = torch.randn(30, 5, 200, dtype=torch.float64)
    h0 = torch.rand(5, 256, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(30, 5, 256, dtype=torch.float64)
    ref, _ = rnn(x, h0.unsqueeze(0))
    (ref * w_out).sum().backward()
    ref_grads = [p.grad.clone() for p in rnn.parameters()] + [h0.grad.clone()]
    rnn.zero_grad()
    h0.grad = None
    pre = torch.nn.functional.linear(x, rnn.weight_ih_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0)
    out = ReluRecurrence.apply(pre, h0, rnn.weight_hh_l0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (out * w_out).sum().backward()
    for got, want in zip([p.grad for p in rnn.parameters()] + [h0.grad], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (ref == 0).any() and (ref > 0).any()  # both ReLU branches were exercised


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
        for k in ("chaser_reward", "explorer_reward", "collision", "chaser_new_field", "explorer_new_field"):
            assert torch.equal(getattr(info, k), c[k]), k
        assert torch.equal(full.chaser_pos, core.chaser_pos) and torch.equal(full.explorer_pos, core.explorer_pos)


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


@pytest.mark.parametrize("arch", ["rnn", "mlp", "transformer"])
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
