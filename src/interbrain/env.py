"""The batched chase grid (SPEC §1) and its rewards (SPEC §2).

One :class:`ChaseEnv` runs B episodes in lockstep; a step is a handful of vectorised tensor operations with no
loop over episodes and no host-device synchronisation apart from one cheap action-range check.

Conventions
-----------
- A cell is ``(row, col)`` with row, col in 0..9; its flat index (the observation one-hot) is ``10*row + col``.
- Actions (official order): 0 up (-1,0), 1 right (0,+1), 2 down (+1,0), 3 left (0,-1). No stay action.
- The step resolves the chaser first (SPEC §1.2): the chaser is blocked by the explorer's *old* cell, the explorer
  by the chaser's *new* cell. Approach and escape compare distances to the partner's *old* cell, strictly.
- Rewards (SPEC §2): baseline, overridden by the agent's own new field, overridden for *both* agents by the shared
  collision flag; nothing after ``done``.
- Distances are compared as exact integer squared distances (band edges 3 and 5 are exact).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch import Tensor

from interbrain.config import EnvConfig
from interbrain.errors import InterbrainError

GRID = 10
N_CELLS = GRID * GRID
OBS_DIM = 2 * N_CELLS
FOV_RADIUS = 3
N_ACTIONS = 4
ACTION_DELTAS = torch.tensor([[-1, 0], [0, 1], [1, 0], [0, -1]], dtype=torch.long)
ACTION_NAMES = ("up", "right", "down", "left")

# Escape bands on d(e', c) (SPEC §1.2): close < 3 <= near < 5 <= far; compared as squared distances.
_NEAR_SQ = 3 * 3
_FAR_SQ = 5 * 5

# SPEC §2 (Supplementary Tables 3 and 4): task -> role -> (collision, own new field, otherwise).
REWARD_TABLE: dict[str, dict[str, tuple[float, float, float]]] = {
    "social": {"chaser": (1.0, 0.1, -0.1), "explorer": (-1.0, 1.0, -0.5)},
    "non_social": {"chaser": (-0.1, 0.1, -0.1), "explorer": (-0.5, 1.0, -0.5)},
    "social_alt": {"chaser": (1.0, 0.1, -0.1), "explorer": (-1.0, 0.1, -0.1)},
    "mutual": {"chaser": (1.0, 0.0, 0.0), "explorer": (1.0, 0.0, 0.0)},
}


@dataclass
class StepInfo:
    """Rewards and events of one transition s_t -> s_{t+1} (SPEC §1.2); every field is a [B] tensor."""

    chaser_reward: Tensor  # float32
    explorer_reward: Tensor  # float32
    collision: Tensor  # bool: chaser_collision OR explorer_collision, drives both rewards
    chaser_collision: Tensor
    explorer_collision: Tensor
    chaser_new_field: Tensor
    explorer_new_field: Tensor
    chaser_approach: Tensor
    explorer_escape: Tensor
    explorer_escape_close: Tensor
    explorer_escape_near: Tensor
    explorer_escape_far: Tensor
    chaser_stuck: Tensor
    explorer_stuck: Tensor
    done: Tensor  # bool: True from the step that reaches the horizon on

    def as_dict(self) -> dict[str, Tensor]:
        """The fields by name, without copying the tensors."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class CoreStep(NamedTuple):
    """What the training step returns (:meth:`ChaseEnv.step_core`); row 0 the chaser, row 1 the explorer. From
    :meth:`ChaseEnv.settle`, every field has a leading time axis [T, ...]."""

    rewards: Tensor  # float [2, B]
    collision: Tensor  # bool [B], the shared collision flag
    blocked: Tensor  # bool [2, B], each agent's own collision flag
    new_field: Tensor  # bool [2, B]


EVENT_NAMES = tuple(f.name for f in fields(StepInfo) if f.name not in ("chaser_reward", "explorer_reward", "done"))


def _reward_rows(task: str) -> Tensor:
    """[2, 4]: row agent (chaser, explorer), column ``new_field + 2 * collision`` -> reward (SPEC §2)."""
    rows = []
    for role in ("chaser", "explorer"):
        collide, new, base = REWARD_TABLE[task][role]
        rows.append([base, new, collide, collide])
    return torch.tensor(rows)


NOT_VISIBLE = N_CELLS  # partner index of an observation index when the partner is not shown


def obs_from_index(index: Tensor) -> Tensor:
    """The float observation [..., 200] (SPEC §1.3) of an observation index [..., 2] = (own cell, partner cell or
    :data:`NOT_VISIBLE`): a one-hot of the own cell in 0..99 and of the partner's cell in 100..199 when shown."""
    own, partner = index[..., :1], index[..., 1:]
    x = torch.zeros(*index.shape[:-1], OBS_DIM, device=index.device)
    x.scatter_(-1, own, 1.0)
    x.scatter_(-1, N_CELLS + partner % N_CELLS, (partner < N_CELLS).to(x.dtype))
    return x


def _flat(pos: Tensor) -> Tensor:
    return pos[:, 0] * GRID + pos[:, 1]


def _tables() -> dict[str, Tensor]:
    """Lookup tables over flat cells and pairs (100·a + b), so a step is a few gathers: ``move[4*cell + action]`` (the
    clamped target cell; it builds ``transition``), ``sq_dist[pair]`` (exact integer squared distance), ``in_fov[pair]``
    (Chebyshev distance <= 3), ``row_col[cell]``, ``transition`` (:func:`_transition`) and ``partner_shown``
    (:func:`_partner_shown`)."""
    cells = torch.arange(N_CELLS)
    row_col = torch.stack([cells // GRID, cells % GRID], -1)  # [100, 2]
    target = (row_col[:, None, :] + ACTION_DELTAS[None]).clamp(0, GRID - 1)  # [100, 4, 2]
    diff = row_col[:, None, :] - row_col[None, :, :]  # [100, 100, 2]
    move = _flat(target.reshape(-1, 2))
    in_fov = (diff.abs().amax(-1) <= FOV_RADIUS).flatten()
    return {"move": move, "sq_dist": diff.square().sum(-1).flatten(), "in_fov": in_fov, "row_col": row_col,
            "transition": _transition(move), "partner_shown": _partner_shown(in_fov)}


def _transition(move: Tensor) -> Tensor:
    """Steps 1-3 of SPEC §1.2 for every (pair, joint action), so a training step is one row lookup. Pair p = 100 c + e
    (chaser cell c, explorer cell e), joint action j = 4 a_c + a_e; row 16 p + j is (c', e', chaser blocked,
    explorer blocked, 2 · shared collision, 100 c' + e') as long [160,000, 6]."""
    c = torch.arange(N_CELLS).view(-1, 1, 1, 1)
    e = torch.arange(N_CELLS).view(1, -1, 1, 1)
    ca = torch.arange(N_ACTIONS).view(1, 1, -1, 1)
    ea = torch.arange(N_ACTIONS).view(1, 1, 1, -1)
    c_star = move[c * N_ACTIONS + ca]  # 1. the chaser is blocked by the explorer's old cell
    chaser_collision = c_star == e
    c_new = torch.where(chaser_collision, c, c_star)
    e_star = move[e * N_ACTIONS + ea]  # 2. the explorer is blocked by the chaser's new cell
    explorer_collision = e_star == c_new
    e_new = torch.where(explorer_collision, e, e_star)
    cols = [c_new, e_new, chaser_collision, explorer_collision, 2 * (chaser_collision | explorer_collision),
            c_new * N_CELLS + e_new]
    return torch.stack([torch.broadcast_to(x, (N_CELLS, N_CELLS, N_ACTIONS, N_ACTIONS)).long() for x in cols],
                       -1).reshape(-1, len(cols))


def _check_spawn_generator(generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise InterbrainError(f"reset needs a CPU torch.Generator to draw spawns, got {generator!r}")


def _transition_row(pair: Tensor, chaser_action: Tensor, explorer_action: Tensor) -> Tensor:
    """The row 16 p + 4 a_c + a_e of :func:`_transition` (and of the tables indexed like it) for pairs p and actions
    of any one shape."""
    return torch.add(torch.add(explorer_action, chaser_action, alpha=N_ACTIONS), pair, alpha=N_ACTIONS * N_ACTIONS)


def _partner_shown(in_fov: Tensor) -> Tensor:
    """[3, 10,000, 2, 2]: per visibility mode (0 partial, 1 full, 2 none) and pair 100 c + e, both agents' observation
    index ((c, e or NOT_VISIBLE), (e, c or NOT_VISIBLE)) (SPEC §1.3)."""
    c = torch.arange(N_CELLS).repeat_interleave(N_CELLS)
    e = torch.arange(N_CELLS).repeat(N_CELLS)
    not_shown = torch.full_like(c, NOT_VISIBLE)
    modes = []
    for shown in (in_fov, torch.ones_like(in_fov), torch.zeros_like(in_fov)):
        modes.append(torch.stack([torch.stack([c, torch.where(shown, e, not_shown)], -1),
                                  torch.stack([e, torch.where(shown, c, not_shown)], -1)], 1))
    return torch.stack(modes)


VISIBILITY_MODES = ("partial", "full", "none")


_DEVICE_TABLES: dict[torch.device, tuple] = {}


def _device_tables(device: torch.device) -> tuple:
    """The lookup tables of :func:`_tables` on ``device``, built and copied once per process and device: ``sq_dist``,
    ``in_fov``, ``row_col``, ``transition``, ``partner_shown`` agent-major ([2, 3 · 10,000, 2]), then two tables
    for the rollout's lookups: the next pair alone (:meth:`ChaseEnv.move`) and the transition's flags as one byte
    (:meth:`ChaseEnv.settle`)."""
    hit = _DEVICE_TABLES.get(device)
    if hit is None:
        t = _tables()
        t["partner_shown"] = t["partner_shown"].permute(2, 0, 1, 3).reshape(2, -1, 2).contiguous()  # [2, 30,000, 2]
        hit = tuple(t[k].to(device) for k in ("sq_dist", "in_fov", "row_col", "transition", "partner_shown"))
        # one byte per row: 1 chaser blocked, 2 explorer blocked, 4 collision (column 4 holds 2 · collision)
        flags = (hit[3][:, 2] + 2 * hit[3][:, 3] + 2 * hit[3][:, 4]).to(torch.uint8)
        # the next pair alone (move) and the flags as one byte (settle): small tables, for the rollout's lookups
        hit = _DEVICE_TABLES[device] = hit + (hit[3][:, 5].contiguous(), flags)
    return hit


class ChaseEnv:
    """B chase-grid episodes stepped together (SPEC §1).

    Public state: ``chaser_pos``, ``explorer_pos`` (long [B,2], row/col), ``chaser_visited``,
    ``explorer_visited`` (bool [B,100]) and ``t`` (python int, shared by all episodes).
    Internally the agents' cells are flat indices ``cells`` (long [2,B]: chaser, explorer) and ``visited`` is one
    bool [2,B,100] buffer (``chaser_visited``/``explorer_visited`` are views of it); moves, distances and the field
    of view are table lookups (:func:`_tables`).

    Three ways to step: :meth:`step` (checked, every event of SPEC §1.2), :meth:`step_core` (the same transition,
    trusted actions, core flags only) and, for a training rollout, :meth:`move` per step (the pair of cells only)
    followed by one :meth:`settle` that computes the core flags of every move at once.
    """

    def __init__(self, config: EnvConfig, batch: int, device: torch.device | str = "cpu",
                 episodes: list[EnvConfig] | None = None):
        """``episodes`` (optional, one :class:`EnvConfig` per episode, equal to ``config`` but for ``task`` and
        ``visibility``) gives each episode its own rewards (SPEC §2) and visibility (SPEC §1.3), as a batched ensemble
        of social and non-social units needs; by default every episode follows ``config``."""
        if not isinstance(config, EnvConfig):
            raise InterbrainError(f"env config must be an EnvConfig, got {type(config).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise InterbrainError(f"batch must be a positive integer, got {batch!r}")
        self.config = config
        self.batch = batch
        self.device = torch.empty(0, device=device).device  # canonical form, e.g. "cuda" -> "cuda:0"
        self.horizon = config.horizon
        self.visibility = config.visibility
        # reward[agent, episode, new_field + 2 * collision]: baseline < own new field < shared collision (SPEC §2);
        # one task's rows for every episode, unless per-episode configs give each its own
        self._reward_table = _reward_rows(config.task).to(self.device)[:, None, :].expand(2, batch, 4)
        if episodes is not None:
            self._set_episodes(config, episodes)
        self._sq_dist, self._in_fov, self._row_col, self._transition, shown, self._next_pair, self._step_flags = \
            _device_tables(self.device)
        # observation indices, agent-major [2, rows, 2], by row 10,000 · visibility mode + pair; each episode reads
        # its mode's block (one mode for the whole batch: its block alone, offset None)
        if episodes is not None:
            self._obs_rows = shown
            self._obs_offset = torch.as_tensor(self._episode_modes, device=self.device) * N_CELLS * N_CELLS
        else:
            mode = VISIBILITY_MODES.index(self.visibility)
            block = shown[:, mode * N_CELLS * N_CELLS:(mode + 1) * N_CELLS * N_CELLS]
            self._obs_rows, self._obs_offset = block.contiguous(), None
        self._visited_offset = (torch.arange(2 * batch, device=self.device) * N_CELLS).view(2, batch)
        self.cells: Tensor | None = None  # long [2, B]: chaser, explorer flat cells
        self.pair: Tensor | None = None  # long [B]: 100 · chaser cell + explorer cell
        self.visited: Tensor | None = None
        self.t = 0
        self._moved_since = None  # step count at the first move() not yet settled (cells and visited are stale)
        self._offset_tables: dict = {}  # offsets values -> observation table (observation_index(offsets=))
        self._last_offsets: tuple | None = None  # (offsets, its version, its table): the last lookup

    def _set_episodes(self, config: EnvConfig, episodes: list[EnvConfig]) -> None:
        if len(episodes) != self.batch:
            raise InterbrainError(f"episodes must give one env config per episode ({self.batch}), got {len(episodes)}")
        shared = lambda c: {f.name: getattr(c, f.name) for f in fields(c) if f.name not in ("task", "visibility")}  # noqa: E731
        for i, c in enumerate(episodes):
            if not isinstance(c, EnvConfig) or shared(c) != shared(config):
                raise InterbrainError(f"episode {i}'s env config differs from the batch's in more than task and "
                                      f"visibility: {c!r}")
        self._reward_table = torch.stack([_reward_rows(c.task) for c in episodes], 1).to(self.device)
        self.visibility = "per_episode"
        self._episode_modes = [VISIBILITY_MODES.index(c.visibility) for c in episodes]

    @property
    def chaser_pos(self) -> Tensor | None:
        self._require_settled()
        return None if self.cells is None else self._row_col[self.cells[0]]

    @property
    def explorer_pos(self) -> Tensor | None:
        self._require_settled()
        return None if self.cells is None else self._row_col[self.cells[1]]

    @property
    def chaser_visited(self) -> Tensor | None:
        self._require_settled()
        return None if self.visited is None else self.visited[0]

    @property
    def explorer_visited(self) -> Tensor | None:
        self._require_settled()
        return None if self.visited is None else self.visited[1]

    # --- reset -----------------------------------------------------------------------------------
    def reset(self, generator: torch.Generator | None, chaser_pos: Tensor | None = None,
              explorer_pos: Tensor | None = None) -> None:
        """Spawn every episode (SPEC §1.1) and clear the step count.

        The chaser's row and column are drawn first, uniformly from 0..9 (``spawn=full``) or 0..8
        (``spawn=official``); then the explorer's, redrawn until its cell differs from the chaser's. Draws come
        from ``generator`` (a CPU ``torch.Generator``) on the CPU and are moved to the device, so spawns are
        identical on CPU and CUDA. ``chaser_pos`` / ``explorer_pos`` (long [B,2]) replace the draw of that agent
        (scripted tests). Each spawn cell is marked visited.
        """
        B = self.batch
        if chaser_pos is None or explorer_pos is None:
            _check_spawn_generator(generator)
        chaser = self._draw_cells(generator) if chaser_pos is None else self._check_positions("chaser_pos", chaser_pos)
        if explorer_pos is None:
            explorer = self._draw_explorer(generator, chaser)
        else:
            explorer = self._check_positions("explorer_pos", explorer_pos)
            clash = (explorer == chaser).all(-1)
            if clash.any():
                i = int(clash.nonzero()[0, 0])
                raise InterbrainError(f"explorer_pos equals chaser_pos in episode {i}: {chaser[i].tolist()}; "
                                      "agents never share a cell")
        self.cells = torch.stack([_flat(chaser), _flat(explorer)]).to(self.device)
        self.pair = self.cells[0] * N_CELLS + self.cells[1]
        self.visited = torch.zeros(2, B, N_CELLS, dtype=torch.bool, device=self.device)
        self.visited.scatter_(2, self.cells.unsqueeze(2), True)
        self.t = 0
        self._moved_since = None

    def draw_spawns(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The spawn cells :meth:`reset` draws from ``generator`` (a CPU ``torch.Generator``), as CPU tensors long
        [B, 2] (chaser, explorer), without touching the environment: a batched ensemble draws each unit's spawns with
        its own generator and resets its joint environment with them."""
        _check_spawn_generator(generator)
        chaser = self._draw_cells(generator)
        return chaser, self._draw_explorer(generator, chaser)

    def _draw_cells(self, generator: torch.Generator, n: int | None = None) -> Tensor:
        """n (default: every episode's) uniform spawn cells as (row, column), long [n, 2]."""
        high = GRID if self.config.spawn == "full" else GRID - 1
        return torch.randint(0, high, (self.batch if n is None else n, 2), generator=generator)

    def _draw_explorer(self, generator: torch.Generator, chaser: Tensor) -> Tensor:
        explorer = self._draw_cells(generator)
        same = (explorer == chaser).all(-1)
        while same.any():  # redraw only the episodes whose explorer landed on the chaser
            explorer[same] = self._draw_cells(generator, int(same.sum()))
            same = (explorer == chaser).all(-1)
        return explorer

    def _check_positions(self, key: str, pos) -> Tensor:
        pos = torch.as_tensor(pos).detach().cpu()
        if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
            raise InterbrainError(f"{key} must be an integer tensor, got dtype {pos.dtype}")
        if tuple(pos.shape) != (self.batch, 2):
            raise InterbrainError(f"{key} must have shape [{self.batch}, 2], got {list(pos.shape)}")
        off = ((pos < 0) | (pos >= GRID)).any(-1)
        if off.any():
            i = int(off.nonzero()[0, 0])
            raise InterbrainError(f"{key} lies off the {GRID}x{GRID} grid in episode {i}: {pos[i].tolist()}")
        return pos.long()

    def _require_state(self) -> None:
        if self.cells is None:
            raise InterbrainError("the environment has not been reset; call reset(generator) first")

    def _require_settled(self) -> None:
        if self._moved_since is not None:
            raise InterbrainError(f"the environment has moved since step {self._moved_since} without settle(); "
                                  "its cells and visited fields are stale")

    # --- state readouts --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.t >= self.horizon

    def fov(self, pairs: Tensor | None = None) -> Tensor:
        """Physical field of view on s_t (SPEC §1.3): Chebyshev distance <= 3; symmetric; independent of visibility.
        Of recorded ``pairs`` (long [..., B], as :meth:`move` writes them) instead of s_t when given."""
        self._require_state()
        return self._in_fov[self.pair if pairs is None else pairs]

    def distance(self) -> Tensor:
        """Euclidean distance between the agents' cells on s_t, float32 [B]."""
        self._require_state()
        return self._sq_dist[self.pair].float().sqrt()

    def observations(self) -> tuple[Tensor, Tensor]:
        """(chaser_obs, explorer_obs), float32 [B,200] built from s_t (SPEC §1.3).

        Entries 0..99 one-hot the agent's own cell; entries 100..199 one-hot the partner's cell when the visibility
        mode shows it (partial: inside the physical FOV; full: always; none: never).
        """
        chaser_obs, explorer_obs = obs_from_index(self.observation_index())
        return chaser_obs, explorer_obs

    def observation_index(self, pairs: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
        """Both agents' observations as indices, long [2, B, 2]: ``[agent][episode] = (own cell, partner cell or
        NOT_VISIBLE)`` with agent 0 the chaser; :func:`obs_from_index` turns it into the float observation. Of
        recorded ``pairs`` (long [..., B], as :meth:`move` writes them) instead of s_t when given: [2, ..., B, 2].
        Contiguous: one row lookup per episode (and step) in the table of its visibility mode.

        ``offsets`` (long, 4 values: [2, 1, 2]) are added to the index, from a table built once per offsets value: a
        batched pair step's rows in its stacked input table (:func:`~interbrain.agents.base.stacked_row_offsets`)."""
        self._require_state()
        pairs = self.pair if pairs is None else pairs
        at = pairs if self._obs_offset is None else pairs + self._obs_offset
        table = self._obs_rows if offsets is None else self._offset_obs_rows(offsets)
        if at.dim() == 1:  # s_t: the rollout loop's call
            return torch.index_select(table, 1, at)
        return torch.index_select(table, 1, at.reshape(-1)).view(2, *at.shape, 2)

    def _offset_obs_rows(self, offsets: Tensor) -> Tensor:
        """The observation table plus ``offsets``, cached by value (and the last one by identity and version: no host
        read per step, and an offsets tensor changed in place is looked up again)."""
        last = self._last_offsets
        if last is not None and last[0] is offsets and last[1] == offsets._version:
            return last[2]
        key = tuple(offsets.flatten().tolist())
        table = self._offset_tables.get(key)
        if table is None:
            table = self._offset_tables[key] = (self._obs_rows + offsets.view(2, 1, 2)).contiguous()
        self._last_offsets = (offsets, offsets._version, table)
        return table

    def acting_tables(self, offsets: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """What a written-out acting loop needs to do :meth:`observation_index` (with ``offsets``) and :meth:`next_pair`
        itself: the observation table [2, rows, 2] plus ``offsets``, the per-episode row offset of each episode's
        visibility mode (long [B]; None when one mode serves the batch) and the next-pair table (long [10,000 · 16],
        row 16 p + 4 a_c + a_e). Read-only; after the loop's moves the caller calls :meth:`moved`."""
        self._require_state()
        return self._offset_obs_rows(offsets), self._obs_offset, self._next_pair

    # --- step ------------------------------------------------------------------------------------
    def _check_actions(self, chaser_action: Tensor, explorer_action: Tensor) -> tuple[Tensor, Tensor]:
        checked = []
        for key, a in (("chaser_action", chaser_action), ("explorer_action", explorer_action)):
            if not isinstance(a, Tensor):
                raise InterbrainError(f"{key} must be a torch tensor, got {type(a).__name__}")
            if a.dtype == torch.bool or a.is_floating_point() or a.is_complex():
                raise InterbrainError(f"{key} must be an integer tensor of action ids, got dtype {a.dtype}")
            if tuple(a.shape) != (self.batch,):
                raise InterbrainError(f"{key} must have shape [{self.batch}], got {list(a.shape)}")
            if a.device != self.device:
                raise InterbrainError(f"{key} is on {a.device} but the environment is on {self.device}")
            checked.append(a.long())
        ca, ea = checked
        # One synchronising check for both: x | y lies in 0..3 iff both do (negatives set the high bits).
        if ((ca | ea) & ~(N_ACTIONS - 1)).any():
            for key, a in (("chaser_action", ca), ("explorer_action", ea)):
                bad = a[(a < 0) | (a >= N_ACTIONS)]
                if bad.numel():
                    raise InterbrainError(f"invalid {key} id {int(bad[0])}; expected 0 up, 1 right, 2 down, 3 left")
        return ca, ea

    def step(self, chaser_action: Tensor, explorer_action: Tensor) -> StepInfo:
        """Resolve one step for all episodes, exactly as SPEC §1.2, with rewards from SPEC §2.

        Both actions were chosen from s_t. After ``done`` the step is inert: no movement, zero rewards, no events,
        ``done`` stays True.
        """
        self._require_state()
        self._require_settled()
        ca, ea = self._check_actions(chaser_action, explorer_action)
        if self.done:
            return self._inert_info()
        (c, e), pair = self.cells, self.pair
        core = self._advance(ca, ea)
        c_new, e_new = self.cells
        chaser_collision, explorer_collision = core.blocked
        chaser_new_field, explorer_new_field = core.new_field

        # 5-6. approach / escape, strict, against the partner's old cell.
        d_old = self._sq_dist[pair]
        chaser_approach = ~chaser_collision & ~chaser_new_field & (self._sq_dist[c_new * N_CELLS + e] < d_old)
        d_escape = self._sq_dist[e_new * N_CELLS + c]
        explorer_escape = ~explorer_collision & ~explorer_new_field & (d_escape > d_old)
        explorer_escape_close = explorer_escape & (d_escape < _NEAR_SQ)
        explorer_escape_far = explorer_escape & (d_escape >= _FAR_SQ)
        explorer_escape_near = explorer_escape & ~explorer_escape_close & ~explorer_escape_far

        # Stuck: acted, did not move, own collision flag false (a wall bump).
        chaser_stuck = ~chaser_collision & (c_new == c)
        explorer_stuck = ~explorer_collision & (e_new == e)
        done = torch.full((self.batch,), self.done, dtype=torch.bool, device=self.device)
        return StepInfo(
            chaser_reward=core.rewards[0], explorer_reward=core.rewards[1], collision=core.collision,
            chaser_collision=chaser_collision, explorer_collision=explorer_collision,
            chaser_new_field=chaser_new_field, explorer_new_field=explorer_new_field,
            chaser_approach=chaser_approach, explorer_escape=explorer_escape,
            explorer_escape_close=explorer_escape_close, explorer_escape_near=explorer_escape_near,
            explorer_escape_far=explorer_escape_far, chaser_stuck=chaser_stuck, explorer_stuck=explorer_stuck,
            done=done,
        )

    def step_core(self, chaser_action: Tensor, explorer_action: Tensor) -> CoreStep:
        """The training path of :meth:`step`: the same transition, returning only the :class:`CoreStep` flags. Actions
        are trusted (long [B] on the device, ids 0..3, as sampled by the learner): no checks, no host
        synchronisation. Must not be called after ``done``."""
        self._require_settled()
        return self._advance(chaser_action, explorer_action)

    def move(self, actions: Tensor, out: Tensor) -> Tensor:
        """The rollout loop's step (issue 6): steps 1-3 of SPEC §1.2 and the step count only, as one row lookup of the
        next pair; no rewards, events or visited fields. ``actions`` long [2, B] (chaser, explorer; trusted, as for
        :meth:`step_core`); the new pair (100 · chaser cell + explorer cell, long [B]) is written into ``out`` and
        becomes s_{t+1}; ``self.pair`` is then ``out`` itself, so the caller must not overwrite it before the next
        move or reset. The caller keeps the pairs and actions of every move and hands them to :meth:`settle`, which
        computes the rest at once; until then the cells and visited fields are stale (``chaser_pos``,
        ``explorer_pos``, ``*_visited``, :meth:`step` and :meth:`step_core` raise). Must not be called after
        ``done``."""
        self.moved(self.next_pair(self.pair, actions, out), 1)
        return out

    def next_pair(self, pair: Tensor, actions: Tensor, out: Tensor) -> Tensor:
        """:meth:`move`'s arithmetic without its bookkeeping: the pairs after ``actions`` (long [2, B]) from ``pair``
        (long [B]), written into ``out`` and returned. A loop of these (a CUDA graph of the acting loop,
        :mod:`interbrain.ensemble`) is followed by one :meth:`moved`."""
        return torch.index_select(self._next_pair, 0, _transition_row(pair, actions[0], actions[1]), out=out)

    def moved(self, last: Tensor, steps: int) -> None:
        """Record ``steps`` moves made by :meth:`next_pair` ending at the pairs ``last`` (long [B], which becomes
        s_t, as :meth:`move`'s ``out``)."""
        if self._moved_since is None:
            self._moved_since = self.t
        self.pair = last
        self.t += steps

    def settle(self, pairs: Tensor, actions: Tensor) -> CoreStep:
        """After T :meth:`move` calls from s_t0: ``pairs`` long [T+1, B] (s_t0's pair, then each move's ``out``) and
        ``actions`` long [T, 2, B] -> the :class:`CoreStep` of every move, each field [T, ...], the same values
        :meth:`step_core` would have returned step by step; the cells and visited fields are brought up to date.

        New field (SPEC §1.2 step 4): an agent's landing cell is new iff it stands there for the first time, counting
        the cells visited before t0 as time 0 (a blocked or bumped agent stays on a visited cell)."""
        self._require_state()
        T, B = actions.shape[0], self.batch
        moved = 0 if self._moved_since is None else self.t - self._moved_since
        if moved == 0 or moved != T or tuple(pairs.shape) != (T + 1, B):
            raise InterbrainError(f"settle needs the pairs [{moved + 1}, {B}] and actions [{moved}, 2, {B}] of the "
                                  f"{moved} moves since the last settle; got pairs {list(pairs.shape)}, actions "
                                  f"{list(actions.shape)}")
        code = _transition_row(pairs[:-1], actions[:, 0], actions[:, 1])
        bits = self._step_flags[code]  # [T, B]: chaser blocked, explorer blocked, collision (1, 2, 4)
        flags = torch.stack([bits & 1, bits & 2, bits & 4]) > 0  # [3, T, B]
        landing = torch.stack([pairs[1:] // N_CELLS, pairs[1:] % N_CELLS]).transpose(1, 2)  # [2, B, T]: c', e'
        step = torch.arange(1, T + 1, device=self.device).expand(2, B, T)
        first = torch.where(self.visited, 0, T + 1)  # [2, B, 100]: the first step on each cell (0: before t0)
        first.scatter_reduce_(2, landing, step, reduce="amin")
        new_field = (first.gather(2, landing) == step).permute(2, 0, 1)  # [T, 2, B]
        self.visited.copy_(first <= T)
        code = torch.add(new_field.long(), flags[2].unsqueeze(1), alpha=2)  # new_field + 2 · collision, [T, 2, B]
        rewards = self._reward_table.unsqueeze(0).expand(T, -1, -1, -1).gather(3, code.unsqueeze(3)).squeeze(3)
        self.cells = landing[:, :, -1]
        self._moved_since = None
        return CoreStep(rewards, flags[2], flags[:2].transpose(0, 1), new_field)

    def _advance(self, ca: Tensor, ea: Tensor) -> CoreStep:
        """Steps 1-4 and 7 of SPEC §1.2 plus the rewards; moves the agents and returns the core flags."""
        # 1-3. both moves and the collision flags: one row of the transition table (see _transition)
        row = self._transition[_transition_row(self.pair, ca, ea)]
        cols = row.t()  # c', e', chaser blocked, explorer blocked, 2 · collision, pair'
        flags = cols[2:5].bool()
        # 4. new field: own landing cell not yet visited (a blocked or bumped agent stays on a visited cell).
        landing = (cols[:2] + self._visited_offset).reshape(-1)
        visited = self.visited.view(-1)
        new_field = ~(flags[:2] | visited[landing].view(2, -1))
        visited[landing] = True
        # Rewards (SPEC §2): baseline < own new field < shared collision; code = new_field + 2 · collision.
        rewards = self._reward_table.gather(2, torch.add(cols[4], new_field).unsqueeze(2)).squeeze(2)
        # 7. step count.
        self.cells, self.pair = cols[:2], cols[5]
        self.t += 1
        return CoreStep(rewards, flags[2], flags[:2], new_field)

    def _inert_info(self) -> StepInfo:
        zeros = torch.zeros(self.batch, device=self.device)
        values = {f.name: torch.zeros(self.batch, dtype=torch.bool, device=self.device) for f in fields(StepInfo)}
        values.update(chaser_reward=zeros, explorer_reward=zeros.clone(),
                      done=torch.ones(self.batch, dtype=torch.bool, device=self.device))
        return StepInfo(**values)


__all__ = ["ChaseEnv", "CoreStep", "StepInfo", "obs_from_index", "NOT_VISIBLE", "ACTION_DELTAS", "ACTION_NAMES", "GRID", "N_CELLS", "OBS_DIM", "FOV_RADIUS",
           "N_ACTIONS", "REWARD_TABLE", "EVENT_NAMES"]
