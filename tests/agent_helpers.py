"""Shared helpers of the agent conformance tests (test_agents.py, test_disrnn_tok.py)."""

from __future__ import annotations

import torch

from interbrain.agents import HIDDEN

TOL = dict(atol=1e-5, rtol=1e-5)


def two_hot_obs(T, B, seed=0):
    """Own-cell one-hot plus, half of the time, a partner one-hot (SPEC §1.3)."""
    g = torch.Generator().manual_seed(seed)
    own = torch.randint(0, 100, (T, B), generator=g)
    partner = torch.randint(0, 100, (T, B), generator=g)
    visible = (torch.rand(T, B, generator=g) < 0.5).float()
    x = torch.zeros(T, B, 200)
    x.scatter_(2, own[..., None], 1.0)
    x.scatter_(2, (100 + partner)[..., None], visible[..., None])
    return x


def run_steps(agent, obs, state=None):
    state = agent.initial_state(obs.shape[1]) if state is None else state
    outs = []
    for t in range(obs.shape[0]):
        logits, value, hidden, state = agent.step(obs[t], state)
        outs.append((logits, value, hidden))
    return tuple(torch.stack(x) for x in zip(*outs)), state


def assert_parity(agent, obs, state0=None):
    with torch.no_grad():
        (l_s, v_s, h_s), _ = run_steps(agent, obs, state0)
        l_q, v_q, h_q = agent.sequence(obs, state0)
    T, B = obs.shape[:2]
    assert l_q.shape == (T, B, 4) and v_q.shape == (T, B) and h_q.shape == (T, B, HIDDEN)
    torch.testing.assert_close(h_q, h_s, **TOL)
    torch.testing.assert_close(l_q, l_s, **TOL)
    torch.testing.assert_close(v_q, v_s, **TOL)
    return h_q
