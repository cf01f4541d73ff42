"""Start real `exo-tools node` processes for tests and tear them down (`NodeProcess` is the
one wrapper for every process a test starts)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


# Ports handed out below the kernel's ephemeral range (32768-60999 by default): a port
# the kernel picked with bind(0) can be taken by any outgoing connection before the
# node binds it (CI lost a run to exactly that), but these are never picked for those.
_PORT_RANGE = range(20000, 32000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, unique within this test process."""
    for _ in range(1000):
        port = random.choice(_PORT_RANGE)
        if port in _handed_out:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


def shared_models_dir() -> Path:
    """One model store for every test node, so the model is fetched once per machine."""
    path = Path(os.environ.get("EXO_TOOLS_TEST_MODELS", REPO / ".exo-tools-home" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def node_environment(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    # Several processes share 2 cores here: one BLAS thread each avoids oversubscription.
    env.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    env["EXO_TOOLS_MODELS_DIR"] = str(shared_models_dir())
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class NodeProcess:
    """One process under test: a real `exo-tools node` (`start_node`) or a cluster-only member
    (`cluster_checks.start_member`), possibly inside a network namespace."""

    process: subprocess.Popen[bytes]
    api_port: int
    home: Path
    log_path: Path
    node_id: str = ""  # empty when the node picks its own
    grpc_port: int = 0  # 0 when not known to the test
    host: str = "127.0.0.1"
    netns: str | None = None  # its API is reachable only from inside this namespace
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def health(self) -> dict[str, object]:
        return requests.get(f"{self.url}/health", timeout=5).json()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.health().get("status") == "ready":
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"node not ready after {timeout} s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Send `sig` and wait for the exit; SIGKILL if it takes longer than `timeout`."""
        if self.process.poll() is not None:
            return
        try:
            # A test may have SIGSTOPped it: resume it, or it could never handle `sig`.
            self.process.send_signal(signal.SIGCONT)
            self.process.send_signal(sig)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


def start_node(
    *args: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    netns: str | None = None,
    host: str = "127.0.0.1",
    api_port: int | None = None,
) -> NodeProcess:
    """A node process; unless `args` say otherwise it is alone in a cluster of its own.

    A unique cluster name and loopback-only discovery keep test nodes from joining each
    other, or a developer's own nodes, by accident. With `netns` it runs inside that network
    namespace, its API reached at `host` (which `args` then make it listen on).
    """
    api_port = api_port or free_port()
    home = Path(tempfile.mkdtemp(prefix="exo-tools-node-"))
    defaults: list[str] = []
    if "--cluster" not in args:
        defaults += ["--cluster", f"test-{uuid.uuid4().hex[:12]}"]
    if "--interface" not in args and "--no-discovery" not in args:
        defaults += ["--interface", "127.0.0.1"]
    log_path = home / "node.log"
    command = [
        *(["ip", "netns", "exec", netns] if netns else []),
        sys.executable,
        "-m",
        "exo_tools",
        "node",
        "--api-port",
        str(api_port),
        "--home",
        str(home),
        "--no-progress",
        *defaults,
        *args,
    ]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env or node_environment()
        )
    node = NodeProcess(
        process=process, api_port=api_port, home=home, log_path=log_path, host=host, netns=netns
    )
    if wait:
        try:
            node.wait_ready()
        except Exception:
            node.stop(signal.SIGKILL)
            raise
    return node


def start_cluster_nodes(count: int, *args: str, env: dict[str, str]) -> list[NodeProcess]:
    """`count` nodes of one cluster, the first of them the elected master.

    The election prefers the earliest cluster start, so the others are launched only once
    the first node's cluster layer answers (process start-up times vary on a busy CPU).
    """
    first = start_node(*args, env=env, wait=False)
    wait_for_cluster_layer(first)
    time.sleep(0.3)
    return [first] + [start_node(*args, env=env, wait=False) for _ in range(count - 1)]


def wait_for_cluster_layer(node: NodeProcess, timeout: float = 60.0) -> None:
    """Until the node's cluster layer answers (/v1/cluster), or `timeout` seconds; nodes
    started after that count as younger in the election."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{node.url}/v1/cluster", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
