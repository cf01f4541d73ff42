"""Who is in the cluster: admission, heartbeats, liveness, gossip, election.

One `PeerLink` per way of reaching a peer (a static --peer address, a zeroconf record, or an
address learned from an inbound call or another node's view). Each link runs its own loop:
admit via Hello/Admit, then heartbeat every HEARTBEAT_INTERVAL_S with a deadline; after
`Liveness` declares it dead the link goes back to admitting, so a returning peer is re-admitted
without restarts. A node's health is the best of its links.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from ..proto import node_pb2, node_pb2_grpc
from .auth import AuthError, ClusterAuth, RejectLog, new_nonce
from .capabilities import Ewma
from .discovery import duplicate_id_message
from .election import Candidate, Liveness, elect
from .tls import CHANNEL_TLS_OPTIONS, ClusterTLS, is_handshake_failure
from .view import ClusterView, LinkInfo, NodeInfo
from .wire import info_from_proto, info_to_proto

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_TIMEOUT_S = 0.8
ADMIT_TIMEOUT_S = 1.0
RETRY_INTERVAL_S = 0.5
REFUSED_RETRY_S = 3.0  # after a peer failed to prove the secret: no need to hammer it
LEARNED_GIVE_UP_S = 60.0  # learned addresses that never answer are dropped (re-learned if alive)

# Fast reconnects: gRPC's default backoff (1 s growing to 120 s) would delay re-admission.
# A prefill chunk's hidden states (2048 tokens x hidden size x 4 bytes) outgrow gRPC's 4 MB
# default for any model; one limit serves client channels and the server.
MAX_MESSAGE_BYTES = 1 << 30
MESSAGE_SIZE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    *MESSAGE_SIZE_OPTIONS,
    *RECONNECT_OPTIONS,
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 3_000),
]


class _ClientDetails(grpc.aio.ClientCallDetails):
    pass


class _Signer:
    """Adds the per-call auth metadata to a call made on a peer channel."""

    def __init__(self, auth: ClusterAuth, node_id: str) -> None:
        self._auth = auth
        self._node_id = node_id

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        raw = details.method
        method = raw.decode() if isinstance(raw, bytes) else str(raw)
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self._auth.sign_call(self._node_id, method):
            metadata.add(key, value)
        return _ClientDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# grpc.aio files an interceptor under the first call kind it implements only, so one
# class per kind: otherwise streaming calls would go out unsigned and be refused.
class _UnaryUnarySigner(_Signer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[override]
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamSigner(_Signer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[override]
        return await continuation(self._details(client_call_details), request)


class _StreamUnarySigner(_Signer, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[override]
        return await continuation(self._details(client_call_details), request_iterator)


class _StreamStreamSigner(_Signer, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[override]
        return await continuation(self._details(client_call_details), request_iterator)


def signing_interceptors(auth: ClusterAuth, node_id: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that sign every call, of every kind, made on a peer channel."""
    kinds = (_UnaryUnarySigner, _UnaryStreamSigner, _StreamUnarySigner, _StreamStreamSigner)
    return [kind(auth, node_id) for kind in kinds]


@dataclass
class PeerLink:
    key: str
    origin: str  # "static", "discovered" or "learned"
    targets: list[str]  # candidate "host:port", tried in order while admitting
    expected_id: str | None = None
    node_id: str | None = None
    info: NodeInfo | None = None
    admitted: bool = False
    target: str | None = None  # the target in use once admitted
    liveness: Liveness = field(default_factory=Liveness)
    rtt: Ewma = field(default_factory=Ewma)
    peers: list[node_pb2.PeerEntry] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    channel: grpc.aio.Channel | None = None
    channel_target: str | None = None
    channel_generation: int = 0  # the TLS generation the channel was opened with
    # Channels replaced after a secret rotation: streams opened on them (a placement's
    # pipeline) run on until they end; closed with the link.
    retired: list[grpc.aio.Channel] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    def healthy(self, now: float) -> bool:
        return self.admitted and not self.liveness.is_dead(now)


class Membership:
    def __init__(
        self,
        *,
        auth: ClusterAuth,
        self_info: Callable[[], NodeInfo],
        cluster_name: str,
        tls: ClusterTLS | None = None,
    ) -> None:
        self.auth = auth
        self.tls = tls
        self.self_info = self_info
        self.cluster_name = cluster_name
        self.links: dict[str, PeerLink] = {}
        self.reject_log = RejectLog()
        # The Hello challenges this node's service issued: server nonce -> (client id,
        # client nonce, issued at); single use, short-lived. Also tells a Hello answered by
        # this very process from one answered by another node using the same id.
        self.challenges: dict[bytes, tuple[str, bytes, float]] = {}
        self.duplicate_of: str | None = None  # a peer target found using our own id
        self._running = False
        self._interceptors: list[grpc.aio.ClientInterceptor] = []
        self._monitor: asyncio.Task[None] | None = None
        self._master: str = ""
        self._background_tasks: set[asyncio.Future[None]] = set()

    @property
    def node_id(self) -> str:
        return self.self_info().id

    def _background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, static_peers: list[str]) -> None:
        self._running = True
        self._interceptors = signing_interceptors(self.auth, self.node_id)
        for target in static_peers:
            self._add_link(PeerLink(key=f"static:{target}", origin="static", targets=[target]))
        self._master = self.compute_master()
        self._monitor = asyncio.create_task(self._monitor_loop(), name="cluster-monitor")

    async def stop(self) -> None:
        self._running = False
        tasks = [link.task for link in self.links.values() if link.task is not None]
        if self._monitor is not None:
            tasks.append(self._monitor)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in list(self.links.values()):
            await self._close_channel(link)
        self.links.clear()

    # ------------------------------------------------------------------ learning peers
    def on_discovered(self, node_id: str, addresses: list[str], grpc_port: int) -> None:
        targets = [f"{address}:{grpc_port}" for address in addresses]
        link = self.links.get(node_id)
        if link is not None:
            # A re-registered node may have moved ports; new targets first, keep old as fallback.
            link.targets = targets + [target for target in link.targets if target not in targets]
            return
        if self._known(node_id):
            return
        self._add_link(
            PeerLink(key=node_id, origin="discovered", targets=targets, expected_id=node_id)
        )

    def on_discovery_gone(self, node_id: str) -> None:
        # A goodbye means a clean stop: drop it now rather than after heartbeat failures.
        link = self.links.get(node_id)
        if link is not None and link.origin == "discovered":
            log.info("peer %s left (mDNS goodbye)", node_id)
            self._remove_link(link)

    def learn(self, node_id: str, targets: list[str]) -> None:
        """A peer seen in an inbound call or in another node's view."""
        if not self._running or node_id == self.node_id or self._known(node_id):
            return
        targets = list(dict.fromkeys(target for target in targets if target))
        if targets:
            self._add_link(
                PeerLink(key=node_id, origin="learned", targets=targets, expected_id=node_id)
            )

    def _known(self, node_id: str) -> bool:
        return any(node_id in (link.node_id, link.expected_id) for link in self.links.values())

    def _add_link(self, link: PeerLink) -> None:
        self.links[link.key] = link
        link.task = asyncio.create_task(self._link_loop(link), name=f"peer-{link.key}")

    def _remove_link(self, link: PeerLink) -> None:
        self.links.pop(link.key, None)
        if link.task is not None and link.task is not asyncio.current_task():
            link.task.cancel()
        self._background(self._close_channel(link))

    # ------------------------------------------------------------------ per-link loop
    def _stub(self, link: PeerLink, target: str) -> node_pb2_grpc.MembershipStub:
        generation = self.tls.generation if self.tls is not None else 0
        if link.channel is not None and link.channel_generation != generation:
            # New secrets: new handshakes must present the new certificate.
            link.retired.append(link.channel)
            while len(link.retired) > 2:
                self._background(link.retired.pop(0).close(grace=5.0))
            link.channel = None
        if link.channel is None or link.channel_target != target:
            if link.channel is not None:
                self._background(link.channel.close())
            link.channel = self._open_channel(target)
            link.channel_target = target
            link.channel_generation = generation
        return node_pb2_grpc.MembershipStub(link.channel)

    def _open_channel(self, target: str) -> grpc.aio.Channel:
        if self.tls is None:
            return grpc.aio.insecure_channel(
                target, options=CHANNEL_OPTIONS, interceptors=self._interceptors
            )
        return grpc.aio.secure_channel(
            target,
            self.tls.channel_credentials(),
            options=[*CHANNEL_OPTIONS, *CHANNEL_TLS_OPTIONS],
            interceptors=self._interceptors,
        )

    async def _close_channel(self, link: PeerLink) -> None:
        retired, link.retired = link.retired, []
        for channel in retired:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)
        if link.channel is not None:
            channel, link.channel = link.channel, None
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    async def _link_loop(self, link: PeerLink) -> None:
        while self._running:
            if not link.admitted:
                delay = await self._admit(link)
                if delay is None:
                    return  # link is pointless (self, or duplicate of a learned one)
                if not link.admitted:
                    if (
                        link.origin == "learned"
                        and link.liveness.last_ok is None
                        and time.monotonic() - link.created > LEARNED_GIVE_UP_S
                    ):
                        self._remove_link(link)
                        return
                    await asyncio.sleep(delay)
                    continue
            started = time.monotonic()
            await self._heartbeat(link)
            await asyncio.sleep(max(0.0, HEARTBEAT_INTERVAL_S - (time.monotonic() - started)))

    async def _admit(self, link: PeerLink) -> float | None:
        """Try each target once. Returns the delay before the next try (None: give up link)."""
        delay = RETRY_INTERVAL_S
        for target in list(link.targets):
            stub = self._stub(link, target)
            me = self.self_info()
            client_nonce = new_nonce()
            try:
                hello = await stub.Hello(
                    node_pb2.HelloRequest(
                        node_id=me.id, cluster_name=self.cluster_name, nonce=client_nonce
                    ),
                    timeout=ADMIT_TIMEOUT_S,
                )
                if hello.node_id == me.id:
                    if hello.nonce not in self.challenges:
                        # Answered by another process: a node started from a copy of our
                        # home. Never admit it: two nodes would count as one member.
                        self.duplicate_of = target
                        log.error("%s", duplicate_id_message(me.id, target, None))
                    else:
                        log.debug("%s is this node itself; dropping", target)
                    self._remove_link(link)
                    return None
                if link.expected_id is not None and hello.node_id != link.expected_id:
                    # e.g. an advertised loopback address that reaches another local node
                    log.debug("%s is %s, not %s", target, hello.node_id, link.expected_id)
                    continue
                if hello.cluster_name != self.cluster_name:
                    self.reject_log.refused(target, f"other cluster {hello.cluster_name!r}")
                    delay = REFUSED_RETRY_S
                    continue
                expected = self.auth.hello_proof(client_nonce, hello.nonce, me.id, hello.node_id)
                if not self.auth.check(expected, hello.proof):
                    self.reject_log.refused(
                        f"{hello.node_id}@{target}", "could not prove the cluster secret"
                    )
                    delay = REFUSED_RETRY_S
                    continue
                proof = self.auth.admit_proof(client_nonce, hello.nonce, me.id, hello.node_id)
                response = await stub.Admit(
                    node_pb2.AdmitRequest(
                        node_id=me.id,
                        client_nonce=client_nonce,
                        server_nonce=hello.nonce,
                        proof=proof,
                        info=info_to_proto(me, self.cluster_name),
                    ),
                    timeout=ADMIT_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                ):
                    self.reject_log.refused(target, f"it refused us: {error.details()}")
                    delay = REFUSED_RETRY_S
                elif self.tls is not None and is_handshake_failure(error.details()):
                    # Its certificate is not from our secret, or ours not from its.
                    self.reject_log.refused(
                        f"{link.expected_id or 'node'}@{target}",
                        "TLS handshake failed: it could not prove the cluster secret (a "
                        "different --secret-file or cluster name, or --no-cluster-tls on one "
                        f"side): {error.details()}",
                    )
                    delay = REFUSED_RETRY_S
                else:
                    log.debug("admit %s failed: %s", target, error.code())
                continue
            now = time.monotonic()
            link.node_id = hello.node_id
            link.info = info_from_proto(response.info)
            link.target = target
            link.admitted = True
            link.liveness.success(now)
            link.peers = list(response.peers)
            self.reject_log.forgive(target)
            self.reject_log.forgive(f"{hello.node_id}@{target}")
            log.info("admitted %s at %s", hello.node_id, target)
            self._learn_from(link.peers)
            self._check_master()
            return delay
        return delay

    async def _heartbeat(self, link: PeerLink) -> None:
        assert link.target is not None
        stub = self._stub(link, link.target)
        nonce = new_nonce()
        me = self.self_info()
        sent = time.monotonic()
        try:
            response = await stub.Heartbeat(
                node_pb2.HeartbeatRequest(
                    info=info_to_proto(me, self.cluster_name),
                    peers=self.peer_entries(),
                    nonce=nonce,
                ),
                timeout=HEARTBEAT_TIMEOUT_S,
            )
            expected = self.auth.heartbeat_response_proof(nonce, link.node_id or "")
            proven = self.auth.check(expected, response.proof)
            if response.info.node_id != link.node_id or not proven:
                raise AuthError(f"bad heartbeat response from {link.target}")
        except (grpc.aio.AioRpcError, AuthError) as error:
            now = time.monotonic()
            if link.liveness.failure(now):
                link.admitted = False
                log.warning(
                    "peer %s at %s removed: %d missed heartbeats, last ok %.1fs ago (%s)",
                    link.node_id,
                    link.target,
                    link.liveness.strikes,
                    now - (link.liveness.last_ok or now),
                    error.code() if isinstance(error, grpc.aio.AioRpcError) else error,
                )
                link.liveness.reset()
                self._check_master()
            return
        now = time.monotonic()
        link.liveness.success(now)
        link.rtt.add((now - sent) * 1000.0)
        link.info = info_from_proto(response.info)
        link.peers = list(response.peers)
        self._learn_from(link.peers)

    def _learn_from(self, peers: list[node_pb2.PeerEntry]) -> None:
        for entry in peers:
            self.learn(entry.node_id, [entry.grpc_target])

    # ------------------------------------------------------------------ view
    def healthy_links(self) -> dict[str, PeerLink]:
        """Best healthy link per node id (most recent success)."""
        now = time.monotonic()
        best: dict[str, PeerLink] = {}
        for link in self.links.values():
            if link.node_id is None or link.info is None or not link.healthy(now):
                continue
            current = best.get(link.node_id)
            if current is None or (link.liveness.last_ok or 0) > (current.liveness.last_ok or 0):
                best[link.node_id] = link
        best.pop(self.node_id, None)
        return best

    def peer_entries(self) -> list[node_pb2.PeerEntry]:
        return [
            node_pb2.PeerEntry(
                node_id=node_id, grpc_target=link.target or "", latency_ms=link.rtt.value or 0.0
            )
            for node_id, link in self.healthy_links().items()
        ]

    def compute_master(self) -> str:
        me = self.self_info()
        candidates = [Candidate(me.id, me.start_time)]
        for node_id, link in self.healthy_links().items():
            assert link.info is not None
            candidates.append(Candidate(node_id, link.info.start_time))
        return elect(candidates)

    @property
    def master(self) -> str:
        # Recomputed on read so callers never see a master older than the liveness state.
        self._check_master()
        return self._master

    def _check_master(self) -> None:
        new = self.compute_master()
        if new != self._master:
            old, self._master = self._master, new
            log.info("master is now %s (was %s)", new, old or "none")

    async def _monitor_loop(self) -> None:
        # Notices deaths between heartbeats (is_dead depends on time), so a master change is
        # logged when it happens rather than at the next read.
        while self._running:
            self._check_master()
            await asyncio.sleep(0.1)

    def snapshot(self) -> ClusterView:
        me = self.self_info()
        healthy = self.healthy_links()
        nodes = [me.model_copy(update={"healthy": True})]
        links: list[LinkInfo] = []
        for node_id in sorted(healthy):
            link = healthy[node_id]
            assert link.info is not None
            nodes.append(link.info.model_copy(update={"healthy": True}))
            if link.rtt.value is not None:
                links.append(
                    LinkInfo(source=me.id, target=node_id, latency_ms=round(link.rtt.value, 3))
                )
            # The peer's own measurements complete the picture (links between other nodes).
            for entry in link.peers:
                if entry.node_id in healthy or entry.node_id == me.id:
                    links.append(
                        LinkInfo(
                            source=node_id,
                            target=entry.node_id,
                            latency_ms=round(entry.latency_ms, 3),
                        )
                    )
        return ClusterView(
            self_id=me.id,
            cluster=self.cluster_name,
            master=self.master,
            nodes=nodes,
            links=links,
        )

    def master_target(self) -> tuple[str, PeerLink] | None:
        master = self.master
        link = self.healthy_links().get(master)
        if link is None or link.target is None:
            return None
        return master, link
