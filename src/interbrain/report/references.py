"""Every reference number of SPEC §7, as data (never inline in a template).

Each :class:`Ref` keeps the number exactly as SPEC §7 prints it (``value``/``sd`` are the printed strings, with the
Unicode minus), plus what SPEC §7.5 requires every side-by-side cell to carry: the source name, n, the SD type and a
protocol id (described in :data:`PROTOCOLS`). ``Ref.cell()`` renders one table cell.

SD types: ``sample`` (ddof 1; the SPEC convention "SD means sample SD unless stated otherwise" applies to the paper's
source-data recomputations), ``population`` (the reproduction's summaries, SPEC §7.3), ``none`` (a single value or a
value without spread), ``not stated``.

Quantity keys used by the reports (``key``):

- behaviour (vs a uniform-random opponent): ``behavior.chaser_collisions``, ``behavior.chaser_in_view``,
  ``behavior.chaser_distance``, ``behavior.chaser_new_fields``, ``behavior.explorer_new_fields``,
  ``behavior.explorer_distance``, ``behavior.explorer_collisions`` (collisions suffered by a trained explorer)
- decoding: ``decoding.<target>`` with the §6.1 target names
- PLSC: ``plsc.k_star``, ``plsc.delta_pcc``, ``plsc.r1`` (raw top correlation), ``plsc.r1_residualized``,
  ``plsc.separation_residualized``, ``plsc.r1_vision_split``
- ``cka`` (``arch`` x ``variant`` = the other architecture)
- partner: ``partner.early``, ``partner.late``, ``partner.first``, ``partner.r_collisions``
- perturbation: ``perturbation.collisions``, ``perturbation.in_view``, ``perturbation.distance``,
  ``perturbation.shared_variance`` (``variant`` = ``original`` | ``shared_removed`` | ``random_removed``)
- other: ``training.w_hh_norm``, ``degeneracy.*``, ``runtime.*``, ``rewrite.*``
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER = "paper"
MRR = "reproduction"
CARD = "model card"

# Protocol ids carried by every reference cell; the report prints this table as its reference legend.
PROTOCOLS: dict[str, str] = {
    "paper-fig5": "paper Fig. 5: trained agent vs a uniform-random opponent at iteration 20,000; n = 10 pairs; "
                  "mean ± SD recomputed from the source-data workbooks",
    "paper-fig6-decoding": "paper Fig. 6b–e: SVM, balanced accuracy; kernel, folds and class balancing unpublished",
    "paper-fig6-plsc": "paper Fig. 6g–h: PLSC with the circular-shift null (tempShift 60), counts averaged over "
                       "episodes, late checkpoints pooled (n = units × checkpoints, after exclusions)",
    "paper-fig6-partner": "paper Fig. 6p–r: official non-redundant-variance routine on the chaser's neural action "
                          "space; early vs late checkpoints",
    "paper-fig6-perturbation": "paper Fig. 6s–u: top-10 shared dimensions removed vs 'random' = top 25 PCs of "
                               "temporally permuted activity; opponent not stated; n = 10",
    "mrr-behavior": "reproduction: random opponent, 100 episodes × 100 steps, seed 0; RNN in `modern` init, L2 0.3 "
                    "on the RNN only, spawn 0..9, `std` sizes; 10 seeds per task; population SD",
    "mrr-decoding": "reproduction: timestep-level folds (not episode-grouped; pitfall 1), shuffled ≈ 0.50",
    "mrr-plsc-raw": "reproduction: raw PLSC, episode-shuffle null with 200 permutations (95th percentile on S, count "
                    "over all ranks)",
    "mrr-plsc-resid": "reproduction: residualized PLSC, 100 permutations; top correlation r1 (not ΔPCC)",
    "mrr-cka": "reproduction: chaser CKA from one seed-0 checkpoint per architecture, probe from RNN rollouts only "
               "(pitfall 9), so the diagonal is a trivial 1.00",
    "mrr-partner": "reproduction: permutation-based unique R² on 30 × 300 rollouts (not the official routine)",
    "mrr-perturbation": "reproduction: self-play vs the trained explorer, 100 × 100, readout-only, z-space basis "
                        "applied to raw states (pitfall 2), 'random' = top-25 PCs (pitfall 3)",
    "mrr-rewrite": "reproduction, later rewrite: lr 1e-3, one epoch, 10 seeds, CPU",
    "mrr-runtime": "reproduction: wall-clock and throughput",
    "model-card": "model card (JacobLinCool/mouse-run-run-2-transformer): null and residualisation unspecified",
}


@dataclass(frozen=True)
class Ref:
    key: str
    task: str | None            # social | non_social | non_social_vision | None
    value: str                  # exactly as SPEC §7 prints it
    sd: str | None
    n: int | None
    sd_type: str                # sample | population | none | not stated
    source: str                 # "paper Fig. 5i", "reproduction §7.3", ...
    protocol: str               # key of PROTOCOLS
    arch: str | None = "rnn"
    variant: str | None = None
    unit: str = ""
    note: str = ""

    @property
    def value_f(self) -> float | None:
        """The value as a float (None for non-numeric entries such as ``82/500``)."""
        return _to_float_or_none(self.value)

    @property
    def sd_f(self) -> float | None:
        return None if self.sd is None else _to_float_or_none(self.sd)

    @property
    def approx(self) -> bool:
        return self.value.startswith("≈")

    def spec_text(self) -> str:
        """The number as SPEC §7 prints it (value ± sd)."""
        return self.value if self.sd is None else f"{self.value} ± {self.sd}"

    def cell(self) -> str:
        """One side-by-side table cell: the number, then source, n, SD type and protocol id (SPEC §7.5)."""
        unit = {"%": " %", "fraction": " (fraction)", "unique R²": " (unique R²)"}.get(self.unit, "")
        n = f"n = {self.n}" if self.n is not None else "n not stated"
        sd = f"{self.sd_type} SD" if self.sd is not None else "no SD"
        note = f"; {self.note}" if self.note else ""
        return f"{self.spec_text()}{unit} ({self.source}; {n}; {sd}; `{self.protocol}`{note})"


def _to_float(text: str) -> float:
    return float(text.replace("≈", "").replace("−", "-").replace(",", "").strip())


def _to_float_or_none(text: str) -> float | None:
    try:
        return _to_float(text)
    except ValueError:
        return None


def _pair(key, source, protocol, social, non_social, *, n=10, sd_type="sample", arch="rnn", unit="", note="",
          n_ns=None, variant=None):
    out = []
    for task, vals, nn in (("social", social, n), ("non_social", non_social, n if n_ns is None else n_ns)):
        if vals is None:
            continue
        v, s = vals if isinstance(vals, tuple) else (vals, None)
        out.append(Ref(key, task, v, s, nn, sd_type if s is not None else "none", source, protocol, arch, variant,
                       unit, note))
    return out


REFERENCES: list[Ref] = []
_add = REFERENCES.extend

# --- SPEC §7.1 the paper, Fig. 5 (behaviour vs a uniform-random opponent, iteration 20,000, n = 10) ---------------
for _key, _panel, _s, _ns, _unit in (
        ("behavior.chaser_collisions", "5i", ("16.06", "2.68"), ("3.19", "0.36"), "collisions/episode"),
        ("behavior.chaser_in_view", "5j", ("86.36", "7.00"), ("36.16", "1.55"), "%"),
        ("behavior.chaser_distance", "5k", ("3.04", "0.47"), ("6.44", "0.12"), "cells"),
        ("behavior.chaser_new_fields", "5l", ("30.77", "1.87"), ("72.39", "3.86"), "fields/episode"),
        ("behavior.explorer_new_fields", "5m", ("35.73", "7.00"), ("58.68", "3.24"), "fields/episode"),
        ("behavior.explorer_distance", "5n", ("7.71", "0.38"), ("6.56", "0.12"), "cells")):
    _add(_pair(_key, f"paper Fig. {_panel}", "paper-fig5", _s, _ns, unit=_unit))

# --- SPEC §7.2 the paper, Fig. 6 ---------------------------------------------------------------------------------
_add(_pair("decoding.chaser_collision", "paper Fig. 6b–e", "paper-fig6-decoding", ("0.949", "0.020"), ("0.50", "0")))
_add(_pair("decoding.chaser_partner_escape", "paper Fig. 6b–e", "paper-fig6-decoding", ("0.886", "0.126"),
           ("0.520", "0.026"), n=None, note="in-view steps"))
_add(_pair("decoding.explorer_collision", "paper Fig. 6b–e", "paper-fig6-decoding", ("0.942", "0.040"), ("0.50", "0"),
           n=None))
_add(_pair("decoding.explorer_partner_approach", "paper Fig. 6b–e", "paper-fig6-decoding", "≈ 0.9", "≈ 0.5", n=None,
           note="read off the plot; the source-data sheet is empty"))
_add(_pair("plsc.k_star", "paper Fig. 6g", "paper-fig6-plsc", ("164.69", "51.95"), ("0.015", "0.047"), n=56, n_ns=59,
           unit="dimensions"))
_add([Ref("plsc.k_star", "non_social_vision", "0.167", "0.585", None, "sample", "paper Fig. 6g", "paper-fig6-plsc",
          unit="dimensions", note="non-social with vision")])
_add(_pair("plsc.delta_pcc", "paper Fig. 6h", "paper-fig6-plsc", ("0.406", "0.046"), ("−0.0003", "0.027"), n=None,
           note="top dimension"))
_add([Ref("plsc.delta_pcc", "non_social_vision", "0.035", "0.050", None, "sample", "paper Fig. 6h", "paper-fig6-plsc",
          note="non-social with vision")])
_add(_pair("partner.early", "paper Fig. 6p–r", "paper-fig6-partner", ("0.69", "0.20"), ("0.57", "0.14"), n=None,
           unit="%"))
_add(_pair("partner.late", "paper Fig. 6p–r", "paper-fig6-partner", ("4.37", "1.58"), ("0.39", "0.17"), n=None,
           unit="%"))
_add(_pair("partner.r_collisions", "paper Fig. 6", "paper-fig6-partner", "0.61", "−0.055", n=219, n_ns=220,
           note="Pearson r over checkpoints"))
for _key, _vals, _unit in (("perturbation.collisions", (("17.49", "5.72"), ("4.55", "3.76"), ("16.91", "11.59")),
                            "collisions/episode"),
                           ("perturbation.in_view", (("89.5", "5.5"), ("46.9", "22.2"), ("81.9", "11.6")), "%"),
                           ("perturbation.distance", (("2.32", "0.25"), ("4.75", "1.24"), ("2.69", "0.62")), "cells")):
    for _variant, (_v, _s) in zip(("original", "shared_removed", "random_removed"), _vals):
        _add([Ref(_key, "social", _v, _s, 10, "sample", "paper Fig. 6s–u", "paper-fig6-perturbation",
                  variant=_variant, unit=_unit, note="−74 %" if (_key, _variant) == ("perturbation.collisions",
                                                                                      "shared_removed") else "")])

# --- SPEC §7.3 the reproduction (10 seeds per task, population SD) -------------------------------------------------
_M = "reproduction §7.3"
for _arch, _coll, _view, _ns_coll, _expl in (
        ("rnn", ("8.98", "5.70"), ("60.51", "18.50"), ("3.45", "0.32"), ("0.57", "0.19")),
        ("mlp", ("26.93", "4.00"), "0.93", "2.68", "0.92"),
        ("ssm", ("35.92", "3.56"), "0.94", "3.15", "0.45"),
        ("transformer", ("41.31", "3.29"), "0.96", "3.39", "0.28")):
    _add(_pair("behavior.chaser_collisions", _M, "mrr-behavior", _coll, _ns_coll, sd_type="population", arch=_arch,
               unit="collisions/episode"))
    _add(_pair("behavior.chaser_in_view", _M, "mrr-behavior", _view, None, sd_type="population", arch=_arch,
               unit="%" if _arch == "rnn" else "fraction",
               note="non-social in view unavailable (pitfall 5)"))
    _add(_pair("behavior.explorer_collisions", _M, "mrr-behavior", _expl,
               ("2.87", "0.32") if _arch == "rnn" else None, sd_type="population", arch=_arch,
               unit="collisions/episode", note="collisions suffered by the trained explorer"))
_add(_pair("behavior.chaser_distance", _M, "mrr-behavior", ("3.78", "0.99"), ("5.19", "0.04"), sd_type="population",
           unit="cells"))
_add(_pair("behavior.chaser_new_fields", _M, "mrr-behavior", ("17.55", "5.31"), ("82.56", "1.90"),
           sd_type="population", unit="fields/episode"))
_add(_pair("behavior.explorer_new_fields", _M, "mrr-behavior", ("45.24", "12.60"), ("74.87", "6.06"),
           sd_type="population", unit="fields/episode"))
_add(_pair("behavior.explorer_distance", _M, "mrr-behavior", ("5.58", "0.19"), ("5.00", "0.08"), sd_type="population",
           unit="cells"))
_add([Ref("training.w_hh_norm", None, "0.05", None, None, "none", _M, "mrr-behavior",
          note="final ‖W_hh‖_F of the RNN, down from 12.8 at init (L2 on the RNN only; pitfall 4)"),
      Ref("training.w_hh_norm_init", None, "12.8", None, None, "none", _M, "mrr-behavior",
          note="‖W_hh‖_F at init (`modern`)")])

# Decoding (social; timestep folds). The per-arch table gives values without n or SD.
for _arch, _cc, _esc, _app in (("rnn", "0.983", "0.888", "0.886"), ("mlp", "0.914", "0.780", "0.778"),
                               ("ssm", "0.850", "0.768", "0.733"), ("transformer", "0.847", "0.761", "0.759")):
    if _arch == "rnn":  # the RNN detail carries SD and n
        _add([Ref("decoding.chaser_collision", "social", "0.983", "0.014", 6, "population", _M, "mrr-decoding"),
              Ref("decoding.chaser_partner_escape", "social", "0.888", "0.033", 9, "population", _M, "mrr-decoding"),
              Ref("decoding.explorer_collision", "social", "0.983", "0.014", 6, "population", _M, "mrr-decoding"),
              Ref("decoding.explorer_partner_approach", "social", _app, None, None, "none", _M, "mrr-decoding"),
              Ref("decoding.chaser_collision", "non_social", "0.765", "0.044", 10, "population", _M, "mrr-decoding",
                  note="paper: 0.50"),
              Ref("decoding.explorer_collision", "non_social", "0.747", "0.066", 10, "population", _M,
                  "mrr-decoding", note="paper: 0.50")])
    else:
        for _key, _v in (("decoding.chaser_collision", _cc), ("decoding.chaser_partner_escape", _esc),
                         ("decoding.explorer_partner_approach", _app)):
            _add([Ref(_key, "social", _v, None, None, "none", _M, "mrr-decoding", arch=_arch,
                      note="'collision' column" if _key == "decoding.chaser_collision" else "")])
_add([Ref("decoding.chaser_collision", "social", "0.85", None, None, "none", "model card", "model-card",
          arch="transformer"),
      Ref("decoding.chaser_partner_escape", "social", "0.76", None, None, "none", "model card", "model-card",
          arch="transformer"),
      Ref("decoding.explorer_partner_approach", "social", "0.76", None, None, "none", "model card", "model-card",
          arch="transformer")])

# PLSC
_add(_pair("plsc.r1", _M, "mrr-plsc-raw", ("0.743", "0.218"), ("0.067", "0.033"), sd_type="population",
           note="raw top correlation"))
_add(_pair("plsc.k_star", _M, "mrr-plsc-raw", ("183.0", "83.64"), ("107.5", "17.88"), sd_type="population",
           unit="dimensions", note="significant dimensions, all ranks counted"))
_add([Ref("plsc.r1", "non_social", "0.957", None, None, "none", _M, "mrr-plsc-raw", arch="transformer",
          note="raw top correlation; untrained positions (pitfall 6)"),
      Ref("plsc.r1", "social", "0.81", None, None, "none", "model card", "model-card", arch="transformer",
          note="'PLSC top correlation'; no counterpart in the study tables")])
for _arch, _s, _ns, _sep in (("rnn", ("0.688", "0.23"), "0.067", "0.62"), ("mlp", ("0.679", "0.06"), "0.103", "0.58"),
                             ("ssm", ("0.642", "0.12"), "0.315", "0.33"),
                             ("transformer", ("0.438", "0.08"), "0.356", "0.08")):
    _add(_pair("plsc.r1_residualized", _M, "mrr-plsc-resid", _s, _ns, sd_type="population", arch=_arch))
    _add([Ref("plsc.separation_residualized", None, _sep, None, None, "none", _M, "mrr-plsc-resid", arch=_arch,
              note="social − non-social")])
for _arch, _variant, _v, _n in (("rnn", "in_view_below_40", "0.652", 7), ("rnn", "in_view_at_least_40", "0.947", 1),
                                ("mlp", "in_view_at_least_40", "0.679", 10), ("ssm", "in_view_at_least_40", "0.642", 9),
                                ("transformer", "in_view_at_least_40", "0.438", 10)):
    _add([Ref("plsc.r1_vision_split", "social", _v, None, _n, "none", _M, "mrr-plsc-resid", arch=_arch,
              variant=_variant, note="vision split, residualized")])

# CKA (one seed-0 checkpoint per architecture)
_CKA = {("rnn", "mlp"): "0.68", ("rnn", "ssm"): "0.64", ("rnn", "transformer"): "0.67", ("mlp", "ssm"): "0.71",
        ("mlp", "transformer"): "0.78", ("ssm", "transformer"): "0.76"}
for (_a, _b), _v in _CKA.items():
    for _x, _y in ((_a, _b), (_b, _a)):
        _add([Ref("cka", "social", _v, None, 1, "none", _M, "mrr-cka", arch=_x, variant=_y)])
for _a in ("rnn", "mlp", "ssm", "transformer"):
    _add([Ref("cka", "social", "1.00", None, 1, "none", _M, "mrr-cka", arch=_a, variant=_a,
              note="same network with itself (trivial)")])

# Partner representation (RNN; unique R², not the official routine)
_add(_pair("partner.late", _M, "mrr-partner", "0.0393", "0.000083", n=None, unit="unique R²"))
_add([Ref("partner.first", "social", "0.0746", None, None, "none", _M, "mrr-partner", unit="unique R²",
          note="first checkpoint; decreasing to 0.0393, where the paper's increased")])
_add(_pair("partner.r_collisions", _M, "mrr-partner", "0.639", "0.284", n=None, note="Pearson r"))

# Perturbation (collisions, self-play)
for _arch, _vals in (("rnn", (("4.57", "7.97"), ("2.44", "3.04"), ("1.55", "0.93"))),
                     ("mlp", ("21.23", "2.04", "1.58")), ("ssm", ("17.21", "4.16", "1.36")),
                     ("transformer", ("10.67", "2.05", "1.70"))):
    for _variant, _val in zip(("original", "shared_removed", "random_removed"), _vals):
        _v, _s = _val if isinstance(_val, tuple) else (_val, None)
        _add([Ref("perturbation.collisions", "social", _v, _s, 10 if _s else None,
                  "population" if _s else "none", _M, "mrr-perturbation", arch=_arch, variant=_variant,
                  unit="collisions/episode")])
for _key, _vals, _unit in (("perturbation.in_view", (("33.08", "24.43"), ("36.52", "21.59"), ("31.76", "10.36")), "%"),
                           ("perturbation.distance", (("5.21", "1.40"), ("4.88", "1.14"), ("5.23", "0.80")), "cells")):
    for _variant, (_v, _s) in zip(("original", "shared_removed", "random_removed"), _vals):
        _add([Ref(_key, "social", _v, _s, 10, "population", _M, "mrr-perturbation", variant=_variant, unit=_unit)])
_add([Ref("perturbation.shared_variance", "social", "≈ 62", None, None, "none", _M, "mrr-perturbation", unit="%",
          note="activity variance held by the top 10 dimensions")])

# Degeneracy
_add([Ref("degeneracy.episodes_excluded", None, "82/500", None, 500, "none", _M, "mrr-behavior",
          note="16.4 % of RNN episodes excluded"),
      Ref("degeneracy.units_below_3_valid", "social", "1/10", None, 10, "none", _M, "mrr-behavior", arch="ssm"),
      Ref("degeneracy.units_below_3_valid", "non_social", "2/10", None, 10, "none", _M, "mrr-behavior", arch="ssm")])

# The later rewrite (lr 1e-3, one epoch)
_add(_pair("rewrite.chaser_collisions", _M, "mrr-rewrite", "14.0", "3.2", n=10, unit="collisions/episode"))
_add(_pair("rewrite.chaser_in_view", _M, "mrr-rewrite", "79.0", "34.7", n=10, unit="%"))
_add(_pair("rewrite.chaser_distance", _M, "mrr-rewrite", "2.73", "5.17", n=10, unit="cells"))

# Runtime
_add([Ref("runtime.panel_wall_h", None, "2.5", None, 20, "none", _M, "mrr-runtime", unit="h",
          note="all 20 RNN units, one RTX 4070 Ti SUPER, concurrency 10"),
      Ref("runtime.steps_per_s_unit", None, "16.5k", None, None, "none", _M, "mrr-runtime", unit="steps/s"),
      Ref("runtime.rllib_s_per_update", None, "26.2", None, None, "none", _M, "mrr-runtime", unit="s/update")])

# --- SPEC §7.4 the model card (transformer) ----------------------------------------------------------------------
_add(_pair("behavior.chaser_collisions", "model card", "model-card", "41.31", "3.39", n=None, arch="transformer",
           unit="collisions/episode"))
_add([Ref("behavior.chaser_in_view", "social", "0.96", None, None, "none", "model card", "model-card",
          arch="transformer", unit="fraction")])

# --- SPEC §7.3 verdicts (text) -----------------------------------------------------------------------------------
REPRODUCTION_VERDICTS: dict[str, str] = {
    "behaviour": "supported",
    "decoding": "partly supported",
    "shared dimensions": "partly supported (the top-r contrast reproduces, the count does not)",
    "partner representation": "partly supported",
    "causality": "inconclusive (the nominal random control hurt as much or more)",
}


def lookup(key: str, *, task: str | None = None, arch: str | None = None, source: str | None = None,
           variant: str | None = None, any_arch: bool = False) -> list[Ref]:
    """References for a quantity. ``source`` is a prefix (``"paper"``, ``"reproduction"``, ``"model card"``).

    ``arch=None`` with ``any_arch=False`` matches references whose ``arch`` is the paper's RNN or unset; paper
    values (source ``paper``) are matched for every architecture since the paper studied the RNN only and its
    numbers stand beside every architecture as *the* target.
    """
    out = []
    for r in REFERENCES:
        if r.key != key or (task is not None and r.task != task) or (variant is not None and r.variant != variant):
            continue
        if source is not None and not r.source.startswith(source):
            continue
        if not any_arch and arch is not None and not r.source.startswith(PAPER) and r.arch != arch:
            continue
        out.append(r)
    return out


def cell(key: str, *, task=None, arch=None, source=PAPER, variant=None, missing: str = "—") -> str:
    """Reference cells for a quantity, joined by '; ' (``missing`` when SPEC §7 has no such number)."""
    refs = lookup(key, task=task, arch=arch, source=source, variant=variant)
    return "<br>".join(r.cell() for r in refs) if refs else missing


__all__ = ["Ref", "REFERENCES", "PROTOCOLS", "REPRODUCTION_VERDICTS", "lookup", "cell", "PAPER", "MRR", "CARD"]
