"""The MLX engine of one node: its shard's forward pass, sampling, and the stage thread.

`core.StageEngine` owns the MLX thread, its typed inbox and every request's KV cache; the
installed stage plays one role (`driver`, `relay`, `last_stage`, `follower`). Speaks only
exo_tools.types: no proto, nothing of the cluster, placement, serving or API layers.
"""
