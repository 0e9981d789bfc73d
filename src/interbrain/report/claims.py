"""'Which claims hold at this scale': verdicts computed from the numbers with explicit rules.

Each claim of the paper is tested per architecture on the unit-level values of the ``final`` scope (n = units) and gets
one of four verdicts: ``holds``, ``does not hold``, ``inconclusive (reason)``, ``not run (reason)``. The rules are in
:data:`RULES` and printed verbatim in the report.

Group contrasts (social vs non-social) use the SPEC §6.7 two-sided permutation test on the difference of means
(:func:`interbrain.analysis.stats.permutation_test`). Paired contrasts (a unit's perturbation condition vs its
control) use the two-sided sign-flip permutation test on the mean paired difference (:func:`sign_flip_test`): exact
over all 2^n sign patterns when 2^n ≤ 10,000, else 10,000 seeded draws with the add-one correction (the §6.7 rule).

Power: with few units the smallest achievable p can exceed α. That smallest p is computed (the p of a perfectly
separated sample of the same sizes) and, when it is ≥ α, an effect in the predicted direction is reported as
"inconclusive (underpowered …)", never as "holds" or "does not hold".
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from interbrain.analysis.stats import EXACT_LIMIT, mean_sd, permutation_test

ALPHA = 0.05
DECODING_MARGIN = 0.05     # "decodable": mean balanced accuracy > 0.5 + margin and > mean shuffled null + margin
CKA_RATIO = 0.90           # cross-architecture CKA ≥ 0.90 x the within-architecture ceiling = "as similar as seeds"
MIN_UNITS_DECODING = 2     # analysable units per task needed to judge decodability

HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run"

CLAIMS: dict[str, str] = {
    "a": "Social chasers collide more with a random explorer than non-social chasers (paper Fig. 5i)",
    "b1": "Chaser collision is decodable from the chaser's hidden state in social units and at chance in non-social "
          "units (paper Fig. 6b–e)",
    "b2": "Explorer collision is decodable from the explorer's hidden state in social units and at chance in "
          "non-social units (paper Fig. 6b–e)",
    "c": "Inter-agent neural coupling: the top PLSC dimension's ΔPCC is larger in social than in non-social units "
         "(paper Fig. 6h)",
    "f": "The chaser's neural action space represents the partner more in social than in non-social units "
         "(paper Fig. 6p–r)",
    "d": "Removing the shared subspace reduces the chaser's collisions more than removing a rank-matched random "
         "orthogonal subspace (paper Fig. 6s–u)",
    "e1": "The architectures learn the same representation: cross-architecture CKA reaches the within-architecture "
          "(cross-seed) ceiling",
    "e2": "The architectures support the same conclusions: the verdicts of claims a–d and f agree across "
          "architectures",
}

RULES: dict[str, str] = {
    "a": f"Behaviour at each unit's final checkpoint vs the uniform-random explorer, social vs non-social (task "
         f"visibility). holds: social mean > non-social mean and two-sided permutation p < {ALPHA}; does not hold: "
         f"social mean ≤ non-social mean; inconclusive: the direction agrees but p ≥ {ALPHA} (underpowered when even "
         f"a perfect separation could not reach p < {ALPHA} with these n); not run: a task has no units.",
    "b": f"Grouped-fold decoding (default scheme, lag 0), final checkpoint, task visibility, analysable units only. "
         f"Decodable in social: mean balanced accuracy > 0.5 + {DECODING_MARGIN} and > mean shuffled null + "
         f"{DECODING_MARGIN}. At chance in non-social: mean balanced accuracy ≤ 0.5 + {DECODING_MARGIN}. holds: both; "
         f"does not hold: social not decodable or non-social above chance; inconclusive: fewer than "
         f"{MIN_UNITS_DECODING} analysable units in a task; not run: no decoding rows.",
    "c": f"PLSC ΔPCC (per-episode fit, circular-shift null: the default), final checkpoint, task visibility; the "
         f"same contrast rule as claim a.",
    "f": f"Partner representation (%) at the final checkpoint, task visibility; the same contrast rule as claim a.",
    "d": f"Perturbation (readout target), social units: per unit, the mean paired Δcollisions under shared_removed "
         f"minus that under random_orthogonal. holds: the mean difference < 0 and the two-sided sign-flip p < "
         f"{ALPHA}; does not hold: mean difference ≥ 0; inconclusive: negative but p ≥ {ALPHA} (underpowered when "
         f"even all-negative differences could not reach p < {ALPHA}); not run: no perturbation rows.",
    "e1": f"From the CKA matrix (mean over seed pairs): for every pair of architectures A ≠ B, the ratio "
          f"CKA(A,B) / √(ceiling_A · ceiling_B), where a ceiling is the within-architecture cross-seed CKA (the "
          f"diagonal). holds: every ratio ≥ {CKA_RATIO:.2f}; does not hold: some ratio < {CKA_RATIO:.2f}; "
          f"inconclusive: a ceiling is missing (fewer than two seeds) or fewer than two architectures; not run: no "
          f"CKA matrix. The threshold is descriptive, not a test.",
    "e2": "For each claim a–d and f, the verdict categories (holds / does not hold / inconclusive) of the "
          "architectures that ran it. holds: every claim has a single category across architectures; does not hold: "
          "some claim's verdict differs between architectures; inconclusive: fewer than two architectures have a "
          "verdict other than not run.",
}


@dataclass
class Verdict:
    claim: str
    arch: str | None
    verdict: str                      # holds | does not hold | inconclusive | not run
    reason: str = ""
    evidence: str = ""
    p: float | None = None
    exact: bool | None = None
    stats: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        if self.verdict in (INCONCLUSIVE, NOT_RUN) or (self.reason and self.verdict == FAILS):
            return f"{self.verdict} ({self.reason})" if self.reason else self.verdict
        return self.verdict


# ----------------------------------------------------------------------------------------------------------------
# statistics helpers
# ----------------------------------------------------------------------------------------------------------------

def fmt_p(p: float, exact: bool | None = None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p not computable"
    how = "" if exact is None else (", exact" if exact else ", 10,000 draws")
    return f"p = {p:.3g}{how}"


def min_two_sample_p(n_a: int, n_b: int) -> float:
    """Smallest two-sided p the §6.7 permutation test can return for these group sizes (perfect separation)."""
    if n_a == 0 or n_b == 0:
        return float("nan")
    return permutation_test(np.arange(n_a, dtype=float) + n_b, np.arange(n_b, dtype=float))["p"]


def sign_flip_test(d, *, n_draws: int = 10_000, seed: int = 0) -> dict:
    """Two-sided sign-flip permutation test of mean(d) = 0 for paired differences d (NaNs dropped).

    {"mean", "p", "exact", "n"}: exact over all 2^n sign patterns when 2^n ≤ 10,000, else ``n_draws`` seeded draws
    with p = (1 + #|mean*| ≥ |mean|) / (n_draws + 1).
    """
    d = np.asarray(d, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = int(d.size)
    if n == 0:
        return {"mean": float("nan"), "p": float("nan"), "exact": True, "n": 0}
    obs = float(d.mean())
    thr = abs(obs) * (1 - 1e-9)
    exact = 2 ** n <= EXACT_LIMIT
    if exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        null = (signs * d).mean(1)
        p = float(np.mean(np.abs(null) >= thr))
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice((1.0, -1.0), size=(n_draws, n))
        null = (signs * d).mean(1)
        p = float((1 + np.sum(np.abs(null) >= thr)) / (n_draws + 1))
    return {"mean": obs, "p": p, "exact": exact, "n": n}


def min_sign_flip_p(n: int) -> float:
    return sign_flip_test(np.ones(n))["p"] if n else float("nan")


def fmt_msd(s: dict, digits: int = 2, n_label: str = "") -> str:
    """"m ± sd (n = k)" with the sample SD; "(n = 1, SD undefined)" for a single value; "no data" for none."""
    if s["n"] == 0:
        return "no data"
    if s["n"] == 1 or math.isnan(s["sd"]):
        return f"{s['mean']:.{digits}f} (n = {s['n']}{n_label}, SD undefined)"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f} (n = {s['n']}{n_label})"


# ----------------------------------------------------------------------------------------------------------------
# claim rules
# ----------------------------------------------------------------------------------------------------------------

def contrast(claim: str, arch: str, social, non_social, *, what: str, digits: int = 2) -> Verdict:
    """Social > non-social by the §6.7 permutation test (rule of claim a)."""
    s = mean_sd(np.asarray(social, dtype=float))
    ns = mean_sd(np.asarray(non_social, dtype=float))
    evidence = f"{what}: social {fmt_msd(s, digits)} vs non-social {fmt_msd(ns, digits)}"
    if s["n"] == 0 or ns["n"] == 0:
        missing = " and ".join(t for t, x in (("social", s), ("non-social", ns)) if x["n"] == 0)
        return Verdict(claim, arch, NOT_RUN, f"no {missing} units", evidence)
    res = permutation_test(np.asarray(social, dtype=float), np.asarray(non_social, dtype=float))
    diff, p, exact = res["diff"], res["p"], res["exact"]
    min_p = min_two_sample_p(s["n"], ns["n"])
    evidence += f"; difference {diff:+.{digits}f}, two-sided permutation {fmt_p(p, exact)}"
    st = {"social": s, "non_social": ns, "diff": diff, "p": p, "exact": exact, "min_p": min_p}
    if not diff > 0:
        return Verdict(claim, arch, FAILS, f"social ≤ non-social, difference {diff:+.{digits}f}, {fmt_p(p, exact)}",
                       evidence, p, exact, st)
    if p < ALPHA:
        return Verdict(claim, arch, HOLDS, "", evidence, p, exact, st)
    if min_p >= ALPHA:
        reason = (f"underpowered: direction agrees, {fmt_p(p, exact)}, but with n = {s['n']} vs {ns['n']} the "
                  f"smallest achievable two-sided p is {min_p:.3g}")
    else:
        reason = f"direction agrees but {fmt_p(p, exact)} ≥ {ALPHA}"
    return Verdict(claim, arch, INCONCLUSIVE, reason, evidence, p, exact, st)


def decoding_claim(claim: str, arch: str, units: pd.DataFrame, target: str) -> Verdict:
    """Rule b on unit-level decoding rows (columns task/condition, target, scheme, lag, status, balanced_accuracy,
    null_mean) of the final scope."""
    if units is None or not len(units):
        return Verdict(claim, arch, NOT_RUN, "no decoding results")
    df = units[(units["target"] == target) & (units["scheme"] == "grouped")]
    if "lag" in df.columns:
        df = df[pd.to_numeric(df["lag"]).fillna(0) == 0]
    if not len(df):
        return Verdict(claim, arch, NOT_RUN, f"no grouped-fold {target} results")
    parts = {}
    for task in ("social", "non_social"):
        t = df[df["condition"] == task]
        ok = t[t["status"] == "ok"]
        parts[task] = {"n_units": int(t["unit_id"].nunique()), "ba": mean_sd(ok["balanced_accuracy"].astype(float)),
                       "null": mean_sd(ok["null_mean"].astype(float))}
    s, ns = parts["social"], parts["non_social"]
    evidence = (f"balanced accuracy social {fmt_msd(s['ba'], 3)} of {s['n_units']} units (shuffled null "
                f"{s['null']['mean']:.3f}); non-social {fmt_msd(ns['ba'], 3)} of {ns['n_units']} units")
    if not math.isnan(ns["null"]["mean"]):
        evidence += f" (shuffled null {ns['null']['mean']:.3f})"
    if s["n_units"] == 0 or ns["n_units"] == 0:
        missing = " and ".join(t for t, x in (("social", s), ("non-social", ns)) if x["n_units"] == 0)
        return Verdict(claim, arch, NOT_RUN, f"no {missing} decoding results", evidence)
    short = [f"{t.replace('_', '-')} {x['ba']['n']}" for t, x in parts.items() if x["ba"]["n"] < MIN_UNITS_DECODING]
    if short:
        return Verdict(claim, arch, INCONCLUSIVE, f"too few analysable units ({', '.join(short)}; need "
                                                  f"{MIN_UNITS_DECODING} per task)", evidence, stats=parts)
    decodable = (s["ba"]["mean"] > 0.5 + DECODING_MARGIN
                 and s["ba"]["mean"] > s["null"]["mean"] + DECODING_MARGIN)
    at_chance = ns["ba"]["mean"] <= 0.5 + DECODING_MARGIN
    if decodable and at_chance:
        return Verdict(claim, arch, HOLDS, "", evidence, stats=parts)
    why = []
    if not decodable:
        why.append(f"social {s['ba']['mean']:.3f} is not above 0.5 + {DECODING_MARGIN} and the shuffled null + "
                   f"{DECODING_MARGIN}")
    if not at_chance:
        why.append(f"non-social {ns['ba']['mean']:.3f} is above chance (> 0.5 + {DECODING_MARGIN})")
    return Verdict(claim, arch, FAILS, "; ".join(why), evidence, stats=parts)


def perturbation_claim(arch: str, units: pd.DataFrame) -> Verdict:
    """Rule d on per-unit perturbation means (see :func:`interbrain.report.tables.perturbation_units`)."""
    claim = "d"
    if units is None or not len(units):
        return Verdict(claim, arch, NOT_RUN, "no perturbation results")
    df = units[(units["target"] == "readout") & (units["task"] == "social")]
    piv = df.pivot_table(index="unit_id", columns="condition", values="delta_collisions", aggfunc="mean")
    if "shared_removed" not in piv.columns or "random_orthogonal" not in piv.columns:
        return Verdict(claim, arch, NOT_RUN, "shared_removed or random_orthogonal missing (readout target)")
    d = (piv["shared_removed"] - piv["random_orthogonal"]).dropna().to_numpy()
    sh, rnd = mean_sd(piv["shared_removed"].to_numpy()), mean_sd(piv["random_orthogonal"].to_numpy())
    res = sign_flip_test(d)
    evidence = (f"Δcollisions shared_removed {fmt_msd(sh)} vs random_orthogonal {fmt_msd(rnd)}; paired difference "
                f"{res['mean']:+.2f} over {res['n']} units, two-sided sign-flip {fmt_p(res['p'], res['exact'])}")
    st = {"shared": sh, "random": rnd, "diff": res["mean"], "p": res["p"], "exact": res["exact"], "n": res["n"]}
    if res["n"] == 0:
        return Verdict(claim, arch, NOT_RUN, "no unit has both conditions", evidence)
    if not res["mean"] < 0:
        return Verdict(claim, arch, FAILS, f"shared removal did not reduce collisions more than the random "
                                           f"orthogonal control (paired difference {res['mean']:+.2f}, "
                                           f"{fmt_p(res['p'], res['exact'])})", evidence, res["p"], res["exact"], st)
    if res["p"] < ALPHA:
        return Verdict(claim, arch, HOLDS, "", evidence, res["p"], res["exact"], st)
    min_p = min_sign_flip_p(res["n"])
    if min_p >= ALPHA:
        reason = (f"underpowered: direction agrees, {fmt_p(res['p'], res['exact'])}, but with n = {res['n']} units "
                  f"the smallest achievable two-sided sign-flip p is {min_p:.3g}")
    else:
        reason = f"direction agrees but {fmt_p(res['p'], res['exact'])} ≥ {ALPHA}"
    return Verdict(claim, arch, INCONCLUSIVE, reason, evidence, res["p"], res["exact"], st)


def cka_claim(cka: pd.DataFrame | None) -> Verdict:
    """Rule e1 on a CKA matrix (columns arch_a, arch_b, mean, sd, n_pairs; either or both triangles)."""
    claim = "e1"
    if cka is None or not len(cka):
        return Verdict(claim, None, NOT_RUN, "no CKA matrix")
    m = symmetric_cka(cka)
    archs = sorted(set(m["arch_a"]) | set(m["arch_b"]))
    if len(archs) < 2:
        return Verdict(claim, None, INCONCLUSIVE, "fewer than two architectures in the CKA matrix")
    ceil = {}
    for a in archs:
        row = m[(m["arch_a"] == a) & (m["arch_b"] == a)]
        ok = len(row) and int(row["n_pairs"].iloc[0]) > 0 and not math.isnan(float(row["mean"].iloc[0]))
        ceil[a] = float(row["mean"].iloc[0]) if ok else None
    missing = [a for a, c in ceil.items() if c is None]
    if missing:
        return Verdict(claim, None, INCONCLUSIVE, f"no within-architecture ceiling for {', '.join(missing)} (needs "
                                                  f"≥ 2 seeds)")
    ratios = {}
    for a, b in itertools.combinations(archs, 2):
        row = m[(m["arch_a"] == a) & (m["arch_b"] == b)]
        if not len(row):
            return Verdict(claim, None, INCONCLUSIVE, f"no CKA for {a} × {b}")
        denom = math.sqrt(ceil[a] * ceil[b]) if ceil[a] > 0 and ceil[b] > 0 else float("nan")
        ratios[(a, b)] = float(row["mean"].iloc[0]) / denom if denom == denom else float("nan")
    evidence = "; ".join(f"{a}×{b} {r:.2f}" for (a, b), r in ratios.items())
    evidence = (f"ceilings {', '.join(f'{a} {c:.3f}' for a, c in ceil.items())}; cross/ceiling ratios {evidence}")
    low = [f"{a}×{b}" for (a, b), r in ratios.items() if not r >= CKA_RATIO]
    st = {"ceilings": ceil, "ratios": ratios}
    if low:
        return Verdict(claim, None, FAILS, f"below {CKA_RATIO:.2f} × ceiling: {', '.join(low)}", evidence, stats=st)
    return Verdict(claim, None, HOLDS, "", evidence, stats=st)


def agreement_claim(per_arch: dict[str, list[Verdict]]) -> Verdict:
    """Rule e2: do the per-architecture verdicts agree?"""
    claim = "e2"
    ran = {a: {v.claim: v.verdict for v in vs if v.verdict != NOT_RUN} for a, vs in per_arch.items()}
    ran = {a: d for a, d in ran.items() if d}
    if len(ran) < 2:
        return Verdict(claim, None, INCONCLUSIVE, "fewer than two architectures with verdicts")
    claims = sorted({c for d in ran.values() for c in d})
    differ, agree = [], []
    for c in claims:
        cats = {a: d[c] for a, d in ran.items() if c in d}
        if len(cats) < 2:
            continue
        (differ if len(set(cats.values())) > 1 else agree).append(
            (c, cats))
    parts = [f"{c}: " + ", ".join(f"{a} {v}" for a, v in cats.items()) for c, cats in differ]
    evidence = ("differing: " + "; ".join(parts)) if parts else ""
    if agree:
        evidence += ("; " if evidence else "") + "agreeing: " + ", ".join(
            f"{c} ({next(iter(cats.values()))})" for c, cats in agree)
    st = {"differ": [c for c, _ in differ], "agree": [c for c, _ in agree]}
    if not differ and not agree:
        return Verdict(claim, None, INCONCLUSIVE, "no claim was judged for two architectures", evidence, stats=st)
    if differ:
        return Verdict(claim, None, FAILS, f"verdicts differ for claim(s) {', '.join(c for c, _ in differ)}",
                       evidence, stats=st)
    return Verdict(claim, None, HOLDS, "", evidence, stats=st)


def symmetric_cka(cka: pd.DataFrame) -> pd.DataFrame:
    """Both triangles of a CKA matrix (a missing (b, a) is filled from (a, b))."""
    rows = cka[["arch_a", "arch_b", "mean", "sd", "n_pairs"]].to_dict("records")
    have = {(r["arch_a"], r["arch_b"]) for r in rows}
    rows += [{**r, "arch_a": r["arch_b"], "arch_b": r["arch_a"]} for r in list(rows)
             if (r["arch_b"], r["arch_a"]) not in have]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# all claims
# ----------------------------------------------------------------------------------------------------------------

def arch_claims(arch: str, *, behavior=None, decoding=None, plsc=None, partner=None, perturbation=None) -> list[Verdict]:
    """Claims a, b1, b2, c, f, d for one architecture from its unit-level frames (final scope)."""
    out = []
    if behavior is None or not len(behavior):
        out.append(Verdict("a", arch, NOT_RUN, "no behaviour evaluation"))
    else:
        out.append(contrast("a", arch, behavior.loc[behavior["condition"] == "social", "chaser_collisions"],
                            behavior.loc[behavior["condition"] == "non_social", "chaser_collisions"],
                            what="chaser collisions / episode"))
    out.append(decoding_claim("b1", arch, decoding, "chaser_collision"))
    out.append(decoding_claim("b2", arch, decoding, "explorer_collision"))
    out.append(_table_contrast("c", arch, plsc, "delta_pcc", "ΔPCC (per-episode)", 3,
                               lambda df: df[df["variant"] == "per_episode"] if "variant" in df.columns else df))
    out.append(_table_contrast("f", arch, partner, "partner", "partner representation, %", 2, lambda df: df))
    out.append(perturbation_claim(arch, perturbation))
    return out


def _table_contrast(claim, arch, df, column, what, digits, select) -> Verdict:
    if df is None or not len(df):
        return Verdict(claim, arch, NOT_RUN, f"no {what.split(',')[0].split(' (')[0]} results")
    df = select(df)
    df = df[df["status"].fillna("ok") == "ok"] if "status" in df.columns else df
    s = df.loc[df["condition"] == "social"].groupby("unit_id")[column].mean()
    ns = df.loc[df["condition"] == "non_social"].groupby("unit_id")[column].mean()
    return contrast(claim, arch, s.to_numpy(), ns.to_numpy(), what=what, digits=digits)


def same_thing_paragraph(e1: Verdict, e2: Verdict, *, archs: list[str], size: str | None, n_seeds: str,
                         updates: str, regularisation: dict[str, str]) -> str:
    """A plain-language answer to 'do the architectures learn the same thing?' built from e1 and e2."""
    s = []
    scale = f"At this scale ({n_seeds} seed{'' if n_seeds == 1 else 's'} per task, {updates} updates per unit)"
    if e1.verdict == HOLDS:
        s.append(f"{scale}, the chasers' hidden states are as similar across architectures as across seeds of one "
                 f"architecture (every cross-architecture CKA is at least {CKA_RATIO:.0%} of the within-architecture "
                 f"ceiling), so by this measure they learn similar representations.")
    elif e1.verdict == FAILS:
        s.append(f"{scale}, the chasers' hidden states differ more between architectures than between seeds of one "
                 f"architecture ({e1.reason}), so they do not learn the same representation.")
    else:
        s.append(f"{scale}, the representational comparison is {e1.text}, so CKA cannot answer the question yet.")
    if e2.verdict == HOLDS:
        s.append("The paper's claims get the same verdict in every architecture that ran them, so the architectures "
                 "support the same conclusions even where their representations differ.")
    elif e2.verdict == FAILS:
        s.append(f"The paper's claims do not get the same verdict in every architecture ({e2.reason}), so which "
                 f"conclusions one draws depends on the architecture.")
    else:
        s.append(f"Whether the claims agree across architectures is {e2.text}.")
    if size is None:
        s.append("The size preset is not given, so whether capacity is confounded with architecture is unknown "
                 "(SPEC §3.3, pitfall 7).")
    elif size != "matched":
        s.append(f"The panel uses the `{size}` size preset, not the parameter-matched one, so capacity is confounded "
                 f"with architecture (SPEC §3.3, pitfall 7): no difference here can be attributed to architecture "
                 f"alone.")
    else:
        s.append("The panel is parameter-matched (SPEC §3.3), so capacity is not the explanation of a difference.")
    reg = [f"{a}: {r}" for a, r in regularisation.items()]
    if reg:
        s.append("Regularisation is also a factor (pitfall 4): recurrent L2 acts only on architectures with a "
                 "recurrent weight matrix (" + "; ".join(reg) + ").")
    return " ".join(s)


__all__ = ["Verdict", "CLAIMS", "RULES", "ALPHA", "DECODING_MARGIN", "CKA_RATIO", "contrast", "decoding_claim",
           "perturbation_claim", "cka_claim", "agreement_claim", "arch_claims", "sign_flip_test",
           "min_two_sample_p", "min_sign_flip_p", "fmt_p", "fmt_msd", "same_thing_paragraph", "symmetric_cka"]
