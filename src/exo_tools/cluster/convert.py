"""Conversions between the wire (protobuf) and view (pydantic) forms of a node."""

from __future__ import annotations

from exo_tools.cluster.view import Capabilities, NodeInfo
from exo_tools.proto import node_pb2


def info_to_proto(info: NodeInfo, cluster_name: str) -> node_pb2.NodeInfo:
    caps = info.capabilities
    return node_pb2.NodeInfo(
        node_id=info.id,
        addresses=info.addresses,
        grpc_port=info.grpc_port,
        api_port=info.api_port,
        version=info.version,
        cluster_name=cluster_name,
        start_time=info.start_time,
        capabilities=node_pb2.Capabilities(
            memory_total=caps.memory_total,
            memory_available=caps.memory_available,
            chip=caps.chip,
            mlx_device=caps.mlx_device,
            matmul_gflops=caps.matmul_gflops,
        ),
    )


def info_from_proto(msg: node_pb2.NodeInfo) -> NodeInfo:
    caps = msg.capabilities
    return NodeInfo(
        id=msg.node_id,
        addresses=list(msg.addresses),
        grpc_port=msg.grpc_port,
        api_port=msg.api_port,
        version=msg.version,
        start_time=msg.start_time,
        capabilities=Capabilities(
            memory_total=caps.memory_total,
            memory_available=caps.memory_available,
            chip=caps.chip,
            mlx_device=caps.mlx_device,
            matmul_gflops=caps.matmul_gflops,
        ),
    )


def parse_grpc_peer(peer: str) -> str | None:
    """IPv4 host of a grpc `context.peer()` string such as "ipv4:10.0.0.2:51234"."""
    if peer.startswith("ipv4:"):
        host, _, _ = peer[len("ipv4:") :].rpartition(":")
        return host or None
    return None
