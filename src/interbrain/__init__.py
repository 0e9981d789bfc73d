"""interbrain: chaser/explorer multi-agent RL and the inter-brain analyses of Zhang et al. 2025."""

__version__ = "0.1.0"
