"""Independent PPO for the chaser and the explorer (SPEC §4.4–4.5), CleanRL style: read top to bottom.

One update =
  1. ``collect_rollout``: reset the ``num_envs`` episodes, both agents act on s_t for t = 0..H-1, each sampling from its
     own generator; everything needed for learning and logging is stored time-major ``[T, B]``.
  2. ``gae``: per agent, with the time limit terminal (no bootstrap) unless ``bootstrap_time_limit``.
  3. ``update_clipped`` (presets ``paper``, ``fast``) or ``update_rllib`` (preset ``rllib``; for an architecture with a
     stacked form, :meth:`Agent.stacked`, both agents' minibatch steps run as one graph: ``_update_rllib_stacked``;
     for the RNN on a CPU, as numpy calls written out by hand, :mod:`interbrain.agents.rnn_numpy`).

The two learners share nothing: separate networks, losses, Adam optimisers, gradient clipping, KL coefficients and
sampling streams (pitfall 11). Every tensor that can go non-finite is checked once per update; the first offender is
named in a :class:`NonFiniteError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from interbrain.agents import Agent
from interbrain.agents.base import HIDDEN, N_ACTIONS, action_log_softmax, param_key
from interbrain.config import PPOConfig
from interbrain.env import ChaseEnv
from interbrain.errors import InterbrainError, NonFiniteError

AGENTS = ("chaser", "explorer")
RLLIB_ORDER = ("explorer", "chaser")  # RLlib's policy-map order: the explorer learns first
Z_SAMPLE_EVERY = 10  # ||z_t|| is logged on every 10th step (SPEC §4.6)


# ------------------------------------------------------------------------------------------------ rollout
@dataclass
class Rollout:
    """Time-major buffers of one update's episodes. ``obs_index[a]`` is [T,B,2] (own cell, partner cell or 100 = not
    shown; :func:`interbrain.env.obs_from_index` gives the float observation); the rest [T,B] unless noted. The
    per-agent tensors are views of joint [T, 2, B, ...] buffers (chaser 0, explorer 1; ``obs_index``: [2, T, B, 2])."""

    obs_index: dict[str, torch.Tensor]
    actions: dict[str, torch.Tensor]
    logp: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]  # [T,B,4]
    values: dict[str, torch.Tensor]
    rewards: dict[str, torch.Tensor]
    done: torch.Tensor  # bool [T,B]
    events: dict[str, torch.Tensor]  # collision, new fields, fov_post (partner in view on s_{t+1})
    final_distance: torch.Tensor  # [B]
    z_norm: dict[str, torch.Tensor]  # [B * T/10] samples of ||W_a^T W_a h_t||
    seq_states: dict[str, list] = field(default_factory=dict)  # agent -> states at the start of each sequence
    bootstrap: dict[str, torch.Tensor] = field(default_factory=dict)  # agent -> V(s_H) when bootstrapping
    # agent -> (param_key when acting, its record: the RNN's hidden [T,B,256], the transformer's per-layer outputs)
    # recorded by a replaying pair step (Agent.replay_index)
    replay: dict[str, tuple] = field(default_factory=dict)


def gumbel_noise(shape: tuple, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gumbel(0, 1) noise from a dedicated generator; drawing [T, ...] at once consumes the generator's stream exactly
    as T draws of [...] would, so a rollout's actions do not depend on how the noise is batched."""
    u = torch.rand(shape, generator=generator, device=device)
    return u.clamp_min_(1e-20).log_().neg_().log_().neg_()  # -log(-log(u)), in place


def sample_actions(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Exact categorical sampling by the Gumbel-max trick from a dedicated generator (no host round trip)."""
    return torch.argmax(logits + gumbel_noise(logits.shape, generator, logits.device), dim=-1)


EVENT_KEYS = ("collision", "chaser_new_field", "explorer_new_field", "fov_post")  # rows of a rollout's events buffer


def act_and_move(env: ChaseEnv, logits_t, noise_t, actions_t, pairs_next) -> None:
    """A rollout's step t, after both agents wrote ``logits_t`` = logits[t] [2,B,4]: Gumbel-max actions from the
    pre-drawn ``noise_t`` = noise[t] into ``actions_t`` = actions[t], and the environment's move (:meth:`ChaseEnv.move`)
    into ``pairs_next`` = pairs[t + 1]. The rewards and events of the whole rollout come afterwards from
    :func:`settle_rollout`. The callers pass each step's views from one ``unbind`` per buffer, made before the loop (an
    index per step and buffer costs a dispatch each)."""
    torch.argmax(torch.add(logits_t, noise_t), dim=-1, out=actions_t)
    env.move(actions_t, pairs_next)


def settle_rollout(env: ChaseEnv, pairs: torch.Tensor, actions: torch.Tensor):
    """After a rollout's moves: (observation index [2,T,B,2] (agent-major), rewards [T,2,B], events [4,T,B] in
    :data:`EVENT_KEYS` order) from the visited pairs [T+1,B] and the actions [T,2,B] (:meth:`ChaseEnv.settle`)."""
    core = env.settle(pairs, actions)
    events = torch.stack([core.collision, core.new_field[:, 0], core.new_field[:, 1], env.fov(pairs[1:])])
    return env.observation_index(pairs[:-1]), core.rewards, events


def _step_views(*buffers: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Each step's views of [T, ...] buffers, one ``unbind`` per buffer, for the rollout loops that index them per step
    (a pair's written-out ``play`` makes its own: 0.2-0.4 ms a rollout that it would not use)."""
    return tuple(b.unbind(0) for b in buffers)


def _per_agent(joint: torch.Tensor) -> dict[str, torch.Tensor]:
    return {a: joint[:, i] for i, a in enumerate(AGENTS)}


@torch.no_grad()
def collect_rollout(env: ChaseEnv, agents: dict[str, Agent], env_gen: torch.Generator,
                    action_gens: dict[str, torch.Generator], *, seq_len: int | None = None,
                    bootstrap: bool = False) -> Rollout:
    """Play one update's ``num_envs`` episodes. Per step: the observation index of both agents, the agents' step
    (chaser first: each agent's ``step_index``, or both as one batched call when the chaser offers a
    :meth:`~interbrain.agents.base.Agent.pair_with` step), Gumbel-max actions from noise drawn up front, and the
    environment's move, all written into preallocated joint buffers; the rewards, events, observation record,
    log-probabilities and ||z|| samples are computed once afterwards. A pair step that replays also records the hidden
    states for the first learning epoch. With ``seq_len`` (the ``rllib`` learner) each agent's state at every
    sequence start is stored: by a pair offering ``sequence_states`` from the hidden states it records, else by the
    per-agent loop as it goes (the same bits on CPU)."""
    env.reset(env_gen)
    T, B, dev = env.config.horizon, env.batch, env.device
    noise = torch.stack([gumbel_noise((T, B, 4), action_gens[a], dev) for a in AGENTS], 1)  # [T,2,B,4]
    heads = torch.empty(T, 2, B, N_ACTIONS + 1, device=dev)  # the joint heads: 4 logits, then the value
    logits, values = heads[..., :N_ACTIONS], heads[..., N_ACTIONS]
    actions = torch.empty(T, 2, B, dtype=torch.long, device=dev)
    pairs = torch.empty(T + 1, B, dtype=torch.long, device=dev)  # s_0 .. s_T as 100 · chaser cell + explorer cell
    pairs[0] = env.pair
    pair = agents[AGENTS[0]].pair_with(agents[AGENTS[1]], T)
    if seq_len is not None and not hasattr(pair, "sequence_states"):
        pair = None  # the rllib learner's sequence starts come from the per-agent loop
    if pair is not None:
        hidden = torch.empty(2, T, B, HIDDEN, device=dev)  # agent-major: each agent's [T,B,256] is contiguous
        if getattr(pair, "play", None) is not None:  # the loop below, written out by the pair
            h = pair.play(env, noise, heads, actions, pairs, hidden)
        else:
            lg, nz, act, pr = _step_views(logits, noise, actions, pairs)
            h, offsets = pair.initial_state(B), pair.row_offsets
            hid, hd = hidden.unbind(1), heads.unbind(0)
            for t in range(T):
                h = pair.step(env.observation_index(offsets=offsets), h, hid[t], hd[t])
                act_and_move(env, lg[t], nz[t], act[t], pr[t + 1])
        z_hidden = {a: hidden[i, ::Z_SAMPLE_EVERY].reshape(-1, HIDDEN) for i, a in enumerate(AGENTS)}
        states = dict(zip(AGENTS, pair.states(h)))
        replay = dict(zip(AGENTS, zip(pair.keys, pair.records(h, hidden, heads)))) if pair.replays else {}
        seq_states = {} if seq_len is None else dict(zip(AGENTS, pair.sequence_states(hidden, seq_len)))
    else:
        lg, nz, act, pr = _step_views(logits, noise, actions, pairs)
        z_list = {a: [] for a in AGENTS}
        states = {a: agents[a].initial_state(B, dev) for a in AGENTS}
        seq_states = {a: [] for a in AGENTS}
        for t in range(T):
            index = env.observation_index()
            if seq_len is not None and t % seq_len == 0:
                for a in AGENTS:
                    seq_states[a].append(tuple(s.clone() if torch.is_tensor(s) else s for s in states[a]))
            for i, a in enumerate(AGENTS):  # chaser first
                logits[t, i], values[t, i], h, states[a] = agents[a].step_index(index[i], states[a])
                if t % Z_SAMPLE_EVERY == 0:
                    z_list[a].append(h)
            act_and_move(env, lg[t], nz[t], act[t], pr[t + 1])
        z_hidden = {a: torch.cat(z_list[a]) for a in AGENTS}
        replay = {}
    obs_index, rewards, events = settle_rollout(env, pairs, actions)
    boot = {}
    if bootstrap:
        index = env.observation_index()
        for i, a in enumerate(AGENTS):
            boot[a] = agents[a].step_index(index[i], states[a])[1]
    logp = action_log_softmax(logits).gather(-1, actions[..., None]).squeeze(-1)
    z_norm = {}
    for a in AGENTS:
        w = agents[a].action_head.weight
        z_norm[a] = ((z_hidden[a] @ w.t()) @ w).norm(dim=-1)
    done = (torch.arange(T, device=dev) + 1 >= T)[:, None].expand(T, B)  # the shared time limit ends every episode
    return Rollout(dict(zip(AGENTS, obs_index)), _per_agent(actions), _per_agent(logp), _per_agent(logits),
                   _per_agent(values), _per_agent(rewards), done, dict(zip(EVENT_KEYS, events)), env.distance(), z_norm,
                   seq_states, boot, replay)


# ------------------------------------------------------------------------------------------------ GAE
def gae(rewards: torch.Tensor, values: torch.Tensor, done: torch.Tensor, gamma: float, lam: float,
        bootstrap_value: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over [T,B] (SPEC §4.4 step 2).

    delta_t = r_t + gamma (1 - done_t) V_{t+1} - V_t;  A_t = delta_t + gamma lambda (1 - done_t) A_{t+1};  V_T = 0.
    With ``bootstrap_value`` (V(s_H)) the time limit is not terminal: the last step bootstraps from it.
    Returns (advantages, returns = A + V_old).
    """
    T = rewards.shape[0]
    nonterminal = (~done).to(rewards.dtype)
    next_value = torch.zeros_like(values[0])
    if bootstrap_value is not None:
        nonterminal = nonterminal.clone()
        nonterminal[-1] = 1.0
        next_value = bootstrap_value
    # delta_t for all t at once (V_{t+1}: the next row, then the final next value); only A_t's recursion is a loop
    next_values = torch.cat([values[1:], next_value.unsqueeze(0)])
    delta = rewards + gamma * nonterminal * next_values - values
    decay = gamma * lam * nonterminal
    adv = torch.empty_like(rewards)
    last = torch.zeros_like(values[0])
    for t in reversed(range(T)):
        last = torch.add(delta[t], decay[t] * last, out=adv[t])
    return adv, adv + values


def normalize_advantages(adv: torch.Tensor, min_std: float = 0.0, eps: float = 1e-8,
                         dim: tuple[int, ...] | None = None) -> torch.Tensor:
    """``paper``/``fast``: (A - mean)/(population std + 1e-8); ``rllib``: (A - mean)/max(std, 1e-4). Statistics over
    the whole tensor, or over ``dim`` (each unit of an ensemble on its own: dims (0, 2) of [T, E, B])."""
    if dim is None:
        mean, std = adv.mean(), adv.std(unbiased=False)
    else:
        mean, std = adv.mean(dim, keepdim=True), adv.std(dim, unbiased=False, keepdim=True)
    if min_std > 0:
        return (adv - mean) / torch.clamp(std, min=min_std)
    return (adv - mean) / (std + eps)


# ------------------------------------------------------------------------------------------------ loss
def policy_loss(agent: Agent, obs_index, actions, old_logp, adv, returns, cfg: PPOConfig, *, state0=None,
                old_logits=None, kl_coef: float = 0.0, mean=torch.mean,
                replay: tuple | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-agent PPO loss (SPEC §4.4 step 4; §4.5 adds the KL penalty and drops the entropy term).

    L = -mean(min(rho A, clip(rho, 1-eps, 1+eps) A)) + c_v mean(min((V-R)^2, cap)) - c_e H[pi]
        + lambda_rec ||W_hh||_F + lambda_in ||W_ih||_F + agent.aux_loss() (+ beta KL(pi_old || pi_new))

    ``mean`` averages over the steps; an ensemble (:mod:`interbrain.ensemble`) passes a per-unit mean, so the loss and
    every statistic come out per unit ([E], as its stacked agent's norms and aux loss). ``replay`` is a rollout's
    (param key, hidden) record (:attr:`Rollout.replay`): used while the weights are still the acting ones.
    """
    if replay is not None and state0 is None and replay[0] == param_key(agent):
        logits, value, _ = agent.replay_index(obs_index, replay[1])  # the acting forward, recorded (same bits)
    else:
        logits, value, _ = agent.sequence_index(obs_index, state0)
    logp_all = action_log_softmax(logits)
    logp = logp_all.gather(-1, actions[..., None]).squeeze(-1)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv)
    pg_loss = -mean(surrogate)
    v_loss = mean(torch.clamp((value - returns) ** 2, max=cfg.value_cap))
    entropy = mean(-(logp_all.exp() * logp_all).sum(-1))
    rec = agent.recurrent_weight_norm()
    aux = agent.aux_loss()
    loss = pg_loss + cfg.value_coef * v_loss - cfg.entropy_coef * entropy + cfg.recurrent_l2 * rec + aux
    if cfg.input_l2:
        loss = loss + cfg.input_l2 * agent.input_weight_norm()
    if old_logits is not None:
        old_logp_all = action_log_softmax(old_logits)
        kl = mean((old_logp_all.exp() * (old_logp_all - logp_all)).sum(-1))
        loss = loss + kl_coef * kl
    else:
        kl = mean((ratio - 1) - log_ratio)  # the k3 estimator of KL(pi_old || pi_new)
    stats = {"loss": loss, "policy_loss": pg_loss, "value_loss": v_loss, "entropy": entropy, "approx_kl": kl,
             "clip_fraction": mean(((ratio - 1).abs() > cfg.clip_eps).float()), "recurrent_norm": rec,
             "aux_loss": aux}
    return loss, stats


class StackedKLPenaltyLoss(torch.autograd.Function):
    """The heads' part of :func:`policy_loss` with ``old_logits`` (the ``rllib`` learner's loss, SPEC §4.5) for E
    stacked units, per unit, with its gradient written out by hand: one autograd node instead of some forty (the
    ``rllib`` learner takes 960 minibatch steps per update, so per-op overhead dominates). Tensors are [T, E, B]
    (logits [T, E, B, 4]); ``kl_coef`` [E]. Returns loss [E] and the detached per-unit statistics of
    :func:`policy_loss` except ``recurrent_norm``/``aux_loss``/``loss``; checked against :func:`policy_loss`'s autograd
    in float64 (``tests/test_fast_paths.py``).

    Per element, with p = softmax(z), l = log p, rho = exp(l_a - old_logp) and N = T·B steps per unit:
      d(-surrogate)/dz = -A·rho·[branch of min(rho A, clip(rho) A) that carries rho] · (onehot(a) - p)
      d(-c_e H)/dz = c_e · p · (l + H),  d(beta KL(old || new))/dz = beta · (p - p_old),
      d(c_v min((V - R)^2, cap))/dV = c_v · 2 (V - R) · [(V - R)^2 <= cap],
    each divided by N (the per-unit mean). Ties follow torch's ``minimum``/``clamp`` backward (half to each branch;
    clamp's bounds inclusive)."""

    @staticmethod
    def forward(ctx, logits, value, actions, old_logp, adv, returns, old_logits, kl_coef, cfg: PPOConfig):
        dims = (0, 2)
        unit = lambda x: x.view(1, -1, 1)  # noqa: E731  [E] -> broadcast over [T, E, B]
        logp_all = action_log_softmax(logits)
        p = logp_all.exp()
        logp = logp_all.gather(-1, actions[..., None]).squeeze(-1)
        log_ratio = logp - old_logp
        ratio = log_ratio.exp()
        lo, hi = 1 - cfg.clip_eps, 1 + cfg.clip_eps
        s1, s2 = ratio * adv, ratio.clamp(lo, hi) * adv
        surrogate = torch.minimum(s1, s2)
        err = value - returns
        sq = err * err
        entropy = -(p * logp_all).sum(-1)
        old_logp_all = action_log_softmax(old_logits)
        p_old = old_logp_all.exp()
        kl = (p_old * (old_logp_all - logp_all)).sum(-1)
        pg_loss, v_loss = -surrogate.mean(dims), sq.clamp(max=cfg.value_cap).mean(dims)
        ent, kl_mean = entropy.mean(dims), kl.mean(dims)
        loss = pg_loss + cfg.value_coef * v_loss - cfg.entropy_coef * ent + kl_coef * kl_mean
        # gradients per element, times N
        half_tie = (s1 == s2) * 0.5
        in_range = (ratio >= lo) & (ratio <= hi)
        d_ratio = adv * ((s1 < s2) + half_tie + ((s2 < s1) + half_tie) * in_range)
        d_logp = -(d_ratio * ratio)
        grad_logits = p * (-d_logp.unsqueeze(-1))
        grad_logits.scatter_add_(-1, actions[..., None], d_logp.unsqueeze(-1))
        if cfg.entropy_coef:
            grad_logits.addcmul_(p, logp_all + entropy.unsqueeze(-1), value=cfg.entropy_coef)
        grad_logits.add_((p - p_old) * unit(kl_coef).unsqueeze(-1))
        grad_value = err * ((sq <= cfg.value_cap) * (2.0 * cfg.value_coef))
        ctx.save_for_backward(grad_logits, grad_value)
        ctx.steps = logits.shape[0] * logits.shape[2]
        clip_fraction = ((ratio - 1).abs() > cfg.clip_eps).float().mean(dims)
        stats = torch.stack([pg_loss, v_loss, ent, kl_mean, clip_fraction])
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        grad_logits, grad_value = ctx.saved_tensors
        scale = (grad_loss / ctx.steps).view(1, -1, 1)
        return grad_logits * scale.unsqueeze(-1), grad_value * scale, None, None, None, None, None, None, None


STACKED_STATS = ("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction")


def stacked_kl_penalty_loss(stack, obs_index, actions, old_logp, adv, returns, cfg: PPOConfig, *, state0,
                            old_logits, kl_coef: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`policy_loss` with ``old_logits`` (the KL-penalty loss) for the E stacked units of ``stack``
    (:meth:`Agent.stacked`): tensors [T, E, B], state0 [E, B, ...]; returns the per-unit loss [E] and statistics."""
    logits, value, _ = stack.sequence_index(obs_index, state0)
    heads_loss, st = StackedKLPenaltyLoss.apply(logits, value, actions, old_logp, adv, returns, old_logits, kl_coef, cfg)
    rec, aux = stack.recurrent_weight_norm(), stack.aux_loss()
    loss = heads_loss + cfg.recurrent_l2 * rec + aux
    if cfg.input_l2:
        loss = loss + cfg.input_l2 * stack.input_weight_norm()
    stats = dict(zip(STACKED_STATS, st)) | {"loss": loss, "recurrent_norm": rec, "aux_loss": aux}
    return loss, stats


def _grad_norm_and_clip(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def check_finite(named: dict[str, torch.Tensor], update: int) -> None:
    """One host sync for the whole set; on failure, name the first non-finite tensor. The tensors may lie on several
    devices (on a GPU, Adam keeps its step count on the CPU); the flags are gathered on an accelerator's, if any (a
    CPU flag moves there without a sync), and read back once."""
    if not named:
        return
    flags = [torch.isfinite(t).all() for t in named.values()]
    device = next((f.device for f in flags if f.device.type != "cpu"), flags[0].device)
    flags = torch.stack([f if f.device == device else f.to(device) for f in flags])
    if bool(flags.all()):
        return
    bad = [name for name, ok in zip(named, flags.tolist()) if not ok]
    raise NonFiniteError(f"non-finite values in {bad[0]} at update {update}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))


# ------------------------------------------------------------------------------------------------ updates
def advantages_and_returns(batch: Rollout, cfg: PPOConfig, units: int | None = None) -> tuple[dict, dict]:
    """GAE for both agents in one pass over time (the columns are independent), then per-agent normalisation.
    With ``units`` = E (an ensemble's rollout, unit-major columns): normalised per unit too, both returned [T, E, B]."""
    T, B = batch.done.shape
    joint = lambda d: torch.stack([d[a] for a in AGENTS], 1).reshape(T, len(AGENTS) * B)  # noqa: E731
    boot = torch.cat([batch.bootstrap[a] for a in AGENTS]) if cfg.bootstrap_time_limit else None
    done = batch.done.repeat(1, len(AGENTS))
    raw, ret = gae(joint(batch.rewards), joint(batch.values), done, cfg.gamma, cfg.gae_lambda, boot)
    adv, rets = {}, {}
    min_std = 1e-4 if cfg.learner == "rllib" else 0.0
    for i, a in enumerate(AGENTS):
        cols = slice(i * B, (i + 1) * B)
        if units is None:
            adv[a], rets[a] = normalize_advantages(raw[:, cols], min_std=min_std), ret[:, cols]
        else:
            per_unit = lambda x: x.reshape(T, units, B // units)  # noqa: E731
            adv[a] = normalize_advantages(per_unit(raw[:, cols]), min_std=min_std, dim=(0, 2))
            rets[a] = per_unit(ret[:, cols])
    return adv, rets


def update_clipped(agents: dict[str, Agent], optimizers: dict[str, torch.optim.Optimizer], batch: Rollout,
                   cfg: PPOConfig, update: int) -> dict:
    """``paper``/``fast``: ``epochs`` full-batch passes over whole episodes from zero state; one backward of the summed
    losses (disjoint parameters), then per-agent gradient clipping and per-agent Adam steps (SPEC §4.4 step 5)."""
    adv, ret = advantages_and_returns(batch, cfg)
    to_check = {f"{a}.{k}": getattr(batch, k)[a] for a in AGENTS for k in ("logits", "logp", "values", "rewards")}
    to_check.update({f"{a}.advantages": adv[a] for a in AGENTS} | {f"{a}.returns": ret[a] for a in AGENTS})
    check_finite(to_check, update)
    stats: dict[str, dict] = {}
    for epoch in range(cfg.epochs):
        total = 0.0
        for a in AGENTS:
            optimizers[a].zero_grad(set_to_none=True)
            loss, stats[a] = policy_loss(agents[a], batch.obs_index[a], batch.actions[a], batch.logp[a], adv[a], ret[a],
                                         cfg, replay=batch.replay.get(a) if epoch == 0 else None)
            total = total + loss
        check_finite({f"{a}.{k}[epoch {epoch}]": v for a in AGENTS for k, v in stats[a].items()}, update)
        total.backward()
        for a in AGENTS:
            stats[a]["grad_norm"] = _grad_norm_and_clip(list(agents[a].parameters()), cfg.grad_clip)
            optimizers[a].step()
    return {a: {k: float(v.detach()) for k, v in stats[a].items()} for a in AGENTS}


def _index_state(state: tuple, idx: torch.Tensor, arch: str) -> tuple:
    out = []
    for s in state:
        if not torch.is_tensor(s):
            raise InterbrainError(f"preset rllib needs a sliceable recurrent state; arch {arch!r} has none")
        out.append(s[idx])
    return tuple(out)


def update_rllib(agents: dict[str, Agent], optimizers: dict[str, torch.optim.Optimizer], batch: Rollout,
                 cfg: PPOConfig, update: int, kl_coefs: dict[str, float], minibatch_gen: torch.Generator) -> dict:
    """The official RLlib 2.2 learner (SPEC §4.5): explorer first, then chaser; 20-step sequences carrying their stored
    initial state; ``epochs`` passes of shuffled minibatches of ~``minibatch_steps`` timesteps (``clean`` slicing: the
    sequences are split into ceil(N / minibatch_steps) near-equal groups, no overlap, no drops); clipped surrogate + beta KL
    + capped value error + L2; no entropy term, no gradient clipping; beta adapted once per update."""
    adv, ret = advantages_and_returns(batch, cfg)
    T, B = batch.done.shape
    L = cfg.seq_len
    if T % L:
        raise InterbrainError(f"seq_len {L} must divide the horizon {T}")
    n_chunks = T // L
    n_seq = n_chunks * B
    n_mb = -(-T * B // cfg.minibatch_steps)
    out = {}

    def chunked(x: torch.Tensor) -> torch.Tensor:  # [T,B,...] -> [L, n_chunks*B, ...] (sequence j = chunk*B + env)
        return x.reshape(n_chunks, L, B, *x.shape[2:]).transpose(0, 1).reshape(L, n_seq, *x.shape[2:])

    stack = type(agents["explorer"]).stacked([agents[a] for a in RLLIB_ORDER]) if cfg.grad_clip is None else None
    if stack is not None:
        return _update_rllib_stacked(stack, agents, optimizers, batch, cfg, update, kl_coefs, minibatch_gen, adv, ret,
                                     chunked, n_seq, n_mb)
    for a in RLLIB_ORDER:
        agent, opt = agents[a], optimizers[a]
        obs, act, old_logp, old_logits = (chunked(batch.obs_index[a]), chunked(batch.actions[a]), chunked(batch.logp[a]),
                                          chunked(batch.logits[a]))
        A, R = chunked(adv[a]), chunked(ret[a])
        states0 = tuple(torch.cat([st[i] for st in batch.seq_states[a]]) if torch.is_tensor(batch.seq_states[a][0][i])
                        else batch.seq_states[a][0][i] for i in range(len(batch.seq_states[a][0])))
        kls, last = [], {}
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n_seq, generator=minibatch_gen).to(obs.device)
            for idx in torch.tensor_split(perm, n_mb):
                opt.zero_grad(set_to_none=True)
                loss, last = policy_loss(agent, obs[:, idx], act[:, idx], old_logp[:, idx], A[:, idx], R[:, idx], cfg,
                                         state0=_index_state(states0, idx, agent.arch), old_logits=old_logits[:, idx],
                                         kl_coef=kl_coefs[a])
                loss.backward()
                last["grad_norm"] = _grad_norm_and_clip(list(agent.parameters()), cfg.grad_clip)
                opt.step()
                kls.append(last["approx_kl"].detach())
        check_finite({f"{a}.{k}": v for k, v in last.items()}, update)
        mean_kl = float(torch.stack(kls).mean())
        if mean_kl > 2.0 * cfg.kl_target:
            kl_coefs[a] *= 1.5
        elif mean_kl < 0.5 * cfg.kl_target:
            kl_coefs[a] *= 0.5
        out[a] = {k: float(v.detach()) for k, v in last.items()} | {"mean_kl": mean_kl, "kl_coef": kl_coefs[a]}
    return out


class FusedAdam(torch.optim.Adam):
    """Each agent's optimiser: ``torch.optim.Adam`` with ``fused=True`` (one kernel a step for all of an agent's
    parameters: 0.10 against 0.48 ms per agent and step for the RNN on the development machine, ~3 ms of a ``paper``
    update; issue 6) that bumps the parameters' version counters after each step, as the foreach Adam's in-place ops
    do. The fused kernel writes the parameters without bumping them, so tensors derived from the weights and reused
    while they are unchanged (:meth:`~interbrain.agents.base.Agent.cached`, :func:`~interbrain.agents.base.param_key`)
    would outlive the step: an acting pass would read stale input tables and heads (``tests/test_ppo.py``)."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr, fused=True)

    def step(self, closure=None):
        loss = super().step(closure)
        torch.autograd.graph.increment_version([p for group in self.param_groups for p in group["params"]])
        return loss


class FusedAdamSteps:
    """Repeated steps of a fused ``torch.optim.Adam`` (one parameter group, no AMSGrad, every parameter with a
    gradient) as direct calls of its kernel ``torch._fused_adam_``, the call ``Adam.step`` ends in (issue 6). The
    ``rllib`` learner steps its stacked Adam 960 times per update on a CPU, where the optimizer's Python bookkeeping
    (grouping the tensors by device, profiler hooks, one ``_foreach_add_`` over eight scalar step counts) cost more
    than the kernel. Here the count lives in one tensor passed for every parameter and is written back into each
    parameter's state by :meth:`finish`; the arithmetic is the kernel's, so the parameters and moments are those of
    ``opt.step()`` bit for bit (``tests/test_fast_paths.py``). The first step, which creates the state, is
    ``opt.step()`` itself."""

    def __init__(self, opt: torch.optim.Optimizer):
        group = opt.param_groups[0]
        if (len(opt.param_groups) != 1 or not group.get("fused") or group["amsgrad"] or group.get("capturable")
                or group.get("decoupled_weight_decay") or group.get("differentiable") or torch.is_tensor(group["lr"])
                or any(torch.is_tensor(b) for b in group["betas"])):
            raise InterbrainError("FusedAdamSteps needs a fused Adam with one parameter group, no AMSGrad and float "
                                  "lr and betas")
        self.opt, self.group, self.params = opt, group, group["params"]
        if len({(p.device, p.dtype) for p in self.params}) != 1:
            raise InterbrainError("FusedAdamSteps needs every parameter on one device with one dtype")
        self.step_count: torch.Tensor | None = None

    def step(self) -> None:
        opt, g = self.opt, self.group
        if self.step_count is None:
            opt.step()  # creates the state where there is none
            states = [opt.state[p] for p in self.params]
            self.step_count = states[0]["step"].clone()
            # on a CPU, counted through a numpy view (a torch op on a scalar costs ~20 µs here, numpy's ~1)
            self.count = self.step_count.numpy() if self.step_count.device.type == "cpu" else self.step_count
            if any(not torch.equal(st["step"], self.step_count) for st in states):
                raise InterbrainError("FusedAdamSteps needs every parameter at the same Adam step")
            self.lists = ([p.detach() for p in self.params], [p.grad for p in self.params],
                          [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], [],
                          [self.step_count] * len(self.params))
            return
        grads = self.lists[1]
        grads[:] = [p.grad for p in self.params]  # a torch learner's backward makes new ones
        if any(gr is None for gr in grads):
            raise InterbrainError("FusedAdamSteps needs a gradient for every parameter")
        self.count += 1
        beta1, beta2 = (float(b) for b in g["betas"])
        torch._fused_adam_(*self.lists, lr=g["lr"], beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"],
                           eps=g["eps"], amsgrad=False, maximize=g["maximize"])

    def finish(self) -> None:
        """Write the step count into every parameter's Adam state. The kernel was handed the parameters' storage at
        the first step: rebinding a parameter's ``.data`` afterwards would have left it behind, which is refused."""
        if self.step_count is not None:
            if any(q.data_ptr() != p.data_ptr() for q, p in zip(self.lists[0], self.params)):
                raise InterbrainError("a parameter's storage changed between FusedAdamSteps' steps")
            for p in self.params:
                self.opt.state[p]["step"].copy_(self.step_count)


def _update_rllib_stacked(stack, agents, optimizers, batch: Rollout, cfg: PPOConfig, update: int, kl_coefs: dict,
                          minibatch_gen: torch.Generator, adv: dict, ret: dict, chunked, n_seq: int, n_mb: int) -> dict:
    """:func:`update_rllib` with both agents' minibatch steps taken together (issue 6): the agents share nothing, so
    minibatch j of the explorer and minibatch j of the chaser run as one graph of the stacked pair (unit 0 the
    explorer, unit 1 the chaser; :meth:`Agent.stacked`), each with its own permutations (drawn in RLlib's order: all
    of the explorer's epochs, then the chaser's), loss, KL coefficient and Adam state (one Adam over the stacked
    tensors, elementwise). Used without gradient clipping (the preset's); with ``grad_clip`` set, the agent-by-agent
    loop runs. Equal to the agent-by-agent loop to float tolerance (``tests/test_fast_paths.py``)."""
    order, E = RLLIB_ORDER, len(RLLIB_ORDER)
    unit_agents, unit_opts = [agents[a] for a in order], [optimizers[a] for a in order]
    groups = [{k: v for k, v in o.param_groups[0].items() if k != "params"} for o in unit_opts]
    if any(g != groups[0] for g in groups):
        raise InterbrainError("the rllib learner's stacked update needs both agents' Adam settings equal")
    opt = torch.optim.Adam(stack.parameters(), **{k: groups[0][k] for k in ("lr", "betas", "eps", "weight_decay",
                                                                            "amsgrad", "maximize")}, fused=True)
    stack.load_adam(opt, unit_opts, unit_agents)
    adam = FusedAdamSteps(opt)
    dev = batch.done.device
    perms = [[torch.randperm(n_seq, generator=minibatch_gen).to(dev) for _ in range(cfg.epochs)] for _ in order]
    minibatches = lambda epoch: zip(*(torch.tensor_split(perms[e][epoch], n_mb) for e in range(E)))  # noqa: E731
    L = cfg.seq_len
    per_unit = lambda f: torch.stack([chunked(f(a)) for a in order], 1)  # noqa: E731  [L, E, S, ...]
    states0 = torch.cat([torch.cat([st[0] for st in batch.seq_states[a]]) for a in order])  # [E·S, 256]
    kl_coef = torch.tensor([kl_coefs[a] for a in order], device=dev, dtype=stack.weight_hh.dtype)
    kls, last = [], {}
    obs, act, old_logp, A, R, old_logits = (per_unit(f) for f in (
        lambda a: batch.obs_index[a], lambda a: batch.actions[a], lambda a: batch.logp[a], lambda a: adv[a],
        lambda a: ret[a], lambda a: batch.logits[a]))
    hand = getattr(stack, "hand_written_minibatches", lambda *args: None)(
        cfg, -(-n_seq // n_mb), obs, act, old_logp, A, R, old_logits, states0.view(E, n_seq, -1))
    if hand is not None:  # the same minibatch steps, written out in numpy (issue 6)
        kl_np, kl_row = kl_coef.numpy(), hand.STATS.index("approx_kl")
        for epoch in range(cfg.epochs):
            for j, idx in enumerate(minibatches(epoch)):
                st = hand.step(torch.stack(idx).numpy(), kl_np, stats=epoch == cfg.epochs - 1 and j == n_mb - 1)
                adam.step()
                kls.append(torch.from_numpy(st[kl_row]))
        last = dict(zip(hand.STATS, torch.from_numpy(st)))
    else:
        longs = torch.cat([obs, act.unsqueeze(-1)], -1).reshape(L, E * n_seq, 3)
        floats = torch.cat([old_logp.unsqueeze(-1), A.unsqueeze(-1), R.unsqueeze(-1), old_logits],
                           -1).reshape(L, E * n_seq, 7)
        shift = (torch.arange(E, device=dev) * n_seq).view(E, 1)
        for epoch in range(cfg.epochs):
            for idx in minibatches(epoch):
                cols = (torch.stack(idx) + shift).view(-1)  # unit-major columns of the minibatch
                n = idx[0].numel()
                lg, fl = longs[:, cols].view(L, E, n, 3), floats[:, cols].view(L, E, n, 7)
                opt.zero_grad(set_to_none=True)
                loss, last = stacked_kl_penalty_loss(stack, lg[..., :2], lg[..., 2], fl[..., 0], fl[..., 1],
                                                     fl[..., 2], cfg, state0=(states0[cols].view(E, n, -1),),
                                                     old_logits=fl[..., 3:], kl_coef=kl_coef)
                loss.sum().backward()
                adam.step()
                kls.append(last["approx_kl"])
    adam.finish()
    last["grad_norm"] = stack.clip_grad_norms(None)  # the last minibatch's (nothing clipped), as the plain loop logs
    stack.write_to(unit_agents)
    stack.store_adam(opt, unit_opts, unit_agents)
    mean_kl = torch.stack(kls).mean(0).tolist()
    out = {}
    for e, a in enumerate(order):
        check_finite({f"{a}.{k}": v[e] for k, v in last.items()}, update)
        if mean_kl[e] > 2.0 * cfg.kl_target:
            kl_coefs[a] *= 1.5
        elif mean_kl[e] < 0.5 * cfg.kl_target:
            kl_coefs[a] *= 0.5
        out[a] = {k: float(v[e].detach()) for k, v in last.items()} | {"mean_kl": mean_kl[e], "kl_coef": kl_coefs[a]}
    return out


def rollout_metrics(batch: Rollout) -> dict:
    """Behaviour of the training episodes (SPEC §4.6 logging)."""
    ev = batch.events
    return {
        "collisions_per_episode": float(ev["collision"].float().sum(0).mean()),
        "chaser_return": float(batch.rewards["chaser"].sum(0).mean()),
        "explorer_return": float(batch.rewards["explorer"].sum(0).mean()),
        "chaser_partner_in_view": float(ev["fov_post"].float().mean()),
        "explorer_partner_in_view": float(ev["fov_post"].float().mean()),
        "chaser_new_fields": float(ev["chaser_new_field"].float().sum(0).mean()),
        "explorer_new_fields": float(ev["explorer_new_field"].float().sum(0).mean()),
        "final_distance": float(batch.final_distance.mean()),
        "chaser_z_norm": float(batch.z_norm["chaser"].mean()),
        "explorer_z_norm": float(batch.z_norm["explorer"].mean()),
    }
