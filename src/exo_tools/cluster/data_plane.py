"""The data plane's transport: a gRPC server served by threads beside the asyncio control
server, and the channels its streams are pulled on.

A placed model's messages (activations, sampled tokens, all-reduce partials) are the hot
path: each costs a decode step's latency per hop. The control server is asyncio, where a
message crosses the event loop (and grpc.aio's per-call tasks) on both sides; here the
receiving node opens a server stream to the sender and reads it on a thread of its own
(`SingleThreadedUnaryStream`: the reading thread polls the call itself, no channel thread
hands it over), and the sender's handler thread writes each message as its MLX thread
queues it. Same host, same mutual TLS and the same signed calls as the control server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent import futures

import grpc
import grpc.experimental

from .auth import ClusterAuth, RejectLog
from .membership import MESSAGE_SIZE_OPTIONS, RECONNECT_OPTIONS
from .service import SyncAuthInterceptor
from .tls import CHANNEL_TLS_OPTIONS, ClusterTLS, bind_port

log = logging.getLogger(__name__)

DataServicerHook = Callable[[grpc.Server], None]

# Every open stream holds a handler thread for its life: a tensor member of 8 serves 7
# partial streams and (rank 0) 7 command streams; replaced placements' streams end.
MAX_STREAM_THREADS = 64

# A stream's path can die without a close: a peer frozen, a cable pulled, TCP stuck in
# retransmissions under loss. Both ends ping every KEEPALIVE_S and drop the connection when
# a ping goes unanswered for KEEPALIVE_TIMEOUT_S, which breaks the stream (and the master
# re-places). gRPC's defaults defeat that three ways: a client sends at most two pings
# without sending data (a reader sends none after its pull); a server answers pings it
# finds too frequent with GOAWAY; an unanswered ping fails the connection only after a
# minute (`ping_timeout_ms`, which this gRPC applies, not `keepalive_timeout_ms`).
KEEPALIVE_S = 5.0
KEEPALIVE_TIMEOUT_S = 3.0


def _keepalive_options() -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", int(KEEPALIVE_S * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.max_ping_strikes", 0),
    ]


def data_channel_options() -> list[tuple[str, int]]:
    """A data channel's options: the control channel's, with the data plane's keepalive."""
    return [
        *MESSAGE_SIZE_OPTIONS,
        *RECONNECT_OPTIONS,
        *_keepalive_options(),
        (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
    ]


class DataServer:
    """This node's data plane server (`DataPlane` service, added by a hook)."""

    def __init__(self, auth: ClusterAuth, reject_log: RejectLog, tls: ClusterTLS | None) -> None:
        self._auth = auth
        self._reject_log = reject_log
        self._tls = tls
        self._hooks: list[DataServicerHook] = []
        self._server: grpc.Server | None = None
        self.port = 0

    def add_servicer_hook(self, hook: DataServicerHook) -> None:
        if self._server is not None:
            raise RuntimeError("add_servicer_hook must be called before start()")
        self._hooks.append(hook)

    def start(self, host: str, port: int) -> int:
        """Bind and serve; the port bound (OSError when it cannot bind)."""
        server = grpc.server(
            futures.ThreadPoolExecutor(MAX_STREAM_THREADS, thread_name_prefix="data-plane"),
            interceptors=[SyncAuthInterceptor(self._auth, self._reject_log)],
            options=[*MESSAGE_SIZE_OPTIONS, *_keepalive_options()],
        )
        for hook in self._hooks:
            hook(server)
        bound = bind_port(server, host, port, self._tls, "the data plane (--data-port)")
        server.start()
        self._server, self.port = server, bound
        return bound

    def stop(self, grace: float = 0.5) -> None:
        """Stop serving (blocks for up to `grace` seconds; call off the event loop)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace).wait(grace + 1.0)


def open_data_channel(target: str, tls: ClusterTLS | None) -> grpc.Channel:
    """A channel for one pulled stream (the option that lets its reader poll the call itself
    is per channel, so each stream has its own)."""
    if tls is None:
        return grpc.insecure_channel(target, options=data_channel_options())
    return grpc.secure_channel(
        target,
        tls.channel_credentials(),
        options=[*data_channel_options(), *CHANNEL_TLS_OPTIONS],
    )
