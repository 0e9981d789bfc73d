"""Degenerate-episode flags (SPEC §1.5): stuck runs, the two-cell oscillation run, and the default/joint rules.

All inputs are time-major (torch tensors or numpy arrays); results are torch tensors on the input's device
(numpy inputs give CPU tensors). Flags are masks: nothing here drops an episode.

- ``longest_run(flags)``: per episode, the longest run of consecutive True steps.
- ``oscillation_run(pos)``: per episode, the longest two-cell oscillation, counted in moves (see its docstring).
- ``degenerate_flags(chaser_stuck, explorer_stuck, horizon, rule)``: the §1.5 rule.
  ``default``: degenerate iff max(R_c, R_e, R_joint) > 0.01*H (strict), i.e. some run reaches floor(H/100) + 1 steps
  (2 at H = 100, 6 at H = 500). ``joint``: degenerate iff R_joint > 5, i.e. a joint run of 6 steps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from interbrain.config import DEGENERATE_RULES
from interbrain.errors import InterbrainError, check_choice

JOINT_RULE_THRESHOLD = 6  # R_joint > 5


def _as_tensor(key: str, value) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise InterbrainError(f"{key} must be a torch tensor or numpy array, got {type(value).__name__}")


def _bool_flags(key: str, flags) -> Tensor:
    flags = _as_tensor(key, flags)
    if flags.dtype != torch.bool:
        raise InterbrainError(f"{key} must be a boolean array, got dtype {flags.dtype}")
    if flags.dim() != 2:
        raise InterbrainError(f"{key} must have shape [T, E] (time-major), got {list(flags.shape)}")
    return flags


def longest_run(flags) -> Tensor:
    """Longest run of consecutive True values along time: bool [T, E] -> long [E] (0 where never True)."""
    flags = _bool_flags("flags", flags)
    T, E = flags.shape
    if T == 0:
        return torch.zeros(E, dtype=torch.long, device=flags.device)
    steps = torch.arange(T, device=flags.device).unsqueeze(1).expand(T, E)
    # The last False at or before t (-1 if none); the run ending at t is t minus it (0 when flags[t] is False).
    last_false = torch.where(flags, torch.full_like(steps, -1), steps).cummax(0).values
    return (steps - last_false).amax(0)


def oscillation_run(pos) -> Tensor:
    """Longest two-cell oscillation per episode: int [T+1, E, 2] state series s_0..s_T -> long [E].

    The value counts *moves* (transitions s_t -> s_{t+1} with s_{t+1} != s_t) in the longest stretch of states
    s_i, ..., s_j that alternates between two distinct cells A, B, A, B, ... (every step a real move and
    s_{k+2} = s_k throughout). So A,B,A,B,A is 4; a lone move A,B (no return) is 1; an episode that never moves is 0.
    Blocked and wall-bump steps are not moves and break a run; A,B,C is two stretches of 1 move each.
    """
    pos = _as_tensor("pos", pos)
    if pos.dim() != 3 or pos.shape[-1] != 2 or pos.shape[0] < 1:
        raise InterbrainError(f"pos must have shape [T+1, E, 2] (time-major state series), got {list(pos.shape)}")
    if pos.dtype == torch.bool or pos.is_floating_point() or pos.is_complex():
        raise InterbrainError(f"pos must hold integer cells, got dtype {pos.dtype}")
    moved = (pos[1:] != pos[:-1]).any(-1)  # [T, E]
    any_move = moved.any(0).long()
    if pos.shape[0] < 3:
        return any_move
    # Move pair (t, t+1) is a back-and-forth A -> B -> A: s_{t+1} != s_t and s_{t+2} == s_t.
    back = moved[:-1] & (pos[2:] == pos[:-2]).all(-1)  # [T-1, E]
    pairs = longest_run(back)  # L consecutive back-and-forth pairs span L + 1 moves
    return torch.where(pairs > 0, pairs + 1, any_move)


def threshold_steps(horizon: int, rule: str = "default") -> int:
    """The shortest run that makes an episode degenerate: floor(H/100) + 1 (> 0.01*H) or 6 (joint rule)."""
    check_choice("degenerate", rule, DEGENERATE_RULES)
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon <= 0:
        raise InterbrainError(f"horizon must be a positive integer, got {horizon!r}")
    return int(horizon) // 100 + 1 if rule == "default" else JOINT_RULE_THRESHOLD


def degenerate_flags(chaser_stuck, explorer_stuck, horizon: int, rule: str = "default") -> dict[str, Tensor]:
    """SPEC §1.5 from the per-step stuck flags (bool [T, E] each, time-major).

    Returns ``episode_degenerate`` (bool [E]); ``episode_chaser_stuck_run``, ``episode_explorer_stuck_run``,
    ``episode_joint_stuck_run`` (long [E], the longest run of each flag and of both together); and
    ``episode_threshold_steps`` (long [E], the run length that makes an episode degenerate under ``rule``).
    Collision-blocked steps are not stuck by construction of the flags (SPEC §1.2).
    """
    threshold = threshold_steps(horizon, rule)
    chaser_stuck = _bool_flags("chaser_stuck", chaser_stuck)
    explorer_stuck = _bool_flags("explorer_stuck", explorer_stuck)
    if chaser_stuck.shape != explorer_stuck.shape:
        raise InterbrainError(f"chaser_stuck {list(chaser_stuck.shape)} and explorer_stuck "
                              f"{list(explorer_stuck.shape)} must have the same shape")
    explorer_stuck = explorer_stuck.to(chaser_stuck.device)
    r_chaser = longest_run(chaser_stuck)
    r_explorer = longest_run(explorer_stuck)
    r_joint = longest_run(chaser_stuck & explorer_stuck)
    if rule == "default":
        degenerate = torch.maximum(torch.maximum(r_chaser, r_explorer), r_joint) >= threshold
    else:
        degenerate = r_joint >= threshold
    return {
        "episode_degenerate": degenerate,
        "episode_chaser_stuck_run": r_chaser,
        "episode_explorer_stuck_run": r_explorer,
        "episode_joint_stuck_run": r_joint,
        "episode_threshold_steps": torch.full_like(r_chaser, threshold),
    }


__all__ = ["longest_run", "oscillation_run", "degenerate_flags", "threshold_steps", "JOINT_RULE_THRESHOLD"]
