"""The Snakemake workflow: job counts and targets derived from the configs, config validation, lint, graphs.

Every Snakemake call runs with ``--directory <tmp>`` and an explicit ``--configfile`` so nothing is written into
the repository. Dry runs only, except the ``slow`` tests (a real resume after a kill, and the smoke study).
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from interbrain.ensemble import ENSEMBLE_ARCHS

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
SNAKEFILE = REPO / "Snakefile"
CONFIGS = {"default": REPO / "config.yaml", "smoke": REPO / "configs" / "smoke.yaml",
           "paper": REPO / "configs" / "paper.yaml", "all_architectures": REPO / "configs" / "all_architectures.yaml"}
RULES = ["train_request", "train", "health", "evaluate", "gather_eval", "rollout", "decode", "plsc", "partner", "dynamics",
         "perturb", "cka",
         "unit_tables", "arch_report", "manifest", "cross_report"]
TASK_VIS = {"social": "partial", "non_social": "none"}

pytestmark = pytest.mark.skipif(not Path(SNAKEMAKE).exists(), reason="snakemake is not installed next to python")


def snakemake(workdir: Path, *args: str, configfile: Path | None = None, timeout: float = 300,
              check: bool = True) -> subprocess.CompletedProcess:
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "--directory", str(workdir)]
    if configfile is not None:
        cmd += ["--configfile", str(configfile)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, cwd=workdir, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def parse_dry_run(text: str) -> dict[str, list[list[str]]]:
    """{rule: [outputs of each job]} from a dry run's job blocks."""
    jobs: dict[str, list[list[str]]] = {}
    rule = None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):$", line)
        if m:
            rule = m.group(1)
            jobs.setdefault(rule, []).append([])
            continue
        m = re.match(r"^\s+output: (.*)$", line)
        if m and rule is not None:
            jobs[rule][-1] = m.group(1).split(", ")
    return jobs


def job_stats(text: str) -> dict[str, int]:
    block = text.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def load_config(name: str) -> dict:
    """The config as the workflow sees it: schema defaults filled in, the file on top."""
    from snakemake.utils import validate

    cfg = yaml.safe_load(CONFIGS[name].read_text())
    validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return cfg


def expected_counts(cfg: dict) -> dict[str, int]:
    """Job counts per rule, derived from a config independently of the workflow code."""
    archs, tasks, seeds = cfg["archs"], cfg["tasks"], cfg["seeds"]
    final, every = cfg["train"]["updates"], cfg["train"]["checkpoint_every"]
    saved = set(range(0, final, every)) | {final}
    analysed = set(cfg["late_updates"]) | {final}
    partner_updates = saved if cfg["partner"]["scope"] == "all" else analysed
    controls = cfg["controls"]["non_social_visibilities"]
    per_arch = Counter()
    for task in tasks:
        vis = [TASK_VIS[task]] + ([v for v in controls if v != TASK_VIS[task]] if task == "non_social" else [])
        analysis = {(v, u) for v in vis for u in analysed}
        partner = {(TASK_VIS[task], u) for u in partner_updates}
        per_arch["rollout"] += len(seeds) * len(analysis | partner)
        per_arch["decode"] += len(seeds) * len(analysis)
        per_arch["plsc"] += len(seeds) * len(analysis)
        per_arch["dynamics"] += len(seeds) * len(analysis)
        per_arch["partner"] += len(seeds) * len(partner)
        per_arch["perturb"] += len(seeds) if task == "social" else 0
    n_units = len(archs) * len(tasks) * len(seeds)
    ensembles = [a for a in archs if a in ENSEMBLE_ARCHS] if cfg["train"].get("ensemble") else []
    counts = {rule: n * len(archs) for rule, n in per_arch.items()}
    counts.update(train_request=n_units, train=n_units - len(ensembles) * len(tasks) * len(seeds), health=n_units,
                  evaluate=n_units, gather_eval=len(archs), unit_tables=len(archs), arch_report=len(archs),
                  manifest=len(archs), cka=1, cross_report=1, all=1)
    if ensembles:
        counts["train_ensemble"] = len(ensembles)  # one job per architecture carries all its units
    return counts


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    """Dry runs of the three configs (computed once per module): {name: (job stats, jobs by rule)}."""
    cache = {}

    def run(name):
        if name not in cache:
            wd = tmp_path_factory.mktemp(f"dry_{name}")
            out = snakemake(wd, "-n", configfile=CONFIGS[name]).stdout
            cache[name] = (job_stats(out), parse_dry_run(out))
        return cache[name]

    return run


# ------------------------------------------------------------------------------------------------ job counts
def test_smoke_job_counts(dry):
    stats, jobs = dry("smoke")
    assert {r: n for r, n in stats.items() if r != "total"} == expected_counts(load_config("smoke"))
    assert stats == {"train_request": 4, "train": 4, "health": 4, "evaluate": 4, "gather_eval": 2, "rollout": 14, "decode": 6,
                     "plsc": 6, "partner": 12, "dynamics": 6, "perturb": 2, "cka": 1, "unit_tables": 2,
                     "arch_report": 2, "manifest": 2, "cross_report": 1, "all": 1, "total": 73}
    assert {r: len(v) for r, v in jobs.items()} == {r: n for r, n in stats.items() if r != "total"}
    assert sum(n for r, n in stats.items() if r != "total") == stats["total"] == 73


def test_paper_job_counts(dry):
    stats, _ = dry("paper")
    expected = expected_counts(load_config("paper"))
    assert {r: n for r, n in stats.items() if r != "total"} == expected
    # 4 archs x 2 tasks x 10 seeds; 21 checkpoints per unit; late scope of 6 checkpoints; 2 vision controls; the 20
    # rnn units in one train_ensemble job (train.ensemble: true)
    assert stats["health"] == stats["evaluate"] == 80 and stats["train"] == 60 and stats["train_ensemble"] == 1
    assert stats["rollout"] == 4 * 10 * (21 + (21 + 2 * 6))   # social 21; non-social 21 (none) + 12 controls
    assert stats["decode"] == stats["plsc"] == stats["dynamics"] == 4 * 10 * (6 + 3 * 6)
    assert stats["partner"] == 4 * 2 * 10 * 21
    assert stats["perturb"] == 40
    assert stats["total"] == 7099 - 20 + 1


def test_default_job_counts(dry):
    stats, _ = dry("default")
    assert {r: n for r, n in stats.items() if r != "total"} == expected_counts(load_config("default"))
    # partner scope `analysis`: only the final checkpoint of each unit is rolled out
    assert stats["train"] == 16 and stats["rollout"] == 16 and stats["dynamics"] == 16 and stats["total"] == 171


def test_every_rule_appears_in_every_study(dry):
    for name in CONFIGS:
        stats, _ = dry(name)
        ensemble = {"train_ensemble"} if load_config(name)["train"].get("ensemble") else set()
        assert set(stats) - {"total"} == set(RULES) | {"all"} | ensemble, name


# ------------------------------------------------------------------------------------------------ targets
def test_smoke_train_targets(dry):
    _, jobs = dry("smoke")
    unit = "results/rnn/social/seed_0000"
    (outputs,) = [o for o in jobs["train"] if o[0].startswith(unit + "/")]
    assert outputs == [f"{unit}/checkpoints/update_{u:06d}.safetensors" for u in (0, 2, 4)] + [
        f"{unit}/checkpoints/latest.safetensors", f"{unit}/metrics.jsonl", f"{unit}/events.jsonl"]
    assert sorted(o[0].split("/checkpoints")[0] for o in jobs["train"]) == sorted(
        f"results/{a}/{t}/seed_0000" for a in ("rnn", "transformer") for t in ("social", "non_social"))


def test_smoke_rollout_and_analysis_targets(dry):
    _, jobs = dry("smoke")
    rollouts = sorted(o[0] for o in jobs["rollout"] if o[0].startswith("results/rnn/"))
    assert rollouts == sorted(f"results/rnn/paper_rollouts/{n}.safetensors" for n in [
        # social: the final checkpoint at partial; partner: every checkpoint (0, 2, 4) at partial
        "social__seed_0000", "social__seed_0000__partial__update_000000", "social__seed_0000__partial__update_000002",
        # non-social: final at none and the full-vision control; partner at none
        "non_social__seed_0000", "non_social__seed_0000__full__update_000004",
        "non_social__seed_0000__none__update_000000", "non_social__seed_0000__none__update_000002"])
    decoding = sorted(o[0] for o in jobs["decode"] if o[0].startswith("results/rnn/"))
    assert decoding == sorted(f"results/rnn/derived/decoding/{n}.csv" for n in [
        "social__seed_0000", "non_social__seed_0000", "non_social__seed_0000__full__update_000004"])
    plsc = sorted(tuple(o) for o in jobs["plsc"] if o[0].startswith("results/rnn/derived/plsc/social__seed_0000."))
    assert plsc == [("results/rnn/derived/plsc/social__seed_0000.csv",
                     "results/rnn/derived/plsc/social__seed_0000.safetensors")]
    dynamics = sorted(o[0] for o in jobs["dynamics"] if o[0].startswith("results/rnn/"))
    assert dynamics == [d.replace("/decoding/", "/dynamics/") for d in decoding]
    partner = sorted(o[0] for o in jobs["partner"] if o[0].startswith("results/rnn/"))
    assert partner == sorted(f"results/rnn/derived/partner/{t}__seed_0000{s}.csv"
                             for t, v in TASK_VIS.items() for s in ("", f"__{v}__update_000000", f"__{v}__update_000002"))
    perturb = sorted(tuple(o) for o in jobs["perturb"])
    assert perturb == [(f"results/{a}/derived/perturbation/social__seed_0000.csv",
                        f"results/{a}/derived/perturbation/social__seed_0000_bases.safetensors")
                       for a in ("rnn", "transformer")]


def test_smoke_report_targets(dry):
    _, jobs = dry("smoke")
    assert sorted(jobs["unit_tables"]) == [[f"results/{a}/derived/tables/{t}.csv" for t in
                                            ("behavior", "decoding", "plsc", "partner", "dynamics", "perturbation")]
                                           for a in ("rnn", "transformer")]
    assert sorted(jobs["gather_eval"]) == [[f"results/{a}/paper_random_eval.jsonl"] for a in ("rnn", "transformer")]
    assert sorted(jobs["manifest"]) == [[f"results/{a}/manifest.json"] for a in ("rnn", "transformer")]
    assert sorted(jobs["arch_report"]) == [[f"results/{a}/derived/reports/report.md", f"results/{a}/derived/reports/figures"]
                                           for a in ("rnn", "transformer")]
    assert jobs["cka"] == [["results/cross_architecture_study/cka_matrix.csv",
                            "results/cross_architecture_study/cka_pairs.csv"]]
    assert jobs["cross_report"] == [["results/cross_architecture_study/report.md",
                                     "results/cross_architecture_study/plsc_matrix.csv",
                                     "results/cross_architecture_study/figures"]]


def test_paper_train_writes_21_checkpoints(dry):
    _, jobs = dry("paper")
    outputs = jobs["train"][0]
    ckpts = [o for o in outputs if re.search(r"/checkpoints/update_\d{6}\.safetensors$", o)]
    assert [int(o[-18:-12]) for o in ckpts] == list(range(0, 20_001, 1_000))


def test_late_updates_add_rollouts_for_every_visibility(tmp_path):
    cfg = yaml.safe_load(CONFIGS["smoke"].read_text())
    cfg["late_updates"] = [2]
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", configfile=path).stdout
    stats, jobs = job_stats(out), parse_dry_run(out)
    assert {r: n for r, n in stats.items() if r != "total"} == expected_counts(cfg)
    decoding = sorted(o[0] for o in jobs["decode"] if o[0].startswith("results/rnn/"))
    assert decoding == sorted(f"results/rnn/derived/decoding/{n}.csv" for n in [
        "social__seed_0000", "social__seed_0000__partial__update_000002",
        "non_social__seed_0000", "non_social__seed_0000__none__update_000002",
        "non_social__seed_0000__full__update_000002", "non_social__seed_0000__full__update_000004"])


def test_cross_report_target_builds_exactly_what_it_needs(tmp_path):
    out = snakemake(tmp_path, "-n", "results/cross_architecture_study/report.md", configfile=CONFIGS["smoke"]).stdout
    stats = job_stats(out)
    full = expected_counts(load_config("smoke"))
    expected = {r: n for r, n in full.items() if r not in ("arch_report", "manifest", "all")}
    assert {r: n for r, n in stats.items() if r != "total"} == expected


def test_one_unit_target_builds_one_unit(tmp_path):
    out = snakemake(tmp_path, "-n", "results/rnn/social/seed_0000/random_eval.jsonl", configfile=CONFIGS["smoke"])
    assert job_stats(out.stdout) == {"train_request": 1, "train": 1, "health": 1, "evaluate": 1,
                                        "total": 4}


def test_non_canonical_rollout_name_is_refused(tmp_path):
    # The final checkpoint at the task's own visibility has one name only: social__seed_0000.
    proc = snakemake(tmp_path, "-n", "results/rnn/paper_rollouts/social__seed_0000__partial__update_000004.safetensors",
                     configfile=CONFIGS["smoke"], check=False)
    assert proc.returncode != 0
    assert "non-canonical rollout name 'social__seed_0000__partial__update_000004'" in proc.stdout + proc.stderr


def test_unknown_arch_in_a_target_matches_no_rule(tmp_path):
    proc = snakemake(tmp_path, "-n", "results/lstm9/social/seed_0000/health.json", configfile=CONFIGS["smoke"],
                     check=False)
    assert proc.returncode != 0
    assert "MissingRuleException" in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------------ config
def test_config_yaml_equals_the_schema_defaults():
    from snakemake.utils import validate

    filled = {}
    validate(filled, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert filled == yaml.safe_load(CONFIGS["default"].read_text())


def test_schema_archs_match_the_package_registry():
    sys.path.insert(0, str(REPO / "src"))
    from interbrain.agents import ARCHITECTURES
    from interbrain.config import PPOConfig, PRESETS

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert set(schema["properties"]["archs"]["items"]["enum"]) == set(ARCHITECTURES)
    assert set(schema["properties"]["train"]["properties"]["preset"]["enum"]) == set(PRESETS)
    overrides = set(schema["properties"]["train"]["properties"]["overrides"]["properties"])
    assert overrides == {f for f in PPOConfig.__dataclass_fields__} - {"learner"}


def test_schema_agent_options_are_architecture_settings_of_registered_architectures():
    sys.path.insert(0, str(REPO / "src"))
    from interbrain.agents import ARCHITECTURES
    from interbrain.config import AGENT_OPTIONS, AgentConfig

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    per_arch = schema["properties"]["train"]["properties"]["agent_options"]["properties"]
    assert set(per_arch) <= set(ARCHITECTURES)
    for arch, spec in per_arch.items():
        assert set(spec["properties"]) <= set(AGENT_OPTIONS) <= set(AgentConfig.__dataclass_fields__), arch


@pytest.mark.parametrize("bad, message", [
    ("foo: 1", "config error: unknown key 'foo'"),
    ("train: {overrides: {lrr: 0.1}}", "config error: unknown key 'train.overrides.lrr'"),
    ("train: {agent_options: {rnn: {bottleneck_beta: 0.1}}}", "config error: unknown key 'train.agent_options.rnn'"),
    ("archs: [rnn, lstm9]", "config error: archs[1]: 'lstm9' is not one of"),
    ("train: {updates: ten}", "config error: train.updates: 'ten' is not of type 'integer'"),
    ("late_updates: [150]", "config error: late_updates: 150 is not a saved checkpoint"),
    ("tasks: [non_social]", "config error: tasks: the CKA probe and the perturbation study need 'social'"),
])
def test_bad_config_fails_in_one_line_before_any_job(tmp_path, bad, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad + "\n")
    proc = snakemake(tmp_path, "-n", configfile=cfg, check=False)
    assert proc.returncode == 1
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr
    assert "Building DAG" not in proc.stdout + proc.stderr and "Job stats" not in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


# ------------------------------------------------------------------------------------------------ lint, graphs
def test_lint_is_clean(tmp_path):
    proc = snakemake(tmp_path, "--lint", configfile=CONFIGS["default"], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_rulegraph_is_dot_with_every_rule(tmp_path):
    out = snakemake(tmp_path, "--rulegraph", configfile=CONFIGS["smoke"]).stdout
    assert out.startswith("digraph")
    assert out.rstrip().endswith("}")
    labels = set(re.findall(r'label = "(\w+)"', out))
    assert labels == set(RULES) | {"all"}
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=out, capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg


def test_dag_is_dot(tmp_path):
    out = snakemake(tmp_path, "--dag", configfile=CONFIGS["smoke"]).stdout
    assert out.startswith("digraph") and out.count("->") > 63


def test_slurm_profile_names_existing_rules():
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    named = set(profile.get("set-resources", {})) | set(profile.get("groups", {}))
    defined = {m for f in (REPO / "workflow" / "rules").glob("*.smk")
               for m in re.findall(r"^\s*rule (\w+):", f.read_text(), re.M)}
    assert named <= defined and set(RULES) <= defined and "train_ensemble" in named


# ------------------------------------------------------------------------------------------------ real runs
DRIVERS = {
    "interbrain.checkpoint": "health_report", "interbrain.evaluate": "evaluate_unit",
    "interbrain.analysis.decoding": "decode_file", "interbrain.analysis.plsc": "plsc_file",
    "interbrain.analysis.partner": "partner_file", "interbrain.analysis.dynamics": "dynamics_file",
    "interbrain.perturb": "perturb_unit",
    "interbrain.analysis.cka": "cka_study", "interbrain.report.tables": "arch_tables",
    "interbrain.report": "arch_report", "interbrain.report.manifest": "write_manifest",
}


def missing_drivers() -> list[str]:
    sys.path.insert(0, str(REPO / "src"))
    missing = []
    for module, name in {**DRIVERS, "interbrain.report ": "cross_report"}.items():
        try:
            if not hasattr(importlib.import_module(module.strip()), name):
                missing.append(f"{module.strip()}.{name}")
        except ImportError:
            missing.append(f"{module.strip()}.{name}")
    return missing


@pytest.mark.slow
def test_train_resumes_after_the_job_is_killed(tmp_path):
    """kill -9 of a running train job: the rerun resumes from the newest periodic checkpoint in train_work (not from
    update 0) and ends with exactly the weights of an uninterrupted run (CPU, fixed seed)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("archs: [rnn]\ntasks: [social]\nseeds: [0]\n"
                   "train: {preset: fast, updates: 400, checkpoint_every: 5, log_every: 5, overrides: {num_envs: 8}, "
                   "device: cpu}\n")
    unit = tmp_path / "results/rnn/social/seed_0000"
    target = "results/rnn/social/seed_0000/metrics.jsonl"
    cmd = [SNAKEMAKE, "-s", str(SNAKEFILE), "--directory", str(tmp_path), "--configfile", str(cfg), "--cores", "1",
           target]
    sm = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (unit / "train_work/checkpoints/update_000010.safetensors").exists():
            assert time.time() < deadline and sm.poll() is None, "training did not reach update 10"
            time.sleep(0.5)
        script = re.compile(rf"{re.escape(str(tmp_path))}/\.snakemake/scripts/tmp\w+\.train\.py")
        jobs = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                and script.search((p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                                  if (p / "cmdline").exists() else "")]
        assert len(jobs) == 1
        os.kill(int(jobs[0].name), signal.SIGKILL)
        assert sm.wait(timeout=120) != 0
    finally:
        if sm.poll() is None:
            sm.kill()
            sm.wait()
    assert not (unit / "metrics.jsonl").exists()            # nothing published by the killed job
    assert (unit / "train_work/checkpoints/latest.safetensors").exists()
    snakemake(tmp_path, "--cores", "1", target, configfile=cfg, timeout=600)
    events = [yaml.safe_load(line) for line in (unit / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert "resumed" in kinds and kinds[-1] == "attempt_completed"
    assert next(e for e in events if e["event"] == "resumed")["update"] >= 10
    published = sorted(p.name for p in (unit / "checkpoints").iterdir())
    assert published == sorted([f"update_{u:06d}.safetensors" for u in range(0, 401, 5)] + ["latest.safetensors"])
    assert os.path.samefile(unit / "checkpoints/update_000400.safetensors",
                            unit / "train_work/checkpoints/update_000400.safetensors")
    # the same unit, uninterrupted, through the package, on one thread as the job (--cores 1) ran: numpy's OpenBLAS
    # splits some products between its threads, so a process that kept its default threads sums in another order
    # (seen with OpenBLAS's AVX2 kernels, OPENBLAS_CORETYPE=Haswell)
    sys.path.insert(0, str(REPO / "src"))
    from interbrain.train import train

    ref = train("rnn", "social", 0, "fast", 400, device="cpu", out=tmp_path / "ref", size="matched",
                checkpoint_every=5, log_every=5, overrides={"num_envs": 8}, progress=False, threads=1)
    assert_same_weights(ref, unit / "checkpoints/latest.safetensors")


def assert_same_weights(a, b):
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    nets = [k for k in ta if k.startswith(("chaser.", "explorer."))]
    assert nets and all(ta[k].equal(tb[k]) for k in nets)


@pytest.mark.slow
def test_corrupt_checkpoint_is_detected_and_its_unit_retrained(tmp_path):
    """A truncated published checkpoint is found before scheduling; the unit is retrained from scratch (same weights,
    training being deterministic) and its descendants rebuilt; other units are untouched."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("archs: [rnn]\ntasks: [social, non_social]\nseeds: [0]\n"
                   "train: {updates: 6, checkpoint_every: 3, log_every: 3, overrides: {num_envs: 8}, device: cpu}\n"
                   "evaluation: {episodes: 4, steps: 20}\n")
    targets = [f"results/rnn/{t}/seed_0000/random_eval.jsonl" for t in ("social", "non_social")]
    snakemake(tmp_path, "--cores", "2", *targets, configfile=cfg, timeout=600)
    unit = tmp_path / "results/rnn/social/seed_0000"
    other = tmp_path / "results/rnn/non_social/seed_0000"
    bad = unit / "checkpoints/update_000003.safetensors"
    reference = tmp_path / "reference.safetensors"
    reference.write_bytes((unit / "checkpoints/latest.safetensors").read_bytes())
    before = {p: p.stat().st_mtime_ns for p in (unit / "random_eval.jsonl", other / "random_eval.jsonl",
                                                  other / "checkpoints/latest.safetensors")}
    with open(bad, "r+b") as fh:  # truncate in place (the published file is a hard link into train_work)
        fh.truncate(bad.stat().st_size - 64)
    run = snakemake(tmp_path, "--cores", "2", *targets, configfile=cfg, timeout=600)
    log = run.stdout + run.stderr
    assert "corrupt checkpoint" in log and "retraining rnn/social/seed_0000 from scratch" in (
        tmp_path / "logs/train/rnn/social/seed_0000.log").read_text()
    assert (unit / "checkpoints/update_000003.safetensors.corrupt").exists()
    from interbrain.checkpoint import health

    assert health(bad)["ok"]
    assert_same_weights(reference, unit / "checkpoints/latest.safetensors")
    assert (unit / "random_eval.jsonl").stat().st_mtime_ns > before[unit / "random_eval.jsonl"]  # descendants rebuilt
    for path in (other / "random_eval.jsonl", other / "checkpoints/latest.safetensors"):
        assert path.stat().st_mtime_ns == before[path]  # the healthy unit is untouched


@pytest.mark.slow
def test_smoke_study_runs_end_to_end(tmp_path):
    missing = missing_drivers()
    if missing:
        pytest.skip("driver functions not written yet: " + ", ".join(missing))
    snakemake(tmp_path, "--cores", "2", configfile=CONFIGS["smoke"], timeout=1800)
    again = snakemake(tmp_path, "-n", configfile=CONFIGS["smoke"])
    assert "Nothing to be done" in again.stdout + again.stderr          # every output present and up to date
    for target in ["results/cross_architecture_study/report.md", "results/cross_architecture_study/cka_matrix.csv",
                   "results/cross_architecture_study/plsc_matrix.csv", "results/rnn/manifest.json",
                   "results/transformer/derived/reports/report.md", "results/rnn/derived/tables/behavior.csv"]:
        assert (tmp_path / target).stat().st_size > 0, target
    for rule in RULES:
        assert list((tmp_path / "logs" / rule).rglob("*.log")), f"no log for {rule}"
    snakemake(tmp_path, "--report", "report.html", configfile=CONFIGS["smoke"], timeout=600)
    assert (tmp_path / "report.html").stat().st_size > 0

    # Incrementality. Changing one architecture's training setting reruns that architecture's chain and the
    # cross-architecture outputs only.
    extra = tmp_path / "rnn_lr.yaml"
    extra.write_text("train:\n  arch_overrides: {rnn: {lr: 0.002}}\n")
    dry = snakemake(tmp_path, "-n", "--configfile", str(CONFIGS["smoke"]), str(extra))
    jobs = parse_dry_run(dry.stdout)
    assert sorted(o for outs in jobs["train"] for o in outs if o.endswith("latest.safetensors")) == [
        "results/rnn/non_social/seed_0000/checkpoints/latest.safetensors",
        "results/rnn/social/seed_0000/checkpoints/latest.safetensors"]
    cross = {"cka", "cross_report", "all"}
    for rule, outs in jobs.items():
        for job_outputs in outs:
            assert rule in cross or all("results/rnn/" in o or "logs/" in o for o in job_outputs), (rule, job_outputs)
    assert {"unit_tables", "arch_report", "manifest", "cka", "cross_report"} <= set(jobs)
    # An architecture setting reaches only its own architecture's jobs: one for an architecture outside the study
    # reruns no training and no analysis, only the cross-architecture report (it records the resolved config's hash).
    other = tmp_path / "disrnn_beta.yaml"
    other.write_text("train:\n  agent_options: {disrnn: {bottleneck_beta: 0.001}}\n")
    jobs = parse_dry_run(snakemake(tmp_path, "-n", "--configfile", str(CONFIGS["smoke"]), str(other)).stdout)
    assert set(jobs) <= {"cross_report", "all"} and "cross_report" in jobs, sorted(jobs)

    # Deleting one rollout rebuilds it and its descendants only.
    rollout = tmp_path / "results/transformer/paper_rollouts/social__seed_0000.safetensors"
    rollout.unlink()
    jobs = parse_dry_run(snakemake(tmp_path, "-n", configfile=CONFIGS["smoke"]).stdout)
    assert jobs["rollout"] == [["results/transformer/paper_rollouts/social__seed_0000.safetensors"]]
    assert not {"train", "train_request", "health", "evaluate", "gather_eval"} & set(jobs)
    for rule in ("decode", "plsc", "dynamics", "perturb"):
        assert all(any("social__seed_0000" in o for o in outs) and all("/transformer/" in o for o in outs)
                   for outs in jobs[rule]), (rule, jobs[rule])
    assert all("results/rnn/" not in o for outs in jobs.values() for o in outs)  # the rnn chain is untouched
    assert {"unit_tables", "arch_report", "cka", "cross_report"} <= set(jobs)


def test_paper_study_learns_every_architecture_with_the_paper_preset():
    """configs/paper.yaml is merged over config.yaml key by key: the default study's per-architecture learners must not
    leak into the paper-scale study."""
    from snakemake.utils import update_config

    from interbrain.config import ppo_preset

    merged = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(merged, yaml.safe_load(CONFIGS["paper"].read_text()))
    train = merged["train"]
    assert train["preset"] == "paper"
    for arch in merged["archs"]:
        effective = ppo_preset("paper", **{**train["overrides"], **train["arch_overrides"].get(arch, {})})
        assert effective == ppo_preset("paper"), arch


def test_all_architectures_study_dry_runs_every_registered_architecture(dry):
    from snakemake.utils import update_config

    from interbrain.agents import ARCHITECTURES

    merged = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(merged, yaml.safe_load(CONFIGS["all_architectures"].read_text()))
    assert sorted(merged["archs"]) == sorted(ARCHITECTURES)
    stats, jobs = dry("all_architectures")
    assert {r: n for r, n in stats.items() if r != "total"} == expected_counts(merged)
    assert stats["train"] == 40 and stats["arch_report"] == 10 and stats["cross_report"] == 1


def test_ensemble_architectures_agree_with_the_package():
    from interbrain.ensemble import ENSEMBLE_ARCHS

    text = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert f"ENSEMBLE_ARCHS = {list(ENSEMBLE_ARCHS)!r}".replace("'", '"') in text


@pytest.mark.parametrize("device, gpus", [("cpu", 0), ("cpu", 1), ("cuda", 1), ("auto", 1)])
def test_train_ensemble_asks_for_what_one_process_of_all_units_needs(tmp_path, device, gpus):
    """One unit's memory plus 100 MB per further unit (measured ~20 MB), not the units' sum; on a GPU one unit's
    runtime (the 20-unit ensemble updates faster than one unit alone there), on CPU the units' runtimes added (also
    when a GPU is requested but the device is the CPU)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("archs: [rnn]\ntasks: [social, non_social]\nseeds: [0, 1, 2]\n"
                   f"train: {{preset: fast, updates: 4, device: {device}, ensemble: true, gpus: {gpus}, mem_mb: 2000, "
                   "runtime: 60}\n")
    out = snakemake(tmp_path, "-n", "--", "results/rnn/social/seed_0000/checkpoints/latest.safetensors",
                    configfile=cfg).stdout
    block = out.split("rule train_ensemble:", 1)[1]
    resources = dict(kv.split("=", 1) for kv in re.search(r"resources: (.*)", block).group(1).split(", "))
    assert int(resources["mem_mb"]) == 2000 + 100 * 5
    on_gpu = gpus > 0 and device != "cpu"
    assert int(resources["runtime"]) == (60 if on_gpu else 60 * 6)
    assert int(resources["gpu"]) == gpus


@pytest.mark.slow
def test_train_ensemble_rule_publishes_every_units_outputs(tmp_path):
    """train.ensemble: true: one train_ensemble job trains the rnn units (the transformer's still go through
    `train`); the published checkpoints are the units' own (compared with a plain run of one unit)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("archs: [rnn, transformer]\ntasks: [social, non_social]\nseeds: [0, 1]\n"
                   "train: {preset: fast, updates: 4, checkpoint_every: 2, log_every: 2, overrides: {num_envs: 8}, "
                   "device: cpu, ensemble: true}\n")
    latest = [f"results/rnn/{t}/seed_{s:04d}/checkpoints/latest.safetensors" for t in ("social", "non_social")
              for s in (0, 1)]
    jobs = parse_dry_run(snakemake(tmp_path, "-n", "results/cross_architecture_study/report.md",
                                   configfile=cfg).stdout)
    assert len(jobs["train_ensemble"]) == 1 and len(jobs["train"]) == 4
    assert sorted(o for o in jobs["train_ensemble"][0] if o.endswith("latest.safetensors")) == sorted(latest)
    assert all("/transformer/" in o for outs in jobs["train"] for o in outs)
    snakemake(tmp_path, "--cores", "2", *latest, configfile=cfg, timeout=600)
    again = snakemake(tmp_path, "-n", *latest, configfile=cfg)
    assert "Nothing to be done" in again.stdout + again.stderr

    from interbrain.checkpoint import load_checkpoint
    from interbrain.config import make_train_config
    from interbrain.train import train_config

    unit = make_train_config("rnn", "non_social", 1, "fast", 4, size="matched", checkpoint_every=2, log_every=2,
                             overrides={"num_envs": 8})
    alone = load_checkpoint(train_config(unit, device="cpu", out=tmp_path / "alone", progress=False))
    published = tmp_path / "results/rnn/non_social/seed_0001/checkpoints"
    got, start = load_checkpoint(published / "latest.safetensors"), load_checkpoint(published / "update_000000.safetensors")
    assert got.config.to_dict() == alone.config.to_dict() and got.update == 4
    for role in ("chaser", "explorer"):
        a, b, s0 = alone.state_dict(role), got.state_dict(role), start.state_dict(role)
        for k in a:
            assert float((a[k] - b[k]).norm()) <= 1e-3 * float((a[k] - s0[k]).norm()) + 1e-7, (role, k)
    assert (tmp_path / "logs/train_ensemble/rnn.log").read_text().count("published") == 4
