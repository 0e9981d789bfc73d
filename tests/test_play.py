"""Evaluation and rollout engine: time alignment on a scripted policy, determinism, shared random streams."""

import numpy as np
import pytest
import torch

from interbrain.agents import Agent
from interbrain.config import AgentConfig, EnvConfig, make_train_config
from interbrain.play import Policy, behaviour_metrics, play


class Scripted(Agent):
    """Acts (row + col + shift) mod 4 from its own cell in s_t; hidden one-hot-codes that cell."""

    def __init__(self, shift=0):
        super().__init__(AgentConfig())
        self.shift = shift

    def initial_state(self, batch, device="cpu"):
        return ()

    def step(self, obs, state):
        own = obs[:, :100].argmax(-1)
        act = (own // 10 + own % 10 + self.shift) % 4
        logits = torch.nn.functional.one_hot(act, 4).float() * 100.0
        hidden = torch.nn.functional.one_hot(own, 256).float()
        return logits, torch.zeros(obs.shape[0]), hidden, state


def test_alignment_hidden_t_produced_action_t_and_events_describe_transition():
    env = EnvConfig(task="social", horizon=60)
    ep = play(env, {"chaser": Policy(Scripted()), "explorer": Policy(None)}, episodes=12, seed=3)
    pos = ep["chaser_pos"].astype(int)  # [T+1, E, 2]
    epos = ep["explorer_pos"].astype(int)
    T = 60
    cell = pos[:T, :, 0] * 10 + pos[:T, :, 1]
    assert np.array_equal(ep["chaser_action"], ((pos[:T, :, 0] + pos[:T, :, 1]) % 4).astype(np.int8))
    assert np.array_equal(ep["chaser_hidden"].argmax(-1), cell)
    assert np.array_equal(ep["chaser_obs"][:, :, :100].argmax(-1), cell)
    deltas = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]])
    for t in range(T):
        target = np.clip(pos[t] + deltas[ep["chaser_action"][t].astype(int)], 0, 9)
        blocked = ep["chaser_collision"][t]
        assert np.array_equal(pos[t + 1][blocked], pos[t][blocked])
        assert np.array_equal(pos[t + 1][~blocked], target[~blocked])
        assert np.allclose(ep["distance"][t], np.sqrt(((pos[t] - epos[t]) ** 2).sum(-1)), atol=1e-6)
        cheb = np.abs(pos[t] - epos[t]).max(-1)
        assert np.array_equal(ep["chaser_fov"][t], cheb <= 3)
        for e in range(12):
            seen = {tuple(p) for p in pos[: t + 1, e]}
            assert ep["chaser_new_field"][t, e] == (tuple(pos[t + 1, e]) not in seen and not ep["chaser_collision"][t, e])
    # rewards at t are those of the transition s_t -> s_{t+1}
    expected = np.where(ep["collision"], 1.0, np.where(ep["chaser_new_field"], 0.1, -0.1))
    assert np.allclose(ep["chaser_reward"], expected)


def test_same_seed_same_worlds_and_random_opponent_across_chasers():
    env = EnvConfig(task="social", horizon=50)
    a = play(env, {"chaser": Policy(Scripted(0)), "explorer": Policy(None)}, episodes=20, seed=0)
    b = play(env, {"chaser": Policy(Scripted(1)), "explorer": Policy(None)}, episodes=20, seed=0)
    a2 = play(env, {"chaser": Policy(Scripted(0)), "explorer": Policy(None)}, episodes=20, seed=0)
    assert np.array_equal(a["explorer_action"], b["explorer_action"])  # the random opponent's stream is shared
    assert np.array_equal(a["chaser_pos"][0], b["chaser_pos"][0]) and np.array_equal(a["explorer_pos"][0], b["explorer_pos"][0])
    assert not np.array_equal(a["chaser_action"], b["chaser_action"])
    assert all(np.array_equal(a[k], a2[k]) for k in a)  # deterministic
    c = play(env, {"chaser": Policy(Scripted(0)), "explorer": Policy(None)}, episodes=20, seed=1)
    assert not np.array_equal(a["chaser_pos"][0], c["chaser_pos"][0])


def test_episode_streams_do_not_depend_on_batch_size():
    env = EnvConfig(task="social", horizon=30)
    big = play(env, {"chaser": Policy(None), "explorer": Policy(None)}, episodes=10, seed=0)
    small = play(env, {"chaser": Policy(None), "explorer": Policy(None)}, episodes=4, seed=0)
    assert np.array_equal(big["chaser_pos"][:, :4], small["chaser_pos"])


def test_random_vs_random_baseline_and_metric_definitions():
    env = EnvConfig(task="social", horizon=100)
    ep = play(env, {"chaser": Policy(None), "explorer": Policy(None)}, episodes=400, seed=0)
    m = behaviour_metrics(ep)
    assert 1.2 < m["collisions_per_episode"] < 2.0  # the random-chaser reference (~1.6 per 100 steps)
    assert m["collisions_per_episode"] == pytest.approx(ep["collision"].sum(0).mean())
    assert m["chaser_partner_in_view"] == pytest.approx(ep["chaser_fov"][1:].mean())
    assert m["final_distance"] == pytest.approx(ep["distance"][100].mean())


def test_evaluate_records_are_deterministic_and_complete(tmp_path):
    from interbrain.checkpoint import save_checkpoint
    from interbrain.evaluate import RECORD_FIELDS, evaluate_checkpoint
    from interbrain.io import read_jsonl
    from interbrain.train import Trainer

    tr = Trainer(make_train_config("rnn", "social", 0, "fast", 2, overrides={"num_envs": 4}), torch.device("cpu"))
    p0 = save_checkpoint(tr.to_checkpoint(), tmp_path / "u0.safetensors")
    tr.step()
    p1 = save_checkpoint(tr.to_checkpoint(), tmp_path / "u1.safetensors")
    out = tmp_path / "ev.jsonl"
    r0 = evaluate_checkpoint(p0, out, episodes=20, device="cpu")
    r1 = evaluate_checkpoint(p1, out, episodes=20, device="cpu")
    assert evaluate_checkpoint(p0, out, episodes=20, device="cpu") == []  # ok records are skipped
    again = evaluate_checkpoint(p0, out, episodes=20, device="cpu", force=True)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in r0]
    rr = {r["matchup"]: r for r in r0}, {r["matchup"]: r for r in r1}
    assert rr[0]["random_vs_random"]["metrics"] == rr[1]["random_vs_random"]["metrics"]
    for rec in read_jsonl(out):
        assert set(RECORD_FIELDS) <= set(rec) and rec["status"] == "ok" and rec["eval_seed"] == 0
    assert rr[0]["random_explorer"]["focus_agent"] == "chaser" and rr[0]["random_chaser"]["focus_agent"] == "explorer"
