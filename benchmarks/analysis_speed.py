"""Timing of the SPEC §6 analyses on synthetic data of the analysis-rollout size (25 episodes × 500 steps × 256 units).

Usage: ``python benchmarks/analysis_speed.py [--sections plsc_pooled,plsc_per_episode,...] [--n-null 2000]``.
Prints one JSON object to stdout: the machine (cpu model, cores, torch threads), the date, and per section its wall
and CPU seconds plus the figures it reports. Each section is one entry of ``SECTIONS``: a function taking the shared
argparse namespace and returning a dict that must contain ``wall_s``. Targets (2 cores): pooled PLSC with 2,000
shifts <= 10 s; per-episode PLSC over 25 episodes <= 30 s. Figures are noisy when the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

from interbrain.analysis.cka import cka_matrix
from interbrain.analysis.plsc import plsc_test
from interbrain.analysis.subspace import perturbation_bases
from interbrain.provenance import cpu_info

E, T, D = 25, 500, 256


def synthetic_pair(seed: int = 0, n_shared: int = 3):
    """Chaser/explorer hidden [E, T, D] float32 sharing ``n_shared`` AR(1) latents, plus AR(1) private noise."""
    rng = np.random.default_rng(seed)

    def ar1(shape, phi=0.9):
        out = np.empty(shape)
        out[:, 0] = rng.standard_normal((shape[0],) + shape[2:])
        eps = rng.standard_normal(shape) * np.sqrt(1 - phi**2)
        for t in range(1, shape[1]):
            out[:, t] = phi * out[:, t - 1] + eps[:, t]
        return out

    z = ar1((E, T, n_shared))
    X = z @ rng.standard_normal((n_shared, D)) * 0.3 + ar1((E, T, D))
    Y = z @ rng.standard_normal((n_shared, D)) * 0.3 + ar1((E, T, D))
    return X.astype(np.float32), Y.astype(np.float32)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _plsc_section(mode: str, null: str = "circular", null_dtype: str = "float64", target_s: float | None = None):
    def bench(args) -> dict:
        X, Y = synthetic_pair()
        kwargs = dict(mode=mode, null=null, n_null=args.n_null, null_dtype=null_dtype)
        res, wall, cpu = _timed(lambda: plsc_test(X, Y, **kwargs))
        out = {"wall_s": wall, "cpu_s": cpu, "shape": [E, T, D], "mode": mode, "null": null, "null_dtype": null_dtype,
               "n_null": args.n_null, "k_star": res.k_star, "r1": res.r1, "delta_pcc": res.delta_pcc}
        if target_s is not None:
            out["target_s"] = target_s
        return out

    return bench


def bench_perturbation_bases(args) -> dict:
    X, Y = synthetic_pair()
    res, wall, cpu = _timed(
        lambda: perturbation_bases(X.reshape(-1, D), Y.reshape(-1, D), episode_lengths=[T] * E, variance_matched=True)
    )
    return {"wall_s": wall, "cpu_s": cpu, "n_samples": E * T, "removed_variance": res.removed_variance}


def bench_cka_matrix(args) -> dict:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((12000, 64)).astype(np.float32)
    feats = {
        (arch, seed): np.tanh(base @ rng.standard_normal((64, 256)).astype(np.float32) * 0.2)
        for arch in ("rnn", "mlp", "ssm", "transformer")
        for seed in range(args.cka_seeds)
    }
    res, wall, cpu = _timed(lambda: cka_matrix(feats))
    n_pairs = int(np.triu(res["n_pairs"]).sum())
    return {"wall_s": wall, "cpu_s": cpu, "networks": len(feats), "pairs": n_pairs, "probe": [12000, 256]}


def bench_decoding(args) -> dict:
    """One unit's four decoding targets (25 x 500 synthetic rollout, D = 256), 200 shuffles each; target <= 20 s."""
    from interbrain.analysis.decoding import bench_decoding as run

    return {**run(n_shuffles=200), "target_s": 20.0}


SECTIONS = {
    "plsc_pooled": _plsc_section("pooled", target_s=10.0),
    "plsc_per_episode": _plsc_section("per_episode", target_s=30.0),
    "plsc_pooled_float32": _plsc_section("pooled", null_dtype="float32"),
    "plsc_per_episode_float32": _plsc_section("per_episode", null_dtype="float32"),
    "plsc_episode_shuffle": _plsc_section("pooled", null="episode_shuffle"),
    "perturbation_bases": bench_perturbation_bases,
    "cka_matrix": bench_cka_matrix,
    "decoding": bench_decoding,
}


def machine_info() -> dict:
    return cpu_info() | {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "load_avg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS)
    )
    parser.add_argument("--n-null", type=int, default=2000)
    parser.add_argument("--cka-seeds", type=int, default=10)
    args = parser.parse_args(argv)
    names = [s for s in args.sections.split(",") if s]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = {"date": now, "machine": machine_info(), "sections": {}}
    for name in names:
        out["sections"][name] = SECTIONS[name](args)
        print(f"{name}: {json.dumps(out['sections'][name], default=float)}", file=sys.stderr, flush=True)
    out["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    json.dump(out, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
