"""Typed configuration: environment, agent and learner settings, and the PPO presets of SPEC §4.2.

Every value a run depends on lives in one of these frozen dataclasses. ``TrainConfig.to_dict`` is what a
checkpoint records, and ``TrainConfig.from_dict`` is how a resumed run or an analysis re-creates it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

from interbrain.errors import InterbrainError, check_choice, check_positive

TASKS = ("social", "non_social", "mutual", "social_alt")
VISIBILITIES = ("partial", "none", "full")
TASK_VISIBILITY = {"social": "partial", "non_social": "none", "mutual": "partial", "social_alt": "partial"}
SPAWNS = ("full", "official")
SIZES = ("std", "matched")
INITS = ("pytorch_default", "modern")
POSITION_MODES = ("learned", "rope")
TOKEN_MODES = ("sum", "concat")
PRESETS = ("paper", "fast", "rllib")
LEARNERS = ("clipped", "rllib")
DEGENERATE_RULES = ("default", "joint")


@dataclass(frozen=True)
class EnvConfig:
    """Chase-grid settings (SPEC §1). ``visibility=None`` means the task's own visibility."""

    task: str = "social"
    visibility: str | None = None
    spawn: str = "full"
    horizon: int = 100

    def __post_init__(self):
        check_choice("task", self.task, TASKS)
        if self.visibility is None:
            object.__setattr__(self, "visibility", TASK_VISIBILITY[self.task])
        check_choice("visibility", self.visibility, VISIBILITIES)
        check_choice("spawn", self.spawn, SPAWNS)
        if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon <= 0:
            raise InterbrainError(f"horizon must be a positive integer, got {self.horizon!r}")


@dataclass(frozen=True)
class AgentConfig:
    """Architecture settings (SPEC §3). ``window`` and ``pos`` matter to attention models only."""

    arch: str = "rnn"
    size: str = "std"
    init: str = "pytorch_default"
    window: int = 100
    pos: str = "learned"
    # `disrnn` only (SPEC §3.4): KL weight β of the bottlenecks, and the noiseless, penalty-free warm-up in updates
    bottleneck_beta: float = 1e-2
    bottleneck_warmup: int = 100
    # `tok_transformer` only (SPEC §3.4): compute tokens per step, how own/partner tokens combine, a per-type
    # embedding, and the previous-action/-reward tokens (off by default; refused, not implemented)
    tok_compute: int = 2
    tok_mode: str = "sum"
    tok_type_embedding: bool = False
    tok_prev_action: bool = False
    tok_prev_reward: bool = False

    def __post_init__(self):
        from interbrain.agents import ARCHITECTURES  # registry; imported lazily to avoid a cycle

        check_choice("arch", self.arch, sorted(ARCHITECTURES))
        check_choice("size", self.size, SIZES)
        check_choice("init", self.init, INITS)
        check_choice("pos", self.pos, POSITION_MODES)
        check_choice("tok_mode", self.tok_mode, TOKEN_MODES)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window <= 0:
            raise InterbrainError(f"window must be a positive integer, got {self.window!r}")
        for key in ("bottleneck_warmup", "tok_compute"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InterbrainError(f"{key} must be a non-negative integer, got {value!r}")
        beta = self.bottleneck_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < float("inf"):
            raise InterbrainError(f"bottleneck_beta must be a finite non-negative number, got {beta!r}")
        for key in ("tok_type_embedding", "tok_prev_action", "tok_prev_reward"):
            if not isinstance(getattr(self, key), bool):
                raise InterbrainError(f"{key} must be true or false, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class PPOConfig:
    """Learner settings. Field names are the override keys accepted by ``interbrain train --set``."""

    learner: str = "clipped"  # clipped (paper, fast) | rllib
    num_envs: int = 40  # episodes per update
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    epochs: int = 4
    clip_eps: float = 0.2
    entropy_coef: float = 0.01
    value_coef: float = 0.5
    value_cap: float = 10.0  # per-sample cap on the squared value error (RLlib vf_clip_param)
    recurrent_l2: float = 0.3  # coefficient on the unsquared ||W_hh||_F
    input_l2: float = 0.0  # coefficient on the unsquared ||W_ih||_F (official default 0)
    grad_clip: float | None = 1.0  # global norm, per agent; None disables
    bootstrap_time_limit: bool = False
    # rllib learner only
    minibatch_steps: int = 128
    seq_len: int = 20
    kl_coef_init: float = 0.2
    kl_target: float = 0.01
    rllib_slicing: str = "clean"  # clean | exact

    def __post_init__(self):
        check_choice("learner", self.learner, LEARNERS)
        check_choice("rllib_slicing", self.rllib_slicing, ("clean", "exact"))
        if self.rllib_slicing == "exact":  # SPEC §4.5 option; refusing beats silently running `clean`
            raise InterbrainError("rllib_slicing='exact' (RLlib 2.2's minibatch slicing) is not implemented yet; "
                                  "use 'clean'")
        for key in ("num_envs", "epochs", "minibatch_steps", "seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterbrainError(f"{key} must be a positive integer, got {value!r}")
        for key in ("lr", "value_cap", "clip_eps"):
            check_positive(key, getattr(self, key))
        for key in ("gamma", "gae_lambda"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InterbrainError(f"{key} must lie in [0, 1], got {value!r}")
        for key in ("entropy_coef", "value_coef", "recurrent_l2", "input_l2", "kl_coef_init", "kl_target"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise InterbrainError(f"{key} must be a non-negative number, got {value!r}")
        if self.grad_clip is not None:
            check_positive("grad_clip", self.grad_clip)


PRESET_VALUES: dict[str, dict[str, Any]] = {
    # SPEC §4.2. `paper` is the default: a modern clipped PPO with the Methods-text regulariser.
    "paper": dict(learner="clipped", lr=3e-4, gamma=0.99, gae_lambda=0.95, epochs=4, clip_eps=0.2,
                  entropy_coef=0.01, value_coef=0.5, value_cap=10.0, recurrent_l2=0.3, grad_clip=1.0),
    # Our own one-epoch preset: one full-batch epoch needs lr ~ 1e-3.
    "fast": dict(learner="clipped", lr=1e-3, gamma=0.99, gae_lambda=0.95, epochs=1, clip_eps=0.2,
                 entropy_coef=0.01, value_coef=0.5, value_cap=10.0, recurrent_l2=0.3, grad_clip=1.0),
    # The official RLlib 2.2 learner values.
    "rllib": dict(learner="rllib", lr=5e-5, gamma=0.99, gae_lambda=1.0, epochs=30, clip_eps=0.3,
                  entropy_coef=0.0, value_coef=1.0, value_cap=10.0, recurrent_l2=3.0, grad_clip=None,
                  minibatch_steps=128, seq_len=20, kl_coef_init=0.2, kl_target=0.01),
}


def ppo_preset(name: str, **overrides) -> PPOConfig:
    check_choice("preset", name, PRESETS)
    values = dict(PRESET_VALUES[name])
    known = {f.name for f in fields(PPOConfig)}
    for key in overrides:
        if key not in known:
            raise InterbrainError(f"unknown learner setting {key!r}; expected one of {', '.join(sorted(known))}")
    values.update(overrides)
    return PPOConfig(**values)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines one training unit (arch, task, seed) and its learner."""

    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    ppo: PPOConfig = field(default_factory=lambda: ppo_preset("paper"))
    preset: str = "paper"
    seed: int = 0
    updates: int = 20_000
    checkpoint_every: int = 1_000
    log_every: int = 500
    latest_every_s: float = 1_800.0

    def __post_init__(self):
        check_choice("preset", self.preset, PRESETS)
        for key in ("updates", "checkpoint_every", "log_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InterbrainError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InterbrainError(f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def unit_id(self) -> str:
        return f"{self.agent.arch}/{self.env.task}/seed_{self.seed:04d}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(env=EnvConfig(**d["env"]), agent=AgentConfig(**d["agent"]), ppo=PPOConfig(**d["ppo"]),
                   **{k: v for k, v in d.items() if k not in ("env", "agent", "ppo")})

    def learning_identity(self) -> dict:
        """The settings that must match for a resume (SPEC §4.6): everything but the run length and logging."""
        d = self.to_dict()
        for key in ("updates", "log_every", "latest_every_s", "checkpoint_every"):
            d.pop(key)
        return d


def make_train_config(arch: str = "rnn", task: str = "social", seed: int = 0, preset: str = "paper",
                      updates: int = 20_000, *, size: str = "std", init: str = "pytorch_default",
                      spawn: str = "full", window: int = 100, pos: str = "learned",
                      checkpoint_every: int = 1_000, log_every: int = 500, latest_every_s: float = 1_800.0,
                      overrides: dict | None = None, agent_options: dict | None = None) -> TrainConfig:
    """Build a validated config from flat arguments; ``overrides`` are :class:`PPOConfig` fields and
    ``agent_options`` the architecture-specific :class:`AgentConfig` fields (:data:`AGENT_OPTIONS`)."""
    options = dict(agent_options or {})
    for key in options:
        check_choice("agent option", key, AGENT_OPTIONS)
    return TrainConfig(
        env=EnvConfig(task=task, spawn=spawn),
        agent=AgentConfig(arch=arch, size=size, init=init, window=window, pos=pos, **options),
        ppo=ppo_preset(preset, **(overrides or {})),
        preset=preset, seed=seed, updates=updates, checkpoint_every=checkpoint_every, log_every=log_every,
        latest_every_s=latest_every_s,
    )


#: AgentConfig fields that only some architectures read (SPEC §3.4); the rest are flat arguments of make_train_config.
AGENT_OPTIONS = ("bottleneck_beta", "bottleneck_warmup", "tok_compute", "tok_mode", "tok_type_embedding",
                 "tok_prev_action", "tok_prev_reward")

__all__ = ["EnvConfig", "AgentConfig", "AGENT_OPTIONS", "PPOConfig", "TrainConfig", "ppo_preset", "make_train_config",
           "replace", "TASKS", "VISIBILITIES", "TASK_VISIBILITY", "PRESETS", "SIZES", "INITS"]
