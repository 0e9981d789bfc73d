"""Architecture tables (docs/ARTIFACTS.md) and the unit-level summaries the reports are built from.

``arch_tables`` writes ``behavior.csv`` (one row per ok evaluation record, every SPEC §5.2 metric a column) and the
concatenations ``decoding.csv``, ``plsc.csv``, ``partner.csv``, ``dynamics.csv``, ``perturbation.csv`` of the
per-rollout CSVs.

The other functions turn those tables into *unit-level* frames (one value per unit, or per unit x checkpoint for the
``late`` scope) which the report then summarises as mean ± sample SD over units (SPEC §6.7) with
:func:`interbrain.analysis.stats.mean_sd`.

Scopes (SPEC §6): ``final`` = each unit's largest update present in the table (n = units); ``late`` = every update
≥ 75 % of that unit's final update, pooled (n = units x checkpoints; updates 15,000–20,000 at the paper's 20,000).
Conditions: a row's *condition* is its task when the rollout used the task's own visibility (social: partial,
non-social: none), else ``"{task}+{visibility}"`` (the non-social vision controls).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from interbrain.config import TASK_VISIBILITY
from interbrain.errors import InterbrainError
from interbrain.io import atomic_path, read_jsonl

TABLES = ("behavior", "decoding", "plsc", "partner", "dynamics", "perturbation")
IDENTITY = ["schema_version", "protocol", "unit_id", "arch", "size", "task", "seed", "update", "visibility", "rollout",
            "rollout_sha256", "n_valid_episodes", "status", "reason"]
# Header of an empty table (no input files): the docs/ARTIFACTS.md schema.
SCHEMAS: dict[str, list[str]] = {
    "decoding": IDENTITY + ["target", "scheme", "lag", "balanced_accuracy", "null_mean", "p_value", "n_shuffles",
                            "n_samples", "n_positive", "n_negative", "n_pos_episodes"],
    "plsc": IDENTITY + ["variant", "mode", "null", "residualized", "n_null", "min_shift", "k_star", "r1", "delta_pcc",
                        "p_value", "null_r1_mean", "n_episodes"],
    "partner": IDENTITY + ["partner", "r2_full", "chance_full"],
    "dynamics": IDENTITY + ["agent", "event", "kind", "bin", "l_lo", "l_hi", "l_centre", "l_mean", "delta_mean",
                            "delta_sd", "delta_sem", "n", "n_out_of_range", "fixed_point", "l_star", "slope", "stable",
                            "n_fixed_points", "min_count"],
    "perturbation": IDENTITY + ["condition", "target", "opponent", "episode", "collisions", "partner_in_view",
                                "mean_distance", "delta_collisions", "delta_partner_in_view", "delta_mean_distance",
                                "removed_variance", "rank"],
}
BEHAVIOR_IDENTITY = ["protocol", "schema_version", "unit_id", "arch", "size", "task", "seed", "update", "matchup",
                     "focus_agent", "visibility", "episodes", "max_steps", "eval_seed", "checkpoint_path",
                     "checkpoint_sha256", "status"]
BEHAVIOR_METRIC_COLUMNS = ["collisions_per_episode", "chaser_partner_in_view", "explorer_partner_in_view",
                           "chaser_new_fields", "explorer_new_fields", "mean_distance", "final_distance",
                           "chaser_return", "explorer_return", "degenerate_episodes", "degenerate_fraction",
                           "chaser_stuck_run_steps", "explorer_stuck_run_steps", "joint_stuck_run_steps"]

PRIMARY_VISIBILITY = TASK_VISIBILITY  # social: partial, non_social: none (SPEC §1.4)
LATE_FRACTION = 0.75

# Behaviour metrics of the reports: (name, label, matchup, column, scale). SPEC §7.1 panels 5i–5n, and the
# reproduction's "explorer collisions suffered" (§7.3).
BEHAVIOR_METRICS = [
    ("chaser_collisions", "chaser collisions / episode (vs random explorer)", "random_explorer",
     "collisions_per_episode", 1.0),
    ("chaser_in_view", "chaser partner in view, % (vs random explorer)", "random_explorer", "chaser_partner_in_view",
     100.0),
    ("chaser_distance", "chaser mean distance (vs random explorer)", "random_explorer", "mean_distance", 1.0),
    ("chaser_new_fields", "chaser new fields / episode (vs random explorer)", "random_explorer", "chaser_new_fields",
     1.0),
    ("explorer_new_fields", "explorer new fields / episode (vs random chaser)", "random_chaser", "explorer_new_fields",
     1.0),
    ("explorer_distance", "explorer mean distance (vs random chaser)", "random_chaser", "mean_distance", 1.0),
    ("explorer_collisions", "collisions suffered by the explorer / episode (vs random chaser)", "random_chaser",
     "collisions_per_episode", 1.0),
]

_UNIT_PATH = re.compile(r"seed_(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# arch_tables
# ----------------------------------------------------------------------------------------------------------------

def _write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def behavior_frame(eval_jsonl) -> pd.DataFrame:
    """One row per ``ok`` evaluation record, every metric a column (SPEC §5.2)."""
    paths = [eval_jsonl] if isinstance(eval_jsonl, (str, os.PathLike)) else list(eval_jsonl)
    rows, metric_cols = [], list(BEHAVIOR_METRIC_COLUMNS)
    for path in paths:
        for rec in read_jsonl(path):
            if rec.get("status") != "ok" or not isinstance(rec.get("metrics"), dict):
                continue
            ckpt = rec.get("checkpoint") or {}
            row = {k: rec.get(k) for k in BEHAVIOR_IDENTITY}
            row["checkpoint_path"], row["checkpoint_sha256"] = ckpt.get("path"), ckpt.get("sha256")
            for k, v in rec["metrics"].items():
                if k not in metric_cols:
                    metric_cols.append(k)
                row[k] = v
            rows.append(row)
    df = pd.DataFrame(rows, columns=BEHAVIOR_IDENTITY + metric_cols)
    if len(df):
        df = df.sort_values(["unit_id", "update", "matchup", "visibility"], kind="stable").reset_index(drop=True)
    return df


def concat_csvs(paths, table: str) -> pd.DataFrame:
    """Concatenate per-rollout CSVs, keeping every column (union, in first-seen order) and every value's text
    verbatim; a column missing from one file is empty in its rows; header only (the schema) if there is no file."""
    frames, columns = [], []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InterbrainError(f"missing {table} CSV {p}")
        try:
            df = pd.read_csv(p, dtype=str, keep_default_na=False)  # text kept verbatim: no float reformatting
        except pd.errors.EmptyDataError:
            raise InterbrainError(f"{table} CSV {p} is empty (no header)") from None
        frames.append(df)
        columns += [c for c in df.columns if c not in columns]
    if not frames:
        return pd.DataFrame(columns=SCHEMAS[table])
    non_empty = [f for f in frames if len(f)]
    if not non_empty:
        return pd.DataFrame(columns=columns)
    return pd.concat(non_empty, ignore_index=True, sort=False).reindex(columns=columns)


def arch_tables(*, eval_jsonl, decoding: list, plsc: list, partner: list, perturbation: list, out_dir,
                dynamics: list | None = None) -> dict[str, Path]:
    """Write ``{out_dir}/{behavior,decoding,plsc,partner,dynamics,perturbation}.csv`` (atomic); returns name -> path.

    ``dynamics`` left out (None) writes the header-only dynamics table, as an empty list does."""
    out_dir = Path(out_dir)
    out = {"behavior": _write_csv(behavior_frame(eval_jsonl), out_dir / "behavior.csv")}
    for name, paths in (("decoding", decoding), ("plsc", plsc), ("partner", partner), ("dynamics", dynamics),
                        ("perturbation", perturbation)):
        out[name] = _write_csv(concat_csvs(paths or [], name), out_dir / f"{name}.csv")
    return out


# ----------------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------------

def read_table(path) -> pd.DataFrame:
    """Read one architecture table (a missing file is an error; a header-only file is an empty frame)."""
    path = Path(path)
    if not path.is_file():
        raise InterbrainError(f"missing table {path}")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def load_tables(arch_dirs: dict[str, str | os.PathLike]) -> dict[str, pd.DataFrame]:
    """Read and concatenate the six tables of several architectures (``arch`` column filled from the key)."""
    out = {}
    for name in TABLES:
        frames = []
        for arch, d in arch_dirs.items():
            df = read_table(Path(d) / f"{name}.csv")
            if len(df):
                df = df.copy()
                if "arch" not in df.columns or df["arch"].isna().all():
                    df["arch"] = arch
                frames.append(df)
        out[name] = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame()
    return out


def parse_unit_path(path) -> tuple[str, str, int]:
    """``results/{arch}/{task}/seed_{seed:04d}/metrics.jsonl`` -> (arch, task, seed)."""
    p = Path(path)
    parts = p.parent.parts
    m = _UNIT_PATH.match(parts[-1]) if parts else None
    if len(parts) < 3 or m is None:
        raise InterbrainError(f"cannot parse arch/task/seed from {path}; expected .../{{arch}}/{{task}}/seed_NNNN/"
                              f"metrics.jsonl")
    return parts[-3], parts[-2], int(m.group(1))


def training_frame(metrics_paths) -> pd.DataFrame:
    """One row per logged interval of every unit: arch, task, seed, update, the scalar metrics, and the chaser's /
    explorer's recurrent weight norm (``agents.*.recurrent_norm``)."""
    rows = []
    for path in metrics_paths:
        arch, task, seed = parse_unit_path(path)
        for rec in read_jsonl(path):
            row = {"arch": arch, "task": task, "seed": seed}
            row.update({k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for agent, st in (rec.get("agents") or {}).items():
                if isinstance(st, dict) and "recurrent_norm" in st:
                    row[f"{agent}_recurrent_norm"] = st["recurrent_norm"]
            rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values(["arch", "task", "seed", "update"], kind="stable").reset_index(drop=True)
    return df


# ----------------------------------------------------------------------------------------------------------------
# unit-level frames
# ----------------------------------------------------------------------------------------------------------------

def condition_of(task: str, visibility) -> str:
    prim = PRIMARY_VISIBILITY.get(task)
    if visibility is None or (isinstance(visibility, float) and np.isnan(visibility)) or visibility == prim:
        return task
    return f"{task}+{visibility}"


def with_condition(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if "visibility" not in df.columns:
        df["visibility"] = None
    df["condition"] = [condition_of(t, v) for t, v in zip(df["task"], df["visibility"])]
    return df


def add_scope(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``final_update`` (the unit's largest update in this table), ``is_final`` and ``is_late``."""
    df = df.copy()
    df["update"] = pd.to_numeric(df["update"])
    df["final_update"] = df.groupby("unit_id")["update"].transform("max")
    df["is_final"] = df["update"] == df["final_update"]
    df["is_late"] = df["update"] >= LATE_FRACTION * df["final_update"]
    return df


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    if "status" not in df.columns:
        return df
    return df[df["status"].fillna("ok") == "ok"]


def behavior_units(behavior: pd.DataFrame, *, scope: str = "final") -> pd.DataFrame:
    """One row per (unit, update, condition) with the report's behaviour metrics (``BEHAVIOR_METRICS``).

    ``scope='final'`` keeps each unit's largest update; ``'all'`` keeps every update.
    """
    cols = ["arch", "task", "seed", "unit_id", "update", "condition"] + [m[0] for m in BEHAVIOR_METRICS]
    if behavior is None or not len(behavior):
        return pd.DataFrame(columns=cols)
    df = add_scope(with_condition(behavior[behavior["matchup"].isin(["random_explorer", "random_chaser"])]))
    if scope == "final":
        df = df[df["is_final"]]
    keys = ["arch", "task", "seed", "unit_id", "update", "condition"]
    out = None
    for name, _label, matchup, column, scale in BEHAVIOR_METRICS:
        part = df[df["matchup"] == matchup]
        if column not in part.columns:
            continue
        part = part[keys + [column]].rename(columns={column: name})
        part[name] = pd.to_numeric(part[name]) * scale
        part = part.groupby(keys, as_index=False)[name].mean()
        out = part if out is None else out.merge(part, on=keys, how="outer")
    if out is None:
        return pd.DataFrame(columns=cols)
    return out.reindex(columns=cols).sort_values(keys, kind="stable").reset_index(drop=True)


def random_baseline(behavior: pd.DataFrame) -> pd.DataFrame:
    """The ``random_vs_random`` sanity rows (SPEC §5.2)."""
    if behavior is None or not len(behavior):
        return pd.DataFrame()
    return behavior[behavior["matchup"] == "random_vs_random"]


def scoped(df: pd.DataFrame, scope: str) -> pd.DataFrame:
    """Rows of the ``final`` or ``late`` scope, with ``condition`` added."""
    if df is None or not len(df):
        return pd.DataFrame()
    df = add_scope(with_condition(df))
    return df[df["is_final"]] if scope == "final" else df[df["is_late"]]


def status_counts(df: pd.DataFrame, by=("arch", "condition")) -> pd.DataFrame:
    """Units (or unit x checkpoint) per status: one analysis row-group per (unit, update, condition)."""
    if df is None or not len(df) or "status" not in df.columns:
        return pd.DataFrame()
    df = add_scope(with_condition(df))
    df = df[df["is_final"]]
    per = df.groupby(list(by) + ["unit_id"])["status"].agg(lambda s: "ok" if (s == "ok").any() else s.iloc[0])
    return per.reset_index().groupby(list(by) + ["status"]).size().unstack(fill_value=0).reset_index()


def perturbation_units(perturbation: pd.DataFrame) -> pd.DataFrame:
    """Per-unit means over episodes for each (condition, target): the values, the paired deltas and the removed
    variance (SPEC §6.6). ``partner_in_view`` is a fraction in the CSV and becomes % here."""
    cols = ["arch", "task", "seed", "unit_id", "target", "condition", "n_episodes", "collisions", "partner_in_view",
            "mean_distance", "delta_collisions", "delta_partner_in_view", "delta_mean_distance", "removed_variance"]
    if perturbation is None or not len(perturbation):
        return pd.DataFrame(columns=cols)
    df = ok_rows(perturbation).copy()
    if not len(df):
        return pd.DataFrame(columns=cols)
    for c in ("partner_in_view", "delta_partner_in_view"):
        df[c] = pd.to_numeric(df[c]) * 100.0
    keys = ["arch", "task", "seed", "unit_id", "target", "condition"]
    values = ["collisions", "partner_in_view", "mean_distance", "delta_collisions", "delta_partner_in_view",
              "delta_mean_distance", "removed_variance"]
    agg = df.groupby(keys, as_index=False)[values].mean()
    agg["n_episodes"] = df.groupby(keys).size().values
    return agg.reindex(columns=cols)


DYNAMICS_KEYS = ["arch", "condition", "agent", "event"]


def dynamics_pooled(dynamics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The choice-dynamics bins pooled over units, and the fixed points of the pooled mean flow.

    ``dynamics`` holds ``bin`` rows of the dynamics table with ``condition`` (see :func:`scoped`) and ok status.
    Bins are pooled per (arch, condition, agent, event, l_lo, l_hi) as if their pairs were one sample: n = sum of
    n, l_mean and delta_mean n-weighted, delta_sd from the within- and between-unit sums of squares, delta_sem =
    delta_sd / sqrt(n). Fixed points: :func:`interbrain.analysis.dynamics.fixed_points` on the pooled bins with the
    table's ``min_count`` (its largest value). Returns (bins, fixed points); both empty when there is nothing.
    """
    from interbrain.analysis.dynamics import fixed_points

    bcols = DYNAMICS_KEYS + ["l_lo", "l_hi", "l_centre", "l_mean", "delta_mean", "delta_sd", "delta_sem", "n",
                             "n_units"]
    fcols = DYNAMICS_KEYS + ["l_star", "slope", "stable", "n"]
    if dynamics is None or not len(dynamics) or "kind" not in dynamics.columns:
        return pd.DataFrame(columns=bcols), pd.DataFrame(columns=fcols)
    d = dynamics[dynamics["kind"] == "bin"].copy()
    if not len(d):
        return pd.DataFrame(columns=bcols), pd.DataFrame(columns=fcols)
    for c in ("l_lo", "l_hi", "l_centre", "l_mean", "delta_mean", "delta_sd", "n"):
        d[c] = pd.to_numeric(d[c])
    d["delta_sd"] = d["delta_sd"].fillna(0.0)
    mc = pd.to_numeric(d["min_count"]) if "min_count" in d.columns else pd.Series(dtype=float)
    min_count = int(mc.max()) if mc.notna().any() else 1
    rows, fps = [], []
    for key, g in d.groupby(DYNAMICS_KEYS, sort=False):
        per_bin = []
        for (lo, hi), b in g.groupby(["l_lo", "l_hi"], sort=True):
            n = b["n"].to_numpy(float)
            N = n.sum()
            m = float((n * b["delta_mean"]).sum() / N)
            ss = float(((n - 1) * b["delta_sd"] ** 2).sum() + (n * (b["delta_mean"] - m) ** 2).sum())
            sd = float(np.sqrt(ss / (N - 1))) if N > 1 else float("nan")
            per_bin.append({**dict(zip(DYNAMICS_KEYS, key)), "l_lo": lo, "l_hi": hi,
                            "l_centre": float(b["l_centre"].iloc[0]), "l_mean": float((n * b["l_mean"]).sum() / N),
                            "delta_mean": m, "delta_sd": sd, "delta_sem": sd / np.sqrt(N) if N > 1 else float("nan"),
                            "n": int(N), "n_units": int(b["unit_id"].nunique())})
        rows += per_bin
        for f in fixed_points([r["l_mean"] for r in per_bin], [r["delta_mean"] for r in per_bin],
                              [r["n"] for r in per_bin], min_count=min_count):
            fps.append({**dict(zip(DYNAMICS_KEYS, key)), "l_star": f["l_star"], "slope": f["slope"],
                        "stable": f["stable"], "n": f["n"]})
    return pd.DataFrame(rows, columns=bcols), pd.DataFrame(fps, columns=fcols)


__all__ = ["arch_tables", "behavior_frame", "concat_csvs", "read_table", "load_tables", "parse_unit_path",
           "training_frame", "behavior_units", "perturbation_units", "scoped", "status_counts", "condition_of",
           "dynamics_pooled", "BEHAVIOR_METRICS", "TABLES", "SCHEMAS", "PRIMARY_VISIBILITY"]
