"""How nodes find, trust and talk to each other: discovery, auth, membership, election."""

from exo_tools.cluster.auth import SECRET_ENV, ClusterAuth, load_or_create_secret
from exo_tools.cluster.config import (
    ClusterConfig,
    add_cluster_arguments,
    cluster_config_from_args,
    load_or_create_node_id,
    parse_peer,
)
from exo_tools.cluster.election import Candidate, Liveness, elect
from exo_tools.cluster.node import ClusterNode
from exo_tools.cluster.table import render_cluster_table
from exo_tools.cluster.view import Capabilities, ClusterView, LinkInfo, NodeInfo

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
    "load_or_create_secret",
    "parse_peer",
    "render_cluster_table",
]
