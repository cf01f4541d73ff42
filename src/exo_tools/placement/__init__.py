"""The model plane: which node computes which part of the model, and making it so.

`plan` decides a placement (pure), the `Coordinator` (on the master) has the nodes load
it and re-places when a node or stream is lost, each node's `Worker` (the Worker gRPC
service) loads its shard into the engine and runs its streams (`streams`). Above the
engine and the control plane (cluster/); below serving.
"""
