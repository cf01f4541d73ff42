"""Server side: the Membership servicer and the interceptor that authenticates every call."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from exo_tools.cluster.auth import AuthError, ClusterAuth, RejectLog, new_nonce
from exo_tools.cluster.convert import info_from_proto, info_to_proto, parse_grpc_peer
from exo_tools.cluster.membership import Membership
from exo_tools.proto import node_pb2, node_pb2_grpc

logger = logging.getLogger(__name__)

# Admission calls carry their own proofs; everything else must be signed.
UNSIGNED_METHODS = frozenset({"/exo_tools.v1.Membership/Hello", "/exo_tools.v1.Membership/Admit"})
CHALLENGE_TTL_S = 10.0


def _denied_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    des = handler.request_deserializer
    ser = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, des, ser)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: ClusterAuth, reject_log: RejectLog) -> None:
        self._auth = auth
        self._reject_log = reject_log

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in UNSIGNED_METHODS:
            return handler
        md: Any = handler_call_details.invocation_metadata
        try:
            self._auth.verify_call(method, [(m[0], m[1]) for m in md or ()])
        except AuthError as e:
            claimed = next((m[1] for m in md or () if m[0] == "x-exo-node"), "unknown")
            self._reject_log.refused(f"{claimed!s} (call {method})", str(e))
            return _denied_handler(handler, f"authentication failed: {e}")
        return handler


class MembershipService(node_pb2_grpc.MembershipServicer):
    def __init__(self, membership: Membership, auth: ClusterAuth) -> None:
        self._m = membership
        self._auth = auth
        # server nonce -> (client id, client nonce, issued at); single use, short-lived
        self._challenges: dict[bytes, tuple[str, bytes, float]] = {}

    async def Hello(
        self, request: node_pb2.HelloRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.HelloResponse:
        me = self._m.self_info()
        now = time.monotonic()
        self._challenges = {
            k: v for k, v in self._challenges.items() if now - v[2] < CHALLENGE_TTL_S
        }
        if len(self._challenges) > 10_000:  # bound memory against a flood of Hellos
            self._challenges.clear()
        nonce = new_nonce()
        self._challenges[nonce] = (request.node_id, request.nonce, now)
        return node_pb2.HelloResponse(
            node_id=me.id,
            cluster_name=self._m.cluster_name,
            nonce=nonce,
            proof=self._auth.hello_proof(request.nonce, nonce, request.node_id, me.id),
        )

    async def Admit(
        self, request: node_pb2.AdmitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.AdmitResponse:
        me = self._m.self_info()
        peer_host = parse_grpc_peer(context.peer())
        challenge = self._challenges.pop(request.server_nonce, None)
        ok = (
            challenge is not None
            and challenge[0] == request.node_id
            and challenge[1] == request.client_nonce
            and time.monotonic() - challenge[2] < CHALLENGE_TTL_S
            and self._auth.check(
                self._auth.admit_proof(
                    request.client_nonce, request.server_nonce, request.node_id, me.id
                ),
                request.proof,
            )
        )
        if not ok:
            self._m.reject_log.refused(
                f"{request.node_id}@{peer_host}", "could not prove the cluster secret"
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "admission refused")
        info = info_from_proto(request.info)
        # Dial back: the address it called from is the one most likely reachable.
        targets = [f"{peer_host}:{info.grpc_port}"] if peer_host else []
        targets += [f"{a}:{info.grpc_port}" for a in info.addresses]
        self._m.learn(request.node_id, targets)
        return node_pb2.AdmitResponse(
            info=info_to_proto(me, self._m.cluster_name), peers=self._m.peer_entries()
        )

    async def Heartbeat(
        self, request: node_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.HeartbeatResponse:
        me = self._m.self_info()
        peer_host = parse_grpc_peer(context.peer())
        sender = request.info
        if peer_host and sender.node_id:
            # After a partition heals this re-creates our side quickly too.
            self._m.learn(sender.node_id, [f"{peer_host}:{sender.grpc_port}"])
        for entry in request.peers:
            self._m.learn(entry.node_id, [entry.grpc_target])
        return node_pb2.HeartbeatResponse(
            info=info_to_proto(me, self._m.cluster_name),
            peers=self._m.peer_entries(),
            proof=self._auth.heartbeat_response_proof(request.nonce, me.id),
        )

    async def GetView(
        self, request: node_pb2.GetViewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.ClusterView:
        view = self._m.snapshot()
        return node_pb2.ClusterView(
            self_id=view.self_id,
            master=view.master,
            nodes=[
                node_pb2.ViewNode(info=info_to_proto(n, view.cluster), healthy=n.healthy)
                for n in view.nodes
            ],
            links=[
                node_pb2.Link(source=lk.source, target=lk.target, latency_ms=lk.latency_ms)
                for lk in view.links
            ],
        )
