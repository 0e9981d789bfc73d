"""A written-out acting loop's work between the agents' products, as compiled loops (numba; issue 6): the pair's
input rows from the observation table, and the Gumbel-max actions with the environment's move.

Per step the torch form of this is five to eight kernel calls on 40-episode tensors (``index_select``,
``embedding_bag``, two ``add``, ``argmax``, ``index_select``), each a few microseconds of set-up around almost no
work: the RNN's acting loop spent ≈ 35 µs a step there (session 20). Here it is two calls. The values are those of the
torch form (integer arithmetic, table rows added as ``embedding_bag``'s sum adds them, ``argmax``'s first maximum with
NaN counted as the largest), so a loop using these gives the same bits as the per-step calls it replaces
(``tests/test_fast_paths.py``, ``tests/test_step_kernels.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from interbrain.env import N_ACTIONS

NO_OFFSETS = np.empty(0, np.int64)  # no per-episode offsets (gather_inputs, acting_kernels.embed_step)


def loop_arrays(obs: torch.Tensor, episode_offset: torch.Tensor | None,
                next_pair: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ChaseEnv.acting_tables``' tensors as the compiled loops take them: numpy views of the observation table and
    of the transition table, and the per-episode row offsets (:data:`NO_OFFSETS` without)."""
    return obs.numpy(), NO_OFFSETS if episode_offset is None else episode_offset.numpy(), next_pair.numpy()


@njit(cache=True, boundscheck=False)
def gather_inputs(obs, at, episode_offset, table, out):
    """out[a, b] = table[r0] + table[r1] with (r0, r1) = obs[a, at[b] + episode_offset[b]] (no offset when
    ``episode_offset`` is empty): each agent's observation rows of the pair state ``at[b]`` (the table of
    ``ChaseEnv.acting_tables``, rows already offset into the stacked input table) summed, [agents, B, width]."""
    per_episode = episode_offset.shape[0] > 0
    for b in range(at.shape[0]):
        row = at[b] + episode_offset[b] if per_episode else at[b]
        for a in range(out.shape[0]):
            first, second = table[obs[a, row, 0]], table[obs[a, row, 1]]
            target = out[a, b]
            for i in range(target.shape[0]):
                target[i] = first[i] + second[i]


@njit(cache=True, boundscheck=False)
def sample_and_move(logits, noise, pair, next_pair, actions, pair_out):
    """Gumbel-max actions ``actions[a, b]`` = argmax_k (logits[a, b, k] + noise[a, b, k]) (the first maximum; a NaN
    counts as the largest, as torch's ``argmax``), then the next pair state from the environment's transition table:
    ``pair_out[b] = next_pair[16 · pair[b] + 4 · chaser action + explorer action]`` (``ChaseEnv.next_pair``)."""
    for b in range(pair.shape[0]):
        for a in range(2):
            best = logits[a, b, 0] + noise[a, b, 0]
            pick = 0
            for k in range(1, N_ACTIONS):
                value = logits[a, b, k] + noise[a, b, k]
                if value > best or (value != value and best == best):
                    best = value
                    pick = k
            actions[a, b] = pick
        pair_out[b] = next_pair[N_ACTIONS * N_ACTIONS * pair[b] + N_ACTIONS * actions[0, b] + actions[1, b]]
