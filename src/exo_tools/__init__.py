"""exo-tools: a distributed MLX inference cluster with an OpenAI-compatible API."""

__version__ = "0.1.0"
