"""The local SLURM cluster (.ci/slurm-up) and the Snakemake SLURM profile (profiles/slurm), end to end.

Run:  sudo .ci/slurm-up && .venv/bin/python -m pytest tests/test_slurm_cluster.py -q
(the fixture runs .ci/slurm-up itself when it runs as root and the cluster is not up).
"""

from __future__ import annotations

import os
import pwd
import subprocess
import textwrap

import pytest

from slurm_helpers import (  # noqa: F401  (slurm_cluster is a fixture)
    SLURM_PROFILE,
    run_snakemake_slurm,
    slurm_cluster,
    wait_for_job,
)

pytestmark = pytest.mark.slurm


def test_sbatch_gpu_job_completes(slurm_cluster, tmp_path):
    """(a) a plain `sbatch --gpus=1 --wrap` job runs as root on the fake GPU, inherits env and cwd."""
    assert {"cpu", "gpu"} <= set(slurm_cluster.partitions), slurm_cluster
    assert slurm_cluster.default_partition == "cpu", slurm_cluster
    assert "gpu:1" in slurm_cluster.gres, slurm_cluster

    env = dict(os.environ, INTERBRAIN_SLURM_MARKER="carried-over")
    out = subprocess.run(
        ["sbatch", "--parsable", "--partition=gpu", "--gpus=1", "--time=2", "--mem=100",
         f"--output={tmp_path}/job-%j.out",
         "--wrap", 'echo "jobid=$SLURM_JOB_ID gpus=$SLURM_GPUS_ON_NODE partition=$SLURM_JOB_PARTITION '
                   'marker=$INTERBRAIN_SLURM_MARKER cwd=$PWD user=$(id -un)"'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    jobid = out.stdout.strip().split(";")[0]
    info = wait_for_job(jobid, timeout=120)
    assert info["JobState"] == "COMPLETED", info
    assert info["Partition"] == "gpu"
    assert "gpu:1" in info.get("TresPerJob", "") + info.get("TresPerNode", ""), info

    text = (tmp_path / f"job-{jobid}.out").read_text()
    assert f"jobid={jobid} " in text
    assert "gpus=1 " in text and "partition=gpu " in text
    assert "marker=carried-over " in text          # submitting shell's environment reaches the job
    assert f"cwd={tmp_path} " in text              # and so does its working directory
    assert f"user={pwd.getpwuid(os.getuid()).pw_name}" in text   # runs as the submitter (root in CI)


SNAKEFILE = textwrap.dedent('''
    # Tiny workflow using the real workflow's rule names, so that the profile's set-resources (train)
    # and groups (evaluate, gather_eval) apply.
    localrules: all

    rule all:
        input: "out/summary.txt"

    rule train:                     # GPU job: asks for the GPU itself, and the profile asks again
        output: "out/model.txt"
        resources:
            gpu=1,
            slurm_partition="gpu",
            mem_mb=lambda wc, attempt: 300 * attempt,
            runtime=5,
        shell: "echo ${{SLURM_JOB_ID:-none}} ${{SLURM_JOB_PARTITION:-none}} ${{SLURM_GPUS_ON_NODE:-0}} > {output}"

    rule evaluate:                  # three small jobs: the profile bundles them into one submission
        input: "out/model.txt"
        output: "out/eval_{i}.txt"
        resources: runtime=5, mem_mb=200
        shell: "echo ${{SLURM_JOB_ID:-none}} ${{SLURM_JOB_PARTITION:-none}} > {output}"

    rule gather_eval:
        input: expand("out/eval_{i}.txt", i=range(3))
        output: "out/summary.txt"
        resources: runtime=5, mem_mb=200
        shell: "cat {input} > {output}; echo ${{SLURM_JOB_ID:-none}} ${{SLURM_JOB_PARTITION:-none}} >> {output}"
''')


def test_snakemake_profile_runs_every_job_through_slurm(slurm_cluster, tmp_path):
    """(b) snakemake --profile profiles/slurm on a tiny workflow: every job is a SLURM job, the GPU rule's
    submission carries the GPU request and lands in the gpu partition, the small jobs are grouped."""
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    run = run_snakemake_slurm(tmp_path, timeout=480, logfile=tmp_path / "snakemake.log")
    run.check()   # rc 0, submissions found, each COMPLETED per scontrol

    assert f"--profile {SLURM_PROFILE}" in " ".join(run.cmd)
    subs = {s.jobid: s for s in run.submissions}
    assert len(subs) == 3, [(s.jobid, s.label, s.target_jobs) for s in run.submissions]

    # -- every output was written inside a SLURM job that snakemake submitted (no local execution)
    model = (tmp_path / "out" / "model.txt").read_text().split()
    evals = [(tmp_path / "out" / f"eval_{i}.txt").read_text().split() for i in range(3)]
    summary_last = (tmp_path / "out" / "summary.txt").read_text().splitlines()[-1].split()
    for jobid, *_ in [model, *evals, summary_last]:
        assert jobid in subs, (jobid, sorted(subs))

    # -- the GPU rule: one submission, sbatch line with the GPU + partition, SLURM agrees
    (train,) = run.by_rule("train")
    assert train.jobid == model[0]
    assert "--gpus=1" in train.sbatch_args, train.sbatch
    assert train.sbatch_args[train.sbatch_args.index("-p") + 1] == "gpu", train.sbatch
    assert "--cpus-per-gpu=2" in train.sbatch_args, train.sbatch       # from the profile's set-resources
    info = train.scontrol()
    assert info["Partition"] == "gpu" and "gpu:1" in info.get("TresPerJob", ""), info
    assert info["JobName"] == run.run_id and run.run_id.startswith("interbrain_")
    assert model[1:] == ["gpu", "1"]          # SLURM_JOB_PARTITION, SLURM_GPUS_ON_NODE inside the job

    # -- the three evaluate jobs went out as ONE grouped submission in the cpu partition, without a GPU
    (ev,) = run.by_rule("evaluate")
    assert ev.is_group and sorted(ev.target_jobs) == [f"evaluate:i={i}" for i in range(3)], ev
    assert {e[0] for e in evals} == {ev.jobid}
    assert all(e[1] == "cpu" for e in evals)
    assert not ev.requests_gpu
    assert ev.scontrol()["Partition"] == "cpu"

    (gather,) = run.by_rule("gather_eval")
    assert gather.jobid == summary_last[0] and summary_last[1] == "cpu"
    assert not gather.requests_gpu
