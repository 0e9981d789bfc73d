"""Batched ensembles: several training units of one architecture in one process (issue 6, the GPU path).

A GPU runs one unit's small matrices far below its capacity; an ensemble stacks E units' parameters ([E, ...]) and
runs their rollouts and losses as batched matrix products, so one job carries many units (seeds, social and
non-social). It is an execution strategy only: every unit keeps its own initial weights, environment spawns, action
stream, Adam state, advantage normalisation and gradient clipping, and the result is each unit's ordinary checkpoint
directory, the same (to float tolerance) as training the unit alone (``tests/test_ensemble.py``).

How the plain path maps onto the batch (E units, B episodes each; the unit index is the outer batch index):

- the units' own :class:`~interbrain.train.Trainer` objects are built first (same ``build_pair`` initial weights and
  generators as a plain run) and then stacked; :meth:`EnsembleTrainer.sync` writes the stacked weights and Adam
  moments back into them, so checkpoints and resume use the plain code unchanged;
- one :class:`~interbrain.env.ChaseEnv` of E·B episodes with per-episode rewards and visibility (``episodes``); spawns are drawn
  per unit from that unit's environment generator, exactly as its plain environment would draw them;
- Gumbel noise per unit and agent from the unit's action generators (the same stream as the plain rollout);
- GAE over all columns at once; advantages normalised per unit and agent;
- the PPO loss is the sum over units of each unit's loss (disjoint parameters, so each unit's gradient is its own);
  gradients are clipped per unit (the unit's global norm over its parameters, as ``clip_grad_norm_``); one Adam over
  the stacked tensors is elementwise, so it equals E separate Adams with the same settings.

Scope: ``rnn`` (the architecture of the GPU target), the clipped learner (presets ``paper`` and ``fast``); the units
must share every setting but seed and task (with the task's visibility). Anything else is refused with a one-line error. A non-finite value stops
the whole ensemble with the offending tensor and unit named (the plain trainer's retry-from-scratch is per unit; rerun
that unit alone). ``torch``'s global RNG is not used by an RNN's training, so its state in the units' checkpoints is
that of the ensemble process.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable

import torch

from interbrain.agents.base import HIDDEN, action_log_softmax
from interbrain.agents.linear import set_cpu_threads
from interbrain.agents.rnn import StackedRNN
from interbrain.allocator import keep_freed_memory
from interbrain.config import TrainConfig
from interbrain.cuda_graph import Captured
from interbrain.env import ChaseEnv
from interbrain.errors import InterbrainError, NonFiniteError
from interbrain.io import append_jsonl, ensure_dir
from interbrain.provenance import now, resolve_device
from interbrain.ppo import (AGENTS, EVENT_KEYS, Z_SAMPLE_EVERY, FusedAdam, Rollout, advantages_and_returns,
                            check_finite, gumbel_noise, policy_loss, settle_rollout)

ENSEMBLE_ARCHS = ("rnn",)


# ------------------------------------------------------------------------------------------------ validation
def check_ensemble(configs: list[TrainConfig]) -> None:
    """One-line errors unless the units can share an ensemble: same architecture (one of :data:`ENSEMBLE_ARCHS`),
    clipped learner, every setting equal but seed and task (and its visibility), no unit twice."""
    if not configs:
        raise InterbrainError("an ensemble needs at least one unit")
    first = configs[0]
    if first.agent.arch not in ENSEMBLE_ARCHS:
        raise InterbrainError(f"arch {first.agent.arch!r} cannot train as an ensemble; supported: {list(ENSEMBLE_ARCHS)}")
    if first.ppo.learner == "rllib":
        raise InterbrainError(f"preset {first.preset!r} (the rllib learner) cannot train as an ensemble; "
                              "use paper or fast")
    if first.ppo.bootstrap_time_limit:
        raise InterbrainError("ppo.bootstrap_time_limit=true cannot train as an ensemble")

    def shared(c: TrainConfig) -> dict:
        d = c.to_dict()
        d.pop("seed")
        d["env"] = {k: v for k, v in d["env"].items() if k not in ("task", "visibility")}
        return d

    ids = set()
    for c in configs:
        if c.unit_id in ids:
            raise InterbrainError(f"unit {c.unit_id} appears twice in the ensemble")
        ids.add(c.unit_id)
        if shared(c) != shared(first):
            from interbrain.train import _first_difference

            raise InterbrainError(f"unit {c.unit_id} cannot share an ensemble with {first.unit_id}: setting "
                                  f"{_first_difference(shared(c), shared(first))}")


# ------------------------------------------------------------------------------------------------ rollout
def acting_loop(env: ChaseEnv, stacks: dict[str, StackedRNN], noise: torch.Tensor, pair0: torch.Tensor):
    """The T acting steps of E units from the pairs ``pair0`` [E·B] with the pre-drawn Gumbel noise [T, 2, E·B, 4]
    (:func:`interbrain.ppo.act_and_move`'s steps, the moves by :meth:`ChaseEnv.next_pair`): returns logits
    [T, 2, E·B, 4], values [T, 2, E·B], actions [T, 2, E·B], the pairs s_0..s_T [T+1, E·B] and each agent's z-norm
    samples [T/10, E·B]. A function of its inputs and the current weights alone (the environment's bookkeeping is left
    to the caller, no host reads, no random numbers), so on CUDA it runs as one captured graph."""
    T, EB, dev = noise.shape[0], noise.shape[2], noise.device
    E = stacks[AGENTS[0]].units
    B = EB // E
    logits = torch.empty(T, 2, EB, 4, device=dev)
    values = torch.empty(T, 2, EB, device=dev)
    actions = torch.empty(T, 2, EB, dtype=torch.long, device=dev)
    pairs = torch.empty(T + 1, EB, dtype=torch.long, device=dev)
    pairs[0] = pair0
    tables = {a: stacks[a].input_table() for a in AGENTS}
    heads = {a: stacks[a].heads() for a in AGENTS}
    h = {a: torch.zeros(E, B, HIDDEN, device=dev) for a in AGENTS}
    z_hidden = {a: [] for a in AGENTS}
    for t in range(T):
        index = env.observation_index(pairs[t])
        for i, a in enumerate(AGENTS):
            lg, v, h[a] = stacks[a].step_index(index[i].view(E, B, 2), h[a], tables[a], heads[a])
            logits[t, i], values[t, i] = lg.view(EB, 4), v.view(EB)
            if t % Z_SAMPLE_EVERY == 0:
                z_hidden[a].append(h[a])
        torch.argmax(torch.add(logits[t], noise[t]), dim=-1, out=actions[t])
        env.next_pair(pairs[t], actions[t], pairs[t + 1])
    z_norm = {}
    for a in AGENTS:
        w = stacks[a].action_weight  # [E, 4, H]
        hs = torch.stack(z_hidden[a])  # [S, E, B, H]
        z_norm[a] = torch.matmul(torch.matmul(hs, w.transpose(1, 2)), w).norm(dim=-1).view(-1, EB)
    return logits, values, actions, pairs, z_norm


@torch.no_grad()
def collect_ensemble_rollout(env: ChaseEnv, spawn_envs: list[ChaseEnv], stacks: dict[str, StackedRNN],
                             env_gens: list[torch.Generator], action_gens: list[dict[str, torch.Generator]],
                             acting: Callable | None = None) -> Rollout:
    """:func:`interbrain.ppo.collect_rollout` for E units in one environment of E·B episodes (unit-major columns).
    Returns one :class:`Rollout` over all E·B columns; ``z_norm`` is [T/10, E·B]. ``acting`` (noise, pair0) runs
    :func:`acting_loop` (default: called directly; :class:`EnsembleTrainer` passes its CUDA graph on a GPU)."""
    E, B = len(spawn_envs), spawn_envs[0].batch
    spawns = [s.draw_spawns(gen) for s, gen in zip(spawn_envs, env_gens)]  # each unit's, as its own reset draws them
    env.reset(None, chaser_pos=torch.cat([c for c, _ in spawns]), explorer_pos=torch.cat([e for _, e in spawns]))
    T, dev = env.config.horizon, env.device
    noise = torch.stack([torch.stack([gumbel_noise((T, B, 4), action_gens[e][a], dev) for e in range(E)], 1)
                         for a in AGENTS], 1).view(T, 2, E * B, 4)
    if acting is None:
        acting = lambda n, p: acting_loop(env, stacks, n, p)  # noqa: E731
    logits, values, actions, pairs, z_norm = acting(noise, env.pair)
    env.moved(pairs[T], T)
    obs_index, rewards, events = settle_rollout(env, pairs, actions)
    logp = action_log_softmax(logits).gather(-1, actions[..., None]).squeeze(-1)
    done = (torch.arange(T, device=dev) + 1 >= T)[:, None].expand(T, E * B)
    per_agent = lambda joint: {a: joint[:, i] for i, a in enumerate(AGENTS)}  # noqa: E731
    return Rollout(dict(zip(AGENTS, obs_index)), per_agent(actions), per_agent(logp), per_agent(logits),
                   per_agent(values), per_agent(rewards), done, dict(zip(EVENT_KEYS, events)), env.distance(), z_norm)


def unit_rollout(batch: Rollout, e: int, B: int) -> Rollout:
    """Unit e's columns of an ensemble rollout (views), as the unit's own rollout would hold them."""
    cols = slice(e * B, (e + 1) * B)
    pick = lambda d: {a: v[:, cols] for a, v in d.items()}  # noqa: E731
    return Rollout(pick(batch.obs_index), pick(batch.actions), pick(batch.logp), pick(batch.logits),
                   pick(batch.values), pick(batch.rewards), batch.done[:, cols], pick(batch.events),
                   batch.final_distance[cols], {a: v[:, cols] for a, v in batch.z_norm.items()})


def unit_rollout_metrics(batch: Rollout, E: int) -> list[dict]:
    """:func:`interbrain.ppo.rollout_metrics` of each unit's columns (what it gives for :func:`unit_rollout`, to float
    summation order), all units at once and read back in one transfer."""
    per_unit = lambda x: x.reshape(*x.shape[:-1], E, -1).float()  # [..., E, B]  # noqa: E731
    ev = batch.events
    in_view = per_unit(ev["fov_post"]).mean((0, 2))
    m = {"collisions_per_episode": per_unit(ev["collision"]).sum(0).mean(-1),
         "chaser_return": per_unit(batch.rewards["chaser"]).sum(0).mean(-1),
         "explorer_return": per_unit(batch.rewards["explorer"]).sum(0).mean(-1),
         "chaser_partner_in_view": in_view, "explorer_partner_in_view": in_view,
         "chaser_new_fields": per_unit(ev["chaser_new_field"]).sum(0).mean(-1),
         "explorer_new_fields": per_unit(ev["explorer_new_field"]).sum(0).mean(-1),
         "final_distance": per_unit(batch.final_distance).mean(-1),
         "chaser_z_norm": per_unit(batch.z_norm["chaser"]).mean((0, 2)),
         "explorer_z_norm": per_unit(batch.z_norm["explorer"]).mean((0, 2))}
    host = torch.stack(list(m.values())).tolist()  # [metric][unit]
    return [dict(zip(m, unit)) for unit in zip(*host)]


# ------------------------------------------------------------------------------------------------ update
def _unit_mean(x: torch.Tensor) -> torch.Tensor:
    """[T, E, B] -> [E]: the mean over each unit's T·B entries (the ``mean`` of :func:`interbrain.ppo.policy_loss`)."""
    return x.mean((0, 2))


def epoch_pass(stacks: dict[str, StackedRNN], cfg, obs_index, actions, logp, adv, ret) -> dict[str, dict]:
    """One learning epoch of E units up to the optimiser step: the backward of the summed per-unit PPO losses, then
    each unit's gradient clipping. Inputs are dicts by agent of [T, E, B(, 2)] tensors; returns each agent's statistics
    (per unit, [E]) with ``grad_norm``. Tensor work only, so on CUDA it runs as one captured graph."""
    stats, total = {}, 0.0
    for a in AGENTS:
        loss, stats[a] = policy_loss(stacks[a], obs_index[a], actions[a], logp[a], adv[a], ret[a], cfg, mean=_unit_mean)
        total = total + loss.sum()  # Σ_e of unit e's loss: disjoint parameters, so each unit's gradient is its own
    total.backward()
    for a in AGENTS:
        stats[a]["grad_norm"] = stacks[a].clip_grad_norms(cfg.grad_clip)
    return stats


def update_ensemble(stacks: dict[str, StackedRNN], optimizers: dict[str, torch.optim.Optimizer], batch: Rollout,
                    cfg, update: int, E: int, unit_ids: list[str], learning: Callable | None = None) -> list[dict]:
    """:func:`interbrain.ppo.update_clipped` for E units: returns each unit's learner stats. ``learning`` (the five
    input dicts of :func:`epoch_pass`) runs an epoch's pass (default: :func:`epoch_pass` after ``zero_grad``;
    :class:`EnsembleTrainer` passes its CUDA graph on a GPU). The statistics are checked after the backward and before
    the optimiser step, so a non-finite loss stops the ensemble before it changes any weight."""
    T, EB = batch.done.shape
    B = EB // E
    per_unit = lambda x: x.view(T, E, B)  # noqa: E731
    adv, ret = advantages_and_returns(batch, cfg, units=E)
    to_check = {f"{a}.{k}": getattr(batch, k)[a].reshape(T, E, B, -1) for a in AGENTS
                for k in ("logits", "logp", "values", "rewards")}
    to_check.update({f"{a}.advantages": adv[a] for a in AGENTS} | {f"{a}.returns": ret[a] for a in AGENTS})
    check_units(to_check, update, unit_ids)
    if learning is None:
        def learning(*inputs):
            for a in AGENTS:
                optimizers[a].zero_grad(set_to_none=True)
            return epoch_pass(stacks, cfg, *inputs)
    inputs = ({a: batch.obs_index[a].view(T, E, B, 2) for a in AGENTS}, {a: per_unit(batch.actions[a]) for a in AGENTS},
              {a: per_unit(batch.logp[a]) for a in AGENTS}, adv, ret)
    stats: dict[str, dict] = {}
    for epoch in range(cfg.epochs):
        stats = learning(*inputs)
        check_units({f"{a}.{k}[epoch {epoch}]": v.view(1, E) for a in AGENTS for k, v in stats[a].items()
                     if k != "grad_norm"}, update, unit_ids)
        for a in AGENTS:
            optimizers[a].step()
    host = {a: {k: v.detach().cpu().tolist() for k, v in stats[a].items()} for a in AGENTS}
    return [{a: {k: float(v[e]) for k, v in host[a].items()} for a in AGENTS} for e in range(E)]


def check_units(named: dict[str, torch.Tensor], update: int, unit_ids: list[str]) -> None:
    """:func:`interbrain.ppo.check_finite` for tensors whose dim 1 is the unit: names the first unit at fault."""
    try:
        check_finite(named, update)
    except NonFiniteError:
        for name, t in named.items():
            bad = ~torch.isfinite(t).reshape(t.shape[0], t.shape[1], -1).all(-1).all(0)
            if bad.any():
                e = int(bad.nonzero()[0, 0])
                raise NonFiniteError(f"non-finite values in {name} of unit {unit_ids[e]} at update {update} "
                                     "(the ensemble stops; rerun that unit alone)") from None
        raise


# ------------------------------------------------------------------------------------------------ the trainer
class EnsembleTrainer:
    """E units' :class:`~interbrain.train.Trainer` s (fresh or resumed, all at the same update) trained as one batch.
    ``cuda_graphs`` (default: on a CUDA device) runs the acting loop and each learning epoch's pass as captured CUDA
    graphs (:mod:`interbrain.cuda_graph`), captured at the first update."""

    def __init__(self, units: list, cuda_graphs: bool | None = None):
        configs = [u.config for u in units]
        check_ensemble(configs)
        updates = {u.update for u in units}
        if len(updates) != 1:
            raise InterbrainError("ensemble units must resume from the same update; found "
                                  + ", ".join(f"{u.config.unit_id} at {u.update}" for u in units))
        self.units, self.update = units, units[0].update
        self.cfg = configs[0].ppo
        self.device = units[0].device
        self.unit_ids = [c.unit_id for c in configs]
        E, B = len(units), self.cfg.num_envs
        self.stacks = {a: StackedRNN([u.agents[a] for u in units]).to(self.device) for a in AGENTS}
        self.optimizers = {a: FusedAdam(self.stacks[a].parameters(), lr=self.cfg.lr) for a in AGENTS}
        for a in AGENTS:
            self.stacks[a].load_adam(self.optimizers[a], [u.optimizers[a] for u in units], [u.agents[a] for u in units])
        self.env = ChaseEnv(configs[0].env, E * B, self.device, episodes=[c.env for c in configs for _ in range(B)])
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise InterbrainError(f"cuda_graphs=True needs a CUDA device; the units are on {self.device}")
        self._acting_graph = self._learning_graph = None

    def step(self) -> list[dict]:
        """One PPO update of every unit; returns each unit's {"rollout", "learner"} stats (as ``Trainer.step``)."""
        E, B = len(self.units), self.cfg.num_envs
        graphs = self.cuda_graphs
        batch = collect_ensemble_rollout(self.env, [u.env for u in self.units], self.stacks,
                                         [u.env_gen for u in self.units], [u.action_gens for u in self.units],
                                         acting=self._acting if graphs else None)
        self.update += 1
        learner = update_ensemble(self.stacks, self.optimizers, batch, self.cfg, self.update, E, self.unit_ids,
                                  learning=self._learning if graphs else None)
        named = {f"{a}.{n}": p.unsqueeze(0) for a in AGENTS for n, p in self.stacks[a].named_parameters()}
        check_units(named, self.update, self.unit_ids)
        return [{"rollout": r, "learner": learner[e]} for e, r in enumerate(unit_rollout_metrics(batch, E))]

    def _acting(self, noise: torch.Tensor, pair0: torch.Tensor):
        """:func:`acting_loop` as a CUDA graph (captured at the first call)."""
        if self._acting_graph is None:
            self._acting_graph = Captured(lambda n, p: acting_loop(self.env, self.stacks, n, p), (noise, pair0))
        return self._acting_graph(noise, pair0)

    def _learning(self, *inputs: dict) -> dict:
        """:func:`epoch_pass` as a CUDA graph (captured at the first call; it owns the gradient buffers from then on,
        which every replay overwrites, so nothing here zeroes them)."""
        flat = tuple(d[a] for d in inputs for a in AGENTS)
        if self._learning_graph is None:
            def run(*flat):
                return epoch_pass(self.stacks, self.cfg, *(dict(zip(AGENTS, flat[i:i + len(AGENTS)]))
                                                           for i in range(0, len(flat), len(AGENTS))))

            def clear():
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)

            clear()
            self._learning_graph = Captured(run, flat, before_capture=clear)
        return self._learning_graph(*flat)

    def sync(self) -> None:
        """Write the stacked weights, Adam moments and update count back into the units' trainers."""
        for a in AGENTS:
            agents = [u.agents[a] for u in self.units]
            self.stacks[a].write_to(agents)
            self.stacks[a].store_adam(self.optimizers[a], [u.optimizers[a] for u in self.units], agents)
        for u in self.units:
            u.update = self.update


# ------------------------------------------------------------------------------------------------ the loop
def train_ensemble(configs: list[TrainConfig], outs: list[str | Path], *, device: str = "auto", progress: bool = True,
                   threads: int | None = None) -> list[Path]:
    """Train E units as one ensemble, unit e writing to ``outs[e]`` exactly what :func:`interbrain.train.train_config`
    writes (checkpoints, metrics.jsonl, events.jsonl). Each unit resumes from its newest usable checkpoint; units
    that resume from different updates train as one ensemble per resume point, earliest first (a unit already at
    ``updates`` only gets its ``latest``). Returns each unit's ``latest`` path. A non-finite value stops the
    ensemble (no retry: rerun the named unit alone); SIGINT/SIGTERM saves every unit's ``latest``."""
    from interbrain.train import UnitOutput, _Stop

    check_ensemble(configs)
    if len(outs) != len(configs):
        raise InterbrainError(f"an ensemble of {len(configs)} units needs {len(configs)} output folders, got {len(outs)}")
    dev = resolve_device(device)
    keep_freed_memory()  # the learning pass's buffers stay mapped between updates (interbrain.allocator)
    if threads is not None:
        set_cpu_threads(threads)
    outputs = [UnitOutput(c, ensure_dir(o)) for c, o in zip(configs, outs)]
    ids = [c.unit_id for c in configs]
    for o in outputs:
        append_jsonl(o.events, {"event": "invoked", "unit": o.config.unit_id, "updates": o.config.updates,
                                "device": str(dev), "ensemble": ids, "argv": sys.argv, "time": now()})

    def on_term(signum, frame):
        _Stop.requested = True

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        units = [o.start(dev) for o in outputs]
        for start in sorted({u.update for u in units}):
            members = [i for i, u in enumerate(units) if u.update == start]
            _run_group([outputs[i] for i in members], [units[i] for i in members], progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
        _Stop.requested = False
    return [o.finish(u) for o, u in zip(outputs, units)]


def _run_group(outputs: list, units: list, progress: bool) -> None:
    """Train units that stand at the same update to the end, as one :class:`EnsembleTrainer`."""
    from interbrain.train import Progress, _Stop

    ens = EnsembleTrainer(units)
    for o in outputs:
        append_jsonl(o.events, {"event": "attempt_started", "attempt": 1, "ensemble_size": len(units), "time": now()})
    total = units[0].config.updates
    bar = Progress(total, ens.update, len(units) * outputs[0].steps_per_update,
                   f"{units[0].config.agent.arch} ensemble of {len(units)}", progress)
    synced = [ens.update]

    def prepare():  # write the stacked state back into the units' trainers, once per update
        if synced[0] != ens.update:
            ens.sync()
            synced[0] = ens.update

    try:
        while ens.update < total:
            stats = ens.step()
            lines = [o.record(ens.update, st, u, prepare=prepare, stop=_Stop.requested)
                     for o, u, st in zip(outputs, units, stats)]
            bar.advance(ens.update, lines[0])
            if _Stop.requested:
                raise KeyboardInterrupt
        prepare()
    except NonFiniteError as exc:
        for o in outputs:
            append_jsonl(o.events, {"event": "attempt_failed", "attempt": 1, "reason": str(exc), "time": now()})
        raise InterbrainError(f"ensemble of {len(units)} {units[0].config.agent.arch} units stopped: {exc}") from None
    except KeyboardInterrupt:
        for o in outputs:
            append_jsonl(o.events, {"event": "interrupted", "attempt": 1, "time": now()})
        raise
    finally:
        bar.close()
    for o in outputs:
        append_jsonl(o.events, {"event": "attempt_completed", "attempt": 1, "time": now()})


__all__ = ["train_ensemble", "ENSEMBLE_ARCHS", "EnsembleTrainer", "StackedRNN", "acting_loop", "check_ensemble",
           "collect_ensemble_rollout", "epoch_pass", "unit_rollout", "unit_rollout_metrics", "update_ensemble"]
