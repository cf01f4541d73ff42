"""ClusterNode: the cluster side of one node daemon (gRPC server, discovery, membership)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import grpc.aio

from ..proto import node_pb2_grpc
from . import capabilities
from .auth import ClusterAuth, secret_fingerprint, secrets_from_text
from .config import ClusterConfig
from .data_plane import DataServer, DataServicerHook, open_data_channel
from .discovery import DiscoveredPeer, Discovery, advertised_addresses
from .membership import MESSAGE_SIZE_OPTIONS, Membership
from .service import AuthInterceptor, MembershipService
from .tls import ClusterTLS, bind_port
from .view import Capabilities, ClusterView, NodeInfo

log = logging.getLogger(__name__)

CAPABILITIES_REFRESH_S = 2.0
SECRET_POLL_S = 2.0  # how soon a rotated secret file takes effect

ServicerHook = Callable[[grpc.aio.Server], None]


class ClusterNode:
    """Lifecycle: construct, `add_servicer_hook(...)` (optional), `await start()`, ...,
    `await stop()`."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.auth = ClusterAuth(config.secrets, config.cluster_name)
        self.tls = (
            ClusterTLS(config.node_id, config.secrets, config.cluster_name) if config.tls else None
        )
        self._secrets = config.secrets
        self._secret_watch: asyncio.Task[None] | None = None
        self._secrets_error: str | None = None
        self.start_time = time.time()
        self._hooks: list[ServicerHook] = []
        self._server: grpc.aio.Server | None = None
        self._discovery: Discovery | None = None
        self._grpc_port = config.grpc_port
        self._capabilities = Capabilities()
        self._capabilities_at = 0.0
        self._broken_ring: tuple[int, str, str] = (0, "", "")
        self._addresses = advertised_addresses(config.interfaces)
        self.membership = Membership(
            auth=self.auth, self_info=self.self_info, cluster_name=config.cluster_name, tls=self.tls
        )
        self._data_server = DataServer(self.auth, self.membership.reject_log, self.tls)
        self._loop: asyncio.AbstractEventLoop | None = None
        # Why this node must stop (another node has its id); set once, with `fatal`.
        self.fatal_error: str | None = None
        self.fatal = asyncio.Event()

    # ------------------------------------------------------------------ integrator API
    def add_servicer_hook(self, hook: ServicerHook) -> None:
        """`hook(server)` runs before the server starts, e.g.
        `lambda s: node_pb2_grpc.add_WorkerServicer_to_server(worker, s)`. Every call to it is
        authenticated by the same interceptor; call peers through `channel(node_id)`."""
        if self._server is not None:
            raise RuntimeError("add_servicer_hook must be called before start()")
        self._hooks.append(hook)

    def add_data_servicer_hook(self, hook: DataServicerHook) -> None:
        """`hook(server)` adds a servicer to the data plane server (threads, not asyncio:
        `cluster/data_plane.py`), under the same authentication."""
        self._data_server.add_servicer_hook(hook)

    def data_channel(self, node_id: str) -> grpc.Channel | None:
        """A new channel to a healthy peer's data plane (None when it is not healthy)."""
        link = self.membership.healthy_links().get(node_id)
        if link is None or link.target is None or link.info is None or not link.info.data_port:
            return None
        host = link.target.rpartition(":")[0]
        return open_data_channel(f"{host}:{link.info.data_port}", self.tls)

    def sign_call(self, method: str) -> list[tuple[str, str]]:
        """The auth metadata for one call from this node (the data plane's pulls)."""
        return self.auth.sign_call(self.node_id, method)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def grpc_port(self) -> int:
        return self._grpc_port

    @property
    def master_id(self) -> str:
        return self.membership.master

    @property
    def is_master(self) -> bool:
        return self.master_id == self.node_id

    def master_api_url(self) -> str | None:
        """http://host:port of the master's API as reachable from here; None if self is master
        (or the master is not reachable right now)."""
        if self.is_master:
            return None
        found = self.membership.master_target()
        if found is None:
            return None
        _, link = found
        assert link.target is not None and link.info is not None
        host = link.target.rpartition(":")[0]
        return f"http://{host}:{link.info.api_port}"

    def channel(self, node_id: str) -> grpc.aio.Channel | None:
        """The persistent, authenticated channel to a healthy peer (None when not healthy)."""
        link = self.membership.healthy_links().get(node_id)
        return None if link is None else link.channel

    def snapshot(self) -> ClusterView:
        return self.membership.snapshot()

    def self_info(self) -> NodeInfo:
        now = time.monotonic()
        if now - self._capabilities_at > CAPABILITIES_REFRESH_S:
            self._capabilities = capabilities.probe()
            self._capabilities_at = now
        return NodeInfo(
            id=self.config.node_id,
            addresses=self._addresses,
            grpc_port=self._grpc_port,
            data_port=self._data_server.port,
            api_port=self.config.api_port,
            version=self.config.version,
            start_time=self.start_time,
            capabilities=self._capabilities,
            broken_epoch=self._broken_ring[0],
            broken_reason=self._broken_ring[1],
            broken_peer=self._broken_ring[2],
        )

    def report_broken_ring(self, epoch: int, reason: str, peer: str) -> None:
        """Tell every peer, with the next heartbeats, that placement `epoch` broke here, at
        a stream with `peer` ("" when unknown); the master re-places on it even when the
        broken hop was not one of its own."""
        self._broken_ring = (epoch, reason, peer)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # mlx import and sysctl are slow-ish; keep them off the event loop.
        await asyncio.to_thread(capabilities.mlx_device)
        await asyncio.to_thread(capabilities.chip_name)
        await asyncio.to_thread(capabilities.matmul_gflops)
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.auth, self.membership.reject_log)],
            options=MESSAGE_SIZE_OPTIONS,
        )
        node_pb2_grpc.add_MembershipServicer_to_server(
            MembershipService(self.membership, self.auth), server
        )
        for hook in self._hooks:
            hook(server)
        port = bind_port(server, self.config.grpc_host, self.config.grpc_port, self.tls, "gRPC")
        self._grpc_port = port
        await server.start()
        self._server = server
        await asyncio.to_thread(
            self._data_server.start, self.config.grpc_host, self.config.data_port
        )
        await self.membership.start(self.config.static_peers)
        if self.config.discovery:
            self._discovery = Discovery(
                node_id=self.node_id,
                cluster_name=self.config.cluster_name,
                grpc_port=port,
                api_port=self.config.api_port,
                version=self.config.version,
                interfaces=self.config.interfaces,
                on_found=self._on_found,
                on_gone=self._on_gone,
                id_file=self.config.node_id_file,
                start_time=self.start_time,
                on_duplicate=self._on_duplicate,
            )
            await self._discovery.start()
        if self.config.secret_file is not None:
            self._secret_watch = asyncio.create_task(
                self._watch_secret_file(self.config.secret_file), name="secret-watch"
            )
        log.info(
            "cluster node %s serving gRPC on %s:%d (cluster %r, %s, discovery %s, %d static peers)",
            self.node_id,
            self.config.grpc_host,
            port,
            self.config.cluster_name,
            "mutual TLS" if self.tls is not None else "UNENCRYPTED (--no-cluster-tls)",
            "on" if self.config.discovery else "off",
            len(self.config.static_peers),
        )

    async def stop(self) -> None:
        if self._secret_watch is not None:
            self._secret_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._secret_watch
            self._secret_watch = None
        if self._discovery is not None:
            await self._discovery.stop()
            self._discovery = None
        await self.membership.stop()
        await asyncio.to_thread(self._data_server.stop)
        if self._server is not None:
            await self._server.stop(grace=0.5)
            self._server = None

    async def _watch_secret_file(self, path: Path) -> None:
        """Applies a rotation: the file's secrets, once it changes, for every proof and
        every new TLS handshake from then on (running connections and streams go on)."""
        while True:
            await asyncio.sleep(SECRET_POLL_S)
            try:
                secrets = secrets_from_text(await asyncio.to_thread(path.read_text))
            except (OSError, ValueError) as error:
                if self._secrets_error != str(error):
                    self._secrets_error = str(error)
                    log.error("cannot read the cluster secret file %s: %s", path, error)
                continue
            self._secrets_error = None
            if secrets != self._secrets:
                self.use_secrets(secrets, f"file {path}")

    def use_secrets(self, secrets: list[bytes], where: str) -> None:
        """Prove, sign and present TLS certificates with `secrets` (this node's own first;
        the others accepted too)."""
        self.auth.set_secrets(secrets)
        if self.tls is not None:
            self.tls.trust(secrets)
        self._secrets = list(secrets)
        log.warning(
            "cluster secret changed (%s): now using secret %s%s",
            where,
            secret_fingerprint(secrets[0]),
            f", also accepting {', '.join(secret_fingerprint(s) for s in secrets[1:])}"
            if len(secrets) > 1
            else "; peers on any other secret are refused from now on",
        )

    # Zeroconf may call back from its own thread; hop onto our loop.
    def _on_found(self, peer: DiscoveredPeer) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                self.membership.on_discovered, peer.node_id, list(peer.addresses), peer.grpc_port
            )

    def _on_duplicate(self, message: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop_for, message)

    def _stop_for(self, message: str) -> None:
        if self.fatal_error is None:
            log.error("%s", message)
            self.fatal_error = message
            self.fatal.set()

    def _on_gone(self, node_id: str) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.membership.on_discovery_gone, node_id)
