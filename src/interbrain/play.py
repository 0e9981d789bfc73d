"""Playing and recording episodes for evaluation, analysis rollouts and perturbation (SPEC §5.2, §5.3, §6.6).

Seeding is per episode, so results do not depend on the batch size and every condition of a comparison faces the same
worlds: episode ``e`` of a run with seed ``s`` draws its spawn from the stream ``world.e``, the trained agents' sampling
noise from ``sample.<agent>.e`` and a uniform-random opponent's actions from ``random.<agent>.e``. All streams are
drawn up front on the CPU (so CPU and CUDA runs see identical worlds and noise) and moved to the device.

Time alignment (SPEC §5.3): index t of a state series (positions, distance, FOV; length T+1) is s_t, the state before
action t. Observation, hidden, logits, value and action at t are computed from s_t, so hidden[t] produced action[t].
Rewards and events at t describe s_t -> s_{t+1}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from interbrain.agents import Agent
from interbrain.config import EnvConfig
from interbrain.degenerate import degenerate_flags, oscillation_run
from interbrain.env import EVENT_NAMES, ChaseEnv
from interbrain.train import derive_seed

AGENTS = ("chaser", "explorer")
ALIGNMENT = ("index t of a state series (pos, distance, fov; length T+1) is s_t, the state before action t; obs, hidden, "
             "logits, value, logp and action at t are computed from s_t (hidden[t] produced action[t]); rewards and "
             "events at t describe s_t -> s_{t+1}")


@dataclass
class Policy:
    """Who acts for one role: a trained network (sampling, or greedy) or a uniform-random agent (never run)."""

    agent: Agent | None = None  # None: uniform random
    greedy: bool = False
    # perturbation (SPEC §6.6): hidden -> hidden' applied at every step; `recurrent` also carries h' forward
    intervention: Callable[[torch.Tensor], torch.Tensor] | None = None
    intervention_target: str = "readout"

    @property
    def is_random(self) -> bool:
        return self.agent is None


def episode_seeds(seed: int, episodes: int) -> np.ndarray:
    return np.array([derive_seed(seed, f"world.{e}") for e in range(episodes)], dtype=np.int64)


def spawns(env_config: EnvConfig, world_seeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Each episode's spawn from its own world seed, by the environment's own spawn rule."""
    chaser, explorer = [], []
    one = ChaseEnv(env_config, 1)
    for s in world_seeds:
        one.reset(torch.Generator().manual_seed(int(s)))
        chaser.append(one.chaser_pos[0])
        explorer.append(one.explorer_pos[0])
    return torch.stack(chaser), torch.stack(explorer)


def _noise(seed: int, stream: str, episodes: int, shape: tuple, kind: str) -> torch.Tensor:
    out = []
    for e in range(episodes):
        g = torch.Generator().manual_seed(derive_seed(seed, f"{stream}.{e}"))
        out.append(torch.rand(shape, generator=g) if kind == "uniform" else torch.randint(0, 4, shape, generator=g))
    return torch.stack(out, dim=1)  # [T, E, ...]


@torch.no_grad()
def play(env_config: EnvConfig, policies: dict[str, Policy], *, episodes: int, seed: int,
         device: torch.device | str = "cpu", record_hidden: bool = True,
         degenerate_rule: str = "default") -> dict[str, np.ndarray]:
    """Play ``episodes`` episodes of ``env_config.horizon`` steps and return the SPEC §5.3 tensors as numpy arrays."""
    device = torch.device(device)
    T, E = env_config.horizon, episodes
    world = episode_seeds(seed, E)
    env = ChaseEnv(env_config, E, device)
    c0, e0 = spawns(env_config, world)
    env.reset(None, chaser_pos=c0, explorer_pos=e0)
    noise = {a: (_noise(seed, f"random.{a}", E, (T,), "int") if policies[a].is_random
                 else _noise(seed, f"sample.{a}", E, (T, 4), "uniform")).to(device) for a in AGENTS}
    states = {a: policies[a].agent.initial_state(E, device) for a in AGENTS if not policies[a].is_random}

    rec: dict[str, list] = {k: [] for k in ("chaser_pos", "explorer_pos", "distance", "chaser_fov", "explorer_fov")}
    per_step = {k: [] for k in [f"{a}_{q}" for a in AGENTS for q in ("obs", "hidden", "logits", "value", "logp", "action",
                                                                      "reward", "hidden_used")] + list(EVENT_NAMES)}

    def record_state():
        rec["chaser_pos"].append(env.chaser_pos.clone())
        rec["explorer_pos"].append(env.explorer_pos.clone())
        rec["distance"].append(env.distance())
        fov = env.fov()
        rec["chaser_fov"].append(fov)
        rec["explorer_fov"].append(fov)

    record_state()
    for t in range(T):
        obs = dict(zip(AGENTS, env.observations()))
        actions = {}
        for a in AGENTS:  # chaser first
            pol = policies[a]
            per_step[f"{a}_obs"].append(obs[a].to(torch.uint8))
            if pol.is_random:
                actions[a] = noise[a][t]
                continue
            logits, value, hidden, new_state = pol.agent.step(obs[a], states[a])
            if pol.intervention is not None:
                used = pol.intervention(hidden)
                logits, value = pol.agent.readout(used)
                if pol.intervention_target == "recurrent":
                    new_state = pol.agent.with_hidden(new_state, used)
                per_step[f"{a}_hidden_used"].append(used)
            states[a] = new_state
            logp_all = torch.log_softmax(logits, -1)
            if pol.greedy:
                act = logits.argmax(-1)
            else:
                gumbel = -torch.log(-torch.log(noise[a][t].clamp_min(1e-20)))
                act = torch.argmax(logits + gumbel, -1)
            actions[a] = act
            if record_hidden:
                per_step[f"{a}_hidden"].append(hidden)
                for site, value in pol.agent.extra_sites(new_state).items():
                    per_step.setdefault(f"{a}_{site}", []).append(value)
            per_step[f"{a}_logits"].append(logits)
            per_step[f"{a}_value"].append(value)
            per_step[f"{a}_logp"].append(logp_all.gather(-1, act[:, None]).squeeze(-1))
        info = env.step(actions["chaser"], actions["explorer"])
        for a in AGENTS:
            per_step[f"{a}_action"].append(actions[a].to(torch.int8))
        per_step["chaser_reward"].append(info.chaser_reward)
        per_step["explorer_reward"].append(info.explorer_reward)
        for k in EVENT_NAMES:
            per_step[k].append(getattr(info, k))
        record_state()

    out: dict[str, np.ndarray] = {}
    for k, v in rec.items():
        out[k] = torch.stack(v).cpu().numpy()
    out["chaser_pos"] = out["chaser_pos"].astype(np.int16)
    out["explorer_pos"] = out["explorer_pos"].astype(np.int16)
    out["distance"] = out["distance"].astype(np.float32)
    for k, v in per_step.items():
        if v:
            out[k] = torch.stack(v).cpu().numpy()
    for k in ("chaser_value", "explorer_value", "chaser_logp", "explorer_logp"):
        if k in out:
            out[k] = out[k].astype(np.float32)
    out["episode_world_seed"] = world
    flags = degenerate_flags(torch.as_tensor(out["chaser_stuck"]), torch.as_tensor(out["explorer_stuck"]), T,
                             degenerate_rule)
    out.update({k: v.cpu().numpy() for k, v in flags.items()})
    out["episode_chaser_oscillation_run"] = oscillation_run(torch.as_tensor(out["chaser_pos"])).cpu().numpy()
    out["episode_explorer_oscillation_run"] = oscillation_run(torch.as_tensor(out["explorer_pos"])).cpu().numpy()
    return out


def behaviour_metrics(ep: dict[str, np.ndarray]) -> dict[str, float]:
    """SPEC §5.2 metrics, means over episodes."""
    T = ep["collision"].shape[0]
    fov_post = ep["chaser_fov"][1:].astype(float)  # s_1..s_H
    m = {
        "collisions_per_episode": ep["collision"].sum(0).mean(),
        "chaser_partner_in_view": fov_post.mean(),
        "explorer_partner_in_view": ep["explorer_fov"][1:].astype(float).mean(),
        "chaser_new_fields": ep["chaser_new_field"].sum(0).mean(),
        "explorer_new_fields": ep["explorer_new_field"].sum(0).mean(),
        "mean_distance": ep["distance"][1:].mean(),
        "final_distance": ep["distance"][T].mean(),
        "chaser_return": ep["chaser_reward"].sum(0).mean(),
        "explorer_return": ep["explorer_reward"].sum(0).mean(),
        "degenerate_episodes": ep["episode_degenerate"].sum(),
        "degenerate_fraction": ep["episode_degenerate"].mean(),
        "chaser_stuck_run_steps": ep["episode_chaser_stuck_run"].mean(),
        "explorer_stuck_run_steps": ep["episode_explorer_stuck_run"].mean(),
        "joint_stuck_run_steps": ep["episode_joint_stuck_run"].mean(),
    }
    return {k: float(v) for k, v in m.items()}
