"""Seaborn figures of the reports (PNG, Agg backend, written atomically).

Every function takes a tidy frame, writes one PNG and returns its path, or returns None when there is nothing to
plot (the report then says "not run" with the reason). Error bars and bands are the sample SD over units
(pandas ``std``, ddof 1), as in the tables.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from interbrain.io import atomic_path  # noqa: E402

TASK_ORDER = ["social", "non_social"]
DPI = 120


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _theme():
    sns.set_theme(style="whitegrid", context="notebook")


def _arch_order(df: pd.DataFrame, order: list[str] | None) -> list[str]:
    present = list(dict.fromkeys(df["arch"]))
    return [a for a in (order or []) if a in present] + sorted(a for a in present if a not in (order or []))


def _order(values, preferred=TASK_ORDER):
    vals = list(dict.fromkeys(values))
    return [v for v in preferred if v in vals] + sorted(v for v in vals if v not in preferred)


def training_curves(df: pd.DataFrame, path, *, per_seed: bool = False, y: str = "collisions_per_episode",
                    ylabel: str = "collisions per episode (training)", order: list[str] | None = None) -> Path | None:
    """Collisions per episode vs update: one panel per task, a line per architecture (mean ± SD band over seeds), or
    with ``per_seed`` a line per seed."""
    if df is None or not len(df) or y not in df.columns:
        return None
    _theme()
    tasks = _order(df["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        d = df[df["task"] == task]
        if per_seed:
            sns.lineplot(data=d, x="update", y=y, hue="seed", palette="tab10", ax=ax, errorbar=None, marker="o",
                         markersize=3)
        else:
            sns.lineplot(data=d, x="update", y=y, hue="arch", hue_order=_arch_order(df, order), ax=ax, errorbar="sd",
                         marker="o", markersize=3)
        ax.set_title(task.replace("_", "-"))
        ax.set_xlabel("PPO update")
        ax.set_ylabel(ylabel)
    fig.suptitle("Training: collisions per episode" + (" (per seed)" if per_seed else " (mean ± SD over seeds)"))
    return _save(fig, path)


def behavior_panel(units: pd.DataFrame, metrics: list[tuple[str, str]], path,
                   references: dict[tuple[str, str], float] | None = None, order: list[str] | None = None) -> Path | None:
    """One panel per behaviour metric: dots = units, bars = mean ± SD, per architecture and task; dashed lines =
    the paper's Fig. 5 means (``references[(metric, task)]``)."""
    metrics = [(m, label) for m, label in metrics if m in units.columns and units[m].notna().any()]
    if units is None or not len(units) or not metrics:
        return None
    _theme()
    tasks = _order(units["task"].unique())
    palette = dict(zip(tasks, sns.color_palette("deep", len(tasks))))
    ncol = min(3, len(metrics))
    nrow = int(np.ceil(len(metrics) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax, (m, label) in zip(axes.flat, metrics):
        d = units[["arch", "task", m]].dropna()
        o = _arch_order(d, order)
        sns.stripplot(data=d, x="arch", y=m, hue="task", order=o, hue_order=tasks, palette=palette, dodge=True,
                      size=5, alpha=0.55, jitter=0.08, ax=ax, legend=ax is axes.flat[0])
        sns.pointplot(data=d, x="arch", y=m, hue="task", order=o, hue_order=tasks, palette="dark:black",
                      errorbar="sd", dodge=0.4, linestyle="none", markers="D", markersize=5, capsize=0.12,
                      err_kws={"linewidth": 1.3}, ax=ax, legend=False)
        for task in tasks:
            ref = (references or {}).get((m, task))
            if ref is not None:
                ax.axhline(ref, ls="--", lw=1, color=palette[task], alpha=0.8)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("architecture")
        ax.set_ylabel(label.split(" (")[0].replace(" / episode", ""))
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle("Behaviour at the final checkpoint (dots: units; black diamond and bar: mean ± SD; dashed: paper "
                 "Fig. 5 mean)")
    fig.tight_layout()
    return _save(fig, path)


def decoding_panel(units: pd.DataFrame, path, order: list[str] | None = None) -> Path | None:
    """Balanced accuracy per target: architecture × task, mean ± SD over analysable units; chance = 0.5."""
    if units is None or not len(units):
        return None
    d = units[units["status"] == "ok"].copy()
    if not len(d):
        return None
    _theme()
    targets = list(dict.fromkeys(d["target"]))
    tasks = _order(d["condition"].unique())
    fig, axes = plt.subplots(1, len(targets), figsize=(4.3 * len(targets), 3.8), squeeze=False, sharey=True)
    for ax, target in zip(axes[0], targets):
        t = d[d["target"] == target]
        sns.barplot(data=t, x="arch", y="balanced_accuracy", hue="condition", order=_arch_order(d, order),
                    hue_order=tasks, errorbar="sd", capsize=0.1, ax=ax, legend=ax is axes[0][0])
        ax.axhline(0.5, ls="--", color="grey", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_title(target.replace("_", " "), fontsize=10)
        ax.set_xlabel("architecture")
        ax.set_ylabel("balanced accuracy")
    fig.suptitle("Event decoding (grouped folds; mean ± SD over analysable units; dashed: chance)")
    fig.tight_layout()
    return _save(fig, path)


def plsc_panel(units: pd.DataFrame, path, order: list[str] | None = None) -> Path | None:
    """ΔPCC and r1 (per-episode default) per architecture × task."""
    if units is None or not len(units):
        return None
    d = units[units["status"].fillna("ok") == "ok"] if "status" in units.columns else units
    d = d.melt(id_vars=["arch", "condition"], value_vars=[c for c in ("delta_pcc", "r1") if c in d.columns],
               var_name="quantity", value_name="value").dropna(subset=["value"])
    if not len(d):
        return None
    _theme()
    tasks = _order(d["condition"].unique())
    quantities = list(dict.fromkeys(d["quantity"]))
    fig, axes = plt.subplots(1, len(quantities), figsize=(4.8 * len(quantities), 3.8), squeeze=False)
    titles = {"delta_pcc": "ΔPCC = r1 − mean null r1", "r1": "r1 (top correlation; not ΔPCC)"}
    for ax, q in zip(axes[0], quantities):
        o = _arch_order(d, order)
        sns.barplot(data=d[d["quantity"] == q], x="arch", y="value", hue="condition", order=o, hue_order=tasks,
                    errorbar="sd", capsize=0.1, ax=ax, legend=ax is axes[0][0])
        sns.stripplot(data=d[d["quantity"] == q], x="arch", y="value", hue="condition", order=o, hue_order=tasks,
                      dodge=True, palette="dark:black", size=3, ax=ax, legend=False)
        ax.axhline(0, color="grey", lw=1)
        ax.set_title(titles.get(q, q), fontsize=10)
        ax.set_xlabel("architecture")
        ax.set_ylabel(q)
    fig.suptitle("PLSC, per-episode fit (mean ± SD over units)")
    fig.tight_layout()
    return _save(fig, path)


def cka_heatmap(matrix: pd.DataFrame, path, *, title: str = "Chaser CKA (mean over seed pairs)") -> Path | None:
    """Heatmap of a square CKA matrix (index = columns = architectures); annotations: mean (n pairs below)."""
    if matrix is None or not len(matrix):
        return None
    _theme()
    means = matrix.map(lambda c: c[0] if isinstance(c, tuple) else np.nan).astype(float)
    annot = matrix.map(lambda c: f"{c[0]:.2f}\n±{c[1]:.2f}\nn={c[2]}" if isinstance(c, tuple) and c[1] == c[1]
                       else (f"{c[0]:.2f}\nn={c[2]}" if isinstance(c, tuple) else ""))
    k = len(means)
    fig, ax = plt.subplots(figsize=(1.4 * k + 2.5, 1.2 * k + 1.5))
    sns.heatmap(means, annot=annot.to_numpy(), fmt="", vmin=0, vmax=1, cmap="viridis", square=True,
                cbar_kws={"label": "linear CKA"}, ax=ax, annot_kws={"fontsize": 9})
    ax.set_xlabel("architecture B")
    ax.set_ylabel("architecture A")
    ax.set_title(title + "\n(diagonal: within-architecture cross-seed ceiling)", fontsize=10)
    return _save(fig, path)


def partner_panel(df: pd.DataFrame, path, order: list[str] | None = None) -> Path | None:
    """Partner representation (%) vs update: architecture × task, mean ± SD band over units."""
    if df is None or not len(df) or "partner" not in df.columns:
        return None
    d = df.dropna(subset=["partner"])
    if not len(d):
        return None
    _theme()
    tasks = _order(d["condition"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks):
        t = d[d["condition"] == task]
        sns.lineplot(data=t, x="update", y="partner", hue="arch", hue_order=_arch_order(d, order), errorbar="sd",
                     marker="o", ax=ax)
        ax.set_title(task.replace("_", "-"))
        ax.set_xlabel("checkpoint update")
        ax.set_ylabel("partner representation (%)")
    fig.suptitle("Chaser partner representation in the neural action space (mean ± SD over units)")
    fig.tight_layout()
    return _save(fig, path)


def perturbation_panel(units: pd.DataFrame, path, order: list[str] | None = None) -> Path | None:
    """Per-unit mean paired Δ (collisions, partner in view, distance) per condition, architecture; readout target."""
    if units is None or not len(units):
        return None
    d = units[(units["condition"] != "baseline") & (units["target"] == "readout")]
    if not len(d):
        return None
    _theme()
    cols = [("delta_collisions", "Δ collisions / episode"), ("delta_partner_in_view", "Δ partner in view (pp)"),
            ("delta_mean_distance", "Δ mean distance")]
    arch_order = order
    conds = [c for c in ("shared_removed", "random_orthogonal", "top_unique_removed", "paper_control")
             if c in set(d["condition"])] + sorted(set(d["condition"]) - {"shared_removed", "random_orthogonal",
                                                                        "top_unique_removed", "paper_control"})
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9), squeeze=False)
    for ax, (c, label) in zip(axes[0], cols):
        sns.barplot(data=d, x="arch", y=c, hue="condition", order=_arch_order(d, arch_order), hue_order=conds,
                    errorbar="sd", capsize=0.08, ax=ax, legend=ax is axes[0][0])
        ax.axhline(0, color="grey", lw=1)
        ax.set_xlabel("architecture")
        ax.set_ylabel(label)
    fig.suptitle("Shared-subspace removal (readout target): per-unit mean paired Δ vs baseline, mean ± SD over units")
    fig.tight_layout()
    return _save(fig, path)


DYNAMICS_EVENTS = ["collision", "new_field", "visible", "invisible", "all"]
_DYNAMICS_COLOURS = {"collision": "#c0392b", "new_field": "#27ae60", "visible": "#2e86c1", "invisible": "#e67e22",
                     "all": "#222222"}


def dynamics_panel(bins: pd.DataFrame, fixed: pd.DataFrame, path, *, title: str = "") -> Path | None:
    """Tiny-RNN phase portraits of one architecture: mean ΔL vs L (pooled bins, band ± SEM), a line per event, a panel
    per condition (rows) and agent (columns); fixed points of the pooled flow on the ΔL = 0 line (filled: stable,
    −2 < slope < 0; open: not). ``bins`` / ``fixed``: :func:`interbrain.report.tables.dynamics_pooled` rows of one
    architecture, ``bins`` already restricted to the bins that enter the fixed-point search."""
    if bins is None or not len(bins):
        return None
    _theme()
    conds = _order(bins["condition"].unique())
    agents = [a for a in ("chaser", "explorer") if a in set(bins["agent"])]
    events = [e for e in DYNAMICS_EVENTS if e in set(bins["event"])] + sorted(set(bins["event"]) - set(DYNAMICS_EVENTS))
    palette = {e: _DYNAMICS_COLOURS.get(e, "grey") for e in events}
    fig, axes = plt.subplots(len(conds), len(agents), figsize=(5.4 * len(agents), 3.7 * len(conds)), squeeze=False,
                             sharex=True)
    for i, cond in enumerate(conds):
        for j, agent in enumerate(agents):
            ax = axes[i][j]
            d = bins[(bins["condition"] == cond) & (bins["agent"] == agent)].sort_values("l_mean")
            if not len(d):
                ax.text(0.5, 0.5, "no bins with enough pairs", ha="center", va="center", transform=ax.transAxes,
                        color="grey")
            else:
                present = [e for e in events if e in set(d["event"])]
                sns.lineplot(data=d, x="l_mean", y="delta_mean", hue="event", hue_order=present, palette=palette,
                             style="event", style_order=present,
                             dashes={e: (4, 2) if e == "all" else "" for e in present}, markers=False, sort=True,
                             estimator=None, errorbar=None, ax=ax, legend=False)
            for e in events:
                g = d[d["event"] == e]
                if len(g):
                    sem = g["delta_sem"].fillna(0).to_numpy(float)
                    ax.fill_between(g["l_mean"], g["delta_mean"] - sem, g["delta_mean"] + sem, color=palette[e],
                                    alpha=0.15, lw=0)
            f = fixed[(fixed["condition"] == cond) & (fixed["agent"] == agent)] if fixed is not None and len(
                fixed) else pd.DataFrame()
            for _, r in f.iterrows():
                c = palette.get(r["event"], "grey")
                ax.plot([r["l_star"]], [0.0], marker="o", ms=8, mec=c, mew=1.8,
                        mfc=c if bool(r["stable"]) else "white", zorder=5, ls="none")
            ax.axhline(0, color="grey", lw=1)
            task, _, vis = cond.partition("+")
            label = task.replace("_", "-") + (f" ({vis} vision control)" if vis else "")
            ax.set_title(f"{label} — {agent}", fontsize=10)
            ax.set_xlabel(r"preference $L_t$ (log-odds of the chosen action $c_t$)")
            ax.set_ylabel(r"$\Delta L = L_{t+1}(c_t) - L_t(c_t)$")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=palette[e], ls="--" if e == "all" else "-", label=e.replace("_", " "))
               for e in events]
    handles += [Line2D([], [], marker="o", ls="none", color="grey", mfc="grey", label="fixed point, stable"),
                Line2D([], [], marker="o", ls="none", color="grey", mfc="white", label="fixed point, not stable")]
    fig.suptitle((title + ": " if title else "") + "choice dynamics (mean ΔL ± SEM, bins pooled over units)")
    fig.tight_layout()
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 4),
               frameon=False, fontsize=9)
    return _save(fig, path)


def bottleneck_panel(sigmas: pd.DataFrame, path, *, open_below: float, closed_above: float) -> Path | None:
    """disRNN latent bottlenecks: σ of each latent per unit (points) and their mean (bars), one panel per agent; σ below
    ``open_below`` = the latent carries information, above ``closed_above`` = closed (noise only). ``sigmas``: rows
    (unit_id, agent, latent, sigma)."""
    if sigmas is None or not len(sigmas):
        return None
    _theme()
    agents = [a for a in ("chaser", "explorer") if a in set(sigmas["agent"])]
    fig, axes = plt.subplots(1, len(agents), figsize=(5.2 * len(agents), 3.6), squeeze=False, sharey=True)
    for ax, agent in zip(axes[0], agents):
        d = sigmas[sigmas["agent"] == agent]
        sns.barplot(data=d, x="latent", y="sigma", color="#9ecae1", errorbar=None, ax=ax)
        sns.stripplot(data=d, x="latent", y="sigma", hue="unit_id", dodge=False, size=5, ax=ax, legend=agent == agents[-1])
        ax.axhline(open_below, color="#2ca02c", ls="--", lw=1)
        ax.axhline(closed_above, color="#d62728", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{agent}: latent bottleneck σ (open < {open_below}, closed > {closed_above})", fontsize=10)
        ax.set_xlabel("latent")
        ax.set_ylabel("σ")
    if len(agents) and axes[0][-1].get_legend() is not None:
        sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["bottleneck_panel", "training_curves", "behavior_panel", "decoding_panel", "plsc_panel", "cka_heatmap", "partner_panel",
           "perturbation_panel", "dynamics_panel"]
