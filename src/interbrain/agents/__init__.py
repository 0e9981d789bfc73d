"""Agent architectures. Each module registers itself by name; import order fixes nothing else."""

from interbrain.agents.base import ARCHITECTURES, HIDDEN, N_ACTIONS, OBS_DIM, Agent, build_agent, build_pair, register
from interbrain.agents import rnn  # noqa: F401  (registers "rnn")
from interbrain.agents import mlp  # noqa: F401  (registers "mlp")
from interbrain.agents import ssm  # noqa: F401  (registers "ssm")
from interbrain.agents import transformer  # noqa: F401  (registers "transformer")

__all__ = ["ARCHITECTURES", "Agent", "build_agent", "build_pair", "register", "HIDDEN", "N_ACTIONS", "OBS_DIM"]
