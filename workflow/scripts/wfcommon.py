"""Shared by every workflow script (imported as ``from wfcommon import job``; Snakemake puts this directory on
``sys.path``).

``with job(snakemake):`` makes the package importable from the repository's ``src/`` (so a conda environment
needs only the pinned dependencies, not an install of the package), caps the BLAS/OpenMP/torch threads at the
job's ``threads``, and sends everything the job prints (Python and C level) to its ``log:`` file. An error leaves
its traceback in the log, one line on the job's stderr, and exit status 1.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def use_repo_package() -> None:
    if SRC.is_dir() and str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def limit_threads(threads: int) -> None:
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    try:
        import torch
    except ImportError:  # pragma: no cover - every environment has torch
        return
    torch.set_num_threads(threads)


@contextlib.contextmanager
def job(snakemake):
    """Run the body of a workflow script with the package importable, threads capped and output in the log."""
    use_repo_package()
    threads = max(int(getattr(snakemake, "threads", 1) or 1), 1)
    log = snakemake.log[0] if len(snakemake.log) else None
    saved_err = os.dup(2)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    try:
        print(f"[{snakemake.rule}] wildcards: {dict(snakemake.wildcards.items())}", flush=True)
        limit_threads(threads)
        yield snakemake
    except BaseException as exc:  # noqa: BLE001 - report every failure the same way
        traceback.print_exc()
        sys.stderr.flush()
        line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = f" (log: {log})" if log else ""
        os.write(saved_err, f"{snakemake.rule}: error: {line}{where}\n".encode())
        raise SystemExit(1) from None
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.close(saved_err)


def as_list(files) -> list[str]:
    """A Snakemake named input/output item (a single path or a list) as a list of str."""
    if isinstance(files, (str, os.PathLike)):
        return [str(files)]
    return [str(f) for f in files]


__all__ = ["job", "as_list", "use_repo_package", "limit_threads", "REPO", "SRC"]
