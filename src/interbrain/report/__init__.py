"""Reports: one architecture's report and the cross-architecture report (SPEC §6.7, §7).

- :func:`interbrain.report.tables.arch_tables` writes an architecture's six tables (docs/ARTIFACTS.md).
- :func:`arch_report` renders one architecture's report from those tables and its units' ``metrics.jsonl``.
- :func:`cross_report` renders the cross-architecture report (the product's main page), writes ``plsc_matrix.csv``.
- :func:`interbrain.report.manifest.write_manifest` writes a SPEC §5.4 sidecar manifest.

Every number in a report is computed here from the tables (mean ± sample SD over units with n, SPEC §6.7) or comes
from :mod:`interbrain.report.references` (SPEC §7, each cell with source, n, SD type and protocol id). A missing
analysis is rendered as "not run" with its reason. Templates: ``templates/*.md.j2`` (Jinja2, loaded by path relative
to this module). Figures: :mod:`interbrain.report.figures` (seaborn, Agg, PNG).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jinja2
import pandas as pd

from interbrain.analysis.stats import mean_sd, pearson, permutation_test
from interbrain.errors import InterbrainError
from interbrain.io import atomic_path, sha256_json, write_text_atomic
from interbrain.report import calibration as CAL
from interbrain.report import claims as C
from interbrain.report import figures as F
from interbrain.report import references as R
from interbrain.report.manifest import write_manifest
from interbrain.report.tables import (BEHAVIOR_METRICS, add_scope, arch_tables, behavior_units, dynamics_pooled,
                                      load_tables, ok_rows, perturbation_units, random_baseline, scoped, status_counts,
                                      training_frame, with_condition)

TEMPLATES = Path(__file__).resolve().parent / "templates"
TASKS = ("social", "non_social")
DEFAULT_EARLY_UPDATE = 1_000
PLSC_VARIANTS = ("per_episode", "pooled", "residualized", "pooled_residualized", "episode_shuffle",
                 "episode_shuffle_mrr", "identical_action_excluded")
PERTURBATION_CONDITIONS = ("baseline", "shared_removed", "random_orthogonal", "top_unique_removed", "paper_control",
                           "shared_only")
DYNAMICS_EVENTS = ("collision", "new_field", "visible", "invisible", "all")
VISION_REF_TASK = {"social": "social", "non_social": "non_social", "non_social+partial": "non_social_vision"}


# ----------------------------------------------------------------------------------------------------------------
# formatting
# ----------------------------------------------------------------------------------------------------------------

def _msd(values, digits: int = 2, n_label: str = "") -> str:
    """Mean ± sample SD (n) of the non-missing values."""
    x = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(dtype=float)
    return C.fmt_msd(mean_sd(x), digits, n_label)


def _refs_by_task(key: str, *, arch: str | None = None, sources=(R.PAPER,), tasks=TASKS, variant=None) -> str:
    """Reference cells for each task, labelled ("social: …<br>non-social: …"); "—" when SPEC §7 has none."""
    parts = []
    for t in tasks:
        cells = [c for c in (R.cell(key, task=t, arch=arch, source=s, variant=variant, missing="") for s in sources)
                 if c]
        if cells:
            parts.append(f"{_cond_label(t)}: " + "<br>".join(cells))
    return "<br>".join(parts) or "—"


def _plain(value) -> str:
    if value is None:
        return "not given"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "none"
    return str(value)


def _num(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}"


def _cond_label(cond: str) -> str:
    if "+" in cond:
        task, vis = cond.split("+", 1)
        return f"{task.replace('_', '-')} ({vis} vision control)"
    return cond.replace("_", "-")


def _table(title: str, headers: list[str], rows: list[list], note: str = "") -> dict:
    clean = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
    return {"title": title, "headers": headers, "rows": clean, "note": note}


def _section(status: str = "ok", reason: str = "", tables=(), figures=(), notes=()) -> dict:
    return {"status": status, "reason": reason, "tables": list(tables), "figures": [f for f in figures if f],
            "notes": list(notes)}


def _not_run(reason: str) -> dict:
    return _section("not run", reason)


def _rel(path: Path | None, base: Path) -> str | None:
    return None if path is None else os.path.relpath(path, base).replace(os.sep, "/")


def _figure(path, base: Path, caption: str) -> dict | None:
    return None if path is None else {"path": _rel(Path(path), base), "caption": caption}


def _conditions(df: pd.DataFrame) -> list[str]:
    vals = list(dict.fromkeys(df["condition"]))
    return [c for c in TASKS if c in vals] + sorted(c for c in vals if c not in TASKS)


def _archs(df: pd.DataFrame, order: list[str]) -> list[str]:
    vals = set(df["arch"])
    return [a for a in order if a in vals] + sorted(vals - set(order))


# ----------------------------------------------------------------------------------------------------------------
# checkpoint-derived facts (parameter counts, effective regularisation)
# ----------------------------------------------------------------------------------------------------------------

def _checkpoint_meta(behavior: pd.DataFrame, arch: str) -> dict | None:
    """Config and parameter counts from the final checkpoint of one of the arch's units, if it is readable."""
    if behavior is None or not len(behavior) or "checkpoint_path" not in behavior.columns:
        return None
    from interbrain.checkpoint import read_metadata

    d = behavior[(behavior["arch"] == arch)].sort_values("update", ascending=False)
    for path in dict.fromkeys(d["checkpoint_path"].dropna()):
        try:
            meta = read_metadata(path)
            return {"config": json.loads(meta["config"]), "param_counts": json.loads(meta.get("param_counts", "{}")),
                    "path": path}
        except (InterbrainError, KeyError, json.JSONDecodeError):
            continue
    return None


def _builder_facts(arch: str, size: str | None) -> dict:
    """Parameters per agent and whether a recurrent weight exists, from the public builder (no RNG side effects)."""
    try:
        import torch

        from interbrain.agents import build_agent
        from interbrain.agents.base import Agent
        from interbrain.config import AgentConfig

        with torch.random.fork_rng(devices=[]):
            agent = build_agent(AgentConfig(arch=arch, size=size or "std"))
        return {"params": agent.num_parameters(),
                "recurrent": type(agent).recurrent_weight_norm is not Agent.recurrent_weight_norm,
                "input_l2_site": type(agent).input_weight_norm is not Agent.input_weight_norm}
    except (InterbrainError, ImportError, TypeError, ValueError):
        return {}


def _learner_values(config: dict, ckpt_cfg: dict | None) -> tuple[dict, str]:
    """(ppo settings, source) from a checkpoint's config, else from the workflow config's preset + overrides."""
    if ckpt_cfg and isinstance(ckpt_cfg.get("ppo"), dict):
        return ckpt_cfg["ppo"], "checkpoint config"
    train = config.get("train", config) if isinstance(config, dict) else {}
    preset = train.get("preset")
    if preset is None:
        return {}, "unknown"
    from interbrain.config import PRESET_VALUES, PPOConfig

    values = {**PPOConfig().__dict__, **PRESET_VALUES.get(preset, {}), **(train.get("overrides") or {})}
    return values, f"preset `{preset}` + overrides"


def _regularisation(arch: str, facts: dict, ppo: dict) -> str:
    lam = ppo.get("recurrent_l2")
    lam_in = ppo.get("input_l2") or 0.0
    if not facts:
        return "unknown (architecture not in the builder registry)"
    if lam is None:
        reg = "recurrent L2 λ unknown" if facts["recurrent"] else "none (no recurrent weight; recurrent L2 inert)"
    elif facts["recurrent"]:
        reg = f"recurrent L2 λ = {lam:g} on ‖W_hh‖_F"
    else:
        reg = f"none (no recurrent weight: the configured λ = {lam:g} has nothing to act on)"
    if lam_in and facts.get("input_l2_site"):
        reg += f"; input L2 λ = {lam_in:g}"
    return reg


# ----------------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------------

def _setup_section(config: dict, archs: list[str], frames: dict, training: pd.DataFrame) -> tuple[dict, dict]:
    """Study setup table + per-arch parameter counts and effective regularisation. Returns (section, reg by arch)."""
    train = config.get("train", {}) if isinstance(config.get("train"), dict) else {}
    get = lambda k, d="not given": train.get(k, config.get(k, d))  # noqa: E731
    seeds = config.get("seeds", "not given")
    rows = [["architectures", ", ".join(archs)],
            ["size preset", "not given (parameter matching unknown)" if get("size") == "not given" else
             f"`{get('size')}`" + ("" if get("size") == "matched" else
                                   " (not parameter-matched: capacity is confounded with architecture, pitfall 7)")],
            ["tasks", ", ".join(config.get("tasks", [])) or "not given"],
            ["seeds", ", ".join(map(str, seeds)) if isinstance(seeds, (list, tuple)) else str(seeds)],
            ["PPO updates per unit", str(get("updates"))],
            ["learner preset", f"`{get('preset')}`"],
            ["learner overrides", _plain(train.get("overrides", config.get("overrides", {})) or {})],
            ["RNN init / spawn / transformer window, positions",
             f"{get('init')} / {get('spawn')} / {get('window')}, {get('pos')}"],
            ["late checkpoints analysed (besides the final one)", _plain(config.get("late_updates"))],
            ["non-social vision controls", _plain((config.get("controls") or {}).get("non_social_visibilities"))],
            ["resolved config sha256", f"`{sha256_json(config)}`"]]
    setup = _table("Study settings (from the resolved workflow config)", ["setting", "value"], rows)

    behavior = frames.get("behavior")
    final = behavior_units(behavior) if behavior is not None and len(behavior) else pd.DataFrame()
    arch_rows, regs = [], {}
    for arch in archs:
        meta = _checkpoint_meta(behavior, arch)
        size = (meta or {}).get("config", {}).get("agent", {}).get("size") or get("size", None)
        size = None if size == "not given" else size
        facts = _builder_facts(arch, size)
        if meta and meta["param_counts"].get("chaser"):
            params = f"{meta['param_counts']['chaser']:,} (checkpoint)"
        elif facts and size:
            params = f"{facts['params']:,} (builder, `{size}`)"
        elif facts:
            params = "unknown (size preset not given)"
        else:
            params = "unknown (architecture not in the builder registry)"
        ppo, src = _learner_values(config, (meta or {}).get("config"))
        reg = _regularisation(arch, facts, ppo)
        regs[arch] = reg
        w = "—"
        if training is not None and len(training) and "chaser_recurrent_norm" in training.columns:
            t = training[training["arch"] == arch]
            if len(t):
                last = t.sort_values("update").groupby(["task", "seed"]).tail(1)
                w = (_msd(last["chaser_recurrent_norm"], 3, " units, both tasks") if facts.get("recurrent", True)
                     else "— (no W_hh)")
        view = "—"
        if len(final):
            v = final[(final["arch"] == arch) & (final["condition"] == "social")]["chaser_in_view"]
            view = _msd(v, 1) if len(v) else "—"
        arch_rows.append([arch, params, f"{reg} [{src}]", w, view])
    per_arch = _table("Per architecture", ["arch", "parameters per agent", "effective regularisation",
                                           "final chaser ‖W_hh‖_F (training log)",
                                           "chaser partner in view, % (social, final)"], arch_rows)
    return _section(tables=[setup, per_arch]), regs


def _eligibility_section(frames: dict, archs: list[str]) -> dict:
    tables = []
    for name in ("decoding", "plsc", "partner", "dynamics", "perturbation"):
        df = frames.get(name)
        counts = status_counts(df) if df is not None and len(df) else pd.DataFrame()
        if not len(counts):
            continue
        counts = _sort_units(counts, archs, "condition")
        statuses = [c for c in counts.columns if c not in ("arch", "condition")]
        rows = [[r["arch"], _cond_label(r["condition"])] + [int(r[s]) for s in statuses] for _, r in counts.iterrows()]
        tables.append(_table(f"{name}: units per status (final checkpoint)", ["arch", "condition"] + statuses, rows))
    if not tables:
        return _not_run("no analysis tables have rows")
    return _section(tables=tables, notes=["A (unit, checkpoint, visibility) with fewer than 3 valid episodes is "
                                          "`degenerate_unit` and skipped; `insufficient` decoding means too few "
                                          "samples or positive episodes, never a score of 0.5 (SPEC §5.4, §6.1)."])


def _sort_units(df: pd.DataFrame, archs: list[str], cond: str = "task") -> pd.DataFrame:
    ar = {a: i for i, a in enumerate(archs)}
    tr = {t: i for i, t in enumerate(TASKS)}
    key = df["arch"].map(lambda a: ar.get(a, len(ar))).astype(int) * 1000 + df[cond].map(
        lambda t: tr.get(t, len(tr))).astype(int)
    extra = [c for c in ("seed",) if c in df.columns]
    return df.assign(_k=key).sort_values(["_k", cond, *extra], kind="stable").drop(columns="_k")


def _training_section(training: pd.DataFrame, figdir: Path, base: Path, *, per_seed: bool, archs: list[str]) -> dict:
    if training is None or not len(training) or "collisions_per_episode" not in training.columns:
        return _not_run("no training metrics (metrics.jsonl) were given")
    fig = F.training_curves(training, figdir / "training_curves.png", per_seed=per_seed, order=archs)
    last = _sort_units(training.sort_values("update").groupby(["arch", "task", "seed"]).tail(1), archs)
    rows = []
    if per_seed:
        for _, r in last.iterrows():
            rows.append([r["arch"], r["task"], int(r["seed"]), int(r["update"]), _num(r["collisions_per_episode"]),
                         _num(r.get("chaser_return")), _num(r.get("chaser_recurrent_norm"), 3)])
        head = ["arch", "task", "seed", "last update", "collisions / episode", "chaser return", "chaser ‖W_hh‖_F"]
    else:
        for (arch, task), g in last.groupby(["arch", "task"], sort=False):
            ups = sorted(set(int(u) for u in g["update"]))
            rows.append([arch, task, len(g), ", ".join(map(str, ups)), _msd(g["collisions_per_episode"]),
                         _msd(g["chaser_return"]) if "chaser_return" in g else "—"])
        head = ["arch", "task", "seeds", "last update", "collisions / episode (mean ± SD)", "chaser return"]
    t = _table("Last logged training values", head, rows,
               note="Training values average the updates of one logging interval (self-play, not the random-opponent "
                    "evaluation).")
    calibration = None if per_seed else _calibration_table(archs)
    return _section(tables=[t] + ([calibration] if calibration else []),
                    figures=[_figure(fig, base, "Collisions per episode during training")])


def _calibration_table(archs: list[str]) -> dict | None:
    """The measured learning budgets of this study's architectures (separate calibration runs, not this study)."""
    runs = CAL.runs_for(archs)
    if not runs:
        return None
    rows = [[r.arch, r.task, r.learner, "; ".join(f"{u}: {c:.2f}" for u, c in r.collisions), r.note or "—"]
            for r in runs]
    return _table("Learning budget: separate calibration runs (not this study)",
                  ["arch", "task", "learner", "update: chaser collisions vs the random explorer", "note"], rows,
                  note=f"One unit each (seed 0, `matched`, {CAL.MACHINE}), trained outside this workflow and evaluated "
                       "with the study's random-opponent protocol at several checkpoints; a uniform-random chaser "
                       "makes ≈ 1.5. They show how many updates an architecture needs before its social chaser "
                       "chases, which one shared budget cannot (interbrain.report.calibration).")


def _behavior_section(frames: dict, archs: list[str], figdir: Path, base: Path) -> dict:
    behavior = frames.get("behavior")
    if behavior is None or not len(behavior):
        return _not_run("the evaluation table has no ok records")
    units = behavior_units(behavior)
    if not len(units):
        return _not_run("no random_explorer / random_chaser records")
    archs = _archs(units, archs)
    main = units[units["condition"].isin(TASKS)]
    tables = []
    for name, label, matchup, _col, _scale in BEHAVIOR_METRICS:
        if name not in main.columns or not main[name].notna().any():
            continue
        key = f"behavior.{name}"
        rows = []
        for arch in archs:
            d = main[main["arch"] == arch]
            s = d.loc[d["condition"] == "social", name].dropna().to_numpy(float)
            ns = d.loc[d["condition"] == "non_social", name].dropna().to_numpy(float)
            if len(s) and len(ns):
                res = permutation_test(s, ns)
                contrast = f"{res['diff']:+.2f} ({C.fmt_p(res['p'], res['exact'])})"
            else:
                contrast = "not run (needs both tasks)"
            paper = _refs_by_task(key)
            mrr = _refs_by_task(key, arch=arch, sources=(R.MRR, R.CARD))
            rows.append([arch, _msd(s), _msd(ns), contrast, paper, mrr])
        tables.append(_table(label, ["arch", "social (mean ± SD, n)", "non-social (mean ± SD, n)",
                                     "social − non-social (two-sided permutation)", "paper",
                                     "reproduction / model card"], rows))
    controls = units[~units["condition"].isin(TASKS)]
    if len(controls):
        rows = []
        for (arch, cond), g in controls.groupby(["arch", "condition"]):
            rows.append([arch, _cond_label(cond)] + [_msd(g[m]) for m, *_ in BEHAVIOR_METRICS[:4]])
        tables.append(_table("Vision controls (labelled; not the primary condition)",
                             ["arch", "condition"] + [m[1].split(" (")[0] for m in BEHAVIOR_METRICS[:4]], rows))
    notes = []
    ups = sorted(set(int(u) for u in units["update"]))
    notes.append(f"Final checkpoint per unit: update(s) {', '.join(map(str, ups))}; n = units; SD = sample SD "
                 f"(ddof 1). The paper's values are at iteration 20,000 with n = 10 pairs.")
    rr = random_baseline(behavior)
    if len(rr):
        notes.append(f"Sanity baseline, random vs random: "
                     f"{_msd(rr['collisions_per_episode'], 2, ' evaluation records')} collisions / episode.")
    refs = {}
    for name, *_ in BEHAVIOR_METRICS:
        for t in TASKS:
            r = R.lookup(f"behavior.{name}", task=t, source=R.PAPER)
            if r:
                refs[(name, t)] = r[0].value_f
    fig = F.behavior_panel(main, [(m[0], m[1]) for m in BEHAVIOR_METRICS], figdir / "behavior.png", refs, order=archs)
    return _section(tables=tables, figures=[_figure(fig, base, "Behaviour at the final checkpoint")], notes=notes)


def _decoding_section(frames: dict, archs: list[str], figdir: Path, base: Path) -> dict:
    df = frames.get("decoding")
    if df is None or not len(df):
        return _not_run("the decoding table is empty")
    fin = scoped(df, "final")
    fin = fin.assign(lag=pd.to_numeric(fin["lag"]).fillna(0) if "lag" in fin.columns else 0)
    archs = _archs(fin, archs)
    tables = []
    for lag in sorted(set(fin["lag"])):
        d = fin[fin["lag"] == lag]
        rows = []
        for arch in archs:
            for cond in _conditions(d[d["arch"] == arch]):
                for target in [t for t in ("chaser_collision", "chaser_partner_escape", "explorer_collision",
                                           "explorer_partner_approach") if t in set(d["target"])]:
                    g = d[(d["arch"] == arch) & (d["condition"] == cond) & (d["target"] == target)]
                    if not len(g):
                        continue
                    cells = []
                    for scheme in ("grouped", "timestep"):
                        s = g[g["scheme"] == scheme]
                        if not len(s):
                            cells.append("not run")
                            continue
                        ok = s[s["status"] == "ok"]
                        n_units = s["unit_id"].nunique()
                        if not len(ok):
                            cells.append(f"insufficient in all {n_units} units")
                            continue
                        sig = int((pd.to_numeric(ok["p_value"]) < 0.05).sum())
                        cells.append(f"{_msd(ok['balanced_accuracy'], 3)} of {n_units} units; null "
                                     f"{_num(pd.to_numeric(ok['null_mean']).mean(), 3)}; p < 0.05 in {sig}")
                    rt = VISION_REF_TASK.get(cond)
                    paper = R.cell(f"decoding.{target}", task=rt, source=R.PAPER) if rt else "—"
                    mrr = "<br>".join(x for x in (R.cell(f"decoding.{target}", task=rt, arch=arch, source=src,
                                                         missing="") for src in (R.MRR, R.CARD)) if x) if rt else ""
                    rows.append([arch, _cond_label(cond), target, *cells, paper, mrr or "—"])
        title = "Decoding, final checkpoint" + ("" if lag == 0 else f" — label lag {int(lag):+d} (option)")
        tables.append(_table(title, ["arch", "condition", "target", "grouped folds (default): BA mean ± SD (n "
                                     "analysable)", "timestep folds (variant; the reproduction's scheme)", "paper",
                                     "reproduction / model card"], rows))
    late = scoped(df, "late")
    if len(late) and late.groupby("unit_id")["update"].nunique().max() > 1:
        late = late[(late["scheme"] == "grouped") & (late["status"] == "ok")]
        rows = [[a, _cond_label(c), t, _msd(g["balanced_accuracy"], 3, " unit × checkpoint")]
                for (a, c, t), g in late.groupby(["arch", "condition", "target"])]
        tables.append(_table("Decoding, late scope (grouped folds, checkpoints pooled)",
                             ["arch", "condition", "target", "BA"], rows))
    fig_units = fin[(fin["scheme"] == "grouped") & (fin["lag"] == 0)]
    fig = F.decoding_panel(fig_units, figdir / "decoding.png", order=archs)
    notes = ["Balanced accuracy, chance 0.5; a linear SVM per SPEC §6.1; n = analysable units (insufficient units are "
             "counted, never scored 0.5). Timestep-level folds leak across neighbouring steps of one episode "
             "(pitfall 1): they are not comparable to grouped folds (SPEC §7.5)."]
    return _section(tables=tables, figures=[_figure(fig, base, "Decoding (grouped folds)")], notes=notes)


def plsc_summary(df: pd.DataFrame, archs: list[str] | None = None) -> pd.DataFrame:
    """arch × condition × variant × scope summary (mean and SD of k*, r1, ΔPCC over analysable units)."""
    cols = ["arch", "task", "variant", "scope", "n", "n_units", "k_star_mean", "k_star_sd", "r1_mean", "r1_sd",
            "delta_pcc_mean", "delta_pcc_sd"]
    if df is None or not len(df):
        return pd.DataFrame(columns=cols)
    rows = []
    for scope in ("final", "late"):
        d = scoped(df, scope)
        if scope == "late" and (not len(d) or d.groupby("unit_id")["update"].nunique().max() <= 1):
            continue
        if "variant" not in d.columns:
            d = d.assign(variant="per_episode")
        for (arch, cond, variant), g in d.groupby(["arch", "condition", "variant"], sort=False):
            ok = ok_rows(g)
            row = {"arch": arch, "task": cond, "variant": variant, "scope": scope, "n": len(ok),
                   "n_units": g["unit_id"].nunique()}
            for q in ("k_star", "r1", "delta_pcc"):
                s = mean_sd(pd.to_numeric(ok[q]).to_numpy(float)) if q in ok.columns else mean_sd([])
                row[f"{q}_mean"], row[f"{q}_sd"] = s["mean"], s["sd"]
            rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    vorder = {v: i for i, v in enumerate(PLSC_VARIANTS)}
    out["_v"] = out["variant"].map(lambda v: vorder.get(v, 99))
    out["_t"] = out["task"].map(lambda t: {"social": 0, "non_social": 1}.get(t, 2))
    ar = {a: i for i, a in enumerate(archs or [])}
    out["_a"] = out["arch"].map(lambda a: ar.get(a, len(ar)))
    return out.sort_values(["scope", "_v", "_a", "arch", "_t", "task"], kind="stable").drop(
        columns=["_v", "_t", "_a"]).reset_index(drop=True)


def _plsc_section(frames: dict, archs: list[str], figdir: Path, base: Path) -> tuple[dict, pd.DataFrame]:
    df = frames.get("plsc")
    summary = plsc_summary(df, archs)
    if df is None or not len(df):
        return _not_run("the PLSC table is empty"), summary
    fin = scoped(df, "final")
    if "variant" not in fin.columns:
        fin = fin.assign(variant="per_episode")
    archs = _archs(fin, archs)
    ok = ok_rows(fin)
    tables = []
    main = fin[fin["variant"] == "per_episode"]
    rows = []
    for arch in archs:
        for cond in _conditions(main[main["arch"] == arch]) if len(main) else []:
            g = main[(main["arch"] == arch) & (main["condition"] == cond)]
            o = ok_rows(g)
            rt = VISION_REF_TASK.get(cond)
            rows.append([arch, _cond_label(cond), f"{len(o)} / {g['unit_id'].nunique()}", _msd(o["k_star"], 2),
                         _msd(o["r1"], 3), _msd(o["delta_pcc"], 3),
                         _num(pd.to_numeric(o["null_r1_mean"]).mean(), 3) if "null_r1_mean" in o else "—",
                         R.cell("plsc.k_star", task=rt, source=R.PAPER) if rt else "—",
                         R.cell("plsc.delta_pcc", task=rt, source=R.PAPER) if rt else "—"])
    if rows:
        tables.append(_table("PLSC, per-episode fit (default: the paper's recipe), final checkpoint",
                             ["arch", "condition", "n analysable / units", "k* (shared dims)", "r1 (top correlation)",
                              "ΔPCC = r1 − mean null r1", "mean null r1", "paper k*", "paper ΔPCC"], rows))
    # r1 side by side with the reproduction (its numbers are r1, not ΔPCC)
    rows = []
    for arch in archs:
        for cond in [c for c in _conditions(ok[ok["arch"] == arch]) if c in TASKS] if len(ok) else []:
            g = ok[(ok["arch"] == arch) & (ok["condition"] == cond)]
            cells = [_msd(g.loc[g["variant"] == v, "r1"], 3) if (g["variant"] == v).any() else "not run"
                     for v in ("per_episode", "pooled", "residualized", "pooled_residualized")]
            rows.append([arch, _cond_label(cond), *cells,
                         R.cell("plsc.r1_residualized", task=cond, arch=arch, source=R.MRR),
                         "<br>".join(x for x in (R.cell("plsc.r1", task=cond, arch=arch, source=s, missing="")
                                                 for s in (R.MRR, R.CARD)) if x) or "—"])
    if rows:
        tables.append(_table("Top correlation r1 by variant, beside the reproduction (r1 is not ΔPCC)",
                             ["arch", "condition", "per-episode raw", "pooled raw", "per-episode residualized",
                              "pooled residualized", "reproduction residualized r1", "reproduction raw r1 / model card"],
                             rows))
    rows = []
    for _, r in summary[summary["scope"] == "final"].iterrows():
        if r["variant"] == "per_episode":
            continue
        rows.append([r["arch"], _cond_label(r["task"]), r["variant"], f"{r['n']} / {r['n_units']}",
                     _msd_from(r, "k_star", 2), _msd_from(r, "r1", 3), _msd_from(r, "delta_pcc", 3)])
    if rows:
        tables.append(_table("Labelled variants (final checkpoint)", ["arch", "condition", "variant",
                                                                      "n analysable / units", "k*", "r1", "ΔPCC"],
                             rows))
    late = summary[summary["scope"] == "late"]
    if len(late):
        rows = [[r["arch"], _cond_label(r["task"]), r["variant"], r["n"], _msd_from(r, "k_star", 2),
                 _msd_from(r, "r1", 3), _msd_from(r, "delta_pcc", 3)] for _, r in late.iterrows()]
        tables.append(_table("Late scope (checkpoints pooled; n = unit × checkpoint, the form of the paper's n)",
                             ["arch", "condition", "variant", "n", "k*", "r1", "ΔPCC"], rows))
    fig = F.plsc_panel(main[main["condition"].isin(TASKS)], figdir / "plsc.png", order=archs)
    notes = ["r1 is the observed top correlation, not ΔPCC = r1 − mean(null r1) (SPEC §7.5, pitfall 8): the paper "
             "reports ΔPCC, the reproduction r1. The final checkpoint (n = units) is not the paper's pooled late "
             "checkpoints (n = 56 / 59). Dimension counts saturate, so r1 and ΔPCC are the primary effect sizes "
             "(pitfall 10). The reproduction used an episode-shuffle null and population SD."]
    return _section(tables=tables, figures=[_figure(fig, base, "PLSC per-episode ΔPCC and r1")], notes=notes), summary


def _msd_from(row, q: str, digits: int) -> str:
    n = int(row["n"])
    return C.fmt_msd({"mean": row[f"{q}_mean"], "sd": row[f"{q}_sd"], "n": n}, digits) if n else "no data"


def cka_square(cka: pd.DataFrame, archs: list[str]) -> pd.DataFrame:
    """Square matrix of (mean, sd, n_pairs) tuples from the long CKA table."""
    m = C.symmetric_cka(cka)
    names = [a for a in archs if a in set(m["arch_a"])] + sorted(set(m["arch_a"]) - set(archs))
    sq = pd.DataFrame(index=names, columns=names, dtype=object)
    for _, r in m.iterrows():
        if r["arch_a"] in sq.index and r["arch_b"] in sq.columns:
            sq.at[r["arch_a"], r["arch_b"]] = (float(r["mean"]), float(r["sd"]) if r["sd"] == r["sd"] else
                                               float("nan"), int(r["n_pairs"]))
    return sq


def _cka_section(cka: pd.DataFrame | None, pairs: pd.DataFrame | None, archs: list[str], figdir: Path,
                 base: Path) -> dict:
    if cka is None or not len(cka):
        return _not_run("the CKA matrix is empty")
    sq = cka_square(cka, archs)
    names = list(sq.index)
    rows = []
    for a in names:
        cells = []
        for b in names:
            c = sq.at[a, b]
            if not isinstance(c, tuple):
                cells.append("—")
            elif c[2] == 0 or math.isnan(c[0]):
                cells.append("not run (fewer than 2 seeds)" if a == b else "not run")
            else:
                cells.append(f"{c[0]:.3f} ± {c[1]:.3f} (n = {c[2]} pairs)" if c[1] == c[1]
                             else f"{c[0]:.3f} (n = {c[2]} pairs)")
        rows.append([f"**{a}**", *cells])
    ours = _table("CKA of the social chasers' hidden states, mean ± SD over seed pairs (diagonal: within-"
                  "architecture cross-seed ceiling, i ≠ j)", ["", *names], rows)
    ref_archs = ["rnn", "mlp", "ssm", "transformer"]
    rrows = [[f"**{a}**", *[(R.lookup("cka", arch=a, variant=b, source=R.MRR) or [None])[0].value
                            for b in ref_archs]] for a in ref_archs]
    ref = _table("The reproduction's CKA (one seed-0 checkpoint per architecture, RNN-rollout probe; "
                 "`mrr-cka`, n = 1 network per architecture, no SD)", ["", *ref_archs], rrows)
    probes = sorted(set(cka["probe"].dropna())) if "probe" in cka.columns else []
    shas = sorted(set(cka["probe_sha256"].dropna())) if "probe_sha256" in cka.columns else []
    notes = [f"Probe: {', '.join(probes) or 'not recorded'}"
             + (f" (sha256 {', '.join(s[:12] + '…' for s in shas)})" if shas else "") + "."]
    if pairs is not None and len(pairs):
        notes.append(f"{len(pairs)} network pairs in cka_pairs.csv.")
    notes.append("Pitfall 9: the reproduction used one seed and a probe from RNN rollouts only, so its diagonal is a "
                 "trivial 1.00 and its off-diagonal cannot be compared with a cross-seed ceiling; here the diagonal is "
                 "the within-architecture cross-seed CKA, and cross-architecture values should be read against it.")
    fig = F.cka_heatmap(sq, figdir / "cka.png")
    return _section(tables=[ours, ref], figures=[_figure(fig, base, "CKA heatmap")], notes=notes)


def _partner_section(frames: dict, archs: list[str], figdir: Path, base: Path, early_update: int) -> dict:
    df = frames.get("partner")
    if df is None or not len(df):
        return _not_run("the partner-representation table is empty")
    d = add_scope(with_condition(ok_rows(df)))
    if not len(d):
        return _not_run("no partner-representation row is ok")
    d = d.assign(partner=pd.to_numeric(d["partner"]))
    archs = _archs(d, archs)
    several = d.groupby("unit_id")["update"].nunique().max() > 1
    rows = []
    for arch in archs:
        for cond in _conditions(d[d["arch"] == arch]):
            g = d[(d["arch"] == arch) & (d["condition"] == cond)]
            final = g[g["is_final"]]
            rt = VISION_REF_TASK.get(cond)
            paper = " → ".join(R.cell(k, task=rt, source=R.PAPER) for k in ("partner.early", "partner.late")) \
                if rt in TASKS else "—"
            paper = "early " + paper.replace(" → ", " → late ", 1) if rt in TASKS else paper
            mrr = R.cell("partner.late", task=rt, arch=arch, source=R.MRR) if rt in TASKS else "—"
            if several:
                before = g[~g["is_final"]]
                if len(before):
                    dist = (before["update"] - early_update).abs()
                    early_u = before.loc[dist.groupby(before["unit_id"]).idxmin()]
                    ups = sorted(set(int(u) for u in early_u["update"]))
                    early = f"{_msd(early_u['partner'])} at update {', '.join(map(str, ups))}"
                else:
                    early = "not run (no checkpoint before the final one)"
                late = g[g["is_late"]]
                rows.append([arch, _cond_label(cond), early, _msd(late["partner"], 2, " unit × checkpoint"),
                             _msd(final["partner"]), paper, mrr])
            else:
                rows.append([arch, _cond_label(cond), "not run (only one checkpoint per unit)", "not run",
                             _msd(final["partner"]), paper, mrr])
    t = _table("Chaser partner representation, % (non-redundant variance of the partner groups)",
               ["arch", "condition", f"early (the checkpoint nearest to update {early_update:,} before the final "
                                     f"one)", "late (≥ 75 % of the final update, pooled)",
                "final (n = units)", "paper early → late", "reproduction late (unique R², not %)"], rows)
    tables = [t]
    beh = frames.get("behavior")
    if beh is not None and len(beh):
        b = with_condition(beh[beh["matchup"] == "random_explorer"])[["unit_id", "update", "condition",
                                                                      "collisions_per_episode"]]
        b = b.assign(update=pd.to_numeric(b["update"]))
        j = d.merge(b, on=["unit_id", "update", "condition"], how="inner")
        rows = []
        for arch in archs:
            for cond in _conditions(j[j["arch"] == arch]) if len(j) else []:
                g = j[(j["arch"] == arch) & (j["condition"] == cond)]
                pr = pearson(g["partner"].to_numpy(float), g["collisions_per_episode"].to_numpy(float))
                rt = VISION_REF_TASK.get(cond)
                rows.append([arch, _cond_label(cond), _num(pr["r"], 3), pr["n"],
                             R.cell("partner.r_collisions", task=rt, source=R.PAPER) if rt in TASKS else "—",
                             R.cell("partner.r_collisions", task=rt, arch=arch, source=R.MRR) if rt in TASKS else "—"])
        if rows:
            tables.append(_table("Pearson r between partner representation and random-explorer collisions over "
                                 "(unit, checkpoint) points", ["arch", "condition", "r", "n points", "paper",
                                                               "reproduction"], rows))
    fig = F.partner_panel(d, figdir / "partner.png", order=archs)
    notes = [("Early vs late are shown because several checkpoints were analysed." if several else
              "Only the final checkpoint was analysed, so the early → late trend is not run; values are final only.")
             + " The reproduction's numbers are a permutation-based unique R² (fraction), not the official routine."]
    return _section(tables=tables, figures=[_figure(fig, base, "Partner representation over checkpoints")],
                    notes=notes)


def _perturbation_section(frames: dict, archs: list[str], figdir: Path, base: Path) -> dict:
    df = frames.get("perturbation")
    if df is None or not len(df):
        return _not_run("the perturbation table is empty")
    units = perturbation_units(df)
    if not len(units):
        return _not_run("no perturbation row is ok")
    archs = _archs(units, archs)
    paper_for = {"baseline": "original", "shared_removed": "shared_removed", "paper_control": "random_removed"}
    tables = []
    for target in [t for t in ("readout", "recurrent") if t in set(units["target"])]:
        rows = []
        for arch in archs:
            for cond in [c for c in PERTURBATION_CONDITIONS if c in set(units["condition"])] + sorted(
                    set(units["condition"]) - set(PERTURBATION_CONDITIONS)):
                g = units[(units["arch"] == arch) & (units["target"] == target) & (units["condition"] == cond)]
                if not len(g):
                    continue
                base_row = cond == "baseline"
                pv = paper_for.get(cond)
                rows.append([arch, cond, g["unit_id"].nunique(), _msd(g["collisions"]),
                             "—" if base_row else _msd(g["delta_collisions"]),
                             "—" if base_row else _msd(g["delta_partner_in_view"], 1),
                             "—" if base_row else _msd(g["delta_mean_distance"]),
                             "—" if base_row else _msd(g["removed_variance"], 3),
                             R.cell("perturbation.collisions", variant=pv, source=R.PAPER) if pv else "—"])
        tables.append(_table(f"Perturbation, target `{target}`: per-unit means over episodes, then mean ± SD over "
                             f"units", ["arch", "condition", "units", "collisions / episode", "Δ collisions (paired)",
                                        "Δ partner in view (pp)", "Δ mean distance", "removed variance",
                                        "paper collisions"], rows))
    ref_rows = []
    for key, label in (("perturbation.collisions", "collisions / episode"), ("perturbation.in_view", "partner in "
                                                                                                      "view, %"),
                       ("perturbation.distance", "mean distance")):
        for src in (R.PAPER, R.MRR):
            refs = {v: R.lookup(key, variant=v, source=src, any_arch=True) for v in ("original", "shared_removed",
                                                                                     "random_removed")}
            for arch in sorted({r.arch for rs in refs.values() for r in rs}, key=lambda a: ["rnn", "mlp", "ssm",
                                                                                            "transformer"].index(a)):
                cells = [next((r.cell() for r in refs[v] if r.arch == arch), "—") for v in refs]
                ref_rows.append([label, arch if src == R.MRR else "rnn (paper)", *cells])
    tables.append(_table("References (paper Fig. 6s–u; reproduction)", ["quantity", "network", "original",
                                                                          "shared top-10 removed",
                                                                          "'random' removed"], ref_rows))
    opp = sorted(set(df["opponent"].dropna())) if "opponent" in df.columns else []
    fig = F.perturbation_panel(units, figdir / "perturbation.png", order=archs)
    notes = [f"Opponent: {', '.join(opp) or 'not recorded'}. Deltas are paired with the baseline in the same episode "
             "(identical worlds and sampling streams), averaged per unit, then mean ± SD over units. `random_orthogonal` "
             "(a random rank-matched basis orthogonal to the shared subspace) is the primary control and has no paper "
             "counterpart; `paper_control` follows the paper's 'top 25 random PCs of temporally permuted activity', "
             "read as non-overlapping, and is shown beside the paper's 'random'. Partner in view is in % "
             "(percentage points for Δ). The reproduction used self-play and a raw-space projection (pitfalls 2, 3)."]
    return _section(tables=tables, figures=[_figure(fig, base, "Perturbation deltas")], notes=notes)


def _truthy(values) -> pd.Series:
    return pd.Series(values).astype(str).str.lower().isin(["true", "1", "1.0"])


def _fp_cell(f: pd.DataFrame) -> str:
    """Fixed points of one pooled flow: "L* (stable|unstable, slope s)", in order of L*; "none" without a crossing."""
    if not len(f):
        return "none"
    return "; ".join(f"{r['l_star']:.2f} ({'stable' if bool(r['stable']) else 'unstable'}, slope {r['slope']:+.2f})"
                     for _, r in f.sort_values("l_star").iterrows())


def _dynamics_section(frames: dict, archs: list[str], figdir: Path, base: Path, *, per_arch_figures: bool,
                      detail: bool) -> dict:
    """Choice dynamics (tiny-RNN phase portraits, protocol ``dynamics_v1``) at the final checkpoint."""
    df = frames.get("dynamics")
    if df is None or not len(df) or "kind" not in df.columns:
        return _not_run("the dynamics table is empty")
    fin = ok_rows(scoped(df, "final"))
    if not len(fin):
        return _not_run("no final-checkpoint dynamics rollout is ok (every unit degenerate)")
    archs = _archs(fin, archs)
    bins, fixed = dynamics_pooled(fin)
    mc = pd.to_numeric(fin["min_count"]) if "min_count" in fin.columns else pd.Series(dtype=float)
    min_count = int(mc.max()) if mc.notna().any() else 1
    events = [e for e in DYNAMICS_EVENTS if e in set(fin["event"])]
    tables = []
    rows = []
    for arch in archs:
        a = fin[fin["arch"] == arch]
        for cond in _conditions(a):
            for agent in [x for x in ("chaser", "explorer") if x in set(a.loc[a["condition"] == cond, "agent"])]:
                key = (fixed["arch"] == arch) & (fixed["condition"] == cond) & (fixed["agent"] == agent)
                has = (bins["arch"] == arch) & (bins["condition"] == cond) & (bins["agent"] == agent)
                cells = [_fp_cell(fixed[key & (fixed["event"] == e)]) if (has & (bins["event"] == e)).any() else "—"
                         for e in events]
                rows.append([arch, _cond_label(cond), agent, a.loc[a["condition"] == cond, "unit_id"].nunique(),
                             *cells])
    tables.append(_table("Fixed points L* of the pooled mean flow (final checkpoint; bins pooled over units)",
                         ["arch", "condition", "agent", "units", *events], rows,
                         note="L* where the binned mean ΔL crosses zero (linear interpolation between adjacent bins "
                              f"with ≥ {min_count} pairs); stable = attractor of L → L + ΔL (−2 < slope < 0); "
                              "“none”: the mean flow does not change sign; “—”: no pairs."))
    if detail:
        summ = fin[fin["kind"] == "summary"].assign(n=lambda x: pd.to_numeric(x["n"]))
        fps = fin[fin["kind"] == "fixed_point"].copy()
        if len(fps):
            fps["stable"] = _truthy(fps["stable"]).to_numpy()
            fps = fps.assign(l_star=pd.to_numeric(fps["l_star"]), n=pd.to_numeric(fps["n"]))
        rows = []
        for arch in archs:
            s = summ[summ["arch"] == arch]
            for cond in _conditions(s) if len(s) else []:
                for agent in [x for x in ("chaser", "explorer") if x in set(s.loc[s["condition"] == cond, "agent"])]:
                    for e in events:
                        g = s[(s["condition"] == cond) & (s["agent"] == agent) & (s["event"] == e)]
                        if not len(g):
                            continue
                        f = fps[(fps["arch"] == arch) & (fps["condition"] == cond) & (fps["agent"] == agent)
                                & (fps["event"] == e) & fps["stable"]] if len(fps) else pd.DataFrame()
                        # one L* per unit: its stable crossing with the most pairs in the bracketing bins
                        best = (f.sort_values("n", ascending=False).groupby("unit_id").head(1) if len(f)
                                else pd.DataFrame(columns=["l_star"]))
                        rows.append([arch, _cond_label(cond), agent, e, int(g["n"].fillna(0).sum()),
                                     f"{len(best)} / {g['unit_id'].nunique()}",
                                     _msd(best["l_star"]) if len(best) else "—"])
        tables.append(_table("Per unit: stable fixed points (final checkpoint)",
                             ["arch", "condition", "agent", "event", "pairs (all units)",
                              "units with a stable L*", "L* over those units (mean ± SD)"], rows,
                             note="A unit's L* is its stable crossing with the most pairs in the two bracketing bins."))
    figures = []
    plotted = bins[bins["n"] >= min_count]
    for arch in archs:
        name = f"dynamics_{arch}.png" if per_arch_figures else "dynamics.png"
        fig = F.dynamics_panel(plotted[plotted["arch"] == arch], fixed[fixed["arch"] == arch], figdir / name,
                               title=arch)
        figures.append(_figure(fig, base, f"Choice dynamics of {arch} (final checkpoint)"))
    notes = ["Preference L_t = log p_t(c) − log(1 − p_t(c)) of the action c chosen at t, and "
             "ΔL = L_{t+1}(c) − L_t(c) for the same action under the next step's policy (after Ji-An, Benna & "
             "Mattar 2025). Each pair is "
             "labelled by the transition t → t+1, by priority: collision, the agent's own new field, partner in its "
             "physical field of view on s_{t+1} (visible), otherwise invisible; `all` pools the four. Valid episodes "
             "only. The visible/invisible split is what the agent observes only under partial visibility (social); in "
             "the non-social task the partner is never shown, so there it is a control.",
             "c is sampled from p_t, so L_t is selected upward and sampling noise alone gives a negative slope at "
             "high L (regression to the mean): compare events, tasks and architectures rather than reading one "
             "attractor as a strategy. Band: ± SEM treating pairs as independent (optimistic within episodes)."]
    return _section(tables=tables, figures=figures, notes=notes)


def _unit_frames(frames: dict) -> dict:
    """Final-scope unit-level frames for the claims."""
    out = {}
    b = frames.get("behavior")
    out["behavior"] = behavior_units(b) if b is not None and len(b) else None
    for name in ("decoding", "plsc", "partner"):
        df = frames.get(name)
        out[name] = scoped(df, "final") if df is not None and len(df) else None
    p = frames.get("perturbation")
    out["perturbation"] = perturbation_units(p) if p is not None and len(p) else None
    return out


def _claims(frames: dict, archs: list[str]) -> dict[str, list[C.Verdict]]:
    u = _unit_frames(frames)

    def sub(df, arch):
        return None if df is None or not len(df) else df[df["arch"] == arch]

    return {a: C.arch_claims(a, behavior=sub(u["behavior"], a), decoding=sub(u["decoding"], a),
                             plsc=sub(u["plsc"], a), partner=sub(u["partner"], a),
                             perturbation=sub(u["perturbation"], a)) for a in archs}


def _claims_section(per_arch: dict[str, list[C.Verdict]], extra: list[C.Verdict] = ()) -> dict:
    archs = list(per_arch)
    ids = [v.claim for v in next(iter(per_arch.values()))] if per_arch else []
    rows = []
    for cid in ids:
        rows.append([f"({cid}) {C.CLAIMS[cid]}", *[next(v.text for v in per_arch[a] if v.claim == cid)
                                                    for a in archs]])
    tables = [_table("Verdict per claim and architecture", ["claim", *archs], rows)]
    ev = [[f"({v.claim})", a, v.evidence or "—"] for a in archs for v in per_arch[a]]
    ev += [[f"({v.claim})", "all", v.evidence or "—"] for v in extra]
    tables.append(_table("The numbers behind each verdict", ["claim", "arch", "evidence"], ev))
    if extra:
        tables.insert(1, _table("Do the architectures learn the same thing?", ["claim", "verdict"],
                                [[f"({v.claim}) {C.CLAIMS[v.claim]}", v.text] for v in extra]))
    rules = [f"Rule ({k}): {v}" for k, v in C.RULES.items() if extra or k not in ("e1", "e2")]
    return _section(tables=tables, notes=rules)


def _references_legend() -> list[list[str]]:
    return [[f"`{k}`", v] for k, v in R.PROTOCOLS.items()]


def _render(template: str, context: dict, out_md) -> Path:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    text = env.get_template(template).render(**context)
    out_md = Path(out_md)
    write_text_atomic(out_md, text)
    return out_md


def _load_cka(path) -> pd.DataFrame | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise InterbrainError(f"missing CKA table {path}")
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------

def _bottleneck_section(frames: dict, arch: str, figdir: Path, base: Path) -> dict | None:
    """disRNN only (SPEC §3.4): which latent bottlenecks stay open in each unit's final networks."""
    beh = frames["behavior"]
    if arch != "disrnn" or beh is None or not len(beh) or "checkpoint_path" not in beh.columns:
        return None
    from interbrain.agents.disrnn import bottleneck_summary
    from interbrain.checkpoint import load_agents

    finals = beh.sort_values("update").groupby("unit_id")["checkpoint_path"].last()
    rows, table = [], []
    thresholds = None
    for unit, path in finals.items():
        try:
            _, agents = load_agents(path, device="cpu")
        except InterbrainError as exc:
            return _not_run(f"cannot read {path}: {exc}")
        for agent in ("chaser", "explorer"):
            summary = bottleneck_summary(agents[agent])
            thresholds = summary["thresholds"]
            rows += [{"unit_id": unit, "agent": agent, "latent": i, "sigma": sd}
                     for i, sd in enumerate(summary["latent_sigma"])]
            c = summary["counts"]
            table.append([unit, agent, ", ".join(map(str, summary["open_latents"])) or "none",
                          f"{c['latent']['open']} / {len(summary['latent_sigma'])}",
                          f"{c['update_obs']['open']}", f"{c['update_latent']['open']}"])
    fig = F.bottleneck_panel(pd.DataFrame(rows), figdir / "bottlenecks.png", open_below=thresholds["open"],
                                   closed_above=thresholds["closed"])
    return _section(
        tables=[_table("Open bottlenecks at the final checkpoint",
                       ["unit", "agent", "open latents", "open latents / all", "open observation inputs",
                        "open latent inputs"], table,
                       note=f"open: σ < {thresholds['open']}; a closed latent (σ > {thresholds['closed']}) carries "
                            "only noise, so the number of open latents is the model's effective dimensionality")],
        figures=[_figure(fig, base, "disRNN latent bottlenecks (σ per latent; points = units)")])


def arch_report(*, arch, tables_dir, metrics: list, out_md, figures_dir) -> Path:
    """One architecture's report (markdown + PNG figures) from its tables and its units' metrics.jsonl."""
    out_md, figdir = Path(out_md), Path(figures_dir)
    base = out_md.parent
    frames = load_tables({arch: tables_dir})
    training = training_frame(metrics or [])
    if len(training):
        training = training[training["arch"] == arch]
    beh = frames["behavior"]
    units = sorted(set(beh["unit_id"])) if len(beh) else []
    size = sorted(set(beh["size"].dropna())) if len(beh) and "size" in beh.columns else []
    setup, regs = _setup_section({"archs": [arch], "train": {"size": size[0] if len(size) == 1 else None}},
                                 [arch], frames, training)
    per_arch = _claims(frames, [arch])
    context = {
        "arch": arch,
        "n_units": len(units),
        "tasks": sorted(set(beh["task"])) if len(beh) else [],
        "size": ", ".join(size) or "unknown",
        "setup": {**setup, "tables": setup["tables"][1:]},
        "eligibility": _eligibility_section(frames, [arch]),
        "training": _training_section(training, figdir, base, per_seed=True, archs=[arch]),
        "behavior": _behavior_section(frames, [arch], figdir, base),
        "decoding": _decoding_section(frames, [arch], figdir, base),
        "plsc": _plsc_section(frames, [arch], figdir, base)[0],
        "partner": _partner_section(frames, [arch], figdir, base, DEFAULT_EARLY_UPDATE),
        "perturbation": _perturbation_section(frames, [arch], figdir, base),
        "dynamics": _dynamics_section(frames, [arch], figdir, base, per_arch_figures=False, detail=True),
        "bottlenecks": _bottleneck_section(frames, arch, figdir, base),
        "claims": _claims_section(per_arch),
        "protocols": _references_legend(),
        "regularisation": regs.get(arch, "unknown"),
    }
    return _render("arch_report.md.j2", context, out_md)


def cross_report(*, arch_tables: dict[str, str], metrics: dict[str, list], cka_matrix, cka_pairs, out_md, figures_dir,
                 plsc_matrix_csv, config: dict) -> Path:
    """The cross-architecture report (markdown + figures) and ``plsc_matrix_csv`` (arch × task PLSC summary)."""
    out_md, figdir = Path(out_md), Path(figures_dir)
    base = out_md.parent
    config = dict(config or {})
    archs = list(config.get("archs") or arch_tables)
    archs = [a for a in archs if a in arch_tables] + [a for a in arch_tables if a not in archs]
    frames = load_tables(arch_tables)
    metric_paths = [p for a in archs for p in (metrics or {}).get(a, [])]
    training = training_frame(metric_paths)
    setup, regs = _setup_section(config, archs, frames, training)
    cka = _load_cka(cka_matrix)
    pairs = _load_cka(cka_pairs)
    plsc_section, summary = _plsc_section(frames, archs, figdir, base)
    with atomic_path(plsc_matrix_csv) as tmp:
        summary.to_csv(tmp, index=False)
    per_arch = _claims(frames, archs)
    e1 = C.cka_claim(cka)
    e2 = C.agreement_claim(per_arch)
    train = config.get("train", {}) if isinstance(config.get("train"), dict) else {}
    seeds = config.get("seeds")
    n_seeds = str(len(seeds)) if isinstance(seeds, (list, tuple)) else "an unknown number of"
    size = train.get("size", config.get("size"))
    paragraph = C.same_thing_paragraph(e1, e2, archs=archs, size=size, n_seeds=n_seeds,
                                       updates=str(train.get("updates", config.get("updates", "an unknown number of"))),
                                       regularisation=regs)
    partner_cfg = config.get("partner") if isinstance(config.get("partner"), dict) else {}
    early = int(partner_cfg.get("early_update", DEFAULT_EARLY_UPDATE))
    penalised = [a for a in archs if regs.get(a, "").startswith("recurrent L2")]
    context = {
        "archs": archs,
        "setup": setup,
        "penalised": penalised,
        "unpenalised": [a for a in archs if a not in penalised],
        "eligibility": _eligibility_section(frames, archs),
        "training": _training_section(training, figdir, base, per_seed=False, archs=archs),
        "behavior": _behavior_section(frames, archs, figdir, base),
        "decoding": _decoding_section(frames, archs, figdir, base),
        "plsc": plsc_section,
        "plsc_matrix": _rel(Path(plsc_matrix_csv), base),
        "cka": _cka_section(cka, pairs, archs, figdir, base),
        "partner": _partner_section(frames, archs, figdir, base, early),
        "perturbation": _perturbation_section(frames, archs, figdir, base),
        "dynamics": _dynamics_section(frames, archs, figdir, base, per_arch_figures=True, detail=False),
        "claims": _claims_section(per_arch, [e1, e2]),
        "paragraph": paragraph,
        "regularisation": regs,
        "size_note": ("" if size == "matched" else
                      f" The `{size}` preset is not parameter-matched, so architecture is also confounded with "
                      f"capacity (SPEC §3.3, pitfall 7): claims that an architecture *causes* a difference need the "
                      f"`matched` panel." if size else
                      " The size preset is not given, so whether architecture is confounded with capacity is unknown "
                      "(SPEC §3.3, pitfall 7)."),
        "protocols": _references_legend(),
        "verdicts_mrr": R.REPRODUCTION_VERDICTS,
    }
    return _render("cross_report.md.j2", context, out_md)


__all__ = ["arch_report", "cross_report", "arch_tables", "write_manifest", "plsc_summary", "cka_square"]
