"""Random-opponent behavioural evaluation, protocol ``random_opponent_v1`` (SPEC §5.2).

Every checkpoint plays two matchups, each ``episodes`` x ``steps`` with the trained agent sampling its actions:
``random_explorer`` (trained chaser vs a uniform-random explorer) and ``random_chaser`` (trained explorer vs a
uniform-random chaser); a ``random_vs_random`` row is the sanity baseline. Evaluation seed 0 everywhere: spawns and
the random agent's actions come from per-episode streams (see :mod:`interbrain.play`), so every checkpoint faces the
same worlds and the same opponent actions. One JSON line per (checkpoint, matchup, visibility).
"""

from __future__ import annotations

import sys
from pathlib import Path

from interbrain.checkpoint import health, load_agents
from interbrain.config import VISIBILITIES, EnvConfig, replace
from interbrain.errors import InterbrainError, check_choice
from interbrain.io import append_jsonl, read_jsonl, sha256_file
from interbrain.play import Policy, behaviour_metrics, play
from interbrain.provenance import now, provenance, resolve_device

PROTOCOL = "random_opponent_v1"
SCHEMA_VERSION = 1
MATCHUPS = {"random_explorer": "chaser", "random_chaser": "explorer", "random_vs_random": None}
RECORD_FIELDS = ("protocol", "schema_version", "created_at", "command", "checkpoint", "unit_id", "arch", "size", "task",
                 "seed", "update", "matchup", "focus_agent", "visibility", "episodes", "max_steps", "batch_size", "device",
                 "deterministic", "eval_seed", "checkpoint_health", "status", "error", "metrics", "provenance")


def _done_keys(out: Path) -> set:
    if not out.exists():
        return set()
    return {(r["checkpoint"]["sha256"], r["matchup"], r["visibility"]) for r in read_jsonl(out)
            if r.get("status") == "ok" and r.get("protocol") == PROTOCOL}


def evaluate_checkpoint(checkpoint: str | Path, out: str | Path, *, episodes: int = 100, steps: int = 100,
                        seed: int = 0, visibility: str | None = None, device: str = "auto", force: bool = False,
                        matchups=tuple(MATCHUPS)) -> list[dict]:
    """Evaluate one checkpoint; append one record per matchup to ``out`` (JSONL). Returns the records written."""
    for m in matchups:
        check_choice("matchup", m, tuple(MATCHUPS))
    if visibility is not None:
        check_choice("visibility", visibility, VISIBILITIES)
    dev = resolve_device(device)
    checkpoint, out = Path(checkpoint), Path(out)
    base = {"protocol": PROTOCOL, "schema_version": SCHEMA_VERSION, "command": " ".join(sys.argv), "episodes": episodes,
            "max_steps": steps, "batch_size": episodes, "device": str(dev), "deterministic": False, "eval_seed": seed}
    hc = health(checkpoint)
    if not hc["ok"]:
        record = {**base, "created_at": now(), "checkpoint": {"path": str(checkpoint), "sha256": None},
                  "checkpoint_health": hc, "status": "invalid_checkpoint", "error": hc["error"], "metrics": None,
                  "matchup": None, "visibility": visibility, "provenance": provenance(dev)}
        append_jsonl(out, record)
        raise InterbrainError(hc["error"])
    ckpt, agents = load_agents(checkpoint, device=dev)
    cfg = ckpt.config
    env_cfg = EnvConfig(task=cfg.env.task, visibility=visibility or cfg.env.visibility, spawn=cfg.env.spawn, horizon=steps)
    done = set() if force else _done_keys(out)
    sha = sha256_file(checkpoint)
    written = []
    for matchup in matchups:
        if (sha, matchup, env_cfg.visibility) in done:
            continue
        focus = MATCHUPS[matchup]
        policies = {a: Policy(agent=agents[a] if a == focus else None) for a in ("chaser", "explorer")}
        record = {**base, "created_at": now(), "checkpoint": {"path": str(checkpoint), "sha256": sha},
                  "unit_id": cfg.unit_id, "arch": cfg.agent.arch, "size": cfg.agent.size, "task": cfg.env.task,
                  "seed": cfg.seed, "update": ckpt.update, "matchup": matchup, "focus_agent": focus,
                  "visibility": env_cfg.visibility, "checkpoint_health": hc, "provenance": provenance(dev)}
        try:
            episodes_data = play(env_cfg, policies, episodes=episodes, seed=seed, device=dev, record_hidden=False)
            record.update(status="ok", error=None, metrics=behaviour_metrics(episodes_data))
        except InterbrainError as exc:
            record.update(status="failed", error=str(exc), metrics=None)
        append_jsonl(out, record)
        written.append(record)
    return written


def evaluate_unit(checkpoints, out, *, episodes: int = 100, steps: int = 100, seed: int = 0, visibilities=None,
                  device: str = "auto") -> Path:
    """Evaluate every checkpoint of a unit (and each visibility override) into a fresh JSONL, written atomically."""
    from interbrain.io import atomic_path

    out = Path(out)
    with atomic_path(out) as tmp:
        for ckpt in checkpoints:
            for vis in (visibilities or [None]):
                evaluate_checkpoint(ckpt, tmp, episodes=episodes, steps=steps, seed=seed, visibility=vis,
                                    device=device, force=True)
    return out


def gather(inputs, out) -> Path:
    """Concatenate unit evaluation files into one architecture-level JSONL (validated line by line)."""
    import json

    from interbrain.io import write_text_atomic

    lines = []
    for path in inputs:
        for record in read_jsonl(path):
            if record.get("protocol") != PROTOCOL:
                raise InterbrainError(f"{path}: record with protocol {record.get('protocol')!r}, expected {PROTOCOL!r}")
            lines.append(json.dumps(record, sort_keys=True))
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return Path(out)
