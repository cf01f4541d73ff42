"""Server side: the Membership servicer and the interceptor that authenticates every call."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from ..proto import node_pb2, node_pb2_grpc
from .auth import METADATA_NODE, AuthError, ClusterAuth, RejectLog, new_nonce
from .membership import Membership
from .wire import info_from_proto, info_to_proto, parse_grpc_peer

# Admission calls carry their own proofs; everything else must be signed.
UNSIGNED_METHODS = frozenset({"/exo_tools.v1.Membership/Hello", "/exo_tools.v1.Membership/Admit"})
CHALLENGE_TTL_S = 10.0


def _shaped_like(
    handler: grpc.RpcMethodHandler, unary: Callable[..., Any], streaming: Callable[..., Any]
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler`, running `unary` for
    unary responses and `streaming` for streamed ones."""
    deserializer = handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, deserializer, serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, deserializer, serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, deserializer, serializer)
    return grpc.stream_stream_rpc_method_handler(streaming, deserializer, serializer)


def _denied_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that fails with UNAUTHENTICATED."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    return _shaped_like(handler, unary, streaming)


def _denied_sync_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """`_denied_handler` for the thread-served data plane server."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return _shaped_like(handler, refuse, refuse)


def _refusal(
    auth: ClusterAuth, reject_log: RejectLog, details: grpc.HandlerCallDetails
) -> str | None:
    """Why a call to this node is refused (None: signed by a cluster member)."""
    method = details.method
    if method in UNSIGNED_METHODS:
        return None
    metadata: Any = details.invocation_metadata
    try:
        auth.verify_call(method, [(entry[0], entry[1]) for entry in metadata or ()])
    except AuthError as error:
        claimed = next(
            (entry[1] for entry in metadata or () if entry[0] == METADATA_NODE), "unknown"
        )
        reject_log.refused(f"{claimed!s} (call {method})", str(error))
        return f"authentication failed: {error}"
    return None


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
        if handler is None:
            return handler
        refused = _refusal(self._auth, self._reject_log, handler_call_details)
        return handler if refused is None else _denied_handler(handler, refused)


class SyncAuthInterceptor(grpc.ServerInterceptor):
    """`AuthInterceptor` for the thread-served data plane server."""

    def __init__(self, auth: ClusterAuth, reject_log: RejectLog) -> None:
        self._auth = auth
        self._reject_log = reject_log

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return handler
        refused = _refusal(self._auth, self._reject_log, handler_call_details)
        return handler if refused is None else _denied_sync_handler(handler, refused)


class MembershipService(node_pb2_grpc.MembershipServicer):
    def __init__(self, membership: Membership, auth: ClusterAuth) -> None:
        self._membership = membership
        self._auth = auth

    async def Hello(
        self, request: node_pb2.HelloRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.HelloResponse:
        me = self._membership.self_info()
        now = time.monotonic()
        challenges = self._membership.challenges
        for stale in [n for n, c in challenges.items() if now - c[2] >= CHALLENGE_TTL_S]:
            del challenges[stale]
        if len(challenges) > 10_000:  # bound memory against a flood of Hellos
            challenges.clear()
        nonce = new_nonce()
        challenges[nonce] = (request.node_id, request.nonce, now)
        return node_pb2.HelloResponse(
            node_id=me.id,
            cluster_name=self._membership.cluster_name,
            nonce=nonce,
            proof=self._auth.hello_proof(request.nonce, nonce, request.node_id, me.id),
        )

    async def Admit(
        self, request: node_pb2.AdmitRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.AdmitResponse:
        me = self._membership.self_info()
        peer_host = parse_grpc_peer(context.peer())
        challenge = self._membership.challenges.pop(request.server_nonce, None)
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
            self._membership.reject_log.refused(
                f"{request.node_id}@{peer_host}", "could not prove the cluster secret"
            )
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "admission refused")
        info = info_from_proto(request.info)
        # Dial back: the address it called from is the one most likely reachable.
        targets = [f"{peer_host}:{info.grpc_port}"] if peer_host else []
        targets += [f"{address}:{info.grpc_port}" for address in info.addresses]
        self._membership.learn(request.node_id, targets)
        return node_pb2.AdmitResponse(
            info=info_to_proto(me, self._membership.cluster_name),
            peers=self._membership.peer_entries(),
        )

    async def Heartbeat(
        self, request: node_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> node_pb2.HeartbeatResponse:
        me = self._membership.self_info()
        peer_host = parse_grpc_peer(context.peer())
        sender = request.info
        if peer_host and sender.node_id:
            # After a partition heals this re-creates our side quickly too.
            self._membership.learn(sender.node_id, [f"{peer_host}:{sender.grpc_port}"])
        for entry in request.peers:
            self._membership.learn(entry.node_id, [entry.grpc_target])
        return node_pb2.HeartbeatResponse(
            info=info_to_proto(me, self._membership.cluster_name),
            peers=self._membership.peer_entries(),
            proof=self._auth.heartbeat_response_proof(request.nonce, me.id),
        )
