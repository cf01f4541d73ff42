"""ClusterConfig and its command-line flags."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from .auth import load_or_create_secrets

NODE_ID_FILENAME = "node_id"
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass
class ClusterConfig:
    node_id: str
    secret: bytes
    cluster_name: str = "default"
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 0  # 0: pick a free port
    data_port: int = 0  # the data plane's gRPC port; 0: pick a free port
    api_host: str = "127.0.0.1"
    api_port: int = 0
    interfaces: list[str] = field(default_factory=list)  # empty: all interfaces
    static_peers: list[str] = field(default_factory=list)  # "host:port" gRPC targets
    discovery: bool = True
    version: str = ""
    secret_source: str = ""
    node_id_file: str | None = None  # where node_id came from (None: --node-id)
    tls: bool = True  # mutual TLS on every inter-node channel, keyed by the secret
    # Secrets accepted besides `secret` (the secret file's later lines, during a rotation)
    # and the file to watch for a rotation (None: the secret came from the environment).
    accepted_secrets: list[bytes] = field(default_factory=list)
    secret_file: Path | None = None

    @property
    def secrets(self) -> list[bytes]:
        return [self.secret, *self.accepted_secrets]


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """A TCP port given on the command line (usable as an argparse `type=`): 1-65535, or also
    0 ("any free port") when `allow_zero`. Raises argparse.ArgumentTypeError otherwise."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    value = int(text)
    lowest = 0 if allow_zero else 1
    if not lowest <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be {lowest}-65535, got {value}")
    return value


def parse_peer(value: str) -> str:
    """Validate HOST:PORT (IPv4 address or host name); returns it normalized."""
    host, sep, port_text = value.strip().rpartition(":")
    expected = f"invalid --peer {value!r}: expected HOST:PORT with a port in 1-65535"
    if not sep or not host:
        raise argparse.ArgumentTypeError(expected)
    try:
        port = parse_port(port_text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(expected) from None
    if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
        raise argparse.ArgumentTypeError(f"invalid --peer {value!r}: bad host {host!r}")
    return f"{host}:{port}"


def _parse_ipv4(flag: str, value: str) -> str:
    """An IPv4 address given to `flag` (argparse `type=` via functools.partial)."""
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid {flag} {value!r}: expected an IPv4 address of this machine"
        ) from None


def _parse_node_id(value: str) -> str:
    if not _NODE_ID_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"invalid --node-id {value!r}: use 1-63 letters, digits, '.', '_' or '-'"
        )
    return value


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--cluster",
        default="default",
        metavar="NAME",
        help="cluster name; nodes only join nodes of the same name (default: default)",
    )
    group.add_argument(
        "--interface",
        action="append",
        default=[],
        type=functools.partial(_parse_ipv4, "--interface"),
        metavar="IP",
        help="advertise/discover only on this IPv4 address (repeatable; default: all interfaces)",
    )
    group.add_argument(
        "--peer",
        action="append",
        default=[],
        type=parse_peer,
        metavar="HOST:PORT",
        help="gRPC address of a node to join, besides zeroconf (repeatable)",
    )
    group.add_argument(
        "--no-discovery",
        action="store_true",
        help="disable zeroconf; only --peer addresses are used",
    )
    group.add_argument(
        "--secret-file",
        type=Path,
        default=None,
        metavar="PATH",
        help="file holding the cluster secret (else $EXO_TOOLS_SECRET, else "
        "<home>/cluster_secret, generated on first start). To rotate, write the new secret "
        "as its first line and the old as its second on every node, then the new alone: "
        "nodes reload it within seconds (docs/CLUSTER.md)",
    )
    group.add_argument(
        "--no-cluster-tls",
        action="store_true",
        help="send inter-node traffic (prompts, activations, tokens) unencrypted; every node "
        "of the cluster must use the same setting. Only for a wired network you trust, or "
        "to measure what TLS costs (default: mutual TLS keyed by the cluster secret)",
    )
    group.add_argument(
        "--grpc-port",
        type=functools.partial(parse_port, allow_zero=True),
        default=0,
        metavar="N",
        help="inter-node gRPC port (default 0: any free port, advertised over zeroconf;"
        " fix it when other nodes use --peer to reach this one)",
    )
    group.add_argument(
        "--data-port",
        type=functools.partial(parse_port, allow_zero=True),
        default=0,
        metavar="N",
        help="inter-node data plane port: the activations, tokens and all-reduce partials "
        "of a placed model travel on it, served by threads beside the control server on "
        "--grpc-port (default 0: any free port, told to the other nodes in heartbeats; fix "
        "it when a firewall must allow it)",
    )
    group.add_argument(
        "--grpc-host",
        type=functools.partial(_parse_ipv4, "--grpc-host"),
        default="0.0.0.0",
        metavar="IP",
        help="address the inter-node gRPC server listens on (default 0.0.0.0: every "
        "interface); other nodes then reach it with --peer IP:PORT",
    )
    group.add_argument(
        "--node-id",
        type=_parse_node_id,
        default=None,
        metavar="ID",
        help="node id (default: a persistent id stored in <home>/node_id)",
    )


def load_or_create_node_id(home: Path) -> str:
    path = home / NODE_ID_FILENAME
    if path.exists():
        value = path.read_text().strip()
        if _NODE_ID_RE.match(value):
            return value
    home.mkdir(parents=True, exist_ok=True)
    value = f"node-{secrets.token_hex(4)}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def cluster_config_from_args(
    args: argparse.Namespace, *, home: Path, api_host: str, api_port: int, version: str
) -> ClusterConfig:
    source = load_or_create_secrets(args.secret_file, home)
    return ClusterConfig(
        node_id=args.node_id or load_or_create_node_id(home),
        node_id_file=None if args.node_id else str(home / NODE_ID_FILENAME),
        secret=source.secrets[0],
        accepted_secrets=source.secrets[1:],
        secret_source=source.where,
        secret_file=source.path,
        cluster_name=args.cluster,
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        data_port=args.data_port,
        api_host=api_host,
        api_port=api_port,
        interfaces=list(args.interface),
        static_peers=list(args.peer),
        discovery=not args.no_discovery,
        version=version,
        tls=not args.no_cluster_tls,
    )
