"""The common agent contract (SPEC §3.1) and the architecture registry.

Every architecture is one module in ``interbrain.agents`` that subclasses :class:`Agent` and registers
itself with ``@register("name")``. Nothing else in the package names an architecture.

Contract
--------
- ``hidden`` is a 256-d vector per step: the single analysis site and the only input to the heads.
- ``action_head`` = Linear(256, 4) (categorical logits), ``value_head`` = Linear(256, 1).
- ``initial_state(batch, device)`` -> state (a tuple of tensors whose first dim is the batch).
- ``step(obs, state)`` -> ``(logits [B,4], value [B], hidden [B,256], state')`` for one time step.
- ``sequence(obs [T,B,200], state0=None)`` -> ``(logits [T,B,4], value [T,B], hidden [T,B,256])``,
  teacher-forced from ``state0`` (zero state when None); equal to repeated ``step`` to 1e-5.
- ``step_index`` / ``sequence_index``: the same two calls on observation indices (own cell, partner cell or 100);
  the trainer uses them, architectures override them to gather input weights (exact: x_t is at most two-hot).
- ``readout(hidden)`` -> ``(logits, value)``.
- ``recurrent_weight_norm()`` -> unsquared Frobenius norm of the recurrent weight (a 0-d tensor; 0 if none).
- ``input_weight_norm()`` -> unsquared Frobenius norm of the input weight (0 if not defined).
- ``carries_hidden``: True iff ``hidden`` is part of the carried state; then ``with_hidden(state, h)``
  returns the state with ``hidden`` replaced by ``h`` (the `recurrent` perturbation target, SPEC §6.6).
- optional hooks: ``extra_sites(state)`` (secondary analysis sites), ``aux_loss()`` (own penalty added to the PPO
  loss), ``set_progress(update)`` (warm-up schedules).
- ``card()`` -> dict: architecture, size preset, parameters per agent, definition of ``hidden``, memory type,
  context limit.
- ``max_position_used`` / ``max_context_used`` (attention models): the largest position index and context
  length this module has been asked to process since construction (SPEC §3.2 context rule, pitfall 6).
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from interbrain.agents.linear import KnownLinear, Linear, linear
from interbrain.config import AgentConfig
from interbrain.env import obs_from_index
from interbrain.errors import InterbrainError

OBS_DIM = 200
N_CELLS = 100
N_ACTIONS = 4
HIDDEN = 256

ARCHITECTURES: dict[str, type["Agent"]] = {}


def register(name: str) -> Callable[[type["Agent"]], type["Agent"]]:
    def deco(cls: type["Agent"]) -> type["Agent"]:
        if name in ARCHITECTURES:
            raise RuntimeError(f"architecture {name!r} registered twice")
        cls.arch = name
        ARCHITECTURES[name] = cls
        return cls

    return deco


class Agent(nn.Module):
    arch: ClassVar[str] = "base"
    carries_hidden: ClassVar[bool] = False
    hidden_definition: ClassVar[str] = ""
    memory_type: ClassVar[str] = ""

    def __init__(self, config: AgentConfig):
        super().__init__()
        self.config = config
        self.action_head = Linear(HIDDEN, N_ACTIONS)
        self.value_head = Linear(HIDDEN, 1)
        self._derived: dict[str, tuple] = {}  # see `cached`

    # --- contract -------------------------------------------------------------------------------
    def initial_state(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def step(self, obs: torch.Tensor, state):
        raise NotImplementedError

    def sequence(self, obs: torch.Tensor, state0=None):
        raise NotImplementedError

    # --- index form of the same two calls (the trainer's path; SPEC §3.2 "input gather") ------------
    def step_index(self, index: torch.Tensor, state):
        """``step`` for an observation index [B, 2] (own cell, partner cell or 100 = not shown; see
        :func:`interbrain.env.obs_from_index`). Architectures override it to gather input weights instead of
        multiplying a two-hot vector; the default builds the observation."""
        return self.step(obs_from_index(index), state)

    def sequence_index(self, index: torch.Tensor, state0=None):
        """``sequence`` for observation indices [T, B, 2]; same contract as :meth:`step_index`."""
        return self.sequence(obs_from_index(index), state0)

    # --- optional fast paths (issue 6); the defaults say "not available" -----------------------------------------
    def pair_with(self, partner: "Agent", steps: int):
        """An object that steps this agent (chaser) and ``partner`` (explorer) as one batched call while acting, for
        ``steps`` steps from the zero state, with ``keys`` (:func:`param_key` of both agents when built), ``replays``
        (whether it records what :meth:`replay_index` needs; then ``records(state, hidden, heads)`` gives each agent's
        record after the episode's steps, from its final state, the hidden states [2, T, B, 256] and the heads' outputs
        [T, 2, B, 5]), ``row_offsets`` (:func:`stacked_row_offsets`
        of its two stacked input tables), ``initial_state(B)``, ``step(rows [2,B,2], state, hidden_out [2,B,256],
        heads_out [2,B,5]) -> state`` (rows: the observation index plus ``row_offsets``, as
        ``ChaseEnv.observation_index(offsets=row_offsets)`` gives it; on CPU the same bits as each agent's
        :meth:`step_index`) and ``states(state)`` (each agent's own state, for a bootstrap step), optionally
        ``sequence_states(hidden, seq_len)`` (each agent's state at every sequence start, from the hidden states
        [2, T, B, 256] it recorded: the ``rllib`` learner's rollouts then use the pair too) and ``play`` (the whole
        acting loop written out, :meth:`interbrain.agents.rnn.RNNPair.play`; None or absent: the rollout's own loop of
        ``step``); or None (the rollout then calls each agent's :meth:`step_index`)."""
        return None

    def replay_index(self, index: torch.Tensor, record):
        """:meth:`sequence_index` from the zero state given what the pair step recorded under the same weights (its
        ``records``); only agents whose :meth:`pair_with` returns a pair marked ``replays`` implement it."""
        raise NotImplementedError(f"arch {self.arch!r} cannot replay a recorded forward")

    @classmethod
    def stacked(cls, agents: list["Agent"]) -> nn.Module | None:
        """E agents of this architecture as one module of stacked parameters ([E, ...]) whose ``sequence_index`` runs
        all of them at once (index [T, E, B, 2], state0 with [E, B, ...] tensors), with per-unit ([E])
        ``recurrent_weight_norm``/``input_weight_norm``/``aux_loss``, per-unit ``clip_grad_norms(max_norm)``,
        ``write_to(agents)`` and ``load_adam``/``store_adam`` (see :class:`interbrain.agents.rnn.StackedRNN`); or None (not available)."""
        return None

    def readout(self, hidden: torch.Tensor, known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads as one Linear(256 -> 5) (rows: the 4 action logits, then the value): one matmul forward and two
        backward instead of twice that. With ``known`` (hidden's shape but 5 columns), their output as an acting pass
        recorded it from the same hidden states and weights: not recomputed, only the backward is built
        (:class:`~interbrain.agents.linear.KnownLinear`; a replay)."""
        weight, bias = self.cached("heads", (self.action_head.weight, self.action_head.bias, self.value_head.weight,
                                             self.value_head.bias), self._joint_heads)
        out = linear(hidden, weight, bias) if known is None else KnownLinear.apply(hidden, weight, bias, (known,))
        return out[..., :N_ACTIONS], out[..., N_ACTIONS]

    def _joint_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([self.action_head.weight, self.value_head.weight]),
                torch.cat([self.action_head.bias, self.value_head.bias]))

    def cached(self, name: str, params: tuple[torch.Tensor, ...], build: Callable[[], object]):
        """``build()`` recomputed only when needed: always under autograd (the result must carry the graph), otherwise
        reused while none of ``params`` changed (tensor version counters, bumped by every in-place update such as an
        optimiser step or ``load_state_dict``). Lets acting reuse tensors derived from the weights (joint heads, input
        tables) across the steps of a rollout."""
        if torch.is_grad_enabled():
            return build()
        key = tuple((p.data_ptr(), p._version) for p in params)
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            hit = self._derived[name] = (key, build())
        return hit[1]

    def gather_linear(self, index: torch.Tensor, layer: nn.Linear, name: str = "input_table") -> torch.Tensor:
        """``layer(two_hot(index))`` for a Linear(200 -> out) first layer, as a gather of two rows of its
        :func:`index_table` (cached under ``name`` while acting, rebuilt under autograd)."""
        return self.gather_weights(index, layer.weight, layer.bias, name)

    def gather_weights(self, index: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       name: str = "input_table") -> torch.Tensor:
        """:meth:`gather_linear` for a bare ``weight`` [out, 200] and ``bias`` (a recurrent layer's input weights)."""
        table = self.cached(name, tuple(p for p in (weight, bias) if p is not None), lambda: index_table(weight, bias))
        return gather_index(index, table)

    def recurrent_weight_norm(self) -> torch.Tensor:
        return torch.zeros((), device=self.action_head.weight.device)

    def input_weight_norm(self) -> torch.Tensor:
        return torch.zeros((), device=self.action_head.weight.device)

    def with_hidden(self, state, hidden: torch.Tensor):
        raise InterbrainError(f"architecture {self.arch!r} does not carry `hidden` in its state")

    # --- optional hooks (defaults suit every architecture without them) --------------------------
    def extra_sites(self, state) -> dict[str, torch.Tensor]:
        """Secondary analysis sites read from the state returned by ``step`` (e.g. the LSTM cell c_t, disRNN latents):
        name -> [B, d]. Rollouts record each as ``{agent}_{name}`` [T, E, d] beside ``{agent}_hidden``."""
        return {}

    def aux_loss(self) -> torch.Tensor:
        """An architecture's own penalty from its latest ``sequence`` call (e.g. the disRNN bottleneck KL), added to the
        PPO loss as is (0 if none)."""
        return torch.zeros((), device=self.action_head.weight.device)

    def set_progress(self, update: int) -> None:
        """Called by the trainer before each update's rollout with the 1-based update number (warm-up schedules)."""

    def context_limit(self) -> int | None:
        """Longest context the model ever sees (None: unbounded recurrence)."""
        return None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def card(self) -> dict:
        return {
            "architecture": self.arch,
            "size": self.config.size,
            "init": self.config.init,
            "parameters_per_agent": self.num_parameters(),
            "hidden": self.hidden_definition,
            "memory": self.memory_type,
            "context_limit": self.context_limit(),
            "carries_hidden": self.carries_hidden,
        }


def init_heads(agent: Agent) -> None:
    """Xavier-uniform heads with zero biases: gain 0.1 for the action head (near-uniform initial policy),
    gain 1 for the value head (SPEC §3.2, RNN `modern`; used by every non-RNN architecture)."""
    nn.init.xavier_uniform_(agent.action_head.weight, gain=0.1)
    nn.init.zeros_(agent.action_head.bias)
    nn.init.xavier_uniform_(agent.value_head.weight, gain=1.0)
    nn.init.zeros_(agent.value_head.bias)


def action_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``torch.log_softmax(logits, -1)`` over the 4 actions, the same bits forward and backward. torch's CPU kernel for a
    last dimension of 4 pays its set-up per row (~0.47 ms for a rollout's [100, 2, 40, 4] logits, forward and backward
    ~0.77 ms); on a copy with the actions as the leading dimension the kernel vectorises across the rows (~0.03 /
    ~0.15 ms; issue 6). That path is taken on CPU when the rows fill whole 64-byte vectors (a multiple of 16 rows in
    float32, 8 in float64: the rollout's 8,000 and a learning pass's 4,000 rows): for other row counts its scalar tail
    rounds differently from the last-dimension kernel, so those keep ``torch.log_softmax`` itself.
    ``tests/test_fast_paths.py`` checks the bits for row counts on and off that grid."""
    rows = logits.numel() // max(logits.shape[-1], 1)
    if logits.device.type != "cpu" or rows % (64 // logits.element_size()) or logits.dim() < 2:
        return torch.log_softmax(logits, -1)
    return torch.log_softmax(logits.movedim(-1, 0).contiguous(), 0).movedim(0, -1)


INDEX_OFFSETS = torch.tensor([0, N_CELLS])  # own cell -> table row r, partner cell (or 100 = not shown) -> row 100 + r


_OFFSETS_ON: dict[torch.device, torch.Tensor] = {}


def index_offsets(device: torch.device) -> torch.Tensor:
    """:data:`INDEX_OFFSETS` on ``device``, copied there once (no host-to-device copy per rollout step on CUDA)."""
    hit = _OFFSETS_ON.get(device)
    if hit is None:
        hit = _OFFSETS_ON[device] = INDEX_OFFSETS.to(device)
    return hit


_STACKED_ROWS_ON: dict[tuple, torch.Tensor] = {}


def stacked_row_offsets(units: int, device: torch.device) -> torch.Tensor:
    """[units, 1, 2]: the rows of unit e's own-cell and partner-cell blocks in input tables stacked unit after unit
    (:func:`index_table`'s 201 rows each): 201 e + :data:`INDEX_OFFSETS`. One tensor per (units, device), so a
    batched pair step's offsets are the same object every rollout (``ChaseEnv.observation_index(offsets=)`` finds
    its table by identity)."""
    key = (units, torch.device(device))
    hit = _STACKED_ROWS_ON.get(key)
    if hit is None:
        rows = torch.arange(units).view(-1, 1, 1) * (2 * N_CELLS + 1) + INDEX_OFFSETS.view(1, 1, 2)
        hit = _STACKED_ROWS_ON[key] = rows.to(device)
    return hit


def param_key(module: nn.Module) -> tuple:
    """Identifies the current values of ``module``'s parameters: (storage, version counter) of each; an in-place update
    through autograd-visible tensors (optimiser step, ``load_state_dict``, ``p.mul_`` under ``no_grad``) changes it, an
    edit through ``p.data`` does not (it bypasses the version counter; nothing in the package edits weights that way)."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


def index_table(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The rows of a Linear(200 -> out) (``weight`` [out, 200]) for observation indices: [201, out], rows 0..99 the own
    cell (plus ``bias``), 100..199 the partner cell, 200 "partner not shown" (zeros)."""
    w = weight.t()
    own = w[:N_CELLS] if bias is None else w[:N_CELLS] + bias
    return torch.cat([own, w[N_CELLS:], w.new_zeros(1, w.shape[1])])


_BAG_OFFSETS: dict[tuple, torch.Tensor] = {}


def bag_sum(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows[:, 0]] + ... + table[rows[:, k-1]] for rows [N, k]: ``F.embedding_bag(rows, table, mode="sum")``'s
    kernel called directly, with its bag offsets (0, k, 2k, ...) made once per (N, k, dtype, device) instead of per call (the
    functional form builds them with an ``arange`` and checks its arguments in Python: a third of a small gather's
    cost). Differentiable as ``embedding_bag`` is."""
    n, k = rows.shape
    key = (n, k, rows.dtype, rows.device)
    offsets = _BAG_OFFSETS.get(key)
    if offsets is None:
        offsets = _BAG_OFFSETS[key] = torch.arange(0, n * k, k, dtype=rows.dtype, device=rows.device)
    return torch.embedding_bag(table, rows.reshape(-1), offsets, False, 0, False, None, False, None)[0]


class TwoRowGather(torch.autograd.Function):
    """table [R, out], rows [N, 2] -> table[rows[:, 0]] + table[rows[:, 1]] ([N, out]). The forward is ``embedding_bag``'s
    sum; the backward scatters the gradient with two ``index_add_`` (sequential, deterministic on CPU), several times
    faster there than ``embedding_bag``'s sort-based backward. CPU only: on CUDA ``index_add_`` adds atomically (run to
    run nondeterministic), so :func:`gather_rows` keeps ``embedding_bag``'s deterministic backward there."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.table_shape = table.shape
        return bag_sum(table, rows)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        return scatter_two_rows(grad, rows, ctx.table_shape), None


def scatter_two_rows(grad: torch.Tensor, rows: torch.Tensor, table_shape) -> torch.Tensor:
    """The gradient of table [R, out] through ``table[rows[:, 0]] + table[rows[:, 1]]`` from ``grad`` [N, out]: two
    sequential ``index_add_`` (deterministic on CPU; :class:`TwoRowGather`'s backward)."""
    grad_table = grad.new_zeros(table_shape)
    return grad_table.index_add_(0, rows[:, 0], grad).index_add_(0, rows[:, 1], grad)


class FrobeniusNorm(torch.autograd.Function):
    """||w_e||_F for each matrix of w [E, ...] ([E]): ``torch.linalg.matrix_norm``'s values and gradient w·g/||w||
    (0 for an all-zero w, as there) in one node; its generic backward is four times slower, which the ``rllib``
    learner's 960 minibatch steps per update feel."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(w.flatten(1), dim=1)
        ctx.save_for_backward(w, norm)
        return norm

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w, norm = ctx.saved_tensors
        scale = torch.where(norm > 0, grad / norm, torch.zeros_like(norm))
        return w * scale.view(-1, *([1] * (w.dim() - 1)))


def gather_index(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``Linear(two_hot(index))`` for observation indices [..., 2] as one summed gather of two rows of
    :func:`index_table` (exact up to float summation order: x_t is at most two-hot). Returns [..., out]."""
    return gather_rows(index, table).view(*index.shape[:-1], table.shape[1])


def gather_rows(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`gather_index` flattened to [N, out] (N = index.numel() / 2), a fresh tensor rather than a view."""
    return sum_rows(table, table_rows(index))


def table_rows(index: torch.Tensor) -> torch.Tensor:
    """The :func:`index_table` rows [N, 2] that observation indices [..., 2] sum (own cell, partner cell or 200)."""
    return (index + index_offsets(index.device)).reshape(-1, 2)


def sum_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows[:, 0]] + table[rows[:, 1]] ([N, out], fresh): :class:`TwoRowGather` when it is differentiated on CPU,
    else ``embedding_bag`` (CUDA: its deterministic backward)."""
    if torch.is_grad_enabled() and table.requires_grad and table.device.type == "cpu":
        return TwoRowGather.apply(table, rows)
    return bag_sum(table, rows)


class TorchRNNAgent(Agent):
    """Shared by agents built around one ``torch.nn`` recurrent layer ``self.rnn`` of state width ``self.width``
    (gru, lstm). At width 256 ``hidden`` is the state output h_t itself (carried); at a parameter-matched width w it
    is ReLU(Linear(w→256)(h_t)) (``self.proj``: Kaiming-uniform for ReLU, zero bias) and not carried. Call
    :meth:`_build_projection` after creating ``self.rnn`` (parameter creation order fixes the seeded init)."""

    rnn: nn.RNNBase
    width: int

    def _build_projection(self) -> None:
        self.carries_hidden = self.width == HIDDEN
        if not self.carries_hidden:
            self.proj = Linear(self.width, HIDDEN)
            nn.init.kaiming_uniform_(self.proj.weight, nonlinearity="relu")
            nn.init.zeros_(self.proj.bias)

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.carries_hidden else torch.relu(self.proj(h))

    def step(self, obs, state):
        r = self.rnn
        return self._cell(torch.addmm(r.bias_ih_l0, obs, r.weight_ih_l0.t()), state)

    def step_index(self, index, state):
        """:meth:`step` with W_ih x_t + b_ih gathered from the layer's input table (SPEC §3.2 "input gather")."""
        return self._cell(self.gather_weights(index, self.rnn.weight_ih_l0, self.rnn.bias_ih_l0), state)

    def _cell(self, gates_in: torch.Tensor, state):
        """One step from the input's gate pre-activations W_ih x_t + b_ih [B, k·w]."""
        raise NotImplementedError

    def recurrent_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_hh_l0)

    def input_weight_norm(self):
        return torch.linalg.matrix_norm(self.rnn.weight_ih_l0)


def check_size(config: AgentConfig, widths: dict) -> None:
    if config.size not in widths:
        raise InterbrainError(f"unknown size {config.size!r} for arch {config.arch!r}; expected one of {', '.join(widths)}")


def build_agent(config: AgentConfig) -> Agent:
    """Instantiate a registered architecture (parameters drawn from the current torch RNG)."""
    if config.arch not in ARCHITECTURES:
        raise InterbrainError(f"unknown arch {config.arch!r}; expected one of {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[config.arch](config)


def build_pair(config: AgentConfig, seed: int) -> tuple[Agent, Agent]:
    """SPEC §3.1: both agents are built after ``torch.manual_seed(seed)``, chaser first."""
    torch.manual_seed(seed)
    chaser = build_agent(config)
    explorer = build_agent(config)
    return chaser, explorer
