"""SPEC §5.4 sidecar manifest: what an output rests on, and how it was made.

``write_manifest`` records every input path with its sha256 and size, every output's sha256, the resolved config and
its sha256, the protocol ids, schema versions and seeds found in the inputs, and the provenance (git sha, dirty flag,
diff hash, package versions, device, created_at) from :func:`interbrain.provenance.provenance`.

Protocols are read without loading any tensor: JSONL records and JSON objects (``protocol`` / ``format``,
``schema_version``, ``seed`` / ``eval_seed``), CSV columns ``protocol`` / ``schema_version`` / ``seed``, and the
safetensors header metadata (analysis rollouts carry ``protocol``; checkpoints carry ``format`` and their config's
``seed``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from interbrain.errors import InterbrainError
from interbrain.io import sha256_file, sha256_json, write_json_atomic

MANIFEST_FORMAT = "interbrain.manifest"
MANIFEST_SCHEMA_VERSION = 1


def _flatten(paths) -> list[Path]:
    """Accept a path, a list (nested allowed) or a dict of lists (Snakemake named inputs); keep order, no duplicates."""
    if paths is None:
        return []
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    items = paths.values() if isinstance(paths, dict) else paths
    out: list[Path] = []
    for item in items:
        for q in _flatten(item):
            if q not in out:
                out.append(q)
    return out


def _scalar(v):
    if v is None or (isinstance(v, float) and v != v):
        return None
    try:
        return int(v) if float(v) == int(float(v)) else v
    except (TypeError, ValueError):
        return v


def _from_mapping(rec: dict, found: dict) -> None:
    proto = rec.get("protocol") or rec.get("format")
    if proto is not None:
        found["protocols"].setdefault(str(proto), set()).add(_scalar(rec.get("schema_version")))
    for key in ("seed", "eval_seed", "rollout_seed"):
        if rec.get(key) is not None and not isinstance(rec.get(key), (dict, list)):
            found["seeds"].setdefault(key, set()).add(_scalar(rec[key]))
    cfg = rec.get("config")
    if isinstance(cfg, dict) and cfg.get("seed") is not None:
        found["seeds"].setdefault("seed", set()).add(_scalar(cfg["seed"]))


def _safetensors_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as fh:
        raw = fh.metadata() or {}
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return meta


def scan_protocols(path: Path) -> dict:
    """{"protocols": {id: {schema versions}}, "seeds": {kind: {values}}} found in one input file."""
    found: dict = {"protocols": {}, "seeds": {}}
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    if isinstance(rec, dict):
                        _from_mapping(rec, found)
        elif suffix == ".json":
            obj = json.loads(path.read_text())
            for rec in obj if isinstance(obj, list) else [obj]:
                if isinstance(rec, dict):
                    _from_mapping(rec, found)
        elif suffix == ".csv":
            head = pd.read_csv(path, nrows=0).columns
            cols = [c for c in ("protocol", "schema_version", "seed") if c in head]
            if cols:
                df = pd.read_csv(path, usecols=cols).drop_duplicates()
                for rec in df.to_dict("records"):
                    _from_mapping(rec, found)
        elif suffix == ".safetensors":
            _from_mapping(_safetensors_meta(path), found)
    except (json.JSONDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError,
            ValueError) as exc:
        found["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return found


def _sorted(values) -> list:
    return sorted(values, key=lambda v: (v is None, str(type(v)), v if v is not None else 0))


def write_manifest(*, inputs: list, outputs: list, config: dict, out_json) -> Path:
    """Write the SPEC §5.4 sidecar manifest to ``out_json`` (atomic). Every input and output must exist."""
    from interbrain.provenance import provenance

    in_paths, out_paths = _flatten(inputs), _flatten(outputs)
    for kind, paths in (("input", in_paths), ("output", out_paths)):
        for p in paths:
            if not p.is_file():
                raise InterbrainError(f"manifest {kind} {p} does not exist or is not a file")
    protocols: dict[str, set] = {}
    seeds: dict[str, set] = {}
    input_rows = []
    for p in in_paths:
        found = scan_protocols(p)
        row = {"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size,
               "protocols": {k: _sorted(v) for k, v in found["protocols"].items()}}
        if "error" in found:
            row["scan_error"] = found["error"]
        input_rows.append(row)
        for k, v in found["protocols"].items():
            protocols.setdefault(k, set()).update(v)
        for k, v in found["seeds"].items():
            seeds.setdefault(k, set()).update(v)
    config = config or {}
    manifest = {
        "format": MANIFEST_FORMAT,
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "inputs": input_rows,
        "outputs": [{"path": str(p), "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in out_paths],
        "config": config,
        "config_sha256": sha256_json(config),
        "protocols": {k: _sorted(v) for k, v in sorted(protocols.items())},
        "seeds": {k: _sorted(v) for k, v in sorted(seeds.items())},
        "provenance": provenance(),
    }
    out_json = Path(out_json)
    write_json_atomic(out_json, manifest)
    return out_json


__all__ = ["write_manifest", "scan_protocols", "MANIFEST_FORMAT", "MANIFEST_SCHEMA_VERSION"]
