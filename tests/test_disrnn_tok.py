"""`disrnn` and `tok_transformer` (SPEC §3.4) against the agent contract (SPEC §3.1) and their own definitions.

Ground truths: the parameter counts documented in each module, the step-vs-sequence identity (disrnn in eval mode,
i.e. noiseless), hand-written float64 numpy forward passes, the KL formula on a hand-computed case, the covariance of
the input bottlenecks' noise (sum over inputs of sigma^2 W W^T per update net) against the sampler's, the transformer
context rule of §3.2 applied to token blocks (a step's output equals a fresh pass over exactly its own window), and
bit-exact training resume (SPEC §4.6).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from agent_helpers import TOL, assert_parity, run_steps, two_hot_obs
from interbrain.agents import HIDDEN, build_agent, build_pair
from interbrain.agents.disrnn import LATENTS, bottleneck_summary, noise_factor
from interbrain.agents.tok_transformer import index_from_obs
from interbrain.checkpoint import load_agents, load_checkpoint, read_metadata, save_checkpoint
from interbrain.config import AgentConfig, make_train_config
from interbrain.errors import InterbrainError
from interbrain.train import Trainer

torch.set_num_threads(1)

ARCH_SIZES = [("disrnn", "std"), ("disrnn", "matched"), ("tok_transformer", "std"), ("tok_transformer", "matched")]
PARAMS = {("disrnn", "std"): 31_841, ("disrnn", "matched"): 118_921, ("tok_transformer", "std"): 1_133_573,
          ("tok_transformer", "matched"): 120_901}


def make_agent(arch, size="std", seed=0, **kw):
    torch.manual_seed(seed)
    agent = build_agent(AgentConfig(arch=arch, size=size, **kw))
    return agent.eval() if arch == "disrnn" else agent  # disrnn: eval mode is the noiseless model


def active_disrnn(size="matched", **kw):
    """A disrnn in training mode past its warm-up: bottleneck noise and penalty on."""
    agent = make_agent("disrnn", size, **kw).train()
    agent.set_progress(agent.warmup + 1)
    assert agent.bottlenecks_active
    return agent


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_params(agent):
    return {k: v.detach().double().numpy() for k, v in agent.state_dict().items()}


# --- sizes, construction, configuration --------------------------------------------------------------
@pytest.mark.parametrize("arch,size", ARCH_SIZES)
def test_parameter_counts_and_card(arch, size):
    agent = make_agent(arch, size)
    assert agent.num_parameters() == PARAMS[(arch, size)]
    assert abs(PARAMS[(arch, "matched")] / 118_533 - 1) < 0.10  # SPEC §3.3: matched = the RNN's count ± 10 %
    card = agent.card()
    assert card["parameters_per_agent"] == PARAMS[(arch, size)] and card["hidden"] and card["memory"]
    assert card["architecture"] == arch and card["size"] == size
    assert card["context_limit"] == {"disrnn": None, "tok_transformer": 100}[arch]
    assert card["carries_hidden"] is False
    with pytest.raises(InterbrainError, match="does not carry"):
        agent.with_hidden(agent.initial_state(1), torch.zeros(1, HIDDEN))
    assert agent.recurrent_weight_norm().item() == 0.0 and agent.input_weight_norm().item() > 0.0


def test_tok_transformer_options_change_only_the_documented_parameters():
    d = {"std": 256, "matched": 64}
    for size in ("std", "matched"):
        base = PARAMS[("tok_transformer", size)]
        assert make_agent("tok_transformer", size, tok_mode="concat").num_parameters() == base
        assert make_agent("tok_transformer", size, tok_compute=0).num_parameters() == base - 2 * d[size]
        assert make_agent("tok_transformer", size, tok_compute=5).num_parameters() == base + 3 * d[size]
        assert make_agent("tok_transformer", size, tok_type_embedding=True).num_parameters() == base + 2 * d[size]
        assert make_agent("tok_transformer", size, tok_type_embedding=True,
                          tok_mode="concat").num_parameters() == base + 3 * d[size]
    assert make_agent("tok_transformer", window=37).pos_table.shape == (37, 256)


def test_tok_transformer_refuses_unimplemented_options():
    for kw in ({"tok_prev_action": True}, {"tok_prev_reward": True}):
        with pytest.raises(InterbrainError, match="previous-action"):
            make_agent("tok_transformer", **kw)
    with pytest.raises(InterbrainError, match="rope"):
        make_agent("tok_transformer", pos="rope")


def test_new_config_fields_are_validated_and_default_to_the_documented_values():
    cfg = AgentConfig()
    assert (cfg.bottleneck_beta, cfg.bottleneck_warmup, cfg.tok_compute, cfg.tok_mode, cfg.tok_type_embedding,
            cfg.tok_prev_action, cfg.tok_prev_reward) == (1e-2, 100, 2, "sum", False, False, False)
    for bad in ({"bottleneck_beta": -1e-3}, {"bottleneck_beta": float("nan")}, {"bottleneck_beta": float("inf")},
                {"bottleneck_beta": True}, {"bottleneck_warmup": -1}, {"bottleneck_warmup": 2.5},
                {"tok_compute": -1}, {"tok_compute": 1.0}, {"tok_mode": "mean"}, {"tok_type_embedding": 1},
                {"tok_prev_action": "no"}):
        with pytest.raises(InterbrainError):
            AgentConfig(arch="tok_transformer", **bad)
    assert AgentConfig(bottleneck_beta=0, bottleneck_warmup=0, tok_compute=0).bottleneck_beta == 0


@pytest.mark.parametrize("arch", ["disrnn", "tok_transformer"])
def test_build_pair_is_reproducible_and_agents_are_independent(arch):
    chaser, explorer = build_pair(AgentConfig(arch=arch, size="matched"), seed=3)
    chaser2, explorer2 = build_pair(AgentConfig(arch=arch, size="matched"), seed=3)
    for a, b in ((chaser, chaser2), (explorer, explorer2)):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    w = lambda m: torch.cat([p.flatten() for p in m.parameters()])  # noqa: E731
    assert not torch.equal(w(chaser), w(explorer))


# --- step == sequence (SPEC §3.1) ----------------------------------------------------------------------
@pytest.mark.parametrize("arch,size", ARCH_SIZES)
@pytest.mark.parametrize("T", [100, 250])
def test_step_equals_sequence(arch, size, T):
    agent = make_agent(arch, size)
    if arch == "disrnn":
        agent.set_progress(10_000)  # past the warm-up: eval mode alone must keep it noiseless
    h = assert_parity(agent, two_hot_obs(T, 2, seed=T))
    assert h.abs().sum() > 0
    if arch == "tok_transformer":
        assert agent.max_position_used == 99 and agent.max_context_used == 100


@pytest.mark.parametrize("arch,size", ARCH_SIZES)
def test_index_form_equals_float_form(arch, size):
    """step_index/sequence_index (the trainer's path) on (own, partner or 100) equal step/sequence on the floats."""
    agent = make_agent(arch, size, window=20)
    obs = two_hot_obs(30, 3, seed=3)
    index = index_from_obs(obs)
    assert torch.equal(index[..., 0], obs[..., :100].argmax(-1))
    shown = obs[..., 100:].sum(-1) > 0
    assert torch.equal(index[..., 1] == 100, ~shown)
    assert torch.equal(index[..., 1][shown], obs[..., 100:].argmax(-1)[shown])
    with torch.no_grad():
        ref = agent.sequence(obs)
        for a, b in zip(agent.sequence_index(index), ref):
            torch.testing.assert_close(a, b, **TOL)
        state = agent.initial_state(3)
        for t in range(30):
            logits, value, hidden, state = agent.step_index(index[t], state)
            torch.testing.assert_close(hidden, ref[2][t], **TOL)
            torch.testing.assert_close(logits, ref[0][t], **TOL)


@pytest.mark.parametrize("size", ["std", "matched"])
def test_disrnn_step_equals_sequence_from_a_nonzero_state(size):
    agent = make_agent("disrnn", size)
    g = torch.Generator().manual_seed(5)
    state0 = (2 * torch.rand(3, LATENTS, generator=g) - 1,)
    h_from_state = assert_parity(agent, two_hot_obs(40, 3, seed=2), state0)
    with torch.no_grad():
        h_from_init = agent.sequence(two_hot_obs(40, 3, seed=2))[2]
    assert (h_from_state - h_from_init).abs().max() > 1e-3  # the state really entered


@pytest.mark.parametrize("t0", [3, 6, 7, 12])
def test_tok_transformer_sequence_continues_any_state(t0):
    """A small window (W=7) hits every case: state inside/at/after the first window."""
    agent = make_agent("tok_transformer", "matched", window=7)
    obs = two_hot_obs(t0 + 20, 2, seed=t0)
    with torch.no_grad():
        (_, _, h_all), _ = run_steps(agent, obs)
        _, state = run_steps(agent, obs[:t0])
    assert state[0] == t0 and state[1].shape == (2, min(t0, 6), 2)
    h_tail = assert_parity(agent, obs[t0:], state)
    torch.testing.assert_close(h_tail, h_all[t0:], **TOL)


@pytest.mark.parametrize("S", [1, 2, 3, 4])
def test_tok_transformer_last_block_for_last_tokens_equals_the_full_causal_block(S):
    """The learning pass runs its last block for each step's last token only (last_tokens_block): the outputs and
    every gradient (block parameters and input) equal the full causal block's, read at those tokens."""
    from interbrain.agents.tok_transformer import last_tokens_block

    torch.manual_seed(S)
    block = make_agent("tok_transformer", "matched", window=20).blocks[-1]
    x = torch.randn(3, 7 * S, 64, requires_grad=True)
    full = block.causal(x)[:, S - 1::S]
    weights = torch.randn_like(full)
    grads_full = torch.autograd.grad((full * weights).sum(), [x, *block.parameters()])
    mine = last_tokens_block(block, x, S)
    grads_mine = torch.autograd.grad((mine * weights).sum(), [x, *block.parameters()])
    torch.testing.assert_close(mine, full, rtol=1e-5, atol=1e-5)
    for g_mine, g_full in zip(grads_mine, grads_full):
        torch.testing.assert_close(g_mine, g_full, rtol=1e-4, atol=1e-5)
    assert grads_mine[0][:, -1].abs().sum() > 0  # the last token reaches the output


# --- causality and memory ------------------------------------------------------------------------------
CAUSAL_CASES = [("disrnn", {}), ("tok_transformer", {}), ("tok_transformer", {"tok_mode": "concat"}),
                ("tok_transformer", {"tok_compute": 0})]


@pytest.mark.parametrize("arch,kw", CAUSAL_CASES)
def test_hidden_is_causal(arch, kw):
    agent = make_agent(arch, "matched", window=20, **kw)
    obs = two_hot_obs(30, 2, seed=7)
    changed = obs.clone()
    changed[15:] = two_hot_obs(15, 2, seed=8)
    with torch.no_grad():
        h, h2 = agent.sequence(obs)[2], agent.sequence(changed)[2]
    torch.testing.assert_close(h2[:15], h[:15], atol=0, rtol=0)
    assert (h2[15] - h[15]).abs().max() > 1e-4  # the change at t=15 is seen at t=15


def test_tok_transformer_step_after_window_forgets_older_steps():
    agent = make_agent("tok_transformer", "matched", window=10)
    obs = two_hot_obs(25, 2, seed=11)
    changed = obs.clone()
    changed[4] = two_hot_obs(1, 2, seed=12)[0]
    with torch.no_grad():
        h, h2 = agent.sequence(obs)[2], agent.sequence(changed)[2]
    assert (h2[13] - h[13]).abs().max() > 1e-4  # window of t=13 is [4, 13]
    torch.testing.assert_close(h2[14:], h[14:], atol=0, rtol=0)  # windows from t=14 on start after 4


# --- tok_transformer context rule (SPEC §3.2 on token blocks) -------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"tok_mode": "concat", "tok_type_embedding": True}, {"tok_compute": 0}])
def test_tok_transformer_each_step_equals_a_fresh_pass_over_its_own_window(kw):
    """Step t < W sees steps 0..t at positions 0..t; step t >= W sees t-W+1..t re-indexed to 0..W-1."""
    W = 8
    agent = make_agent("tok_transformer", "matched", window=W, **kw)
    obs = two_hot_obs(30, 2, seed=13)
    with torch.no_grad():
        (_, _, h), _ = run_steps(agent, obs)
        for t in (0, 5, 7, 8, 19, 29):
            fresh = agent.sequence(obs[max(0, t - W + 1): t + 1])[2][-1]
            torch.testing.assert_close(h[t], fresh, **TOL)


def test_tok_transformer_context_never_exceeds_window_and_position_W_raises():
    W = 100
    agent = make_agent("tok_transformer", "matched", window=W)
    assert agent.max_position_used == -1 and agent.max_context_used == 0
    with torch.no_grad():
        agent.sequence(two_hot_obs(250, 2, seed=14))
        _, state = run_steps(agent, two_hot_obs(120, 1, seed=15))
    assert agent.max_position_used == W - 1 and agent.max_context_used == W
    assert state[0] == 120 and state[1].shape == (1, W - 1, 2) and state[2].shape[2] == 0
    for start, stop in ((W, W + 1), (0, W + 1), (-1, 3)):
        with pytest.raises(InterbrainError, match="position"):
            agent.position_embedding(start, stop)
    assert agent.max_position_used == W - 1
    bad_state = (5,) + agent.initial_state(1)[1:]  # step counter 5 with no history
    with pytest.raises(InterbrainError, match="expected 5"):
        agent.step(two_hot_obs(1, 1)[0], bad_state)


def test_tok_transformer_matches_a_numpy_forward_pass():
    """concat mode, K = 2 compute tokens, type embedding: 4 tokens per step, causal over tokens, hidden = last token."""
    agent = make_agent("tok_transformer", "matched", window=10, tok_mode="concat", tok_type_embedding=True)
    T, d, H, S = 5, 64, 4, 4
    obs = two_hot_obs(T, 1, seed=16)
    P = numpy_params(agent)
    own = obs[:, 0, :100].argmax(-1).numpy()
    partner = [int(obs[t, 0, 100:].argmax()) if obs[t, 0, 100:].sum() > 0 else 100 for t in range(T)]

    def ln(x, w, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * w + b

    tokens = []
    for t in range(T):
        block = [P["own_embed.weight"][own[t]] + P["type_embed"][0],
                 P["partner_embed.weight"][partner[t]] + P["type_embed"][1],
                 P["compute_tokens"][0] + P["type_embed"][2], P["compute_tokens"][1] + P["type_embed"][2]]
        tokens += [tok + P["pos_table"][t] for tok in block]
    x = np.stack(tokens)  # [T*S, d]
    N = T * S
    for i in range(2):
        p = lambda name: P[f"blocks.{i}.{name}"]  # noqa: E731
        qkv = ln(x, p("ln_attn.weight"), p("ln_attn.bias")) @ p("qkv.weight").T + p("qkv.bias")
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        heads = []
        for h in range(H):
            sl = slice(h * 16, (h + 1) * 16)
            scores = q[:, sl] @ k[:, sl].T / 4.0 + np.triu(np.full((N, N), -np.inf), 1)
            att = np.exp(scores - scores.max(1, keepdims=True))
            heads.append((att / att.sum(1, keepdims=True)) @ v[:, sl])
        x = x + np.concatenate(heads, 1) @ p("attn_out.weight").T + p("attn_out.bias")
        m = np.maximum(ln(x, p("ln_mlp.weight"), p("ln_mlp.bias")) @ p("mlp_in.weight").T + p("mlp_in.bias"), 0)
        x = x + m @ p("mlp_out.weight").T + p("mlp_out.bias")
    last = x[S - 1::S]  # the last compute token of every step
    hidden = np.maximum(ln(last, P["final_ln.weight"], P["final_ln.bias"]) @ P["hidden_proj.weight"].T
                        + P["hidden_proj.bias"], 0)
    with torch.no_grad():
        h = agent.sequence(obs)[2][:, 0].double().numpy()
    np.testing.assert_allclose(h, hidden, atol=1e-5)


# --- disrnn against its formulas ---------------------------------------------------------------------------
def disrnn_reference(P, obs, z):
    """disRNN written out per latent (noiseless): bottleneck means, residual update MLP, gated update, hidden."""
    L, layers = P["latent_init"].shape[0], P["layer_weight"].shape[0]
    leaky = lambda s: np.where(s > 0, s, 0.01 * s)  # noqa: E731
    hidden = []
    for x in obs:
        new = np.zeros_like(z)
        for i in range(L):
            a = x * P["obs_multiplier"][:, i]  # observation bottleneck means of net i
            b = z * P["latent_in_multiplier"][:, i]  # previous-latent bottleneck means of net i
            s = a @ P["obs_weight"][i] + b @ P["latent_weight"][i] + P["in_bias"][i]
            for layer in range(layers):
                s = s + leaky(s @ P["layer_weight"][layer, i] + P["layer_bias"][layer, i])
            g, v = (s @ P["out_weight"][i] + P["out_bias"][i]).T
            w, u = sigmoid(g), 2.0 * np.tanh(v / 2.0)
            new[:, i] = (1 - w) * z[:, i] + w * u
        z = new
        hidden.append(np.maximum(z @ P["hidden_proj.weight"].T + P["hidden_proj.bias"], 0))
    return np.stack(hidden), z


@pytest.mark.parametrize("size", ["std", "matched"])
def test_disrnn_matches_a_numpy_forward_pass(size):
    agent = make_agent("disrnn", size)
    with torch.no_grad():  # non-trivial multipliers, so the bottleneck means matter
        agent.obs_multiplier.uniform_(0.5, 1.5)
        agent.latent_in_multiplier.uniform_(-1.5, 1.5)
    obs = two_hot_obs(12, 2, seed=17)
    P = numpy_params(agent)
    for state0 in (None, (torch.rand(2, LATENTS) * 2 - 1,)):
        z0 = P["latent_init"][None].repeat(2, 0) if state0 is None else state0[0].double().numpy()
        hidden_ref, z_ref = disrnn_reference(P, obs.double().numpy(), z0)
        with torch.no_grad():
            logits, value, hidden = agent.sequence(obs, state0)
            _, state = run_steps(agent, obs, state0)
        np.testing.assert_allclose(hidden.numpy(), hidden_ref, atol=1e-5)
        logits_ref = hidden_ref @ P["action_head.weight"].T + P["action_head.bias"]
        value_ref = (hidden_ref @ P["value_head.weight"].T + P["value_head.bias"])[..., 0]
        np.testing.assert_allclose(logits.numpy(), logits_ref, atol=1e-5)
        np.testing.assert_allclose(value.numpy(), value_ref, atol=1e-5)
        np.testing.assert_allclose(state[0].numpy(), z_ref, atol=1e-5)
        np.testing.assert_allclose(agent.extra_sites(state)["latents"].numpy(), z_ref, atol=1e-5)


def test_disrnn_initial_state_is_the_learned_latent_init_and_latents_are_a_site():
    agent = make_agent("disrnn")
    (z0,) = agent.initial_state(3)
    assert z0.shape == (3, LATENTS) and not z0.requires_grad
    assert torch.equal(z0, agent.latent_init.detach().expand(3, -1))
    assert z0.abs().max() <= 0.1
    with torch.no_grad():
        _, _, hidden, state = agent.step(two_hot_obs(1, 3)[0], agent.initial_state(3))
    sites = agent.extra_sites(state)
    assert set(sites) == {"latents"} and sites["latents"].shape == (3, LATENTS)
    torch.testing.assert_close(hidden, torch.relu(agent.hidden_proj(sites["latents"])), atol=0, rtol=0)


def test_disrnn_bottlenecks_start_open():
    agent = make_agent("disrnn")
    for name, sigma in agent.sigmas().items():
        assert sigma.min() >= 1e-5 and sigma.max() <= 0.05 + 1e-5, name
    assert torch.all(agent.obs_multiplier == 1) and torch.all(agent.latent_in_multiplier == 1)


# --- disrnn noise, penalty and warm-up ----------------------------------------------------------------------
def test_disrnn_noise_only_in_training_mode_after_warm_up_and_deterministic_under_a_seed():
    agent = make_agent("disrnn", "matched", bottleneck_warmup=3)
    obs = two_hot_obs(20, 2, seed=18)
    with torch.no_grad():
        clean = agent.sequence(obs)[2]
        agent.train()
        for update in (1, 2, 3):  # warm-up: noiseless in training mode too
            agent.set_progress(update)
            torch.testing.assert_close(agent.sequence(obs)[2], clean, atol=0, rtol=0)
            assert agent.aux_loss().item() == 0.0
        agent.set_progress(4)
        torch.manual_seed(1)
        noisy = agent.sequence(obs)[2]
        noisy_again = agent.sequence(obs)[2]
        torch.manual_seed(1)
        noisy_seeded = agent.sequence(obs)[2]
        (_, _, h_step), _ = run_steps(agent, obs)  # rollouts in training mode are noisy as well
        agent.eval()
        torch.testing.assert_close(agent.sequence(obs)[2], clean, atol=0, rtol=0)
        assert agent.aux_loss().item() == 0.0
    assert (noisy - clean).abs().max() > 1e-4 and (noisy - noisy_again).abs().max() > 1e-4
    assert (h_step - clean).abs().max() > 1e-4
    torch.testing.assert_close(noisy_seeded, noisy, atol=0, rtol=0)


def test_noise_factor_reproduces_the_covariance_and_its_gradient():
    """R^T R = S^T S (upper-triangular R), so ε' R and ε S are the same Gaussian; through R, the gradient of any
    function of the covariance equals that function's gradient through S^T S; zero weights (a singular covariance)
    give a zero, finite factor."""
    g = torch.Generator().manual_seed(40)
    scaled = (torch.randn(3, 50, 7, generator=g, dtype=torch.float64) * torch.rand(3, 50, 1, generator=g,
                                                                                    dtype=torch.float64)).requires_grad_()
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    r = noise_factor(scaled)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, scaled.transpose(-1, -2) @ scaled, rtol=1e-10, atol=1e-12)
    assert torch.equal(r, r.triu())
    (grad_r,) = torch.autograd.grad((r.transpose(-1, -2) @ r @ a).diagonal(dim1=-2, dim2=-1).sum(), scaled)
    torch.testing.assert_close(grad_r, scaled @ (a + a.t()), rtol=1e-8, atol=1e-10)  # d tr(S^T S A) / dS
    zero = noise_factor(torch.zeros(2, 50, 7))
    assert torch.isfinite(zero).all() and zero.abs().max().item() < 1e-30


def test_disrnn_input_noise_has_the_covariance_of_its_bottlenecks():
    """The noise update net i's first pre-activation receives is Σ_j ε_j σ_{j,i} W_i[j] over its 200 observation and L
    latent inputs: covariance C_i = Σ_j σ_{j,i}² W_i[j] W_i[j]^T, written out here from the parameters in numpy. The
    sampler's empirical covariance over 100,000 rows matches C_i (planted, unequal σ) and its mean is 0."""
    agent = active_disrnn("std")
    g = torch.Generator().manual_seed(41)
    with torch.no_grad():
        agent.obs_sigma_param.copy_(torch.rand(agent.obs_sigma_param.shape, generator=g) * 2)
        agent.latent_in_sigma_param.copy_(torch.rand(agent.latent_in_sigma_param.shape, generator=g) * 2)
        torch.manual_seed(42)
        noise = agent._input_noise(100_000, torch.float32).double()  # [L, rows, n]
    P = numpy_params(agent)
    s_obs, s_lat = np.abs(P["obs_sigma_param"]) + 1e-5, np.abs(P["latent_in_sigma_param"]) + 1e-5  # [input j, net i]
    for i in range(LATENTS):
        rows = np.concatenate([s_obs[:, i, None] * P["obs_weight"][i], s_lat[:, i, None] * P["latent_weight"][i]])
        cov = rows.T @ rows
        x = noise[i].numpy()
        emp = x.T @ x / len(x)
        sd = np.sqrt(np.outer(np.diag(cov), np.diag(cov)))  # scale of each entry's sampling error
        assert np.abs(emp - cov).max() < 0.03 * sd.max(), i
        assert np.abs(x.mean(0)).max() < 0.02 * np.sqrt(np.diag(cov)).max(), i


def test_disrnn_kl_hand_computed_case():
    """All σ = 1 and multipliers 0 and zero means: KL = 0; one latent σ = 0.5: KL = ½(0.25 − 1 − ln 0.25)."""
    agent = active_disrnn("std", bottleneck_beta=0.1)
    with torch.no_grad():
        for p in (agent.obs_sigma_param, agent.latent_in_sigma_param, agent.latent_sigma_param):
            p.fill_(1.0 - 1e-5)  # σ = |p| + 1e-5 = 1
        agent.obs_multiplier.zero_()
        agent.latent_in_multiplier.zero_()
        agent.latent_init.zero_()
        agent.out_weight.zero_()
        agent.out_bias.zero_()  # gate 0.5, target 0: the latent mean stays 0
    obs = two_hot_obs(1, 3, seed=19)
    agent.sequence(obs)
    assert abs(agent.aux_loss().item()) < 1e-6
    with torch.no_grad():
        agent.latent_sigma_param[4] = 0.5 - 1e-5
    agent.sequence(obs)
    assert agent.aux_loss().item() == pytest.approx(0.1 * 0.5 * (0.25 - 1 - math.log(0.25)), rel=1e-5)


def test_disrnn_aux_loss_is_beta_times_the_mean_kl_of_the_latest_sequence():
    """With the input weights zeroed the means do not depend on the noise, so KL = ½ Σ (μ² + σ² − 1 − log σ²) over the
    observation inputs (μ = x·m), the previous-latent inputs (μ = z0·m') and the latents (μ = gated update), per net."""
    agent = active_disrnn("std", bottleneck_beta=1e-2)
    g = torch.Generator().manual_seed(20)
    with torch.no_grad():
        agent.obs_weight.zero_()
        agent.latent_weight.zero_()
        for p in (agent.obs_sigma_param, agent.latent_in_sigma_param, agent.latent_sigma_param,
                  agent.obs_multiplier, agent.latent_in_multiplier, agent.in_bias, agent.out_bias):
            p.copy_(torch.randn(p.shape, generator=g))
    obs = two_hot_obs(1, 4, seed=21)
    agent.sequence(obs)
    aux = agent.aux_loss()
    assert aux.requires_grad
    P = numpy_params(agent)
    sigma = lambda name: np.abs(P[name]) + 1e-5  # noqa: E731
    half_kl = lambda mu, s: 0.5 * (mu ** 2 + s ** 2 - 1 - np.log(s ** 2))  # noqa: E731
    x = obs[0].double().numpy()  # [B, 200]
    z0 = np.repeat(P["latent_init"][None], 4, 0)
    kl = half_kl(x[:, :, None] * P["obs_multiplier"], sigma("obs_sigma_param")).sum((1, 2))
    kl += half_kl(z0[:, :, None] * P["latent_in_multiplier"], sigma("latent_in_sigma_param")).sum((1, 2))
    _, mean = disrnn_reference(P, x[None], z0)  # the input weights are zero, so the noiseless update is the mean
    kl += half_kl(mean, sigma("latent_sigma_param")).sum(1)
    assert aux.item() == pytest.approx(1e-2 * kl.mean(), rel=1e-5)


def test_disrnn_gradients_reach_every_parameter_after_warm_up_and_sigmas_wait_for_it():
    obs = two_hot_obs(20, 2, seed=22)
    for active in (False, True):
        agent = make_agent("disrnn", "matched").train()
        agent.set_progress(agent.warmup + 1 if active else 1)
        logits, value, hidden = agent.sequence(obs)
        (logits.square().sum() + value.square().sum() + hidden.sum() + agent.aux_loss()).backward()
        for name, p in agent.named_parameters():
            if not active and name.endswith("sigma_param"):  # noiseless warm-up: σ enters nothing
                assert p.grad is None, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def _latent_loop(drive, z, noise, latent_table, layers, out):
    """The update nets' recurrence as plain autograd ops, step by step (the loop before the written-out gradient)."""
    T, L, B, n = drive.shape
    zs, means = [], []
    for t in range(T):
        s = drive[t] + (z @ latent_table).view(B, L, n).transpose(0, 1)
        for bias, weight in layers:
            s = s + torch.nn.functional.leaky_relu(torch.baddbmm(bias, s, weight))
        gate, target = torch.baddbmm(out[0], s, out[1]).unbind(-1)
        mean = torch.lerp(z, 2.0 * torch.tanh(target.t()), torch.sigmoid(gate).t())
        z = mean if noise is None else mean + noise[t]
        zs.append(z)
        means.append(mean)
    return torch.stack(zs), torch.stack(means)


@pytest.mark.parametrize("backend", ["torch", "numpy"])
@pytest.mark.parametrize("noisy", [False, True])
def test_disrnn_written_out_gradient_equals_autograd_through_the_loop(monkeypatch, backend, noisy):
    """LatentRecurrence (forward and hand-written backward, torch or numpy calls) against autograd through the plain
    per-step loop, in float64, for every input: drive, z0, noise, latent table, output and hidden layers."""
    from interbrain.agents import disrnn

    monkeypatch.setattr(disrnn, "small_products_on_numpy", lambda x: backend == "numpy")
    g = torch.Generator().manual_seed(5)
    T, L, B, n = 6, 4, 3, 5
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale  # noqa: E731
                                      ).requires_grad_()
    drive, z0, table = rand(T, L, B, n), rand(B, L), rand(L, L * n, scale=0.5)
    noise = rand(T, B, L, scale=0.3) if noisy else None
    layers = [(rand(L, 1, n), rand(L, n, n, scale=0.4)) for _ in range(2)]
    out = (rand(L, 1, 2), rand(L, n, 2))
    leaves = [drive, z0, table, *out, *(p for layer in layers for p in layer)] + ([noise] if noisy else [])
    w_z, w_m = torch.randn(T, B, L, generator=g, dtype=torch.float64), torch.randn(T, B, L, generator=g,
                                                                                  dtype=torch.float64)
    results = []
    for fn in (_latent_loop, disrnn.latent_recurrence):
        zs, means = fn(drive, z0, noise, table, layers, out)
        loss = (zs * w_z).sum() + (means * w_m).sum() + zs.square().sum()
        results.append((zs.detach(), means.detach(), torch.autograd.grad(loss, leaves)))
    (zs_ref, means_ref, grads_ref), (zs, means, grads) = results
    torch.testing.assert_close(zs, zs_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(means, means_ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_disrnn_numpy_and_torch_recurrences_give_one_gradient_in_float32(monkeypatch):
    """A whole agent's loss gradient (float32, bottlenecks on, one noise draw) is the same through the numpy and the
    torch calls of the written-out recurrence, to float32 rounding."""
    from interbrain.agents import disrnn

    grads = []
    for numpy in (False, True):
        monkeypatch.setattr(disrnn, "small_products_on_numpy", lambda x, numpy=numpy: numpy)
        agent = active_disrnn("matched")
        torch.manual_seed(8)
        logits, value, hidden = agent.sequence(two_hot_obs(30, 4, seed=9))
        (logits.square().sum() + value.square().sum() + hidden.sum() + agent.aux_loss()).backward()
        grads.append({k: p.grad for k, p in agent.named_parameters()})
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-4, atol=1e-5 * want.abs().max().item(), msg=name)


def test_disrnn_second_backward_and_replaced_parameters():
    """retain_graph: a second backward through the written-out recurrence adds the same gradient again; parameters
    replaced by load_state_dict(assign=True) are what the next acting step uses (its cache is keyed by them)."""
    agent = active_disrnn("matched")
    torch.manual_seed(4)
    logits, value, hidden = agent.sequence(two_hot_obs(12, 3, seed=5))
    loss = logits.square().sum() + hidden.sum()
    loss.backward(retain_graph=True)
    first = agent.layer_weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(agent.layer_weight.grad, 2 * first)

    a, b = make_agent("disrnn", "matched", seed=1), make_agent("disrnn", "matched", seed=2)
    index = torch.stack([torch.randint(0, 100, (5,)), torch.randint(0, 101, (5,))], -1)
    with torch.no_grad():
        a.step_index(index, a.initial_state(5))  # fills a's acting cache
        a.load_state_dict(b.state_dict(), assign=True)
        got, want = a.step_index(index, a.initial_state(5)), b.step_index(index, b.initial_state(5))
    for x, y in zip(got[:3], want[:3]):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("active", [False, True])
def test_disrnn_numpy_acting_step_equals_the_torch_step_with_the_same_draws(monkeypatch, active):
    """The acting step as numpy calls (_act_numpy: input bias in the own-cell rows, heads as numpy products) against
    the torch step, from one seed: the same outputs and state to float32 rounding, so the same noise draws in the
    same order (a draw out of order would move the latents by the bottlenecks' σ ~ 0.03); and the RNG is left at
    the same point."""
    from interbrain.agents import disrnn

    agent = active_disrnn("matched") if active else make_agent("disrnn", "matched")
    index = torch.stack([torch.randint(0, 100, (40,)), torch.randint(0, 101, (40,))], -1)
    state = agent.initial_state(40)
    results = []
    for numpy in (True, False):
        monkeypatch.setattr(disrnn, "small_products_on_numpy", lambda x, numpy=numpy: numpy)
        torch.manual_seed(3)
        with torch.no_grad():
            out = [agent.step_index(index, state) for _ in range(3)][-1]
            state_after = out[3]
            for _ in range(4):
                out = agent.step_index(index, state_after)
                state_after = out[3]
        results.append((out, torch.rand(1)))
    (got, rng_numpy), (want, rng_torch) = results
    for a, b in zip(got[:3] + got[3], want[:3] + want[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert rng_numpy.item() == rng_torch.item()


def test_disrnn_kept_acting_step_follows_the_warm_up_and_eval_mode_without_a_weight_change():
    """The numpy acting step the agent keeps while its weights stay (a one-agent DisRNNActing) reads whether the
    bottlenecks are noisy at every step: built during the warm-up, it draws noise once the warm-up ends (the draws of
    the torch step, to float rounding), and none again in eval mode (the noiseless bits, the RNG untouched)."""
    from interbrain.agents import disrnn

    if not disrnn.small_products_on_numpy(torch.zeros(1)):
        pytest.skip("the numpy acting path is not this machine's")
    agent = make_agent("disrnn", "matched").train()
    index = torch.stack([torch.randint(0, 100, (40,)), torch.randint(0, 101, (40,))], -1)
    state = agent.initial_state(40)
    with torch.no_grad():
        torch.manual_seed(2)
        quiet = agent.step_index(index, state)  # builds the kept step, noiseless
        agent.set_progress(agent.warmup + 1)
        assert agent.bottlenecks_active
        torch.manual_seed(2)
        noisy = agent.step_index(index, state)
        rng_numpy = torch.rand(1)
        assert not torch.allclose(noisy[2], quiet[2], atol=1e-4)
        torch.manual_seed(2)
        want = agent._step(*agent._obs_terms(index=index, mu2=False), state)  # the torch step, noisy
        assert torch.rand(1).item() == rng_numpy.item()
        for x, y in zip(noisy[:3] + noisy[3], want[:3] + want[3]):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        agent.eval()
        torch.manual_seed(2)
        again = agent.step_index(index, state)
        after_eval = torch.rand(1).item()
        torch.manual_seed(2)
        assert after_eval == torch.rand(1).item()  # no draw
    assert all(torch.equal(x, y) for x, y in zip(again[:3] + again[3], quiet[:3] + quiet[3]))


@pytest.mark.parametrize("size,kw", [("std", {}), ("matched", {}),
                                     ("matched", {"tok_mode": "concat", "tok_type_embedding": True})])
def test_tok_transformer_gradients_reach_every_parameter(size, kw):
    agent = make_agent("tok_transformer", size, window=20, **kw)
    logits, value, hidden = agent.sequence(two_hot_obs(20, 2, seed=23))
    (logits.square().sum() + value.square().sum() + hidden.sum()).backward()
    for name, p in agent.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bottleneck_summary_fields():
    agent = make_agent("disrnn")
    with torch.no_grad():
        agent.latent_sigma_param[3] = 2.0  # one closed latent
        agent.obs_sigma_param[:, 0] = 0.2  # update net 0's observation inputs: partial
    s = bottleneck_summary(agent)
    assert set(s) == {"thresholds", "latent_sigma", "update_obs_sigma", "update_latent_sigma", "counts", "open_latents"}
    assert s["thresholds"] == {"open": 0.1, "partial": 0.25, "closed": 0.9}
    assert len(s["latent_sigma"]) == LATENTS and s["latent_sigma"][3] == pytest.approx(2.0 + 1e-5)
    assert np.shape(s["update_obs_sigma"]) == (LATENTS, 200)
    assert np.shape(s["update_latent_sigma"]) == (LATENTS, LATENTS)
    assert s["counts"]["latent"] == {"open": 9, "partial": 9, "closed": 1}
    assert s["counts"]["update_obs"] == {"open": 1800, "partial": 2000, "closed": 0}
    assert s["counts"]["update_latent"] == {"open": 100, "partial": 100, "closed": 0}
    assert s["open_latents"] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    json.dumps(s)  # plain python, ready for a report
    full = bottleneck_summary(agent, two_hot_obs(15, 3, seed=24))
    for key in ("latent_kl", "update_obs_kl", "update_latent_kl"):
        assert len(full[key]) == LATENTS and min(full[key]) >= 0
    # a wide σ (≈2) costs less than the open ones (σ ≤ 0.05)
    assert full["latent_kl"][3] < min(kl for i, kl in enumerate(full["latent_kl"]) if i != 3)
    assert full["update_obs_kl"][0] < min(full["update_obs_kl"][1:])


# --- training: checkpoints (SPEC §4.6) ------------------------------------------------------------
def _config(arch, updates, tiny_overrides, **agent_kw):
    cfg = make_train_config(arch, "social", 1, "fast", updates, size="matched", window=100, checkpoint_every=2,
                            log_every=1, overrides=tiny_overrides)
    return dataclasses.replace(cfg, agent=dataclasses.replace(cfg.agent, **agent_kw))


# Bit-exact resume of both architectures: tests/test_train.py::test_resume_is_bit_exact.


@pytest.mark.parametrize("arch", ["disrnn", "tok_transformer"])
def test_checkpoint_round_trip(tmp_path, tiny_overrides, arch):
    tr = Trainer(_config(arch, 2, tiny_overrides, tok_mode="concat", bottleneck_beta=0.1), torch.device("cpu"))
    tr.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(tr.to_checkpoint({"collisions_per_episode": 1.5}), path)
    ck = load_checkpoint(path)
    assert ck.update == 1 and ck.config == tr.config and ck.config.agent.tok_mode == "concat"
    for agent in ("chaser", "explorer"):
        for k, v in tr.agents[agent].state_dict().items():
            assert torch.equal(ck.state_dict(agent)[k], v)
    count = PARAMS[(arch, "matched")]
    assert json.loads(read_metadata(path)["param_counts"]) == {"chaser": count, "explorer": count}
    _, agents = load_agents(path)
    obs = two_hot_obs(5, 2, seed=25)
    with torch.no_grad():
        for a in ("chaser", "explorer"):
            assert not agents[a].training
            torch.testing.assert_close(agents[a].sequence(obs)[2], tr.agents[a].eval().sequence(obs)[2], atol=0, rtol=0)
