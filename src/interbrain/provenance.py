"""Provenance recorded with every artifact (SPEC §5.1, §5.4): code version, packages, device, numerics flags."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

import interbrain

_PACKAGES = ("torch", "numpy", "numba", "scipy", "scikit-learn", "safetensors", "pandas")
_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), *args], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


@lru_cache(maxsize=1)
def code_version() -> dict:
    sha = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD") if sha else None
    return {
        "git_sha": sha.strip() if sha else None,
        "git_dirty": bool(diff.strip()) if diff is not None else None,
        "git_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "interbrain_version": interbrain.__version__,
    }


@lru_cache(maxsize=1)
def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """The host processor, for benchmark records: timings differ between processors that report the same name (e.g.
    AMD EPYC family 25 and 26 (Zen 4, Zen 5), whose AVX-512 products differ twofold), so the family and model numbers
    are kept too. Read from /proc/cpuinfo (Linux); elsewhere only ``platform.processor()``."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    return {
        "cpu_model": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_vendor": fields.get("vendor_id"),
        "cpu_family": int(fields["cpu family"]) if fields.get("cpu family", "").isdigit() else None,
        "cpu_model_number": int(fields["model"]) if fields.get("model", "").isdigit() else None,
        "cpu_mhz": float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
        "avx512f": "avx512f" in flags if flags else None,
        "cores_visible": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def device_info(device: torch.device | str | None = None) -> dict:
    device = torch.device(device) if device is not None else torch.device("cpu")
    info = {"device": str(device), "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if device.type == "cpu":  # which kernels ran the large float32 products (interbrain.agents.linear)
        from interbrain.agents.linear import cpu_backend, numpy_blas_kernels, small_backend

        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["cpu_matmul"] = cpu_backend()
        info["cpu_small_matmul"] = small_backend()
        info["numpy_blas_kernels"] = numpy_blas_kernels()  # the kernels of numpy's products (OpenBLAS's choice)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
        info["tf32_cudnn"] = bool(torch.backends.cudnn.allow_tf32)
        info["cudnn_deterministic"] = bool(torch.backends.cudnn.deterministic)
        info["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    return info


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(device: torch.device | str | None = None) -> dict:
    return {**code_version(), "packages": package_versions(), **device_info(device), "created_at": now()}


def float32_on_cuda() -> None:
    """float32 stays float32 on CUDA: TF32 off for cuDNN (``nn.GRU``/``nn.LSTM``; torch turns it on by default, and
    on an H100 it moved gru's and lstm's learning-pass gradients by up to 4e-3 of their norm from the CPU's, 1e-6
    without it; session 25) and for matmul (off by default). Process-wide; called by :func:`resolve_device` and by
    :class:`interbrain.train.Trainer` for a CUDA device, and recorded in the provenance (``tf32_*``)."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; a CUDA device computes in float32 (:func:`float32_on_cuda`)."""
    dev = _parse_device(device)
    if dev.type == "cuda":
        float32_on_cuda()
    return dev


def _parse_device(device: str) -> torch.device:
    from interbrain.errors import InterbrainError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InterbrainError(f"unknown device {device!r}; expected auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InterbrainError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise InterbrainError(f"unsupported device {device!r}; expected auto, cpu or cuda[:N]")
    return dev
