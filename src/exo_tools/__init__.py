"""exo-tools: a distributed MLX inference cluster with an OpenAI-compatible API."""

import os

__version__ = "0.1.0"

# gRPC's core logs every refused TLS handshake to stderr at INFO level: a peer with a wrong
# secret retrying every few seconds would flood the log, where membership says it once.
# Read when grpc is first imported, hence here; an explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
