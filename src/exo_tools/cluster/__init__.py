"""The control plane: how nodes find, trust and track each other.

Discovery (zeroconf), auth (the cluster secret and its proofs), membership (admission,
heartbeats, liveness), master election, the Membership gRPC service, and `wire`, the
conversions between the package's types and their protobuf form.
"""

from .auth import SECRET_ENV, ClusterAuth, load_or_create_secrets
from .config import (
    ClusterConfig,
    add_cluster_arguments,
    cluster_config_from_args,
    load_or_create_node_id,
    parse_peer,
)
from .election import Candidate, Liveness, elect
from .node import ClusterNode
from .table import render_cluster_table
from .view import Capabilities, ClusterView, LinkInfo, NodeInfo

__all__ = [
    "SECRET_ENV",
    "Candidate",
    "Capabilities",
    "ClusterAuth",
    "ClusterConfig",
    "ClusterNode",
    "ClusterView",
    "LinkInfo",
    "Liveness",
    "NodeInfo",
    "add_cluster_arguments",
    "cluster_config_from_args",
    "elect",
    "load_or_create_node_id",
    "load_or_create_secrets",
    "parse_peer",
    "render_cluster_table",
]
