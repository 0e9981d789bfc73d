"""PPO math against hand-computed cases; learner independence (per-agent clipping, no coupling)."""

import math

import pytest
import torch
from torch import nn

from interbrain.agents import Agent
from interbrain.config import AgentConfig, ppo_preset
from interbrain.ppo import gae, normalize_advantages, policy_loss, sample_actions


def test_gae_hand_case_time_limit_terminal():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    done = torch.tensor([[False], [False], [True]])
    adv, ret = gae(r, v, done, gamma=0.9, lam=0.8)
    # delta2 = 2 - 0.1 = 1.9; delta1 = 0 + 0.9*0.1 - 0.2 = -0.11; delta0 = 1 + 0.9*0.2 - 0.5 = 0.68
    expected = [0.68 + 0.72 * (-0.11 + 0.72 * 1.9), -0.11 + 0.72 * 1.9, 1.9]
    assert adv[:, 0].tolist() == pytest.approx(expected, abs=1e-6)
    assert ret[:, 0].tolist() == pytest.approx([e + x for e, x in zip(expected, [0.5, 0.2, 0.1])], abs=1e-6)


def test_gae_bootstrap_time_limit():
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [0.2], [0.1]])
    done = torch.tensor([[False], [False], [True]])
    adv, _ = gae(r, v, done, gamma=0.9, lam=0.8, bootstrap_value=torch.tensor([1.0]))
    a2 = 2 + 0.9 * 1.0 - 0.1
    a1 = -0.11 + 0.72 * a2
    assert adv[:, 0].tolist() == pytest.approx([0.68 + 0.72 * a1, a1, a2], abs=1e-6)


def test_gae_done_mid_sequence_stops_propagation():
    r = torch.tensor([[0.0], [5.0]])
    v = torch.zeros(2, 1)
    adv, _ = gae(r, v, torch.tensor([[True], [True]]), gamma=0.99, lam=0.95)
    assert adv[0, 0] == 0.0 and adv[1, 0] == 5.0


def test_advantage_normalisation_population_std():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    n = normalize_advantages(a)
    assert n.mean().abs() < 1e-7
    assert n.std(unbiased=False) == pytest.approx(1.0, abs=1e-6)
    assert normalize_advantages(torch.full((4,), 2.0), min_std=1e-4).abs().max() == 0  # rllib floor


class FixedPolicy(Agent):
    """A stand-in network whose logits/values are parameters: the loss terms can be computed by hand."""

    def __init__(self, logits, values):
        super().__init__(AgentConfig())
        self.logits = nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))
        self.values = nn.Parameter(torch.as_tensor(values, dtype=torch.float32))

    def sequence_index(self, obs_index, state0=None):
        return self.logits, self.values, torch.zeros(*self.values.shape, 256)


def test_clipped_surrogate_value_cap_entropy_by_hand():
    cfg = ppo_preset("paper", entropy_coef=0.01, value_coef=0.5, recurrent_l2=0.0)
    logits = torch.log(torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]]))  # T=1, B=2
    agent = FixedPolicy(logits, [[1.0, -4.0]])
    actions = torch.tensor([[0, 1]])
    old_logp = torch.log(torch.tensor([[0.5, 0.25]]))
    adv = torch.tensor([[1.0, -1.0]])
    ret = torch.tensor([[0.0, 0.0]])
    loss, st = policy_loss(agent, None, actions, old_logp, adv, ret, cfg)
    # sample 0: ratio 1.4, A>0 -> clipped at 1.2 -> 1.2; sample 1: ratio 1, A<0 -> -1
    assert st["policy_loss"].item() == pytest.approx(-(1.2 - 1.0) / 2, abs=1e-6)
    # value errors 1 and 16 -> capped at 10
    assert st["value_loss"].item() == pytest.approx((1.0 + 10.0) / 2, abs=1e-6)
    h0 = -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))
    assert st["entropy"].item() == pytest.approx((h0 + math.log(4)) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(st["policy_loss"].item() + 0.5 * 5.5 - 0.01 * st["entropy"].item(), abs=1e-6)
    assert st["clip_fraction"].item() == pytest.approx(0.5)


def test_recurrent_l2_is_unsquared_frobenius():
    from interbrain.agents import build_agent

    cfg = ppo_preset("paper", recurrent_l2=0.3, entropy_coef=0.0, value_coef=0.0)
    agent = build_agent(AgentConfig(arch="rnn"))
    obs_index = torch.zeros(3, 2, 2, dtype=torch.long)
    obs_index[..., 1] = 100  # own cell 0, partner not shown
    with torch.no_grad():
        logits, _, _ = agent.sequence_index(obs_index)
    logp = torch.log_softmax(logits, -1)[..., 0]
    loss, st = policy_loss(agent, obs_index, torch.zeros(3, 2, dtype=torch.long), logp, torch.zeros(3, 2), torch.zeros(3, 2), cfg)
    norm = torch.sqrt((agent.rnn.weight_hh_l0.detach() ** 2).sum())
    assert loss.item() == pytest.approx(0.3 * norm.item(), rel=1e-5)


def test_gumbel_sampling_matches_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])).expand(200_000, 4)
    counts = torch.bincount(sample_actions(logits, g), minlength=4).float() / 200_000
    assert counts.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.005)


def test_learners_are_independent(tiny_overrides):
    """Per-agent clipping and disjoint losses: the explorer's update must not depend on the chaser's data."""
    from interbrain.config import make_train_config
    from interbrain.ppo import collect_rollout, update_clipped
    from interbrain.train import Trainer

    # a tiny clip threshold makes clipping bind for both agents, so a joint norm would couple them
    cfg = make_train_config("rnn", "social", 0, "fast", 1, overrides=tiny_overrides | {"grad_clip": 1e-3})
    results = []
    for scale in (1.0, -3.0):
        tr = Trainer(cfg, torch.device("cpu"))
        batch = collect_rollout(tr.env, tr.agents, tr.env_gen, tr.action_gens)
        batch.rewards["chaser"] = batch.rewards["chaser"] * scale  # different chaser data and gradients
        stats = update_clipped(tr.agents, tr.optimizers, batch, cfg.ppo, 1)
        results.append(({k: v.clone() for k, v in tr.agents["explorer"].state_dict().items()},
                        {k: v.clone() for k, v in tr.agents["chaser"].state_dict().items()}, stats))
    (e1, c1, s1), (e2, c2, s2) = results
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    assert s1["explorer"]["grad_norm"] == s2["explorer"]["grad_norm"] > 1e-3  # clipping engaged
    assert s1["chaser"]["grad_norm"] != s2["chaser"]["grad_norm"]
    assert not all(torch.equal(c1[k], c2[k]) for k in c1)


def test_unimplemented_options_are_refused_not_ignored():
    from interbrain.errors import InterbrainError

    with pytest.raises(InterbrainError, match="rllib_slicing='exact'.*not implemented"):
        ppo_preset("rllib", rllib_slicing="exact")


@pytest.mark.parametrize("arch", ["rnn", "mlp"])
def test_rollout_z_norm_is_the_action_space_norm_every_tenth_step(arch, tiny_overrides):
    """``Rollout.z_norm`` (SPEC §4.6) is ‖W_aᵀ W_a h_t‖ with W_a the 4 × 256 action-head weight, for h_t at steps 0, 10,
    20, … of every episode, step-major: checked in float64 against the hidden states the agents act on, through the
    RNN pair's written-out loop and through the per-agent loop (mlp)."""
    from interbrain.config import make_train_config
    from interbrain.ppo import AGENTS, Z_SAMPLE_EVERY, collect_rollout
    from interbrain.train import Trainer

    tr = Trainer(make_train_config(arch, "social", 1, "paper", 2, overrides=tiny_overrides), torch.device("cpu"))
    batch = collect_rollout(tr.env, tr.agents, tr.env_gen, tr.action_gens)
    T, B = batch.done.shape
    for a in AGENTS:
        agent = tr.agents[a]
        with torch.no_grad():
            logits, _, hidden = agent.sequence_index(batch.obs_index[a])  # from the zero state, as each episode
        torch.testing.assert_close(logits, batch.logits[a], rtol=1e-5, atol=1e-5)  # the states acted on
        h = hidden[::Z_SAMPLE_EVERY].reshape(-1, hidden.shape[-1]).double()
        w = agent.action_head.weight.detach().double()
        expected = (h @ w.t() @ w).norm(dim=-1)
        assert batch.z_norm[a].shape == (T // Z_SAMPLE_EVERY * B,)
        torch.testing.assert_close(batch.z_norm[a].double(), expected, rtol=1e-5, atol=1e-6)
        assert expected.min() > 0


def test_fused_adam_bumps_versions_so_cached_tables_follow_the_step():
    """FusedAdam is torch's fused Adam, bit for bit, and it bumps the parameters' version counters: tensors derived
    from the weights and cached while acting (an RNN's input table, its joint heads) are rebuilt after a step. The
    fused kernel alone does not bump them, and the cache would keep the old table."""
    from interbrain.agents.base import build_agent
    from interbrain.ppo import FusedAdam

    torch.manual_seed(0)
    agent = build_agent(AgentConfig(arch="rnn"))
    twin = build_agent(AgentConfig(arch="rnn"))
    twin.load_state_dict(agent.state_dict())
    mine = FusedAdam(agent.parameters(), lr=1e-2)
    plain = torch.optim.Adam(twin.parameters(), lr=1e-2, fused=True)
    for step in range(3):
        for p, q in zip(agent.parameters(), twin.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        with torch.no_grad():
            before = agent._table()
        versions = [p._version for p in agent.parameters()]
        mine.step()
        plain.step()
        assert all(p._version > v for p, v in zip(agent.parameters(), versions))
        assert all(torch.equal(p, q) for p, q in zip(agent.parameters(), twin.parameters()))
        with torch.no_grad():
            after = agent._table()
            assert not torch.equal(after, before)
            assert torch.equal(after, agent.input_table())  # the current weights' table, not the cached one
