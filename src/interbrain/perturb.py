"""Shared-subspace removal (perturbation), SPEC §6.6.

Basis: pooled PLSC on the unit's final-checkpoint analysis rollout (valid episodes only): the chaser's mean mu, scale
sigma and its top-k loadings P in standardised coordinates, plus the control bases (see
:func:`interbrain.analysis.subspace.perturbation_bases`). At every chaser step: u = (h - mu)/sigma; u' = u - QQ^T u;
h' = mu + sigma * u' (pitfall 2: standardise -> project -> map back). Target ``readout``: h' feeds only this step's
logits and value; ``recurrent``: h' also becomes the carried state (only where the architecture carries `hidden`).

Evaluation: ``episodes`` x ``steps`` per condition against a uniform-random explorer (default) or the trained explorer;
every condition shares the per-episode world seeds and sampling streams (validated: identical spawns), so per-episode
deltas against ``baseline`` are paired.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from interbrain.analysis.subspace import apply_removal, perturbation_bases
from interbrain.checkpoint import load_agents
from interbrain.config import EnvConfig
from interbrain.errors import InterbrainError, check_choice
from interbrain.io import atomic_path, sha256_file
from interbrain.play import Policy, play
from interbrain.provenance import resolve_device
from interbrain.rollout import load_rollout

PROTOCOL = "perturbation_v1"
SCHEMA_VERSION = 1
CONDITIONS = ("baseline", "shared_removed", "random_orthogonal", "top_unique_removed", "paper_control")
TARGETS = ("readout", "recurrent")
OPPONENTS = ("random", "trained")
MIN_VALID_EPISODES = 3
FIELDS = ("schema_version", "protocol", "unit_id", "arch", "size", "task", "seed", "update", "visibility", "rollout",
          "rollout_sha256", "n_valid_episodes", "status", "reason", "condition", "target", "opponent", "episode",
          "collisions", "partner_in_view", "mean_distance", "delta_collisions", "delta_partner_in_view",
          "delta_mean_distance", "removed_variance", "rank")


def per_episode_behaviour(ep: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"collisions": ep["collision"].sum(0).astype(float),
            "partner_in_view": ep["chaser_fov"][1:].mean(0).astype(float),
            "mean_distance": ep["distance"][1:].mean(0).astype(float)}


def _write_csv(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)


def perturb_unit(checkpoint, rollout, out_csv, out_bases, *, episodes: int = 100, steps: int = 100, seed: int = 0,
                 opponent: str = "random", k: int = 10, targets=TARGETS, conditions=CONDITIONS,
                 device: str = "auto") -> Path:
    check_choice("opponent", opponent, OPPONENTS)
    for t in targets:
        check_choice("target", t, TARGETS)
    for c in conditions:
        check_choice("condition", c, CONDITIONS)
    if "baseline" not in conditions:
        raise InterbrainError("conditions must include 'baseline' (deltas are paired against it)")
    dev = resolve_device(device)
    ckpt, agents = load_agents(checkpoint, device=dev)
    data, meta = load_rollout(rollout)
    cfg = ckpt.config
    valid = ~data["episode_degenerate"].astype(bool)
    ident = {"schema_version": SCHEMA_VERSION, "protocol": PROTOCOL, "unit_id": cfg.unit_id, "arch": cfg.agent.arch,
             "size": cfg.agent.size, "task": cfg.env.task, "seed": cfg.seed, "update": ckpt.update,
             "visibility": meta["visibility"], "rollout": str(rollout), "rollout_sha256": sha256_file(rollout),
             "n_valid_episodes": int(valid.sum()), "opponent": opponent}
    if valid.sum() < MIN_VALID_EPISODES:
        _write_csv([{**ident, "status": "degenerate_unit",
                     "reason": f"{int(valid.sum())} valid episodes < {MIN_VALID_EPISODES}"}], Path(out_csv))
        with atomic_path(out_bases) as tmp:
            save_file({"empty": np.zeros(0, np.float32)}, str(tmp), metadata={"status": "degenerate_unit"})
        return Path(out_csv)

    T = data["chaser_hidden"].shape[0]
    X = data["chaser_hidden"][:, valid].transpose(1, 0, 2).reshape(-1, data["chaser_hidden"].shape[-1])
    Y = data["explorer_hidden"][:, valid].transpose(1, 0, 2).reshape(-1, data["explorer_hidden"].shape[-1])
    bases = perturbation_bases(X, Y, k=k, seed=seed, episode_lengths=[T] * int(valid.sum()))
    with atomic_path(out_bases) as tmp:
        save_file({n: np.ascontiguousarray(v) for n, v in bases.to_tensors().items()}, str(tmp),
                  metadata={"protocol": PROTOCOL, "schema_version": str(SCHEMA_VERSION),
                            "bases": json.dumps(bases.metadata(), default=float)})

    mu = torch.as_tensor(bases.mu, dtype=torch.float32, device=dev)
    sigma = torch.as_tensor(bases.sigma, dtype=torch.float32, device=dev)
    env_cfg = EnvConfig(task=cfg.env.task, visibility=cfg.env.visibility, spawn=cfg.env.spawn, horizon=steps)
    explorer = Policy(None if opponent == "random" else agents["explorer"])

    def run(cond: str, target: str) -> dict[str, np.ndarray]:
        if cond == "baseline":
            chaser = Policy(agents["chaser"])
        else:
            Q = torch.as_tensor(bases.bases[cond], dtype=torch.float32, device=dev)
            chaser = Policy(agents["chaser"], intervention=lambda h, Q=Q: apply_removal(h, mu, sigma, Q),
                            intervention_target=target)
        return play(env_cfg, {"chaser": chaser, "explorer": explorer}, episodes=episodes, seed=seed, device=dev,
                    record_hidden=False)

    baseline = run("baseline", "readout")
    base_beh = per_episode_behaviour(baseline)
    rows = []
    carries = agents["chaser"].carries_hidden
    for target in targets:
        if target == "recurrent" and not carries:
            continue  # recorded as not applicable: no rows for this target
        for cond in conditions:
            ep = baseline if cond == "baseline" else run(cond, target)
            if not np.array_equal(ep["chaser_pos"][0], baseline["chaser_pos"][0]) or not np.array_equal(
                    ep["explorer_pos"][0], baseline["explorer_pos"][0]):
                raise InterbrainError(f"perturbation condition {cond} did not start from the baseline's worlds")
            beh = per_episode_behaviour(ep)
            Q = bases.bases[cond]
            for e in range(episodes):
                rows.append({**ident, "status": "ok", "reason": "", "condition": cond, "target": target, "episode": e,
                             **{m: beh[m][e] for m in beh},
                             **{f"delta_{m}": beh[m][e] - base_beh[m][e] for m in beh},
                             "removed_variance": bases.removed_variance[cond], "rank": int(Q.shape[1])})
    _write_csv(rows, Path(out_csv))
    return Path(out_csv)
