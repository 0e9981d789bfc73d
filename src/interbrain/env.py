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


EVENT_NAMES = tuple(f.name for f in fields(StepInfo) if f.name not in ("chaser_reward", "explorer_reward", "done"))


def _flat(pos: Tensor) -> Tensor:
    return pos[:, 0] * GRID + pos[:, 1]


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().sum(-1)


class ChaseEnv:
    """B chase-grid episodes stepped together (SPEC §1).

    Public state: ``chaser_pos``, ``explorer_pos`` (long [B,2], row/col), ``chaser_visited``,
    ``explorer_visited`` (bool [B,100]) and ``t`` (python int, shared by all episodes).
    """

    def __init__(self, config: EnvConfig, batch: int, device: torch.device | str = "cpu"):
        if not isinstance(config, EnvConfig):
            raise InterbrainError(f"env config must be an EnvConfig, got {type(config).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
            raise InterbrainError(f"batch must be a positive integer, got {batch!r}")
        self.config = config
        self.batch = batch
        self.device = torch.empty(0, device=device).device  # canonical form, e.g. "cuda" -> "cuda:0"
        self.horizon = config.horizon
        self.visibility = config.visibility
        collide_c, new_c, base_c = REWARD_TABLE[config.task]["chaser"]
        collide_e, new_e, base_e = REWARD_TABLE[config.task]["explorer"]
        self._chaser_rewards = (collide_c, new_c, base_c)
        self._explorer_rewards = (collide_e, new_e, base_e)
        self._deltas = ACTION_DELTAS.to(self.device)
        self._rows = torch.arange(batch, device=self.device)
        self.chaser_pos: Tensor | None = None
        self.explorer_pos: Tensor | None = None
        self.chaser_visited: Tensor | None = None
        self.explorer_visited: Tensor | None = None
        self.t = 0

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
        if chaser_pos is None or explorer_pos is None:
            if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
                raise InterbrainError(f"reset needs a CPU torch.Generator to draw spawns, got {generator!r}")
        high = GRID if self.config.spawn == "full" else GRID - 1
        B = self.batch
        if chaser_pos is None:
            chaser = torch.randint(0, high, (B, 2), generator=generator)
        else:
            chaser = self._check_positions("chaser_pos", chaser_pos)
        if explorer_pos is None:
            explorer = torch.randint(0, high, (B, 2), generator=generator)
            same = (explorer == chaser).all(-1)
            while same.any():  # redraw only the episodes whose explorer landed on the chaser
                explorer[same] = torch.randint(0, high, (int(same.sum()), 2), generator=generator)
                same = (explorer == chaser).all(-1)
        else:
            explorer = self._check_positions("explorer_pos", explorer_pos)
            clash = (explorer == chaser).all(-1)
            if clash.any():
                i = int(clash.nonzero()[0, 0])
                raise InterbrainError(f"explorer_pos equals chaser_pos in episode {i}: {chaser[i].tolist()}; "
                                      "agents never share a cell")
        self.chaser_pos = chaser.to(self.device)
        self.explorer_pos = explorer.to(self.device)
        self.chaser_visited = torch.zeros(B, N_CELLS, dtype=torch.bool, device=self.device)
        self.explorer_visited = torch.zeros(B, N_CELLS, dtype=torch.bool, device=self.device)
        self.chaser_visited[self._rows, _flat(self.chaser_pos)] = True
        self.explorer_visited[self._rows, _flat(self.explorer_pos)] = True
        self.t = 0

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
        if self.chaser_pos is None:
            raise InterbrainError("the environment has not been reset; call reset(generator) first")

    # --- state readouts --------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.t >= self.horizon

    def fov(self) -> Tensor:
        """Physical field of view on s_t (SPEC §1.3): Chebyshev distance <= 3; symmetric; independent of visibility."""
        self._require_state()
        return (self.chaser_pos - self.explorer_pos).abs().amax(-1) <= FOV_RADIUS

    def distance(self) -> Tensor:
        """Euclidean distance between the agents' cells on s_t, float32 [B]."""
        self._require_state()
        return _sq_dist(self.chaser_pos, self.explorer_pos).float().sqrt()

    def observations(self) -> tuple[Tensor, Tensor]:
        """(chaser_obs, explorer_obs), float32 [B,200] built from s_t (SPEC §1.3).

        Entries 0..99 one-hot the agent's own cell; entries 100..199 one-hot the partner's cell when the visibility
        mode shows it (partial: inside the physical FOV; full: always; none: never).
        """
        self._require_state()
        c = _flat(self.chaser_pos).unsqueeze(1)
        e = _flat(self.explorer_pos).unsqueeze(1)
        chaser_obs = torch.zeros(self.batch, OBS_DIM, device=self.device)
        explorer_obs = torch.zeros(self.batch, OBS_DIM, device=self.device)
        chaser_obs.scatter_(1, c, 1.0)
        explorer_obs.scatter_(1, e, 1.0)
        if self.visibility == "full":
            chaser_obs.scatter_(1, e + N_CELLS, 1.0)
            explorer_obs.scatter_(1, c + N_CELLS, 1.0)
        elif self.visibility == "partial":
            seen = self.fov().to(torch.float32).unsqueeze(1)
            chaser_obs.scatter_(1, e + N_CELLS, seen)
            explorer_obs.scatter_(1, c + N_CELLS, seen)
        return chaser_obs, explorer_obs

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
        ca, ea = self._check_actions(chaser_action, explorer_action)
        if self.done:
            return self._inert_info()
        c, e = self.chaser_pos, self.explorer_pos

        # 1. chaser: blocked by the explorer's old cell.
        c_star = (c + self._deltas[ca]).clamp_(0, GRID - 1)
        chaser_collision = (c_star == e).all(-1)
        c_new = torch.where(chaser_collision.unsqueeze(1), c, c_star)
        # 2. explorer: blocked by the chaser's new cell.
        e_star = (e + self._deltas[ea]).clamp_(0, GRID - 1)
        explorer_collision = (e_star == c_new).all(-1)
        e_new = torch.where(explorer_collision.unsqueeze(1), e, e_star)
        # 3. shared collision flag.
        collision = chaser_collision | explorer_collision

        # 4. new field: own landing cell not yet visited (a blocked or bumped agent stays on a visited cell).
        c_idx, e_idx = _flat(c_new), _flat(e_new)
        chaser_new_field = ~chaser_collision & ~self.chaser_visited.gather(1, c_idx.unsqueeze(1)).squeeze(1)
        explorer_new_field = ~explorer_collision & ~self.explorer_visited.gather(1, e_idx.unsqueeze(1)).squeeze(1)
        self.chaser_visited.scatter_(1, c_idx.unsqueeze(1), True)
        self.explorer_visited.scatter_(1, e_idx.unsqueeze(1), True)

        # 5-6. approach / escape, strict, against the partner's old cell.
        d_old = _sq_dist(c, e)
        chaser_approach = ~chaser_collision & ~chaser_new_field & (_sq_dist(c_new, e) < d_old)
        d_escape = _sq_dist(e_new, c)
        explorer_escape = ~explorer_collision & ~explorer_new_field & (d_escape > d_old)
        explorer_escape_close = explorer_escape & (d_escape < _NEAR_SQ)
        explorer_escape_far = explorer_escape & (d_escape >= _FAR_SQ)
        explorer_escape_near = explorer_escape & ~explorer_escape_close & ~explorer_escape_far

        # Stuck: acted, did not move, own collision flag false (a wall bump).
        chaser_stuck = ~chaser_collision & (c_new == c).all(-1)
        explorer_stuck = ~explorer_collision & (e_new == e).all(-1)

        # Rewards (SPEC §2): baseline < own new field < shared collision.
        chaser_reward = self._reward(self._chaser_rewards, chaser_new_field, collision)
        explorer_reward = self._reward(self._explorer_rewards, explorer_new_field, collision)

        # 7. step count.
        self.chaser_pos, self.explorer_pos = c_new, e_new
        self.t += 1
        done = torch.full((self.batch,), self.done, dtype=torch.bool, device=self.device)
        return StepInfo(
            chaser_reward=chaser_reward, explorer_reward=explorer_reward, collision=collision,
            chaser_collision=chaser_collision, explorer_collision=explorer_collision,
            chaser_new_field=chaser_new_field, explorer_new_field=explorer_new_field,
            chaser_approach=chaser_approach, explorer_escape=explorer_escape,
            explorer_escape_close=explorer_escape_close, explorer_escape_near=explorer_escape_near,
            explorer_escape_far=explorer_escape_far, chaser_stuck=chaser_stuck, explorer_stuck=explorer_stuck,
            done=done,
        )

    @staticmethod
    def _reward(values: tuple[float, float, float], new_field: Tensor, collision: Tensor) -> Tensor:
        on_collision, on_new_field, otherwise = values
        reward = torch.where(new_field, on_new_field, otherwise)
        return torch.where(collision, on_collision, reward).to(torch.float32)

    def _inert_info(self) -> StepInfo:
        zeros = torch.zeros(self.batch, device=self.device)
        values = {f.name: torch.zeros(self.batch, dtype=torch.bool, device=self.device) for f in fields(StepInfo)}
        values.update(chaser_reward=zeros, explorer_reward=zeros.clone(),
                      done=torch.ones(self.batch, dtype=torch.bool, device=self.device))
        return StepInfo(**values)


__all__ = ["ChaseEnv", "StepInfo", "ACTION_DELTAS", "ACTION_NAMES", "GRID", "N_CELLS", "OBS_DIM", "FOV_RADIUS",
           "N_ACTIONS", "REWARD_TABLE", "EVENT_NAMES"]
