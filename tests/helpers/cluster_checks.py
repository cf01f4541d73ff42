"""Launch cluster members and poll/assert their GET /v1/cluster views (test helpers).

The checks only need each member's base URL (or the member itself, when it lives in a network
namespace), so they work for the helper member (tests/helpers/cluster_member.py) and for real
`exo-tools node` processes alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from exo_tools.cluster.tls import CHANNEL_TLS_OPTIONS, ClusterTLS
from tests.helpers.nodes import NodeProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
MEMBER_SCRIPT = ROOT / "tests" / "helpers" / "cluster_member.py"


# A base URL, or a member process (whose view is fetched from inside its network namespace).
ViewSource = str | NodeProcess


def get_view(src: ViewSource, timeout: float = 1.0) -> dict[str, Any] | None:
    """GET {url}/v1/cluster, or None when it does not answer."""
    if isinstance(src, NodeProcess):
        if src.netns is not None:
            return netns_get_view(src.netns, src.url)
        src = src.url
    try:
        with urllib.request.urlopen(f"{src}/v1/cluster", timeout=timeout) as resp:
            return json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _label(src: ViewSource) -> str:
    return src if isinstance(src, str) else f"{src.node_id or '?'} at {src.url}"


def node_ids(view: dict[str, Any] | None) -> set[str]:
    return {n["id"] for n in view["nodes"]} if view else set()


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll until predicate() holds; returns the seconds it took, raises AssertionError after
    timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def agreed_master(urls: Sequence[ViewSource], expected: set[str]) -> str | None:
    """The master all of urls agree on, if each sees exactly `expected` (all healthy)."""
    masters: set[str] = set()
    for url in urls:
        view = get_view(url)
        if view is None or node_ids(view) != expected:
            return None
        if not all(n.get("healthy") for n in view["nodes"]):
            return None
        masters.add(view["master"])
    if len(masters) != 1:
        return None
    (master,) = masters
    return master if master in expected else None


def wait_converged(
    urls: Sequence[ViewSource], expected: set[str], timeout: float
) -> tuple[float, str]:
    """Wait until every url shows exactly `expected` and the same master; (seconds, master)."""
    found: list[str] = []

    def check() -> bool:
        master = agreed_master(urls, expected)
        if master is not None:
            found.append(master)
        return master is not None

    try:
        labels = [_label(u) for u in urls]
        elapsed = wait_for(check, timeout, f"{labels} to agree on members {sorted(expected)}")
    except AssertionError as e:
        views = {_label(u): get_view(u) for u in urls}
        summary = {u: (sorted(node_ids(v)), v and v.get("master")) for u, v in views.items()}
        raise AssertionError(f"{e}; views: {summary}") from None
    return elapsed, found[-1]


def start_member(
    node_id: str,
    workdir: Path,
    *,
    secret_file: Path,
    api_port: int | None = None,
    grpc_port: int | None = None,
    interface: str | None = "127.0.0.1",
    host: str = "127.0.0.1",
    cluster: str = "default",
    peers: Sequence[str] = (),
    discovery: bool = True,
    netns: str | None = None,
    extra_env: dict[str, str] | None = None,
) -> NodeProcess:
    """Start tests/helpers/cluster_member.py (inside network namespace `netns` if given)."""
    api_port = api_port or free_port()
    grpc_port = grpc_port or free_port()
    home = workdir / "homes" / node_id
    home.mkdir(parents=True, exist_ok=True)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    cmd = [
        *prefix,
        sys.executable,
        str(MEMBER_SCRIPT),
        "--node-id",
        node_id,
        "--api-port",
        str(api_port),
        "--grpc-port",
        str(grpc_port),
        "--cluster",
        cluster,
        "--secret-file",
        str(secret_file),
        "--home",
        str(home),
    ]
    if interface:
        cmd += ["--interface", interface]
    for peer in peers:
        cmd += ["--peer", peer]
    if not discovery:
        cmd.append("--no-discovery")
    log_path = workdir / f"{node_id}.log"
    env = {**os.environ, **(extra_env or {})}
    env.pop("EXO_TOOLS_SECRET", None)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    return NodeProcess(
        process=proc,
        api_port=api_port,
        home=home,
        log_path=log_path,
        node_id=node_id,
        grpc_port=grpc_port,
        host=host,
        netns=netns,
    )


def netns_get_view(netns: str, base_url: str) -> dict[str, Any] | None:
    """The view of a member inside a network namespace, fetched from inside it with curl."""
    try:
        out = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "curl",
                "-sf",
                "--max-time",
                "1",
                f"{base_url}/v1/cluster",
            ],
            capture_output=True,
            timeout=3,
            check=False,
        )
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (subprocess.SubprocessError, ValueError):
        return None


def wait_serving(members: Sequence[NodeProcess], timeout: float = 15.0) -> None:
    for m in members:
        wait_for(
            lambda m=m: get_view(m) is not None or not m.alive(),
            timeout,
            f"{m.node_id} to serve",
        )
        assert m.alive(), f"{m.node_id} exited:\n{m.log()[-3000:]}"


def write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def peer_channel(target: str, secret: bytes, cluster: str = "default") -> grpc.Channel:
    """A blocking gRPC channel to a node's gRPC port, over the cluster's mutual TLS as a
    holder of `secret` would open it (calls still need `ClusterAuth.sign_call` metadata)."""
    tls = ClusterTLS("tester", [secret], cluster)
    return grpc.secure_channel(target, tls.channel_credentials(), options=CHANNEL_TLS_OPTIONS)
