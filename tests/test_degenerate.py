"""SPEC §1.5: stuck runs, oscillation runs and the default/joint degenerate rules, against hand-counted cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interbrain.config import EnvConfig
from interbrain.degenerate import degenerate_flags, longest_run, oscillation_run, threshold_steps
from interbrain.env import ChaseEnv
from interbrain.errors import InterbrainError


def col(*bits):
    """One episode's flags as a [T, 1] bool tensor."""
    return torch.tensor(bits, dtype=torch.bool).unsqueeze(1)


def runs_with(length, T, start=3):
    """[T, 1] flags holding a single run of `length` True steps."""
    f = torch.zeros(T, 1, dtype=torch.bool)
    f[start:start + length] = True
    return f


# --- longest_run -----------------------------------------------------------------------------------
def test_longest_run_hand_counted():
    flags = torch.tensor([
        [0, 1, 1, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, 0, 1, 0, 1, 0, 1, 0],
        [1, 1, 0, 0, 0, 0, 1, 1],
        [0, 0, 0, 0, 0, 1, 1, 1],
    ], dtype=torch.bool).T  # time-major [8, 6]
    assert longest_run(flags).tolist() == [3, 0, 8, 1, 2, 3]
    assert longest_run(flags).dtype == torch.long


def test_longest_run_accepts_numpy_and_empty_time():
    assert longest_run(np.array([[True], [True], [False], [True]])).tolist() == [2]
    assert longest_run(torch.zeros(0, 3, dtype=torch.bool)).tolist() == [0, 0, 0]


def test_longest_run_matches_a_loop_on_random_flags():
    g = torch.Generator().manual_seed(0)
    flags = torch.rand(300, 50, generator=g) < 0.6
    expected = []
    for e in range(50):
        best = cur = 0
        for v in flags[:, e].tolist():
            cur = cur + 1 if v else 0
            best = max(best, cur)
        expected.append(best)
    assert longest_run(flags).tolist() == expected


def test_longest_run_rejects_bad_input():
    with pytest.raises(InterbrainError, match="boolean"):
        longest_run(torch.ones(4, 2))
    with pytest.raises(InterbrainError, match=r"\[T, E\]"):
        longest_run(torch.ones(4, dtype=torch.bool))
    with pytest.raises(InterbrainError, match="numpy"):
        longest_run([[True]])


# --- oscillation_run -------------------------------------------------------------------------------
A, B, C, D = (2, 2), (2, 3), (3, 3), (4, 3)


def series(*cells):
    return torch.tensor(cells).unsqueeze(1)  # [T+1, 1, 2]


@pytest.mark.parametrize("cells,expected", [
    ((A, B, A, B, A), 4),           # four moves back and forth
    ((A, B), 1),                    # one move, no return
    ((A, A, A), 0),                 # never moves
    ((A,), 0),                      # a single state
    ((A, B, C, D), 1),              # a straight walk: no two-cell alternation longer than one move
    ((A, B, C, B, C, B, D), 4),     # B, C, B, C, B inside a walk
    ((A, B, A, A, B, A), 2),        # a bump (A, A) breaks the run: two runs of 2
    ((A, B, A, B, B, A, B, A, B, A), 5),  # 3 moves, bump, then B, A, B, A, B, A = 5 moves
])
def test_oscillation_run_counts_moves(cells, expected):
    assert oscillation_run(series(*cells)).tolist() == [expected]


def test_oscillation_run_is_per_episode_and_accepts_numpy():
    pos = np.stack([np.array([A, B, A, B]), np.array([A, B, C, D]), np.array([A, A, A, A])], axis=1).astype(np.int16)
    assert oscillation_run(pos).tolist() == [3, 1, 0]


def test_oscillation_run_rejects_bad_shape():
    with pytest.raises(InterbrainError, match=r"\[T\+1, E, 2\]"):
        oscillation_run(torch.zeros(5, 3, dtype=torch.long))


# --- the rules -------------------------------------------------------------------------------------
def test_threshold_steps():
    assert threshold_steps(100) == 2
    assert threshold_steps(500) == 6
    assert threshold_steps(150) == 2   # 1.5: a run of 2 is > 1.5
    assert threshold_steps(99) == 1    # 0.99: any stuck step is degenerate
    assert threshold_steps(200) == 3   # strict: a run of exactly 2 = 0.01*200 is fine
    assert threshold_steps(500, "joint") == 6 and threshold_steps(100, "joint") == 6
    with pytest.raises(InterbrainError, match="degenerate"):
        threshold_steps(100, "loose")
    with pytest.raises(InterbrainError, match="horizon"):
        threshold_steps(0)


@pytest.mark.parametrize("H,fine,bad", [(100, 1, 2), (500, 5, 6), (200, 2, 3)])
@pytest.mark.parametrize("who", ["chaser", "explorer", "joint"])
def test_default_rule_edges(H, fine, bad, who):
    none = torch.zeros(H, 1, dtype=torch.bool)
    for length, degenerate in ((fine, False), (bad, True)):
        run = runs_with(length, H)
        cs = run if who in ("chaser", "joint") else none
        es = run if who in ("explorer", "joint") else none
        out = degenerate_flags(cs, es, H)
        assert out["episode_degenerate"].tolist() == [degenerate], (who, length)
        assert out["episode_threshold_steps"].tolist() == [bad]
        assert out["episode_joint_stuck_run"].tolist() == [length if who == "joint" else 0]


def test_default_rule_counts_consecutive_steps_not_totals():
    # 50 isolated stuck steps at H = 100 never form a run of 2.
    flags = torch.zeros(100, 1, dtype=torch.bool)
    flags[::2] = True
    out = degenerate_flags(flags, torch.zeros_like(flags), 100)
    assert out["episode_chaser_stuck_run"].tolist() == [1]
    assert out["episode_degenerate"].tolist() == [False]


def test_joint_rule_edges_and_single_agent_runs_do_not_count():
    H = 500
    five, six = runs_with(5, H), runs_with(6, H)
    assert degenerate_flags(five, five, H, "joint")["episode_degenerate"].tolist() == [False]
    assert degenerate_flags(six, six, H, "joint")["episode_degenerate"].tolist() == [True]
    # Long runs by one agent alone, or runs that do not overlap in time, are not joint.
    long_c, shifted = runs_with(40, H, start=0), runs_with(40, H, start=100)
    out = degenerate_flags(long_c, shifted, H, "joint")
    assert out["episode_joint_stuck_run"].tolist() == [0]
    assert out["episode_degenerate"].tolist() == [False]
    assert out["episode_threshold_steps"].tolist() == [6]
    assert degenerate_flags(long_c, shifted, H)["episode_degenerate"].tolist() == [True]
    # Overlap of 6 steps exactly.
    out = degenerate_flags(runs_with(10, H, start=0), runs_with(10, H, start=4), H, "joint")
    assert out["episode_joint_stuck_run"].tolist() == [6]
    assert out["episode_degenerate"].tolist() == [True]


def test_degenerate_flags_batched_outputs():
    cs = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool).T
    es = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool).T
    out = degenerate_flags(cs.numpy(), es.numpy(), horizon=100)
    assert out["episode_chaser_stuck_run"].tolist() == [3, 1, 0]
    assert out["episode_explorer_stuck_run"].tolist() == [4, 0, 1]
    assert out["episode_joint_stuck_run"].tolist() == [2, 0, 0]
    assert out["episode_degenerate"].tolist() == [True, False, False]
    assert out["episode_threshold_steps"].tolist() == [2, 2, 2]
    assert out["episode_degenerate"].dtype == torch.bool
    with pytest.raises(InterbrainError, match="same shape"):
        degenerate_flags(cs, es[:5], 100)


def test_collision_blocked_steps_never_count_as_stuck():
    # Chaser at (0,1) pushes left into the explorer at (0,0) for 10 steps: blocked by collision, not stuck.
    # The explorer pushes up into the wall: stuck every step.
    H = 100
    env = ChaseEnv(EnvConfig(horizon=H), batch=1)
    env.reset(None, chaser_pos=torch.tensor([[0, 1]]), explorer_pos=torch.tensor([[0, 0]]))
    cs, es, pos = [], [], [env.chaser_pos.clone()]
    for _ in range(10):
        info = env.step(torch.tensor([3]), torch.tensor([0]))
        assert bool(info.chaser_collision[0])
        cs.append(info.chaser_stuck)
        es.append(info.explorer_stuck)
        pos.append(env.chaser_pos.clone())
    out = degenerate_flags(torch.stack(cs), torch.stack(es), H)
    assert out["episode_chaser_stuck_run"].tolist() == [0]
    assert out["episode_explorer_stuck_run"].tolist() == [10]
    assert out["episode_joint_stuck_run"].tolist() == [0]
    assert out["episode_degenerate"].tolist() == [True]      # the explorer's wall run
    out = degenerate_flags(torch.stack(cs), torch.stack(es), H, rule="joint")
    assert out["episode_degenerate"].tolist() == [False]     # no joint run
    assert oscillation_run(torch.stack(pos)).tolist() == [0]  # the chaser never moved


def test_env_rollout_flags_agree_with_positions():
    # On a random rollout, a stuck step is exactly an unblocked step with no movement, so the stuck run equals the
    # longest run of (no move and no own collision) computed from the state series.
    B, H = 40, 100
    env = ChaseEnv(EnvConfig(horizon=H), batch=B)
    g = torch.Generator().manual_seed(2)
    env.reset(g)
    pos, cs, cc = [env.chaser_pos.clone()], [], []
    for _ in range(H):
        info = env.step(torch.randint(0, 4, (B,), generator=g), torch.randint(0, 4, (B,), generator=g))
        pos.append(env.chaser_pos.clone())
        cs.append(info.chaser_stuck)
        cc.append(info.chaser_collision)
    pos, cs, cc = torch.stack(pos), torch.stack(cs), torch.stack(cc)
    still = (pos[1:] == pos[:-1]).all(-1)
    out = degenerate_flags(cs, torch.zeros_like(cs), H)
    assert torch.equal(out["episode_chaser_stuck_run"], longest_run(still & ~cc))
    assert int(out["episode_chaser_stuck_run"].max()) >= 2  # random play bumps walls repeatedly
    assert bool(out["episode_degenerate"].any())
