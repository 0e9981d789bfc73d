"""Training one unit (arch, task, seed): the loop, checkpoints, metrics, resume and retries (SPEC §4.1, §4.6).

Output directory layout::

    {out}/checkpoints/update_000000.safetensors ... update_XXXXXX.safetensors   (every ``checkpoint_every`` + final)
    {out}/checkpoints/latest.safetensors                                         (rolling, also every ``latest_every_s``)
    {out}/metrics.jsonl                                                          (one line per logging interval)
    {out}/events.jsonl                                                           (append-only: invocations and attempts)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from interbrain.agents import build_pair
from interbrain.agents.linear import set_cpu_threads
from interbrain.allocator import keep_freed_memory
from interbrain.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from interbrain.config import TrainConfig, make_train_config
from interbrain.env import ChaseEnv
from interbrain.errors import InterbrainError, NonFiniteError
from interbrain.io import append_jsonl, ensure_dir, write_text_atomic
from interbrain.ppo import AGENTS, FusedAdam, check_finite, collect_rollout, rollout_metrics, update_clipped, update_rllib
from interbrain.provenance import device_info, float32_on_cuda, now, provenance, resolve_device

MAX_ATTEMPTS = 2


def derive_seed(seed: int, stream: str) -> int:
    """Independent, reproducible seeds for the environment, action and minibatch streams (SPEC §4.1)."""
    return int.from_bytes(hashlib.sha256(f"interbrain:{seed}:{stream}".encode()).digest()[:8], "little") & (2**63 - 1)


class Trainer:
    """Holds everything one unit's learning depends on; ``to_checkpoint``/``from_checkpoint`` round-trip it exactly."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config, self.device = config, device
        if device.type == "cuda":
            float32_on_cuda()
        chaser, explorer = build_pair(config.agent, config.seed)
        self.agents = {"chaser": chaser.to(device), "explorer": explorer.to(device)}
        self.optimizers = {a: FusedAdam(self.agents[a].parameters(), lr=config.ppo.lr) for a in AGENTS}
        self.env = ChaseEnv(config.env, config.ppo.num_envs, device)
        self.env_gen = torch.Generator().manual_seed(derive_seed(config.seed, "env"))
        self.action_gens = {a: torch.Generator(device=device).manual_seed(derive_seed(config.seed, f"action.{a}"))
                            for a in AGENTS}
        self.minibatch_gen = torch.Generator().manual_seed(derive_seed(config.seed, "minibatch"))
        self.kl_coefs = {a: float(config.ppo.kl_coef_init) for a in AGENTS}
        self.update = 0

    # -- one PPO update ---------------------------------------------------------------------------
    def step(self) -> dict:
        cfg = self.config.ppo
        rllib = cfg.learner == "rllib"
        for agent in self.agents.values():
            agent.set_progress(self.update + 1)
        batch = collect_rollout(self.env, self.agents, self.env_gen, self.action_gens,
                                seq_len=cfg.seq_len if rllib else None, bootstrap=cfg.bootstrap_time_limit)
        self.update += 1
        if rllib:
            learner = update_rllib(self.agents, self.optimizers, batch, cfg, self.update, self.kl_coefs, self.minibatch_gen)
        else:
            learner = update_clipped(self.agents, self.optimizers, batch, cfg, self.update)
        self.check_health()
        return {"rollout": rollout_metrics(batch), "learner": learner}

    def check_health(self) -> None:
        named = {}
        for a in AGENTS:
            params = dict(self.agents[a].named_parameters())
            named.update({f"{a}.{n}": p for n, p in params.items()})
            state = self.optimizers[a].state  # keyed by the parameter tensors themselves (never format them: slow)
            for n, p in params.items():
                named.update({f"optimizer.{a}.{n}.{k}": v for k, v in state.get(p, {}).items() if torch.is_tensor(v)})
        check_finite(named, self.update)

    def agent_stats(self) -> dict:
        out = {}
        for a in AGENTS:
            net = self.agents[a]
            with torch.no_grad():
                out[a] = {"max_abs_param": max(float(p.abs().max()) for p in net.parameters()),
                          "recurrent_norm": float(net.recurrent_weight_norm()), "kl_coef": self.kl_coefs[a]}
        return out

    # -- checkpoint round trip ----------------------------------------------------------------------
    def rng_state(self) -> dict[str, torch.Tensor]:
        rng = {"torch_cpu": torch.get_rng_state(), "env": self.env_gen.get_state(),
               "minibatch": self.minibatch_gen.get_state()}
        rng.update({f"action.{a}": g.get_state() for a, g in self.action_gens.items()})
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        return rng

    def to_checkpoint(self, metrics: dict | None = None) -> Checkpoint:
        opts = {}
        for a in AGENTS:
            sd = self.optimizers[a].state_dict()
            opts[a] = {"state": sd["state"], "param_groups": sd["param_groups"]}
        return Checkpoint(config=self.config, update=self.update,
                          chaser={k: v for k, v in self.agents["chaser"].state_dict().items()},
                          explorer={k: v for k, v in self.agents["explorer"].state_dict().items()},
                          optimizers=opts, rng=self.rng_state(), metrics=metrics or {}, kl_coefs=dict(self.kl_coefs),
                          provenance=provenance(self.device))

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, device: torch.device, config: TrainConfig | None = None) -> "Trainer":
        config = config or ckpt.config
        if config.learning_identity() != ckpt.config.learning_identity():
            diff = _first_difference(config.learning_identity(), ckpt.config.learning_identity())
            raise InterbrainError(f"refusing to resume from {ckpt.path}: setting {diff} differs from the checkpoint")
        self = cls(config, device)
        for a in AGENTS:
            self.agents[a].load_state_dict(ckpt.state_dict(a))
            opt = ckpt.optimizers.get(a)
            if not opt:
                raise InterbrainError(f"cannot resume from {ckpt.path}: it holds no optimizer state for {a}")
            self.optimizers[a].load_state_dict({"state": opt["state"], "param_groups": opt["param_groups"]})
        try:
            torch.set_rng_state(ckpt.rng["torch_cpu"])
            self.env_gen.set_state(ckpt.rng["env"])
            self.minibatch_gen.set_state(ckpt.rng["minibatch"])
            for a in AGENTS:
                self.action_gens[a].set_state(ckpt.rng[f"action.{a}"])
            if "torch_cuda" in ckpt.rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(ckpt.rng["torch_cuda"])
        except (KeyError, RuntimeError) as exc:
            raise InterbrainError(f"cannot resume from {ckpt.path}: RNG state does not fit this device ({exc})") from None
        self.kl_coefs = {a: float(ckpt.kl_coefs.get(a, config.ppo.kl_coef_init)) for a in AGENTS}
        self.update = ckpt.update
        return self


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')} ({b!r} in checkpoint, {a!r} requested)"


# ------------------------------------------------------------------------------------------------ progress
class Progress:
    """A tqdm bar with ETA and env-steps/s on a terminal; plain periodic lines otherwise."""

    def __init__(self, total: int, start: int, steps_per_update: int, label: str, enabled: bool = True):
        self.tty = enabled and sys.stderr.isatty()
        self.enabled, self.steps_per_update, self.label = enabled, steps_per_update, label
        self.t0, self.start = time.perf_counter(), start
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=label, unit="upd", dynamic_ncols=True)

    def advance(self, update: int, metrics: dict | None) -> None:
        rate = (update - self.start) * self.steps_per_update / max(time.perf_counter() - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{rate:,.0f} env-steps/s" + (
                f" coll {metrics['collisions_per_episode']:.2f}" if metrics else ""))
        elif self.enabled and metrics is not None:
            print(f"[{self.label}] update {update} | {rate:,.0f} env-steps/s | collisions/episode "
                  f"{metrics['collisions_per_episode']:.2f}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ the loop
def _checkpoint_name(update: int) -> str:
    return f"update_{update:06d}.safetensors"


def _truncate_metrics(path: Path, update: int) -> None:
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["update"] <= update]
        write_text_atomic(path, "".join(line + "\n" for line in lines))


def _newest_resumable(ckpt_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that loads and passes validation: latest, else the newest periodic one."""
    candidates = [ckpt_dir / "latest.safetensors"] + sorted(ckpt_dir.glob("update_*.safetensors"), reverse=True)
    best = None
    for path in candidates:
        if not path.exists():
            continue
        try:
            ckpt = load_checkpoint(path)
        except InterbrainError as exc:
            print(f"warning: skipping unusable checkpoint: {exc}", file=sys.stderr)
            continue
        if best is None or ckpt.update > best.update:
            best = ckpt
    return best


class _Stop:
    requested = False


class UnitOutput:
    """One unit's output directory while it trains: resume or start, metrics lines, periodic and rolling checkpoints.
    Shared by the plain loop and the ensemble loop (:mod:`interbrain.ensemble`)."""

    def __init__(self, config: TrainConfig, out: Path):
        self.config = config
        self.ckpt_dir = ensure_dir(out / "checkpoints")
        self.metrics_path, self.events = out / "metrics.jsonl", out / "events.jsonl"
        self.steps_per_update = config.ppo.num_envs * config.env.horizon
        self.acc: list[dict] = []
        self.last_latest, self.t_interval = time.monotonic(), time.perf_counter()

    def start(self, device: torch.device) -> Trainer:
        """The unit's trainer: resumed from its newest usable checkpoint, else fresh (writing update 0)."""
        resume_from = _newest_resumable(self.ckpt_dir)
        if resume_from is not None:
            trainer = Trainer.from_checkpoint(resume_from, device, self.config)
            _truncate_metrics(self.metrics_path, trainer.update)
            event = {"event": "resumed", "update": trainer.update, "from": str(resume_from.path), "time": now()}
            info = device_info(device)
            # the CPU kernels' choices (interbrain.agents.linear); the small-step one matters to the rnn's stacked
            # recurrence only and was torch's before it was recorded, and so does the processor's vector capability,
            # which picks the rllib learner's step products (compiled or MKL; interbrain.agents.rnn_numpy)
            keys = (("cpu_matmul", "cpu_small_matmul", "cpu_capability") if self.config.agent.arch == "rnn"
                    else ("cpu_matmul",))
            for key in keys:
                if key == "cpu_capability" and key not in resume_from.provenance:
                    continue
                then = resume_from.provenance.get(key, "torch" if key == "cpu_small_matmul" else None)
                current = info.get(key)
                if then != current:  # another kernel: other float summation order from here on
                    event[key] = {"checkpoint": then, "now": current}
                    print(f"warning: resuming from {resume_from.path} with {key} {current!r} (the checkpoint's: "
                          f"{then!r}): the continued run is not bit for bit the uninterrupted one", file=sys.stderr)
            append_jsonl(self.events, event)
        else:
            trainer = Trainer(self.config, device)
            self.metrics_path.unlink(missing_ok=True)
            save_checkpoint(trainer.to_checkpoint(), self.ckpt_dir / _checkpoint_name(0))
        self.last_latest, self.t_interval = time.monotonic(), time.perf_counter()
        return trainer

    def record(self, update: int, stats: dict, trainer: Trainer, prepare=None, stop: bool = False) -> dict | None:
        """After update ``update`` with ``stats`` (``Trainer.step``'s): the metrics line when one is due, the periodic
        and rolling checkpoints of ``trainer``. ``prepare()``, when given, runs once before the trainer is read (the
        ensemble writes its stacked weights back then). Returns the line written, if any."""
        config = self.config
        self.acc.append(stats["rollout"])
        is_ckpt = update % config.checkpoint_every == 0 or update == config.updates
        is_log = update % config.log_every == 0 or is_ckpt
        is_latest = not is_ckpt and (time.monotonic() - self.last_latest >= config.latest_every_s or stop)
        if prepare is not None and (is_log or is_latest):
            prepare()
        line = None
        if is_log:
            elapsed, acc = time.perf_counter() - self.t_interval, self.acc
            mean = {k: sum(m[k] for m in acc) / len(acc) for k in acc[0]}
            line = {"update": update, "env_steps": update * self.steps_per_update, "updates_averaged": len(acc),
                    "seconds_per_update": elapsed / len(acc), "env_steps_per_s": len(acc) * self.steps_per_update / elapsed,
                    **mean, "learner": stats["learner"], "agents": trainer.agent_stats(), "time": now()}
            append_jsonl(self.metrics_path, line)
            self.acc, self.t_interval = [], time.perf_counter()
        if is_ckpt:
            ckpt = trainer.to_checkpoint(line)
            save_checkpoint(ckpt, self.ckpt_dir / _checkpoint_name(update))
            save_checkpoint(ckpt, self.ckpt_dir / "latest.safetensors")
            self.last_latest = time.monotonic()
        elif is_latest:
            save_checkpoint(trainer.to_checkpoint(line or {}), self.ckpt_dir / "latest.safetensors")
            self.last_latest = time.monotonic()
        return line

    def finish(self, trainer: Trainer) -> Path:
        latest = self.ckpt_dir / "latest.safetensors"
        if not latest.exists():  # resumed at the end with only periodic checkpoints left
            save_checkpoint(trainer.to_checkpoint(), latest)
        return latest


def _run_attempt(config: TrainConfig, device: torch.device, out: Path, progress: bool) -> Path:
    unit = UnitOutput(config, out)
    trainer = unit.start(device)
    bar = Progress(config.updates, trainer.update, unit.steps_per_update, config.unit_id, progress)
    try:
        while trainer.update < config.updates:
            stats = trainer.step()
            line = unit.record(trainer.update, stats, trainer, stop=_Stop.requested)
            bar.advance(trainer.update, line)
            if _Stop.requested:
                raise KeyboardInterrupt
    finally:
        bar.close()
    return unit.finish(trainer)


def train(arch: str = "rnn", task: str = "social", seed: int = 0, preset: str = "paper", updates: int = 20_000,
          *, device: str = "auto", out: str | Path = "results/unit", overrides: dict | None = None, size: str = "std",
          init: str = "pytorch_default", spawn: str = "full", window: int = 100, pos: str = "learned",
          checkpoint_every: int = 1_000, log_every: int = 500, latest_every_s: float = 1_800.0,
          progress: bool = True, threads: int | None = None, agent_options: dict | None = None) -> Path:
    """Train one unit; resume from ``{out}/checkpoints`` when it holds a compatible checkpoint. Returns latest's path.

    A non-finite value fails the attempt with a recorded reason; a genuine failure retries from scratch, at most
    ``MAX_ATTEMPTS`` attempts. An interruption (SIGINT/SIGTERM) saves ``latest`` and is not counted as an attempt.
    """
    config = make_train_config(arch, task, seed, preset, updates, size=size, init=init, spawn=spawn, window=window,
                               pos=pos, checkpoint_every=checkpoint_every, log_every=log_every,
                               latest_every_s=latest_every_s, overrides=overrides, agent_options=agent_options)
    return train_config(config, device=device, out=out, progress=progress, threads=threads)


def train_config(config: TrainConfig, *, device: str = "auto", out: str | Path = "results/unit", progress: bool = True,
                 threads: int | None = None) -> Path:
    dev = resolve_device(device)
    keep_freed_memory()  # the learning pass's buffers stay mapped between updates (interbrain.allocator)
    if threads is not None:
        set_cpu_threads(threads)
    out = ensure_dir(out)
    events = out / "events.jsonl"
    append_jsonl(events, {"event": "invoked", "unit": config.unit_id, "updates": config.updates, "device": str(dev),
                          "argv": sys.argv, "time": now()})

    def on_term(signum, frame):
        _Stop.requested = True

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            append_jsonl(events, {"event": "attempt_started", "attempt": attempt, "time": now()})
            try:
                latest = _run_attempt(config, dev, out, progress)
            except NonFiniteError as exc:
                append_jsonl(events, {"event": "attempt_failed", "attempt": attempt, "reason": str(exc), "time": now()})
                if attempt == MAX_ATTEMPTS:
                    raise InterbrainError(f"unit {config.unit_id} failed {MAX_ATTEMPTS} attempts; last: {exc}") from None
                shutil.rmtree(out / "checkpoints", ignore_errors=True)
                (out / "metrics.jsonl").unlink(missing_ok=True)
                continue
            except KeyboardInterrupt:
                append_jsonl(events, {"event": "interrupted", "attempt": attempt, "time": now()})
                raise
            append_jsonl(events, {"event": "attempt_completed", "attempt": attempt, "time": now()})
            return latest
    finally:
        signal.signal(signal.SIGTERM, previous)
        _Stop.requested = False
    raise AssertionError("unreachable")


__all__ = ["train", "train_config", "Trainer", "UnitOutput", "derive_seed", "MAX_ATTEMPTS"]
