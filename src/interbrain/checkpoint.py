"""Checkpoints: safetensors files with a format tag, a schema version and JSON metadata (SPEC §5.1).

Tensors
    ``chaser.<param>``, ``explorer.<param>``          network parameters
    ``optimizer.<agent>.state.<i>.<key>``              Adam state (i = parameter index)
    ``rng.<stream>``                                    RNG states (uint8)
Metadata (all JSON strings)
    ``format`` = "interbrain.checkpoint", ``schema_version``, ``config`` (+ ``config_sha256``), ``update``, ``metrics``,
    ``param_counts``, ``kl_coefs``, ``optimizer`` (hyper-parameters), ``provenance``.

No pickle is ever read. :func:`build_checkpoint` turns two plain state dicts plus a config into a checkpoint, so external
weights (e.g. the paper's released RNN, converted to plain tensors) can enter the pipeline.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from interbrain.config import TrainConfig
from interbrain.errors import InterbrainError
from interbrain.io import atomic_path, sha256_json
from interbrain.provenance import provenance

FORMAT = "interbrain.checkpoint"
SCHEMA_VERSION = 1
AGENTS = ("chaser", "explorer")


@dataclass
class Checkpoint:
    config: TrainConfig
    update: int
    chaser: dict[str, torch.Tensor]
    explorer: dict[str, torch.Tensor]
    optimizers: dict[str, dict] = field(default_factory=dict)  # agent -> {"state": {i: {key: tensor}}, "param_groups": [...]}
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    kl_coefs: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def state_dict(self, agent: str) -> dict[str, torch.Tensor]:
        return {"chaser": self.chaser, "explorer": self.explorer}[agent]


def _flatten(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for agent in AGENTS:
        for name, value in ckpt.state_dict(agent).items():
            tensors[f"{agent}.{name}"] = value.detach().to("cpu").contiguous()
        opt = ckpt.optimizers.get(agent)
        if opt:
            for i, state in opt["state"].items():
                for key, value in state.items():
                    value = value if torch.is_tensor(value) else torch.tensor(value)
                    tensors[f"optimizer.{agent}.state.{i}.{key}"] = value.detach().to("cpu").contiguous()
    for name, value in ckpt.rng.items():
        tensors[f"rng.{name}"] = value.detach().to("cpu").contiguous()
    return tensors


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike) -> Path:
    """Validate finiteness, then write atomically (temporary file + rename)."""
    tensors = _flatten(ckpt)
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InterbrainError(f"refusing to write checkpoint {path}: tensor {name} is not finite")
    config = ckpt.config.to_dict()
    meta = {
        "format": FORMAT,
        "schema_version": str(SCHEMA_VERSION),
        "config": json.dumps(config, sort_keys=True),
        "config_sha256": sha256_json(config),
        "update": str(int(ckpt.update)),
        "metrics": json.dumps(ckpt.metrics, sort_keys=True, default=float),
        "param_counts": json.dumps({a: int(sum(v.numel() for v in ckpt.state_dict(a).values())) for a in AGENTS}),
        "kl_coefs": json.dumps(ckpt.kl_coefs),
        "optimizer": json.dumps({a: o.get("param_groups", []) for a, o in ckpt.optimizers.items()}, default=float),
        "provenance": json.dumps(ckpt.provenance or provenance(), default=str),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def _meta_json(meta: dict, key: str, path) -> object:
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise InterbrainError(f"invalid checkpoint {path}: metadata field {key!r} missing or not JSON") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata, validated for format and version (tensors are not read)."""
    path = Path(path)
    if not path.is_file():
        raise InterbrainError(f"missing checkpoint {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InterbrainError(f"corrupt checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if meta.get("format") != FORMAT:
        raise InterbrainError(f"invalid checkpoint {path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("schema_version") != str(SCHEMA_VERSION):
        raise InterbrainError(f"invalid checkpoint {path}: schema_version {meta.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return meta


def load_checkpoint(path: str | os.PathLike, *, device: torch.device | str = "cpu") -> Checkpoint:
    """Load and validate: format, version, metadata, every float tensor finite. One-line errors name the file."""
    from interbrain.io import sha256_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise InterbrainError(f"corrupt checkpoint {path}: {str(exc).splitlines()[0]}") from None
    for name, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise InterbrainError(f"invalid checkpoint {path}: tensor {name} is not finite")
    try:
        config = TrainConfig.from_dict(_meta_json(meta, "config", path))
    except (TypeError, KeyError) as exc:
        raise InterbrainError(f"invalid checkpoint {path}: config does not match this version ({exc})") from None
    ckpt = Checkpoint(config=config, update=int(meta["update"]), chaser={}, explorer={}, path=path,
                      metrics=_meta_json(meta, "metrics", path), kl_coefs=_meta_json(meta, "kl_coefs", path),
                      provenance=_meta_json(meta, "provenance", path), sha256=sha256_file(path))
    groups = _meta_json(meta, "optimizer", path)
    for name, value in tensors.items():
        head, _, rest = name.partition(".")
        if head in AGENTS:
            ckpt.state_dict(head)[rest] = value
        elif head == "rng":
            ckpt.rng[rest] = value
        elif head == "optimizer":
            agent, _, tail = rest.partition(".state.")
            i, _, key = tail.partition(".")
            opt = ckpt.optimizers.setdefault(agent, {"state": {}, "param_groups": groups.get(agent, [])})
            opt["state"].setdefault(int(i), {})[key] = value
        else:
            raise InterbrainError(f"invalid checkpoint {path}: unexpected tensor {name}")
    for agent in AGENTS:
        if not ckpt.state_dict(agent):
            raise InterbrainError(f"invalid checkpoint {path}: no {agent} parameters")
    return ckpt


def build_checkpoint(chaser_state: dict[str, torch.Tensor], explorer_state: dict[str, torch.Tensor], config: TrainConfig,
                     path: str | os.PathLike, *, update: int = 0, metrics: dict | None = None) -> Path:
    """Public builder: two plain state dicts plus a config -> a checkpoint file (SPEC §5.1).

    The state dicts are loaded strictly into freshly built networks of ``config.agent``, so names and shapes are
    checked before anything is written.
    """
    from interbrain.agents import build_agent

    for agent, state in (("chaser", chaser_state), ("explorer", explorer_state)):
        net = build_agent(config.agent)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise InterbrainError(f"{agent} state dict does not fit arch {config.agent.arch!r}: {first}") from None
    ckpt = Checkpoint(config=config, update=update, chaser={k: v.detach().clone() for k, v in chaser_state.items()},
                      explorer={k: v.detach().clone() for k, v in explorer_state.items()},
                      metrics=metrics or {}, provenance=provenance())
    return save_checkpoint(ckpt, path)


def health(path: str | os.PathLike) -> dict:
    """SPEC §5.1 health check: loads, format valid, every float tensor finite; counts and max |x|."""
    path = Path(path)
    record = {"path": str(path), "ok": False, "error": None, "tensor_count": 0, "nonfinite_count": 0, "max_abs": None}
    try:
        read_metadata(path)
        tensors = load_file(str(path))
    except InterbrainError as exc:
        record["error"] = str(exc)
        return record
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        record["error"] = f"corrupt checkpoint {path}: {str(exc).splitlines()[0]}"
        return record
    max_abs, nonfinite = 0.0, 0
    for value in tensors.values():
        if value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            nonfinite += int((~finite).sum())
            if finite.any():
                max_abs = max(max_abs, float(value[finite].abs().max()))
    record.update(tensor_count=len(tensors), nonfinite_count=nonfinite, max_abs=max_abs if math.isfinite(max_abs) else None)
    record["ok"] = nonfinite == 0
    if nonfinite:
        record["error"] = f"{nonfinite} non-finite values in {path}"
    return record


def load_agents(source: "str | os.PathLike | Checkpoint", *, device: torch.device | str = "cpu"):
    """Build both networks of a checkpoint and load their weights; returns ``(checkpoint, {"chaser", "explorer"})``."""
    from interbrain.agents import build_agent

    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source)
    agents = {}
    for agent in AGENTS:
        net = build_agent(ckpt.config.agent)
        try:
            net.load_state_dict(ckpt.state_dict(agent), strict=True)
        except RuntimeError as exc:
            raise InterbrainError(f"checkpoint {ckpt.path}: {agent} weights do not fit arch "
                                  f"{ckpt.config.agent.arch!r}: {str(exc).splitlines()[0]}") from None
        agents[agent] = net.to(device).eval()
    return ckpt, agents


def health_report(checkpoints, out_json) -> Path:
    """Health-check every checkpoint (SPEC §5.1); write the records only if all pass, else raise naming the first bad file."""
    from interbrain.io import write_json_atomic

    records = [health(p) for p in checkpoints]
    bad = [r for r in records if not r["ok"]]
    if bad:
        raise InterbrainError(bad[0]["error"] or f"unhealthy checkpoint {bad[0]['path']}")
    write_json_atomic(out_json, records)
    return Path(out_json)
