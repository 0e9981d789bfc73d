"""Training throughput: seconds per PPO update (40 episodes x 100 steps) for every architecture x preset.

Prints one JSON document: machine info, this machine's dense matmul throughput (GFLOP/s, one thread and all threads),
environment-only steps/s, and per (arch, size, preset): seconds per update (median of ``--repeats`` after ``--warmup``),
env steps/s, and the rollout share of the update time.

    python benchmarks/train_throughput.py [--threads 1] [--archs rnn,mlp] [--presets paper,fast] [--sizes std,matched]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from interbrain.config import EnvConfig, make_train_config
from interbrain.env import ChaseEnv
from interbrain.ppo import collect_rollout, update_clipped, update_rllib
from interbrain.provenance import now, package_versions
from interbrain.train import Trainer


def matmul_gflops(n: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def env_steps_per_s(batch: int = 40, steps: int = 2000) -> float:
    env = ChaseEnv(EnvConfig(task="social"), batch)
    g = torch.Generator().manual_seed(0)
    acts = torch.randint(0, 4, (steps, 2, batch), generator=g)
    env.reset(g)
    t = time.perf_counter()
    for i in range(steps):
        if env.done:
            env.reset(g)
        env.step(acts[i, 0], acts[i, 1])
    return steps * batch / (time.perf_counter() - t)


def time_update(arch: str, size: str, preset: str, warmup: int, repeats: int) -> dict:
    cfg = make_train_config(arch, "social", 0, preset, warmup + repeats, size=size)
    tr = Trainer(cfg, torch.device("cpu"))
    rollout_t, total_t = [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        batch = collect_rollout(tr.env, tr.agents, tr.env_gen, tr.action_gens,
                                seq_len=cfg.ppo.seq_len if cfg.ppo.learner == "rllib" else None)
        t1 = time.perf_counter()
        if cfg.ppo.learner == "rllib":
            update_rllib(tr.agents, tr.optimizers, batch, cfg.ppo, i + 1, tr.kl_coefs, tr.minibatch_gen)
        else:
            update_clipped(tr.agents, tr.optimizers, batch, cfg.ppo, i + 1)
        t2 = time.perf_counter()
        if i >= warmup:
            rollout_t.append(t1 - t0)
            total_t.append(t2 - t0)
    sec = statistics.median(total_t)
    steps = cfg.ppo.num_envs * cfg.env.horizon
    return {"arch": arch, "size": size, "preset": preset, "seconds_per_update": sec, "env_steps_per_s": steps / sec,
            "rollout_seconds": statistics.median(rollout_t), "rollout_share": statistics.median(rollout_t) / sec,
            "parameters_per_agent": tr.agents["chaser"].num_parameters(), "repeats": repeats}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = one Snakemake training job per core)")
    p.add_argument("--archs", default="rnn,mlp,ssm,transformer")
    p.add_argument("--sizes", default="std,matched")
    p.add_argument("--presets", default="paper,fast")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for arch in args.archs.split(","):
        for size in args.sizes.split(","):
            for preset in args.presets.split(","):
                results.append(time_update(arch, size, preset, args.warmup, args.repeats))
    out = {
        "benchmark": "train_throughput", "date": now(), "torch_threads": args.threads,
        "machine": {"processor": platform.processor() or platform.machine(), "cpu_count": torch.get_num_threads(),
                    "python": platform.python_version(), "packages": package_versions()},
        "matmul_gflops_1024": matmul_gflops(),
        "env_only_steps_per_s_batch40": env_steps_per_s(),
        "updates": results,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
