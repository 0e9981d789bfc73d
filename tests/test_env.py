"""Conformance of the chase grid to SPEC §1-2: scripted scenarios, invariants and a scalar reference."""

from __future__ import annotations

import math
import random

import pytest
import torch

from interbrain.config import EnvConfig
from interbrain.env import ACTION_DELTAS, FOV_RADIUS, GRID, ChaseEnv
from interbrain.errors import InterbrainError

UP, RIGHT, DOWN, LEFT = 0, 1, 2, 3

# SPEC §2 typed out by hand (not read from the implementation): (collision, own new field, otherwise).
SPEC_REWARDS = {
    "social": {"chaser": (1.0, 0.1, -0.1), "explorer": (-1.0, 1.0, -0.5)},
    "non_social": {"chaser": (-0.1, 0.1, -0.1), "explorer": (-0.5, 1.0, -0.5)},
    "mutual": {"chaser": (1.0, 0.0, 0.0), "explorer": (1.0, 0.0, 0.0)},
    "social_alt": {"chaser": (1.0, 0.1, -0.1), "explorer": (-1.0, 0.1, -0.1)},
}
EVENTS = ("collision", "chaser_collision", "explorer_collision", "chaser_new_field", "explorer_new_field",
          "chaser_approach", "explorer_escape", "explorer_escape_close", "explorer_escape_near",
          "explorer_escape_far", "chaser_stuck", "explorer_stuck")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(chaser, explorer, task="social", horizon=100, visibility=None, device="cpu"):
    """An env of B episodes placed at the given cells (lists of (row, col) or one pair for B = 1)."""
    if isinstance(chaser[0], int):
        chaser, explorer = [chaser], [explorer]
    env = ChaseEnv(EnvConfig(task=task, horizon=horizon, visibility=visibility), batch=len(chaser), device=device)
    env.reset(None, chaser_pos=torch.tensor(chaser), explorer_pos=torch.tensor(explorer))
    return env


def act(env, chaser_action, explorer_action):
    def as_tensor(a):
        return torch.tensor([a] if isinstance(a, int) else a, device=env.device)
    return env.step(as_tensor(chaser_action), as_tensor(explorer_action))


def flags(info, i=0):
    """The set of events that are true in episode i."""
    return {name for name in EVENTS if bool(getattr(info, name)[i])}


def pos(env, i=0):
    return tuple(env.chaser_pos[i].tolist()), tuple(env.explorer_pos[i].tolist())


def rewards(info, i=0):
    return float(info.chaser_reward[i]), float(info.explorer_reward[i])


# --- step order and collisions (SPEC §1.2) -------------------------------------------------------------
def test_action_deltas_are_the_official_order():
    assert ACTION_DELTAS.tolist() == [[-1, 0], [0, 1], [1, 0], [0, -1]]
    assert ACTION_DELTAS.dtype == torch.long


def test_chaser_blocked_by_explorers_old_cell_even_if_explorer_leaves():
    env = make((5, 5), (5, 6))
    info = act(env, RIGHT, RIGHT)
    assert pos(env) == ((5, 5), (5, 7))  # chaser kept its cell, explorer moved on
    assert flags(info) == {"collision", "chaser_collision", "explorer_new_field"}
    assert rewards(info) == pytest.approx((1.0, -1.0))  # collision replaces the explorer's new-field +1


def test_explorer_may_step_into_the_cell_the_chaser_just_left():
    env = make((5, 5), (5, 6))
    info = act(env, UP, LEFT)
    assert pos(env) == ((4, 5), (5, 5))
    assert not bool(info.collision[0])
    assert {"chaser_new_field", "explorer_new_field"} <= flags(info)


def test_explorer_blocked_by_chasers_new_cell_and_chaser_still_earns_collision():
    env = make((5, 5), (5, 7))
    info = act(env, RIGHT, LEFT)  # both aim at (5,6); the chaser resolves first and takes it
    assert pos(env) == ((5, 6), (5, 7))
    assert flags(info) == {"collision", "explorer_collision", "chaser_new_field"}
    assert rewards(info) == pytest.approx((1.0, -1.0))


def test_explorer_walking_into_a_moving_chaser_pays_the_chaser():
    env = make((5, 5), (6, 6))
    info = act(env, DOWN, LEFT)  # chaser to (6,5) (a new cell); explorer aims at (6,5)
    assert pos(env) == ((6, 5), (6, 6))
    assert flags(info) == {"collision", "explorer_collision", "chaser_new_field"}
    assert rewards(info) == pytest.approx((1.0, -1.0))


def test_explorer_walking_into_a_wall_bumped_chaser():
    env = make((0, 0), (0, 1))
    info = act(env, UP, LEFT)  # chaser bumps the top wall and stays; explorer walks into it
    assert pos(env) == ((0, 0), (0, 1))
    assert flags(info) == {"collision", "explorer_collision", "chaser_stuck"}
    assert rewards(info) == pytest.approx((1.0, -1.0))


def test_non_social_collision_value_overrides_a_new_field_caused_by_the_other_agent():
    env = make((5, 5), (6, 6), task="non_social")
    info = act(env, DOWN, LEFT)  # chaser reaches a new cell, explorer's move causes the collision
    assert flags(info) == {"collision", "explorer_collision", "chaser_new_field"}
    assert rewards(info) == pytest.approx((-0.1, -0.5))
    # The chaser still moved there, so the cell is now visited.
    assert bool(env.chaser_visited[0, 6 * GRID + 5])


def test_collision_never_ends_the_episode_and_repeats():
    env = make((0, 1), (0, 0), horizon=5)
    for _ in range(4):
        info = act(env, LEFT, UP)  # chaser pushes into the explorer; explorer bumps the wall
        assert flags(info) == {"collision", "chaser_collision", "explorer_stuck"}
        assert not bool(info.done[0])
    assert pos(env) == ((0, 1), (0, 0))


# --- walls, new fields, stuck -----------------------------------------------------------------------
@pytest.mark.parametrize("cell,action", [((0, 4), UP), ((9, 4), DOWN), ((4, 0), LEFT), ((4, 9), RIGHT),
                                         ((0, 0), LEFT), ((9, 9), DOWN)])
def test_wall_bump_is_stuck_not_collision_not_new_field(cell, action):
    partner = (5, 5) if cell != (5, 5) else (2, 2)
    env = make(cell, partner)
    env_e = make(partner, cell)
    info = act(env, action, UP)
    info_e = act(env_e, UP, action)
    assert pos(env)[0] == cell and pos(env_e)[1] == cell
    assert flags(info) & {"collision", "chaser_collision", "chaser_new_field", "chaser_approach"} == set()
    assert "chaser_stuck" in flags(info)
    assert flags(info_e) & {"collision", "explorer_collision", "explorer_new_field", "explorer_escape"} == set()
    assert "explorer_stuck" in flags(info_e)
    assert rewards(info)[0] == pytest.approx(-0.1)  # baseline
    assert rewards(info_e)[1] == pytest.approx(-0.5)


def test_spawn_cell_is_visited_and_only_unvisited_cells_are_new_fields():
    env = make((5, 5), (0, 0))
    assert env.chaser_visited.sum().item() == 1 and bool(env.chaser_visited[0, 55])
    assert env.explorer_visited.sum().item() == 1 and bool(env.explorer_visited[0, 0])
    first = act(env, RIGHT, RIGHT)   # chaser to (5,6), explorer to (0,1): both new
    back = act(env, LEFT, LEFT)      # back to the spawn cells: not new
    again = act(env, RIGHT, RIGHT)   # visited already
    assert {"chaser_new_field", "explorer_new_field"} <= flags(first)
    assert flags(back) & {"chaser_new_field", "explorer_new_field"} == set()
    assert flags(again) & {"chaser_new_field", "explorer_new_field"} == set()
    assert rewards(first) == pytest.approx((0.1, 1.0))
    assert rewards(back) == pytest.approx((-0.1, -0.5))
    # Visited sets are per agent: the explorer entering a cell the chaser visited is still new for the explorer.
    env = make((5, 5), (5, 7))
    act(env, RIGHT, UP)    # chaser visits (5,6); explorer to (4,7)
    act(env, UP, DOWN)     # chaser to (4,6); explorer back to (5,7)
    info = act(env, UP, LEFT)  # explorer into (5,6), visited by the chaser only
    assert "explorer_new_field" in flags(info)


# --- approach and escape ---------------------------------------------------------------------------
def _no_new_fields(env):
    env.chaser_visited[:] = True
    env.explorer_visited[:] = True


def test_approach_and_escape_use_the_partners_old_cell():
    env = make((5, 5), (5, 7))
    _no_new_fields(env)
    info = act(env, RIGHT, RIGHT)  # c' = (5,6), e' = (5,8); d(c',e)=1 < 2, d(e',c)=3 > 2
    assert flags(info) == {"chaser_approach", "explorer_escape", "explorer_escape_near"}
    assert rewards(info) == pytest.approx((-0.1, -0.5))  # labels never change rewards
    # Against the partner's new cell the chaser would not approach (d(c',e') = 2 = d(c,e)), nor would the
    # explorer escape here: chaser to (5,6), explorer to (4,7), d(e',c) = sqrt(5) > 2 but d(e',c') = sqrt(2).
    env = make((5, 5), (5, 7))
    _no_new_fields(env)
    info = act(env, RIGHT, UP)
    assert flags(info) == {"chaser_approach", "explorer_escape", "explorer_escape_close"}


def test_approach_and_escape_are_strict_on_equal_distance():
    # A unit move always changes the squared distance by an odd amount, so equal distance arises only when the
    # agent does not move: a wall bump. Equal is neither approach nor escape.
    env = make((0, 3), (2, 3))
    _no_new_fields(env)
    info = act(env, UP, DOWN)  # chaser bumps; explorer moves away -> escape
    assert "chaser_approach" not in flags(info) and "chaser_stuck" in flags(info)
    env = make((2, 3), (0, 3))
    _no_new_fields(env)
    info = act(env, DOWN, UP)  # explorer bumps at equal distance; chaser moves away
    assert flags(info) == {"explorer_stuck"}


def test_moving_away_or_closer_gives_no_label_to_the_wrong_agent():
    env = make((5, 5), (5, 7))
    _no_new_fields(env)
    info = act(env, LEFT, LEFT)  # chaser retreats (5,4): d=3 > 2; explorer approaches (5,6): d=1 < 2
    assert flags(info) == set()


@pytest.mark.parametrize("explorer,action,d_new,band", [
    ((2, 1), RIGHT, math.sqrt(8), "close"),    # 2.83 < 3
    ((2, 0), DOWN, 3.0, "near"),                # exactly 3.0
    ((4, 1), RIGHT, math.sqrt(20), "near"),     # 4.47 < 5
    ((0, 4), RIGHT, 5.0, "far"),                # exactly 5.0 on an axis
    ((3, 3), RIGHT, 5.0, "far"),                # exactly 5.0 as (3, 4)
    ((5, 0), DOWN, math.sqrt(36), "far"),
])
def test_escape_bands_edges(explorer, action, d_new, band):
    env = make((0, 0), explorer)
    _no_new_fields(env)
    info = act(env, UP, action)  # the chaser bumps the wall and stays at (0,0)
    assert float(env.distance()[0]) == pytest.approx(d_new)
    expected = {"explorer_escape", f"explorer_escape_{band}", "chaser_stuck"}
    assert flags(info) == expected


def test_escape_band_flags_only_on_escape():
    env = make((0, 0), (0, 6))
    _no_new_fields(env)
    info = act(env, UP, LEFT)  # explorer approaches: d 6 -> 5, not an escape, no band
    assert flags(info) == {"chaser_stuck"}


def test_precedence_collision_then_new_field_then_approach():
    env = make((5, 5), (5, 7))
    info = act(env, RIGHT, RIGHT)  # the chaser approaches into a new cell: new field, not approach
    assert {"chaser_new_field", "explorer_new_field"} <= flags(info)
    assert flags(info) & {"chaser_approach", "explorer_escape"} == set()


# --- observation and field of view (SPEC §1.3) -----------------------------------------------------
def _all_pairs():
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    pairs = [(a, b) for a in cells for b in cells if a != b]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.mark.parametrize("visibility", ["partial", "none", "full"])
def test_visibility_modes_and_physical_fov_over_all_cell_pairs(visibility):
    chaser, explorer = _all_pairs()
    env = make(chaser, explorer, visibility=visibility)
    cheb = torch.tensor([max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(chaser, explorer)])
    fov = env.fov()
    assert torch.equal(fov, cheb <= FOV_RADIUS)  # physical, in every mode (pitfall 5)
    assert bool(fov[cheb == 3].all()) and not bool(fov[cheb == 4].any())
    c_obs, e_obs = env.observations()
    assert c_obs.dtype == torch.float32 and c_obs.shape == (len(chaser), 200)
    c_idx = torch.tensor([10 * r + c for r, c in chaser])
    e_idx = torch.tensor([10 * r + c for r, c in explorer])
    rows = torch.arange(len(chaser))
    # Own channel: exactly one 1 at 10*row + col.
    assert torch.equal(c_obs[:, :100].sum(1), torch.ones(len(chaser)))
    assert bool((c_obs[rows, c_idx] == 1).all()) and bool((e_obs[rows, e_idx] == 1).all())
    # Partner channel.
    shown = {"partial": cheb <= 3, "none": torch.zeros_like(fov), "full": torch.ones_like(fov)}[visibility]
    assert torch.equal(c_obs[:, 100:].sum(1), shown.float())
    assert torch.equal(e_obs[:, 100:].sum(1), shown.float())
    assert torch.equal(c_obs[rows, 100 + e_idx], shown.float())
    assert torch.equal(e_obs[rows, 100 + c_idx], shown.float())
    # Symmetry: the explorer sees the chaser iff the chaser sees the explorer.
    assert torch.equal(c_obs[:, 100:].sum(1), e_obs[:, 100:].sum(1))


def test_observation_one_hot_worked_example():
    env = make((2, 7), (4, 5))  # Chebyshev 2: in view
    c_obs, e_obs = env.observations()
    assert c_obs[0].nonzero().flatten().tolist() == [27, 145]
    assert e_obs[0].nonzero().flatten().tolist() == [45, 127]
    env = make((2, 7), (6, 7))  # Chebyshev 4: out of view
    c_obs, e_obs = env.observations()
    assert c_obs[0].nonzero().flatten().tolist() == [27]
    assert e_obs[0].nonzero().flatten().tolist() == [67]
    assert float(env.distance()[0]) == 4.0


def test_default_visibility_follows_the_task():
    assert make((0, 0), (0, 1), task="non_social").observations()[0][0, 100:].sum() == 0
    assert make((0, 0), (0, 1), task="social").observations()[0][0, 100:].sum() == 1


# --- reward tables (SPEC §2) -----------------------------------------------------------------------
@pytest.mark.parametrize("task", ["social", "non_social", "mutual", "social_alt"])
def test_reward_tables(task):
    chaser_r, explorer_r = SPEC_REWARDS[task]["chaser"], SPEC_REWARDS[task]["explorer"]
    # B = 3 episodes in one step: a collision, new fields for both, and a baseline step (visited cells).
    env = make([(5, 5), (5, 5), (5, 5)], [(5, 6), (7, 7), (7, 7)], task=task)
    env.chaser_visited[2] = True
    env.explorer_visited[2] = True
    info = act(env, [RIGHT, UP, UP], [UP, DOWN, DOWN])
    assert flags(info, 0) == {"collision", "chaser_collision", "explorer_new_field"}
    assert {"chaser_new_field", "explorer_new_field"} <= flags(info, 1)
    assert flags(info, 2) & {"collision", "chaser_new_field", "explorer_new_field"} == set()
    assert info.chaser_reward.tolist() == pytest.approx([chaser_r[0], chaser_r[1], chaser_r[2]])
    assert info.explorer_reward.tolist() == pytest.approx([explorer_r[0], explorer_r[1], explorer_r[2]])
    assert info.chaser_reward.dtype == torch.float32


# --- episode end -----------------------------------------------------------------------------------
def test_last_step_carries_rewards_then_steps_are_inert():
    env = make((5, 5), (0, 0), horizon=3)
    for t in range(3):
        info = act(env, RIGHT, DOWN)  # new cells every step
        assert rewards(info) == pytest.approx((0.1, 1.0))
        assert bool(info.done[0]) == (t == 2)
        assert env.done == (t == 2)
    before = pos(env)
    for _ in range(2):
        info = act(env, RIGHT, DOWN)
        assert pos(env) == before
        assert rewards(info) == (0.0, 0.0)
        assert flags(info) == set()
        assert bool(info.done[0])
    assert env.t == 3


def test_reset_restarts_the_clock():
    env = make((5, 5), (0, 0), horizon=1)
    act(env, UP, DOWN)
    assert env.done
    env.reset(torch.Generator().manual_seed(1))
    assert env.t == 0 and not env.done
    assert int(env.chaser_visited.sum()) == 1 and int(env.explorer_visited.sum()) == 1


# --- input validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [4, -1, 7])
def test_invalid_action_id_raises_naming_it(bad):
    env = make([(5, 5), (2, 2)], [(0, 0), (8, 8)])
    with pytest.raises(InterbrainError, match=rf"explorer_action id {bad}\b"):
        act(env, [0, 1], [2, bad])
    with pytest.raises(InterbrainError, match=rf"chaser_action id {bad}\b"):
        act(env, [bad, 1], [2, 3])
    assert pos(env) == ((5, 5), (0, 0)) and env.t == 0  # nothing moved


def test_action_dtype_and_shape_errors():
    env = make([(5, 5), (2, 2)], [(0, 0), (8, 8)])
    with pytest.raises(InterbrainError, match="chaser_action"):
        env.step(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(InterbrainError, match="explorer_action"):
        env.step(torch.tensor([0, 1]), torch.tensor([0, 1, 2]))


def test_step_before_reset_raises():
    env = ChaseEnv(EnvConfig(), batch=2)
    with pytest.raises(InterbrainError, match="reset"):
        env.step(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_explicit_positions_are_validated():
    env = ChaseEnv(EnvConfig(), batch=2)
    with pytest.raises(InterbrainError, match="episode 1"):
        env.reset(None, chaser_pos=torch.tensor([[0, 0], [3, 3]]), explorer_pos=torch.tensor([[0, 1], [3, 3]]))
    with pytest.raises(InterbrainError, match="chaser_pos.*off the"):
        env.reset(None, chaser_pos=torch.tensor([[0, 10], [3, 3]]), explorer_pos=torch.tensor([[0, 1], [3, 4]]))
    with pytest.raises(InterbrainError, match="shape"):
        env.reset(None, chaser_pos=torch.tensor([[0, 0]]), explorer_pos=torch.tensor([[0, 1]]))
    with pytest.raises(InterbrainError, match="Generator"):
        env.reset(None)


# --- spawn (SPEC §1.1) -----------------------------------------------------------------------------
@pytest.mark.parametrize("spawn,high", [("official", 8), ("full", 9)])
def test_spawn_ranges_and_distinct_cells(spawn, high):
    env = ChaseEnv(EnvConfig(spawn=spawn), batch=20_000)
    env.reset(torch.Generator().manual_seed(0))
    both = torch.cat([env.chaser_pos, env.explorer_pos])
    assert int(both.min()) == 0 and int(both.max()) == high  # 'full' uses row/col 9, 'official' never does
    for p in (env.chaser_pos, env.explorer_pos):
        for k in range(2):  # each coordinate covers its whole range
            assert torch.unique(p[:, k]).tolist() == list(range(high + 1))
    assert not bool((env.chaser_pos == env.explorer_pos).all(-1).any())
    # Spawning marks exactly the spawn cell visited.
    assert torch.equal(env.chaser_visited.sum(1), torch.ones(20_000, dtype=torch.long))
    assert bool(env.chaser_visited[torch.arange(20_000), env.chaser_pos[:, 0] * 10 + env.chaser_pos[:, 1]].all())


def test_spawn_draws_the_chaser_first_and_redraws_only_the_explorer():
    # With the official 9x9 range, ~1/81 explorers collide on first draw; the chaser cells must equal the first
    # B draws of the generator regardless, and the explorer cells are uniform over the other cells.
    B = 4_000
    env = ChaseEnv(EnvConfig(spawn="official"), batch=B)
    env.reset(torch.Generator().manual_seed(3))
    expected = torch.randint(0, 9, (B, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(env.chaser_pos, expected)


def test_same_seed_same_spawns_and_different_seed_differs():
    def spawns(seed):
        env = ChaseEnv(EnvConfig(), batch=64)
        env.reset(torch.Generator().manual_seed(seed))
        return env.chaser_pos.clone(), env.explorer_pos.clone()
    a, b, c = spawns(11), spawns(11), spawns(12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_spawns_identical_on_cpu_and_cuda():
    out = []
    for device in ("cpu", "cuda"):
        env = ChaseEnv(EnvConfig(), batch=128, device=device)
        env.reset(torch.Generator().manual_seed(5))
        assert env.chaser_pos.device.type == device
        out.append((env.chaser_pos.cpu(), env.explorer_pos.cpu()))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])



@pytest.mark.parametrize("spawn", ["full", "official"])
def test_draw_spawns_are_the_spawns_reset_draws(spawn):
    """An ensemble draws each unit's spawns with draw_spawns and resets its joint environment with them: the same
    cells (explorer redraws included: 256 episodes of a 10x10 grid always have some) and the same generator state
    afterwards as the unit's own reset."""
    env = ChaseEnv(EnvConfig(spawn=spawn), batch=256)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):
        env.reset(g1)
        chaser, explorer = env.draw_spawns(g2)
        assert torch.equal(chaser, env.chaser_pos) and torch.equal(explorer, env.explorer_pos)
        assert not (chaser == explorer).all(-1).any()
        assert torch.equal(g1.get_state(), g2.get_state())
    assert int(env.chaser_pos.max()) == (9 if spawn == "full" else 8)
    with pytest.raises(InterbrainError, match="needs a CPU torch.Generator"):
        env.draw_spawns(None)

# --- scalar reference and random invariants --------------------------------------------------------
DELTA = {0: (-1, 0), 1: (0, 1), 2: (1, 0), 3: (0, -1)}


def reference_step(task, c, e, vc, ve, ac, ae):
    """Plain-Python SPEC §1.2 / §2 for one episode. Returns (c', e', events dict, (r_c, r_e))."""
    def clamp(p, d):
        return (min(max(p[0] + d[0], 0), 9), min(max(p[1] + d[1], 0), 9))

    def d2(a, b):
        return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2

    cs = clamp(c, DELTA[ac])
    cc = cs == e
    c1 = c if cc else cs
    es = clamp(e, DELTA[ae])
    ec = es == c1
    e1 = e if ec else es
    coll = cc or ec
    cnf = (not cc) and c1 not in vc
    enf = (not ec) and e1 not in ve
    vc.add(c1)
    ve.add(e1)
    appr = (not cc) and (not cnf) and d2(c1, e) < d2(c, e)
    esc = (not ec) and (not enf) and d2(e1, c) > d2(e, c)
    dist = math.sqrt(d2(e1, c))
    ev = dict(collision=coll, chaser_collision=cc, explorer_collision=ec, chaser_new_field=cnf,
              explorer_new_field=enf, chaser_approach=appr, explorer_escape=esc,
              explorer_escape_close=esc and dist < 3, explorer_escape_near=esc and 3 <= dist < 5,
              explorer_escape_far=esc and dist >= 5, chaser_stuck=(not cc) and c1 == c,
              explorer_stuck=(not ec) and e1 == e)
    table = SPEC_REWARDS[task]
    rewards = []
    for role, new in (("chaser", cnf), ("explorer", enf)):
        on_coll, on_new, base = table[role]
        rewards.append(on_coll if coll else (on_new if new else base))
    return c1, e1, ev, tuple(rewards)


def reference_obs(c, e, visibility):
    def one(own, partner):
        x = [0.0] * 200
        x[10 * own[0] + own[1]] = 1.0
        visible = max(abs(own[0] - partner[0]), abs(own[1] - partner[1])) <= 3
        if visibility == "full" or (visibility == "partial" and visible):
            x[100 + 10 * partner[0] + partner[1]] = 1.0
        return x
    return one(c, e), one(e, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,task,visibility", [(0, "social", "partial"), (1, "non_social", "none"),
                                                  (2, "mutual", "full"), (3, "social_alt", "partial")])
def test_matches_scalar_reference_over_random_steps(seed, task, visibility, device):
    B, H = 32, 60
    rng = random.Random(seed)
    env = ChaseEnv(EnvConfig(task=task, visibility=visibility, horizon=H, spawn="full"), batch=B, device=device)
    # Half the episodes start adjacent so collisions are frequent.
    gen = torch.Generator().manual_seed(seed)
    env.reset(gen)
    cpos = env.chaser_pos.cpu().clone()
    epos = env.explorer_pos.cpu().clone()
    for i in range(0, B, 2):
        cpos[i] = torch.tensor([rng.randrange(1, 9), rng.randrange(1, 9)])
        epos[i] = cpos[i] + torch.tensor(DELTA[rng.randrange(4)])
    env.reset(gen, chaser_pos=cpos, explorer_pos=epos)
    C = [tuple(p) for p in cpos.tolist()]
    E = [tuple(p) for p in epos.tolist()]
    VC = [{p} for p in C]
    VE = [{p} for p in E]
    counts = dict.fromkeys(EVENTS, 0)
    for t in range(H + 2):  # two inert steps past the horizon
        c_obs, e_obs = env.observations()
        fov = env.fov().cpu()
        for i in range(B):
            ref_c, ref_e = reference_obs(C[i], E[i], visibility)
            assert c_obs[i].cpu().tolist() == ref_c and e_obs[i].cpu().tolist() == ref_e
            assert bool(fov[i]) == (max(abs(C[i][0] - E[i][0]), abs(C[i][1] - E[i][1])) <= 3)
        ac = [rng.randrange(4) for _ in range(B)]
        ae = [rng.randrange(4) for _ in range(B)]
        info = env.step(torch.tensor(ac, device=device), torch.tensor(ae, device=device))
        got = {k: v.cpu().tolist() for k, v in info.as_dict().items()}
        for i in range(B):
            if t < H:
                C[i], E[i], ev, (rc, re) = reference_step(task, C[i], E[i], VC[i], VE[i], ac[i], ae[i])
            else:
                ev, rc, re = dict.fromkeys(EVENTS, False), 0.0, 0.0
            for name in EVENTS:
                assert got[name][i] == ev[name], (t, i, name)
                counts[name] += ev[name]
            assert got["chaser_reward"][i] == pytest.approx(rc, abs=1e-6)
            assert got["explorer_reward"][i] == pytest.approx(re, abs=1e-6)
            assert got["done"][i] == (t >= H - 1)
        # Invariants: on the grid, never the same cell, state equals the reference.
        assert env.chaser_pos.cpu().tolist() == [list(p) for p in C]
        assert env.explorer_pos.cpu().tolist() == [list(p) for p in E]
        assert not bool((env.chaser_pos == env.explorer_pos).all(-1).any())
        assert int(env.chaser_pos.min()) >= 0 and int(env.chaser_pos.max()) <= 9
        assert env.chaser_visited.cpu().sum().item() == sum(len(v) for v in VC)
    # Every event type occurred, so the comparison above is not vacuous.
    assert all(n > 0 for n in counts.values()), counts


def test_long_random_run_invariants():
    B, H = 200, 500
    env = ChaseEnv(EnvConfig(horizon=H, spawn="official"), batch=B)
    g = torch.Generator().manual_seed(0)
    env.reset(g)
    prev_c, prev_e = env.chaser_pos.clone(), env.explorer_pos.clone()
    for _ in range(H):
        info = env.step(torch.randint(0, 4, (B,), generator=g), torch.randint(0, 4, (B,), generator=g))
        c, e = env.chaser_pos, env.explorer_pos
        assert not bool((c == e).all(-1).any())
        assert int(torch.cat([c, e]).min()) >= 0 and int(torch.cat([c, e]).max()) <= 9
        # Every move is a single unit step or none.
        assert bool(((c - prev_c).abs().sum(-1) <= 1).all()) and bool(((e - prev_e).abs().sum(-1) <= 1).all())
        # Stuck iff not moved and not self-blocked; collisions are exactly the blocked agents.
        assert torch.equal(info.chaser_stuck, (c == prev_c).all(-1) & ~info.chaser_collision)
        assert torch.equal(info.explorer_stuck, (e == prev_e).all(-1) & ~info.explorer_collision)
        assert not bool((info.chaser_new_field & info.chaser_approach).any())
        assert torch.equal(info.explorer_escape_close | info.explorer_escape_near | info.explorer_escape_far,
                           info.explorer_escape)
        prev_c, prev_e = c.clone(), e.clone()
    assert env.done


def test_per_episode_configs_match_the_scalar_reference():
    """A batch whose episodes have their own task and visibility (the ensemble's environment) follows, episode by
    episode, the scalar reference of that episode's config: rewards, observations, events."""
    combos = [("social", "partial"), ("non_social", "none"), ("mutual", "full"), ("social_alt", "partial")]
    B, H = 32, 40
    episodes = [EnvConfig(task=combos[i % 4][0], visibility=combos[i % 4][1], horizon=H) for i in range(B)]
    env = ChaseEnv(EnvConfig(horizon=H), batch=B, episodes=episodes)
    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    env.reset(gen)
    cpos, epos = env.chaser_pos.clone(), env.explorer_pos.clone()
    for i in range(0, B, 2):  # half the episodes start adjacent, so collisions are frequent
        cpos[i] = torch.tensor([rng.randrange(1, 9), rng.randrange(1, 9)])
        epos[i] = cpos[i] + torch.tensor(DELTA[rng.randrange(4)])
    env.reset(gen, chaser_pos=cpos, explorer_pos=epos)
    C, E = [tuple(p) for p in cpos.tolist()], [tuple(p) for p in epos.tolist()]
    VC, VE = [{p} for p in C], [{p} for p in E]
    seen = set()
    for t in range(H):
        c_obs, e_obs = env.observations()
        for i in range(B):
            ref_c, ref_e = reference_obs(C[i], E[i], episodes[i].visibility)
            assert c_obs[i].tolist() == ref_c and e_obs[i].tolist() == ref_e, (t, i)
        ac, ae = [rng.randrange(4) for _ in range(B)], [rng.randrange(4) for _ in range(B)]
        info = env.step(torch.tensor(ac), torch.tensor(ae))
        for i in range(B):
            C[i], E[i], ev, (rc, re) = reference_step(episodes[i].task, C[i], E[i], VC[i], VE[i], ac[i], ae[i])
            assert float(info.chaser_reward[i]) == pytest.approx(rc, abs=1e-6), (t, i)
            assert float(info.explorer_reward[i]) == pytest.approx(re, abs=1e-6), (t, i)
            assert bool(info.collision[i]) == ev["collision"]
            if ev["collision"]:
                seen.add(episodes[i].task)
    assert seen == {c[0] for c in combos}  # every task's collision reward was exercised


def test_per_episode_configs_are_validated():
    with pytest.raises(InterbrainError, match="one env config per episode"):
        ChaseEnv(EnvConfig(), batch=2, episodes=[EnvConfig()])
    with pytest.raises(InterbrainError, match="episode 1's env config differs"):
        ChaseEnv(EnvConfig(), batch=2, episodes=[EnvConfig(), EnvConfig(horizon=50)])
