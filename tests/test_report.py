"""interbrain.report: tables, reports, claims, references and manifests against hand-made ground truth.

Fixtures: tests/fixtures/report (written by make_fixtures.py there; its docstring lists the hand-chosen numbers).
"""

import glob
import hashlib
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from interbrain.errors import InterbrainError
from interbrain.io import sha256_json
from interbrain.report import arch_report, cross_report
from interbrain.report import claims as C
from interbrain.report import references as R
from interbrain.report.manifest import write_manifest
from interbrain.report.tables import arch_tables, parse_unit_path

FIX = Path(__file__).parent / "fixtures" / "report"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {"archs": ["rnn", "mlp"], "tasks": ["social", "non_social"], "seeds": [0, 1, 2],
          "train": {"preset": "fast", "size": "matched", "updates": 200, "overrides": {}}}


def _inputs(arch):
    return dict(eval_jsonl=FIX / f"{arch}_eval.jsonl", decoding=sorted(FIX.glob(f"decoding_{arch}*.csv")),
                plsc=sorted(FIX.glob(f"plsc_{arch}*.csv")), partner=sorted(FIX.glob(f"partner_{arch}*.csv")),
                perturbation=sorted(FIX.glob(f"perturbation_{arch}*.csv")),
                dynamics=sorted(FIX.glob(f"dynamics_{arch}*.csv")))


def _metrics(arch):
    return sorted(glob.glob(str(FIX / "results" / arch / "*" / "seed_*" / "metrics.jsonl")))


def _section(md: str, title: str) -> str:
    """The text of one '## ' section."""
    start = md.index(f"## {title}")
    nxt = md.find("\n## ", start + 3)
    return md[start:nxt if nxt > 0 else None]


def _claim_row(md: str, claim: str) -> list[str]:
    for line in md.splitlines():
        if line.startswith(f"| ({claim}) ") and "evidence" not in line:
            return [c.strip() for c in line.strip("|").split(" | ")]
    raise AssertionError(f"no verdict row for claim {claim}")


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 300 and height > 200


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Tables for rnn and mlp, the rnn report and the cross-architecture report (rendered once)."""
    root = tmp_path_factory.mktemp("study")
    tables = {}
    for arch in ("rnn", "mlp"):
        tables[arch] = arch_tables(**_inputs(arch), out_dir=root / arch / "tables")
    rnn_md = arch_report(arch="rnn", tables_dir=root / "rnn" / "tables", metrics=_metrics("rnn"),
                         out_md=root / "rnn" / "reports" / "report.md", figures_dir=root / "rnn" / "reports" / "figures")
    cross = root / "cross"
    cross_md = cross_report(arch_tables={a: str(root / a / "tables") for a in tables},
                            metrics={a: _metrics(a) for a in tables}, cka_matrix=FIX / "cka_matrix.csv",
                            cka_pairs=FIX / "cka_pairs.csv", out_md=cross / "report.md",
                            figures_dir=cross / "figures", plsc_matrix_csv=cross / "plsc_matrix.csv", config=CONFIG)
    return {"root": root, "tables": tables, "rnn_md": rnn_md, "cross_md": cross_md, "cross": cross}


# ---------------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------------

def test_arch_tables_behavior_rows_and_metric_columns(study):
    beh = pd.read_csv(study["tables"]["rnn"]["behavior"])
    # rnn: 2 tasks x 3 seeds x 2 updates x 3 matchups ok records; the failed record is dropped
    assert len(beh) == 36
    assert set(beh["status"]) == {"ok"} and "seed_0009" not in " ".join(beh["unit_id"])
    for col in ("collisions_per_episode", "chaser_partner_in_view", "explorer_new_fields", "mean_distance",
                "joint_stuck_run_steps", "checkpoint_sha256", "matchup", "visibility", "update"):
        assert col in beh.columns
    row = beh[(beh["unit_id"] == "rnn/social/seed_0001") & (beh["update"] == 200) & (beh["matchup"] == "random_explorer")]
    assert row["collisions_per_episode"].item() == 12.0 and row["chaser_partner_in_view"].item() == 0.85


def test_arch_tables_concatenates_and_keeps_columns(study):
    dec = pd.read_csv(study["tables"]["rnn"]["decoding"])
    parts = [pd.read_csv(p) for p in _inputs("rnn")["decoding"]]
    assert len(dec) == sum(len(p) for p in parts) == 15     # 9 social + 6 non-social rows
    # the union of the columns survives, including a column present in one input only
    assert set(dec.columns) == set(parts[0].columns) | set(parts[1].columns)
    assert "fold_scores" in dec.columns and dec["fold_scores"].notna().sum() == 6
    assert list(dec.columns[:len(parts[0].columns)]) == list(parts[0].columns)


def test_arch_tables_empty_lists_write_header_only(tmp_path):
    out = arch_tables(eval_jsonl=FIX / "rnn_eval.jsonl", decoding=[], plsc=[], partner=[], perturbation=[],
                      out_dir=tmp_path)
    for name in ("decoding", "plsc", "partner", "perturbation"):
        text = out[name].read_text().splitlines()
        assert len(text) == 1, name
        assert text[0].startswith("schema_version,protocol,unit_id,arch")
    assert "balanced_accuracy" in out["decoding"].read_text() and "delta_collisions" in out["perturbation"].read_text()


def test_parse_unit_path():
    assert parse_unit_path("results/ssm/non_social/seed_0007/metrics.jsonl") == ("ssm", "non_social", 7)
    with pytest.raises(InterbrainError):
        parse_unit_path("metrics.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------------------------

def test_arch_report_behaviour_mean_and_sample_sd(study):
    md = study["rnn_md"].read_text()
    beh = _section(md, "Behaviour")
    # chaser collisions 10, 12, 14 -> 12.00 ± 2.00; 3, 4, 5 -> 4.00 ± 1.00 (sample SD, ddof 1)
    assert "| rnn | 12.00 ± 2.00 (n = 3) | 4.00 ± 1.00 (n = 3) | +8.00 (p = 0.1, exact) |" in beh
    # in view 0.80/0.85/0.90 -> 85.00 ± 5.00 %; explorer new fields 35/36/40 -> 37.00 ± 2.65 (sqrt(7))
    assert "| rnn | 85.00 ± 5.00 (n = 3) | 35.00 ± 5.00 (n = 3) |" in beh
    assert "37.00 ± 2.65 (n = 3)" in beh and f"{math.sqrt(7):.2f}" == "2.65"
    # references carry source, n, SD type and protocol id (SPEC §7.5)
    assert "16.06 ± 2.68 (paper Fig. 5i; n = 10; sample SD; `paper-fig5`)" in beh
    assert "8.98 ± 5.70 (reproduction §7.3; n = 10; population SD; `mrr-behavior`)" in beh


def test_arch_report_sections_numbers(study):
    md = study["rnn_md"].read_text()
    dec = _section(md, "Event decoding")
    # grouped 0.90/0.92/0.94; explorer collision: one insufficient unit -> n analysable 2 of 3
    assert "0.920 ± 0.020 (n = 3) of 3 units; null 0.500; p < 0.05 in 3" in dec
    assert "0.860 ± 0.014 (n = 2) of 3 units" in dec
    assert "0.980 ± 0.010 (n = 3) of 3 units" in dec           # the labelled timestep variant
    plsc = _section(md, "PLSC")
    assert "r1 is not ΔPCC" in plsc and "0.420 ± 0.020 (n = 3)" in plsc
    partner = _section(md, "Partner representation")
    assert "0.70 ± 0.20 (n = 3) at update 100" in partner and "4.50 ± 0.50 (n = 3)" in partner
    pert = _section(md, "Shared-subspace removal")
    assert "| rnn | shared_removed | 3 | 8.00 ± 2.00 (n = 3) | -10.00 ± 2.00 (n = 3) |" in pert
    assert "| rnn | baseline | 3 | 18.00 ± 2.00 (n = 3) | — |" in pert
    assert "Not run" not in md


def test_dynamics_sections_pool_units_and_find_the_fixed_points(study):
    """Fixture flows are linear in each unit (tests/fixtures/report/make_fixtures.py): pooling three units with the
    same bins and slope gives the mean of their L*; update 100 is not the final checkpoint and stays out."""
    tab = pd.read_csv(study["tables"]["rnn"]["dynamics"])
    assert len(tab) == len(pd.read_csv(FIX / "dynamics_rnn.csv")) and set(tab["kind"]) == {"summary", "bin",
                                                                                          "fixed_point"}
    md = study["rnn_md"].read_text()
    dyn = _section(md, "Choice dynamics")
    # columns: arch, condition, agent, units, collision, visible, invisible, all (no new_field rows in the fixture)
    assert ("| rnn | social | chaser | 3 | 1.00 (stable, slope -0.50) | 0.50 (unstable, slope +0.20) | none | "
            "0.00 (stable, slope -0.30) |") in dyn
    assert "| rnn | social | explorer | 3 | — | — | — | -0.50 (stable, slope -1.00) |" in dyn
    assert "| rnn | non-social | chaser | 3 | — | — | — | 2.00 (stable, slope -0.40) |" in dyn
    assert "2.50" not in dyn                                    # the update-100 rows are not the final checkpoint
    # per unit: the collision attractor at 0.9 / 1.0 / 1.1 -> 1.00 ± 0.10; the repeller is no stable point
    assert "| rnn | social | chaser | collision | 1200 | 3 / 3 | 1.00 ± 0.10 (n = 3) |" in dyn
    assert "| rnn | social | chaser | visible | 1200 | 0 / 3 | — |" in dyn
    assert "![Choice dynamics of rnn (final checkpoint)](figures/dynamics.png)" in dyn
    cross = _section(study["cross_md"].read_text(), "9 Choice dynamics")
    assert "| rnn | social | chaser | 3 | 1.00 (stable, slope -0.50) |" in cross
    assert "figures/dynamics_rnn.png" in cross and "Per unit" not in cross


def test_claims_exact_permutation_p_and_underpowered(study):
    md = study["cross_md"].read_text()
    claims = _section(md, "10 Which claims hold")
    a = _claim_row(claims, "a")
    # 3 vs 3 fully separated: exact two-sided p = 2 / C(6,3) = 0.1, which is also the smallest achievable p
    for verdict in a[1:]:
        assert verdict.startswith("inconclusive (underpowered")
        assert "p = 0.1, exact" in verdict and "smallest achievable two-sided p is 0.1" in verdict
    # decoding: rnn holds; mlp's non-social 0.72 is above chance -> does not hold; mlp has no explorer rows
    b1, b2 = _claim_row(claims, "b1"), _claim_row(claims, "b2")
    assert b1[1] == "holds" and b1[2].startswith("does not hold (non-social 0.720 is above chance")
    assert b2[1] == "holds" and b2[2].startswith("not run")
    # perturbation: paired differences -9, -8, -10 -> sign-flip p = 2/8 = 0.25 (all-negative is the minimum)
    d = _claim_row(claims, "d")
    assert "p = 0.25, exact" in d[1] and d[1].startswith("inconclusive (underpowered") and d[2].startswith("not run")
    # CKA: 0.60 / sqrt(0.80 * 0.70) = 0.80 < 0.90 -> does not hold; verdicts differ for b1 -> e2 does not hold
    assert "| (e1) " in claims and "does not hold (below 0.90 × ceiling: mlp×rnn)" in claims
    assert "does not hold (verdicts differ for claim(s) b1)" in claims
    assert "cross/ceiling ratios mlp×rnn 0.80" in claims
    assert "**Do the architectures learn the same thing?** At this scale (3 seeds per task, 200 updates" in md


def test_cross_report_tables_and_plsc_matrix(study):
    md = study["cross_md"].read_text()
    setup = _section(md, "1 Study setup")
    assert "| rnn | 118,533 (builder, `matched`) | recurrent L2 λ = 0.3 on ‖W_hh‖_F" in setup
    assert "| mlp | 120,389 (builder, `matched`) | none (no recurrent weight" in setup
    assert "recurrent weight matrix — in this study: rnn. mlp\ntrains without any weight penalty" in setup
    cka = _section(md, "6 CKA")
    assert "| **rnn** | 0.800 ± 0.050 (n = 3 pairs) | 0.600 ± 0.030 (n = 9 pairs) |" in cka
    assert "| **mlp** | 0.600 ± 0.030 (n = 9 pairs) | 0.700 ± 0.040 (n = 3 pairs) |" in cka
    assert "Pitfall 9" in cka and "| **rnn** | 1.00 | 0.68 | 0.64 | 0.67 |" in cka
    train = _section(md, "2 Training")
    assert "| rnn | social | 3 | 200 | 11.00 ± 2.00 (n = 3) |" in train
    # the measured learning budgets of this study's architectures only, labelled as separate runs
    assert "Learning budget: separate calibration runs (not this study)" in train
    assert "| rnn | social | paper | 100: 1.71; 200: 4.95; 300: 6.38; 400: 6.59 |" in train
    assert "| mlp | social | fast |" in train and "| ssm |" not in train and "| gru |" not in train
    m = pd.read_csv(study["cross"] / "plsc_matrix.csv")
    r = m[(m["arch"] == "rnn") & (m["task"] == "social") & (m["variant"] == "per_episode") & (m["scope"] == "final")]
    assert r["n"].item() == 3
    assert r["delta_pcc_mean"].item() == pytest.approx(0.42) and r["delta_pcc_sd"].item() == pytest.approx(0.02)
    assert r["k_star_mean"].item() == pytest.approx(160) and r["r1_mean"].item() == pytest.approx(0.62)
    assert list(m.columns[:6]) == ["arch", "task", "variant", "scope", "n", "n_units"]
    assert not re.search(r"\bnan\b", md), "a NaN leaked into the report"


def test_figures_are_valid_pngs(study):
    rnn_figs = study["root"] / "rnn" / "reports" / "figures"
    for name in ("training_curves", "behavior", "decoding", "plsc", "partner", "perturbation", "dynamics"):
        _assert_png(rnn_figs / f"{name}.png")
    for name in ("training_curves", "behavior", "decoding", "plsc", "partner", "perturbation", "cka", "dynamics_rnn"):
        _assert_png(study["cross"] / "figures" / f"{name}.png")
    assert not (study["cross"] / "figures" / "dynamics_mlp.png").exists()  # mlp has no dynamics rows
    md = study["cross_md"].read_text()
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (study["cross"] / link).is_file(), link


def _checkpoint(path: Path, recurrent_l2: float) -> Path:
    """A real (untrained) matched RNN checkpoint whose config says recurrent_l2 (the report reads its metadata)."""
    import torch

    from interbrain.checkpoint import save_checkpoint
    from interbrain.config import AgentConfig, TrainConfig, ppo_preset
    from interbrain.train import Trainer

    cfg = TrainConfig(agent=AgentConfig(arch="rnn", size="matched"), preset="fast",
                      ppo=ppo_preset("fast", recurrent_l2=recurrent_l2))
    return save_checkpoint(Trainer(cfg, torch.device("cpu")).to_checkpoint(), path)


def test_claim_flips_and_not_run_with_empty_tables(tmp_path):
    """Social numbers lower than non-social -> 'does not hold'; empty analysis tables -> 'not run'; parameter count
    and effective regularisation come from the evaluated checkpoint's metadata."""
    ckpt = _checkpoint(tmp_path / "update_000200.safetensors", recurrent_l2=3.0)
    recs = [json.loads(x) for x in (FIX / "rnn_eval.jsonl").read_text().splitlines()]
    swap = {"social": "non_social", "non_social": "social"}
    for r in recs:
        r["checkpoint"]["path"] = str(ckpt)  # relabel the tasks: the social chasers now collide 4 times per episode, non-social 12
        r["task"] = swap[r["task"]]
        r["unit_id"] = r["unit_id"].replace("/social/", "/X/").replace("/non_social/", "/social/").replace("/X/", "/non_social/")
        r["visibility"] = {"social": "partial", "non_social": "none"}[r["task"]]
    ev = tmp_path / "eval.jsonl"
    ev.write_text("".join(json.dumps(r) + "\n" for r in recs))
    arch_tables(eval_jsonl=ev, decoding=[], plsc=[], partner=[], perturbation=[], out_dir=tmp_path / "tables")
    md = arch_report(arch="rnn", tables_dir=tmp_path / "tables", metrics=[], out_md=tmp_path / "r" / "report.md",
                     figures_dir=tmp_path / "r" / "figures").read_text()
    assert "| rnn | 118,533 (checkpoint) | recurrent L2 λ = 3 on ‖W_hh‖_F [checkpoint config] |" in md
    a = _claim_row(md, "a")
    assert a[1].startswith("does not hold (social ≤ non-social, difference -8.00, p = 0.1, exact)")
    assert "| rnn | 4.00 ± 1.00 (n = 3) | 12.00 ± 2.00 (n = 3) | -8.00 (p = 0.1, exact) |" in md
    for title, reason in (("Event decoding", "the decoding table is empty"), ("PLSC", "the PLSC table is empty"),
                          ("Partner representation", "the partner-representation table is empty"),
                          ("Shared-subspace removal", "the perturbation table is empty"),
                          ("Choice dynamics", "the dynamics table is empty"),
                          ("Training curves", "no training metrics")):
        assert f"**Not run:** {reason}" in _section(md, title), title
    for claim in ("b1", "b2", "c", "f", "d"):
        assert _claim_row(md, claim)[1].startswith("not run"), claim
    assert not (tmp_path / "r" / "figures" / "decoding.png").exists()
    _assert_png(tmp_path / "r" / "figures" / "behavior.png")


# ---------------------------------------------------------------------------------------------------------------
# claims (unit level)
# ---------------------------------------------------------------------------------------------------------------

def test_contrast_rules_and_power():
    assert C.min_two_sample_p(2, 2) == pytest.approx(1 / 3)         # the brief's "0.33 with 2 seeds per group"
    v = C.contrast("a", "rnn", [5.0, 6.0], [1.0, 2.0], what="x")
    assert v.verdict == C.INCONCLUSIVE and "smallest achievable two-sided p is 0.333" in v.reason
    # 5 vs 5 fully separated: p = 2 / C(10,5) = 2/252 < 0.05 -> holds
    v = C.contrast("a", "rnn", [10, 11, 12, 13, 14], [1, 2, 3, 4, 5], what="x")
    assert v.verdict == C.HOLDS and v.p == pytest.approx(2 / 252) and v.exact
    v = C.contrast("a", "rnn", [1, 2, 3, 4, 5], [10, 11, 12, 13, 14], what="x")
    assert v.verdict == C.FAILS
    assert C.contrast("a", "rnn", [1.0, 2.0], [], what="x").verdict == C.NOT_RUN


def test_sign_flip_exact():
    res = C.sign_flip_test([-9.0, -8.0, -10.0])
    assert res == {"mean": -9.0, "p": pytest.approx(0.25), "exact": True, "n": 3}
    # d = [1, -1, 2]: |mean| = 2/3; sign patterns reaching |sum| >= 2: 6 of 8
    assert C.sign_flip_test([1.0, -1.0, 2.0])["p"] == pytest.approx(6 / 8)
    assert C.min_sign_flip_p(6) == pytest.approx(2 / 64)


# ---------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------

def _spec_text():
    for p in (Path("/work/shared/SPEC.md"), Path(__file__).parents[1] / "docs" / "SPEC.md"):
        if p.is_file():
            return " ".join(p.read_text().split())
    pytest.skip("SPEC.md not available")


def test_every_reference_number_is_in_the_spec():
    spec = _spec_text()
    missing = [r for r in R.REFERENCES if r.spec_text() not in spec]
    assert not missing, missing
    assert set(r.protocol for r in R.REFERENCES) <= set(R.PROTOCOLS)
    assert all(r.sd_type in ("sample", "population", "none", "not stated") for r in R.REFERENCES)


def test_reference_spot_checks():
    (coll,) = R.lookup("behavior.chaser_collisions", task="social", source=R.PAPER)
    assert (coll.value_f, coll.sd_f, coll.n, coll.sd_type) == (16.06, 2.68, 10, "sample")
    (dpcc,) = R.lookup("plsc.delta_pcc", task="non_social", source=R.PAPER)
    assert dpcc.value_f == -0.0003 and dpcc.sd_f == 0.027
    (k,) = R.lookup("plsc.k_star", task="non_social", source=R.PAPER)
    assert (k.value_f, k.n) == (0.015, 59)
    (mrr,) = R.lookup("behavior.chaser_collisions", task="social", arch="transformer", source=R.MRR)
    assert (mrr.value_f, mrr.sd_f, mrr.sd_type) == (41.31, 3.29, "population")
    (res,) = R.lookup("plsc.r1_residualized", task="social", arch="ssm", source=R.MRR)
    assert res.spec_text() == "0.642 ± 0.12"
    shared = R.lookup("perturbation.collisions", variant="shared_removed", source=R.PAPER)[0]
    assert shared.value_f == 4.55 and "−74 %" in shared.cell()
    assert R.lookup("cka", arch="mlp", variant="transformer", source=R.MRR)[0].value == "0.78"


# ---------------------------------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------------------------------

def test_write_manifest_hashes_and_protocols(tmp_path, study):
    ckpt = _checkpoint(tmp_path / "latest.safetensors", recurrent_l2=0.3)
    inputs = [FIX / "rnn_eval.jsonl", *_inputs("rnn")["decoding"], FIX / "plsc_rnn.csv", ckpt]
    outputs = [study["tables"]["rnn"]["behavior"], study["rnn_md"]]
    config = {"archs": ["rnn"], "train": {"preset": "fast"}}
    out = write_manifest(inputs={"eval": inputs[:1], "tables": inputs[1:]}, outputs=outputs, config=config,
                         out_json=tmp_path / "manifest.json")
    m = json.loads(out.read_text())
    assert [Path(r["path"]) for r in m["inputs"]] == inputs
    for row in m["inputs"] + m["outputs"]:
        assert row["sha256"] == hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest()
        assert row["bytes"] == Path(row["path"]).stat().st_size
    assert [Path(r["path"]) for r in m["outputs"]] == outputs
    assert m["config"] == config and m["config_sha256"] == sha256_json(config)
    assert m["protocols"] == {"decoding_v1": [1], "interbrain.checkpoint": [1], "plsc_v1": [1],
                              "random_opponent_v1": [1]}  # the checkpoint's format tag is read from its header
    assert m["seeds"]["seed"] == [0, 1, 2, 9] and m["seeds"]["eval_seed"] == [0]
    assert {"git_sha", "git_dirty", "packages", "created_at"} <= set(m["provenance"])
    with pytest.raises(InterbrainError, match="does not exist"):
        write_manifest(inputs=[tmp_path / "nope.csv"], outputs=[], config={}, out_json=tmp_path / "m2.json")


def test_disrnn_bottleneck_section_names_the_open_latents(tmp_path):
    """A planted closure: latents 2 and 7 of the chaser get σ = 1.5 (closed); the report must list the other 8 as
    open, and the explorer's 10 (all open at init)."""
    import torch

    from interbrain.checkpoint import save_checkpoint
    from interbrain.config import make_train_config
    from interbrain.report import _bottleneck_section
    from interbrain.train import Trainer

    trainer = Trainer(make_train_config("disrnn", "social", 0, "fast", 1, size="std", overrides={"num_envs": 2}),
                      torch.device("cpu"))
    with torch.no_grad():
        trainer.agents["chaser"].latent_sigma_param[[2, 7]] = 1.5
    path = save_checkpoint(trainer.to_checkpoint(), tmp_path / "ckpt.safetensors")
    behavior = pd.DataFrame([{"unit_id": "disrnn/social/seed_0000", "update": 0, "checkpoint_path": str(path)}])
    section = _bottleneck_section({"behavior": behavior}, "disrnn", tmp_path, tmp_path)
    rows = {r[1]: r for r in section["tables"][0]["rows"]}
    assert rows["chaser"][2] == "0, 1, 3, 4, 5, 6, 8, 9" and rows["chaser"][3] == "8 / 10"
    assert rows["explorer"][3] == "10 / 10"
    assert (tmp_path / "bottlenecks.png").stat().st_size > 0
    assert _bottleneck_section({"behavior": behavior}, "rnn", tmp_path, tmp_path) is None
