"""The real workflow on a real SLURM cluster (.ci/slurm-up): configs/smoke.yaml through `--profile profiles/slurm`.

Asserts that every job ran as a SLURM job, that training jobs were submitted with their GPU request, and that the
outputs equal those of a local run of the same config (weights bit for bit on CPU; evaluation, decoding and PLSC
numbers exactly).
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from slurm_helpers import REPO_ROOT, run_snakemake_slurm, slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

GPU_CONFIG = "train:\n  gpus: 1\n"  # the cluster profile's GPU request (the smoke config itself asks for none)


def _weights(path: Path) -> dict:
    return {k: v for k, v in load_file(str(path)).items() if not k.startswith(("rng.", "optimizer."))}


def _eval_metrics(path: Path) -> list:
    return sorted((r["unit_id"], r["update"], r["matchup"], r["visibility"], json.dumps(r["metrics"], sort_keys=True))
                  for r in map(json.loads, path.read_text().splitlines()))


def test_smoke_workflow_through_slurm_equals_local(slurm_cluster, tmp_path):
    gpu_cfg = tmp_path / "gpu.yaml"
    gpu_cfg.write_text(GPU_CONFIG)
    slurm_dir, local_dir = tmp_path / "slurm", tmp_path / "local"
    slurm_dir.mkdir()
    local_dir.mkdir()
    common = ["-s", str(REPO_ROOT / "Snakefile"), "--configfile", str(REPO_ROOT / "configs/smoke.yaml"), str(gpu_cfg)]

    run = run_snakemake_slurm(REPO_ROOT, *common, "--directory", str(slurm_dir), timeout=1500,
                              logfile=tmp_path / "slurm.log")
    run.check()  # rc 0, every submission COMPLETED according to SLURM
    trains = run.by_rule("train")
    assert len(trains) == 4  # 2 archs x 2 tasks x 1 seed
    assert all(s.requests_gpu for s in trains), [s.sbatch for s in trains]
    # every non-local job was a SLURM job: each rule of the workflow except `all` appears in some submission
    submitted_rules = {r for s in run.submissions for r in (s.rules or [s.label.removeprefix("rule_")])}
    for rule in ("train", "health", "evaluate", "gather_eval", "rollout", "decode", "plsc", "partner", "dynamics", "perturb", "cka",
                 "unit_tables", "arch_report", "manifest", "cross_report"):
        assert any(rule in r for r in submitted_rules), (rule, submitted_rules)

    local = subprocess.run([sys.executable, "-m", "snakemake", *common, "--directory", str(local_dir), "--cores", "2",
                            "--quiet"], capture_output=True, text=True, timeout=1500)
    assert local.returncode == 0, local.stderr[-3000:]

    for unit in ("rnn/social/seed_0000", "transformer/non_social/seed_0000"):
        a = _weights(slurm_dir / f"results/{unit}/checkpoints/latest.safetensors")
        b = _weights(local_dir / f"results/{unit}/checkpoints/latest.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for arch in ("rnn", "transformer"):
        assert _eval_metrics(slurm_dir / f"results/{arch}/paper_random_eval.jsonl") == _eval_metrics(
            local_dir / f"results/{arch}/paper_random_eval.jsonl")
        for table, cols in (("decoding", ["target", "scheme", "status", "balanced_accuracy", "p_value"]),
                            ("plsc", ["variant", "status", "k_star", "r1", "delta_pcc"])):
            ta = pd.read_csv(slurm_dir / f"results/{arch}/derived/tables/{table}.csv")
            tb = pd.read_csv(local_dir / f"results/{arch}/derived/tables/{table}.csv")
            key = ["unit_id", "visibility", "update"] + cols[:2]
            ta, tb = ta.sort_values(key).reset_index(drop=True), tb.sort_values(key).reset_index(drop=True)
            pd.testing.assert_frame_equal(ta[key + cols[2:]], tb[key + cols[2:]])
    assert (slurm_dir / "results/cross_architecture_study/report.md").stat().st_size > 1000
