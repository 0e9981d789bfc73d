"""Agent architectures. Each module registers itself by name; import order fixes nothing else."""

from interbrain.agents.base import ARCHITECTURES, HIDDEN, N_ACTIONS, OBS_DIM, Agent, build_agent, build_pair, register
from interbrain.agents import rnn  # noqa: F401  (registers "rnn")
from interbrain.agents import mlp  # noqa: F401  (registers "mlp")
from interbrain.agents import ssm  # noqa: F401  (registers "ssm")
from interbrain.agents import transformer  # noqa: F401  (registers "transformer")
from interbrain.agents import gru  # noqa: F401  (registers "gru")
from interbrain.agents import lstm  # noqa: F401  (registers "lstm")
from interbrain.agents import mingru  # noqa: F401  (registers "mingru")
from interbrain.agents import minlstm  # noqa: F401  (registers "minlstm")
from interbrain.agents import disrnn  # noqa: F401  (registers "disrnn")
from interbrain.agents import tok_transformer  # noqa: F401  (registers "tok_transformer")

__all__ = ["ARCHITECTURES", "Agent", "build_agent", "build_pair", "register", "HIDDEN", "N_ACTIONS", "OBS_DIM"]
