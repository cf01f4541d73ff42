"""Generated protobuf/gRPC modules (from protos/; regenerate with scripts/gen_protos.py)."""
