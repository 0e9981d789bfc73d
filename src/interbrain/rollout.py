"""Analysis rollouts, protocol ``analysis_selfplay_v1`` (SPEC §5.3): self-play episodes with every hidden state.

A rollout file is safetensors: the tensors of SPEC §5.3 and JSON metadata (schema version, protocol, checkpoint path,
sha256 and update, unit, arch, size, task, visibility, opponent, episodes, H, seed, sampling mode, the degenerate rule and
threshold, the time-alignment statement, the transformer window/position mode, provenance).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from interbrain.checkpoint import load_agents
from interbrain.config import VISIBILITIES, EnvConfig
from interbrain.errors import InterbrainError, check_choice
from interbrain.io import atomic_path, sha256_file
from interbrain.play import ALIGNMENT, Policy, play
from interbrain.provenance import provenance, resolve_device

PROTOCOL = "analysis_selfplay_v1"
SCHEMA_VERSION = 1
OPPONENTS = ("trained", "random")


def save_rollout(data: dict[str, np.ndarray], meta: dict, path: str | Path) -> Path:
    arrays = {k: np.ascontiguousarray(v) for k, v in data.items()}
    for k, v in arrays.items():
        if v.dtype == np.bool_:
            arrays[k] = v  # safetensors stores bool natively
        if np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            raise InterbrainError(f"refusing to write rollout {path}: tensor {k} is not finite")
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata={k: json.dumps(v, default=str) for k, v in meta.items()})
    return Path(path)


def load_rollout(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Load a rollout file and validate its protocol and schema version; one-line errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InterbrainError(f"missing rollout {path}")
    try:
        with safe_open(str(path), framework="numpy") as fh:
            raw = fh.metadata() or {}
        data = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InterbrainError(f"corrupt rollout {path}: {str(exc).splitlines()[0]}") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise InterbrainError(f"corrupt rollout {path}: metadata is not JSON") from None
    if meta.get("protocol") not in (PROTOCOL, "perturbation_v1") or meta.get("schema_version") != SCHEMA_VERSION:
        raise InterbrainError(f"invalid rollout {path}: protocol {meta.get('protocol')!r} schema "
                              f"{meta.get('schema_version')!r}, expected {PROTOCOL!r} schema {SCHEMA_VERSION}")
    return data, meta


def rollout_checkpoint(checkpoint: str | Path, out: str | Path, *, episodes: int = 25, steps: int = 500, seed: int = 0,
                       visibility: str | None = None, opponent: str = "trained", device: str = "auto",
                       degenerate_rule: str = "default") -> Path:
    """Self-play (or vs a uniform-random explorer) with hidden states recorded; writes one safetensors file."""
    if visibility is not None:
        check_choice("visibility", visibility, VISIBILITIES)
    check_choice("opponent", opponent, OPPONENTS)
    dev = resolve_device(device)
    ckpt, agents = load_agents(checkpoint, device=dev)
    cfg = ckpt.config
    env_cfg = EnvConfig(task=cfg.env.task, visibility=visibility or cfg.env.visibility, spawn=cfg.env.spawn, horizon=steps)
    policies = {"chaser": Policy(agents["chaser"]),
                "explorer": Policy(agents["explorer"] if opponent == "trained" else None)}
    data = play(env_cfg, policies, episodes=episodes, seed=seed, device=dev, degenerate_rule=degenerate_rule)
    for k in ("chaser_hidden_used", "explorer_hidden_used"):
        data.pop(k, None)
    meta = {
        "protocol": PROTOCOL, "schema_version": SCHEMA_VERSION,
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_file(checkpoint), "update": ckpt.update},
        "unit_id": cfg.unit_id, "arch": cfg.agent.arch, "size": cfg.agent.size, "task": cfg.env.task, "seed": cfg.seed,
        "visibility": env_cfg.visibility, "opponent": opponent, "episodes": episodes, "horizon": steps,
        "rollout_seed": seed, "sampling": "sampled", "degenerate_rule": degenerate_rule,
        "degenerate_threshold_steps": int(data["episode_threshold_steps"][0]), "alignment": ALIGNMENT,
        "agent_card": agents["chaser"].card(),
        "transformer": {"window": cfg.agent.window, "pos": cfg.agent.pos,
                        "max_position_used": getattr(agents["chaser"], "max_position_used", None),
                        "max_context_used": getattr(agents["chaser"], "max_context_used", None)},
        "action_head_weight": {a: agents[a].action_head.weight.detach().cpu().tolist() for a in agents},
        "provenance": provenance(dev),
    }
    return save_rollout(data, meta, out)


__all__ = ["rollout_checkpoint", "load_rollout", "save_rollout", "PROTOCOL", "SCHEMA_VERSION"]

MIN_VALID_EPISODES = 3  # SPEC §5.4: fewer valid episodes -> degenerate_unit


def rollout_identity(path: str | Path, data: dict[str, np.ndarray], meta: dict, *, protocol: str,
                     schema_version: int = 1) -> dict:
    """The identity columns shared by every analysis CSV row (docs/ARTIFACTS.md)."""
    valid = ~data["episode_degenerate"].astype(bool)
    n_valid = int(valid.sum())
    return {
        "schema_version": schema_version, "protocol": protocol, "unit_id": meta["unit_id"], "arch": meta["arch"],
        "size": meta["size"], "task": meta["task"], "seed": meta["seed"], "update": meta["checkpoint"]["update"],
        "visibility": meta["visibility"], "rollout": str(path), "rollout_sha256": sha256_file(path),
        "n_valid_episodes": n_valid,
        "status": "ok" if n_valid >= MIN_VALID_EPISODES else "degenerate_unit",
        "reason": "" if n_valid >= MIN_VALID_EPISODES else f"{n_valid} valid episodes < {MIN_VALID_EPISODES}",
    }
