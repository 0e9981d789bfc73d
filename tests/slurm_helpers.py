"""Helpers for tests that run against the local single-node SLURM cluster of ``.ci/slurm-up``.

Import into a test module (tests/ is on sys.path under pytest's default import mode)::

    from slurm_helpers import slurm_cluster, run_snakemake_slurm  # noqa: F401  (fixture import)

    @pytest.mark.slurm
    def test_smoke_through_slurm(slurm_cluster, tmp_path):
        run = run_snakemake_slurm(REPO_ROOT, "--configfile", "configs/smoke.yaml", "--directory", tmp_path)
        run.check()                                        # rc == 0, every submitted job COMPLETED
        assert all(s.requests_gpu for s in run.by_rule("train"))  # training jobs carried the GPU request

``slurm_cluster`` (session fixture) makes sure the cluster answers: it uses a running one, otherwise it runs
``.ci/slurm-up`` (as root; set ``INTERBRAIN_NO_SLURM_UP=1`` to forbid that). It skips only when SLURM is not
installed and cannot be brought up; a cluster that is installed but broken fails the test.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_UP = REPO_ROOT / ".ci" / "slurm-up"
SLURM_PROFILE = REPO_ROOT / "profiles" / "slurm"
LOCAL_PROFILE = REPO_ROOT / "profiles" / "local"

# first status poll after 2 s instead of the profile's 20 s: keeps tiny test workflows fast
FAST_POLL_ARGS = ("--slurm-init-seconds-before-status-checks", "2")


# --------------------------------------------------------------------------- cluster
@dataclass
class ClusterInfo:
    node: str
    partitions: list[str]
    default_partition: str | None
    gres: str


def _run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def cluster_ready() -> ClusterInfo | None:
    """The cluster's node/partitions when slurmctld answers and a node can take jobs, else None."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = _run(["sinfo", "-h", "-N", "-o", "%N|%P|%T|%G"], timeout=15)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    node, parts, gres, default, usable = None, [], "", None, False
    for line in out.stdout.split():
        n, p, state, g = line.split("|", 3)
        node, gres = n, g
        if p.endswith("*"):
            p = p[:-1]
            default = p
        parts.append(p)
        usable |= state.rstrip("*~#!%$@^-") in ("idle", "mixed", "allocated", "completing")
    if not usable:
        return None
    return ClusterInfo(node=node, partitions=sorted(set(parts)), default_partition=default, gres=gres)


def bring_up_cluster(timeout: float = 900) -> tuple[ClusterInfo | None, str]:
    """Run .ci/slurm-up (root only). Returns (info or None, why/what it printed)."""
    if os.environ.get("INTERBRAIN_NO_SLURM_UP") == "1":
        return None, "INTERBRAIN_NO_SLURM_UP=1 forbids running .ci/slurm-up"
    if os.geteuid() != 0:
        return None, "not root, so .ci/slurm-up cannot run here (run `sudo .ci/slurm-up` first)"
    try:
        p = _run([str(SLURM_UP)], timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f".ci/slurm-up did not finish within {timeout:.0f} s"
    text = (p.stdout + p.stderr).strip()
    if p.returncode != 0:
        return None, f".ci/slurm-up failed (exit {p.returncode}):\n{text[-3000:]}"
    return cluster_ready(), text


@pytest.fixture(scope="session")
def slurm_cluster() -> ClusterInfo:
    """A reachable SLURM cluster (starting it with .ci/slurm-up when needed), or skip/fail with the reason."""
    info = cluster_ready()
    if info is not None:
        return info
    info, why = bring_up_cluster()
    if info is not None:
        return info
    if shutil.which("sbatch") is None:
        pytest.skip(f"no SLURM here: sbatch is missing and the cluster could not be started "
                    f"(.ci/slurm-up must run first, as root). {why}")
    pytest.fail(f"SLURM is installed but the cluster does not answer and .ci/slurm-up could not fix it: {why}")


# --------------------------------------------------------------------------- plain SLURM jobs
def scontrol_show_job(jobid: str | int) -> dict[str, str]:
    """`scontrol show job` as a dict ({} when SLURM no longer knows the job; MinJobAge on the CI cluster
    is 900 s)."""
    p = _run(["scontrol", "-o", "show", "job", str(jobid)])
    if p.returncode != 0:
        return {}
    fields: dict[str, str] = {}
    # one line, space-separated Key=Value tokens; values of Command/WorkDir/etc. have no spaces here
    for tok in re.findall(r"(\S+?)=(\S*)", p.stdout):
        fields.setdefault(tok[0], tok[1])
    return fields


def wait_for_job(jobid: str | int, timeout: float = 120) -> dict[str, str]:
    """Poll until the job reaches a final state; returns its scontrol fields."""
    final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
             "DEADLINE", "PREEMPTED"}
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = scontrol_show_job(jobid)
        if info.get("JobState") in final:
            return info
        time.sleep(0.5)
    raise TimeoutError(f"SLURM job {jobid} not finished after {timeout} s: {info.get('JobState')} "
                       f"({info.get('Reason')})")


def job_requests_gpu(info: dict[str, str]) -> bool:
    """True if the job asked for a GPU (sbatch --gpus / --gres=gpu / --gpus-per-*)."""
    return any("gpu" in info.get(k, "") for k in ("TresPerJob", "TresPerNode", "TresPerTask",
                                                   "TresPerSocket"))


# --------------------------------------------------------------------------- snakemake through SLURM
_SUBMITTED_RE = re.compile(
    r"Job (?P<smk>\S+) has been submitted with SLURM jobid (?P<jobid>\d+) \(log: (?P<log>[^)]+)\)\.")
_ARRAY_RE = re.compile(r"Submitted array job with Snakemake IDs (?P<smk>\S+) and SLURM job ID (?P<jobid>\d+)")
_SBATCH_RE = re.compile(r"^sbatch call: (?P<line>sbatch .*)$", re.M)
_RUNID_RE = re.compile(r"SLURM run ID: (\S+)")


@dataclass
class SlurmSubmission:
    """One sbatch submission of a snakemake run (a single job or a group of jobs)."""

    jobid: str
    snakemake_jobid: str
    logfile: str               # .snakemake/slurm_logs/<rule_R | group_G_R1_R2>/<wildcards>/<jobid>.log
    sbatch: str | None = None  # the sbatch command line up to --wrap (only logged with --verbose)
    rules: list[str] = field(default_factory=list)        # --allowed-rules of the job (with --verbose)
    target_jobs: list[str] = field(default_factory=list)  # e.g. ['evaluate:i=0', 'evaluate:i=1']

    @property
    def label(self) -> str:
        """'rule_train' or 'group_small_evaluate_evaluate' (the directory under .snakemake/slurm_logs)."""
        parts = Path(self.logfile).parts
        return parts[parts.index("slurm_logs") + 1] if "slurm_logs" in parts else ""

    @property
    def is_group(self) -> bool:
        return self.label.startswith("group_")

    def covers(self, rule: str) -> bool:
        """Whether this submission runs jobs of *rule*."""
        if self.rules:
            return rule in self.rules
        return self.label == f"rule_{rule}" or (self.is_group and self.label.endswith(f"_{rule}"))

    @property
    def sbatch_args(self) -> list[str]:
        return shlex.split(self.sbatch) if self.sbatch else []

    @property
    def requests_gpu(self) -> bool:
        """GPU request seen on the sbatch line (if logged) or in `scontrol show job`."""
        if self.sbatch and re.search(r"--gpus[= ]|--gres[= ]\S*gpu|--gpus-per-", self.sbatch):
            return True
        return job_requests_gpu(scontrol_show_job(self.jobid))

    def scontrol(self) -> dict[str, str]:
        return scontrol_show_job(self.jobid)


@dataclass
class SnakemakeSlurmRun:
    cmd: list[str]
    returncode: int
    log: str
    run_id: str | None       # also the SLURM job name of every job of the run
    logfile: Path | None = None
    submissions: list[SlurmSubmission] = field(default_factory=list)

    def by_rule(self, rule: str) -> list[SlurmSubmission]:
        """The submissions that ran jobs of *rule* (a group submission counts for each of its rules)."""
        return [s for s in self.submissions if s.covers(rule)]

    def check(self, require_completed: bool = True) -> None:
        """Assert success: rc 0, at least one SLURM job, and every job COMPLETED according to SLURM."""
        assert self.returncode == 0, f"snakemake failed (rc={self.returncode}):\n{self.log[-6000:]}"
        assert self.submissions, f"no SLURM submissions found in the log:\n{self.log[-4000:]}"
        if require_completed:
            for s in self.submissions:
                info = s.scontrol()
                assert info.get("JobState") == "COMPLETED", (s, info.get("JobState"), info.get("Reason"))


def _option_values(text: str, option: str) -> list[str]:
    """Values following *option* in a (shell-quoted) command line, up to the next --option."""
    m = re.search(rf"{re.escape(option)}\s+(.*?)(?=\s--[a-z]|$)", text)
    if not m:
        return []
    try:
        return shlex.split(m.group(1).replace('\\"', '"'))
    except ValueError:
        return m.group(1).split()


def parse_slurm_submissions(log: str) -> list[SlurmSubmission]:
    """SLURM job ids and (with snakemake --verbose) the sbatch command lines from a snakemake log.

    A submission line's log path is the sbatch ``--output`` path with ``%j`` filled in; that pairs each
    job id with its sbatch call even when submissions interleave."""
    calls: dict[str, str] = {}
    for m in _SBATCH_RE.finditer(log):
        line = m.group("line")
        call, _, wrap = line.partition(' --wrap="')
        call = call.removesuffix(" /dev/stdin")
        try:
            args = shlex.split(call)
        except ValueError:
            continue
        if "--output" in args:
            calls[args[args.index("--output") + 1]] = (call, wrap)
    subs = []
    for m in _SUBMITTED_RE.finditer(log):
        logpath = m.group("log")
        call, wrap = calls.get(str(Path(logpath).with_name("%j.log")), (None, ""))
        subs.append(SlurmSubmission(jobid=m.group("jobid"), snakemake_jobid=m.group("smk"), logfile=logpath,
                                    sbatch=call, rules=_option_values(wrap, "--allowed-rules"),
                                    target_jobs=_option_values(wrap, "--target-jobs")))
    for m in _ARRAY_RE.finditer(log):
        subs.append(SlurmSubmission(jobid=m.group("jobid"), snakemake_jobid=m.group("smk"), logfile=""))
    return subs


def _kill_run(proc: subprocess.Popen, run_id: str | None) -> None:
    """Stop a snakemake run and its SLURM jobs (snakemake may ignore SIGINT while polling SLURM)."""
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if run_id and shutil.which("scancel"):
        subprocess.run(["scancel", "--name", run_id], capture_output=True)


def run_snakemake_slurm(workdir: str | Path, *args: str | Path, profile: str | Path = SLURM_PROFILE,
                        timeout: float = 600, fast_poll: bool = True, verbose: bool = True,
                        env: dict[str, str] | None = None,
                        logfile: str | Path | None = None) -> SnakemakeSlurmRun:
    """Run ``python -m snakemake --profile <profile> [args]`` in *workdir* and collect its SLURM jobs.

    The venv's bin directory is put first on PATH (the jobs inherit the environment through
    ``sbatch --export=ALL``). ``verbose`` adds --verbose so that the sbatch command lines are logged;
    ``fast_poll`` makes the first status check come after 2 s. On timeout the run is killed, its SLURM jobs
    cancelled, and AssertionError raised with the log tail. Snakemake's combined stdout/stderr goes to
    *logfile* (default: a new temporary file; its path is ``result.logfile``)."""
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(profile)]
    if fast_poll:
        cmd += list(FAST_POLL_ARGS)
    if verbose:
        cmd.append("--verbose")
    cmd += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.pop("SLURM_JOB_ID", None)
    if env:
        full_env.update(env)
    if logfile is None:
        fd, name = tempfile.mkstemp(prefix="snakemake-slurm-", suffix=".log")
        os.close(fd)
        logfile = Path(name)
    logfile = Path(logfile)
    with open(logfile, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = -1
    log = logfile.read_text(errors="replace")
    m = _RUNID_RE.search(log)
    run_id = m.group(1) if m else None
    if timed_out:
        _kill_run(proc, run_id)
        log = logfile.read_text(errors="replace")
        squeue = _run(["squeue", "--states=all", "-o", "%i|%T|%P|%R|%j"]).stdout if shutil.which("squeue") else ""
        raise AssertionError(f"snakemake did not finish within {timeout} s: {shlex.join(cmd)}\n"
                             f"--- squeue ---\n{squeue}\n--- log tail ---\n{log[-6000:]}")
    return SnakemakeSlurmRun(cmd=cmd, returncode=rc, log=log, run_id=run_id, logfile=logfile,
                             submissions=parse_slurm_submissions(log))
