"""Persistent gRPC streams from this node to another: what every pipeline hop, tensor
command and all-reduce partial travels on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from ..proto import node_pb2_grpc

log = logging.getLogger(__name__)

ChannelFor = Callable[[str], "grpc.aio.Channel | None"]
BrokenListener = Callable[[str], None]


class StreamSender:
    """A persistent stream to another node: the next pipeline stage (the last stage's: to
    stage 0), a tensor member's commands, or a tensor member's all-reduce partials.

    `send` may be called from any thread; messages go out in order on one gRPC call of the
    Worker `method` ("Activations" or "AllReduce"). When the stream breaks, `on_broken`
    hears why, once, and later messages are dropped."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel_for: ChannelFor,
        target_id: str,
        on_broken: BrokenListener,
        method: str = "Activations",
        encrypted: bool = False,
    ) -> None:
        self._method = method
        self._encrypted = encrypted
        self._loop = loop
        self._channel_for = channel_for
        self.target_id = target_id
        self._on_broken = on_broken
        # Messages waiting for the writer. `_idle` (under `_lock`) says the writer has found
        # the deque empty and waits for `_ready`: only then does `send` wake the event loop,
        # so a burst (prefill chunks, many requests) costs one wakeup, not one per message.
        self._pending: deque[Any] = deque()
        self._lock = threading.Lock()
        self._idle = True
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._broken = False

    def send(self, message: Any) -> None:
        if self._broken or self._closing:
            return
        with self._lock:
            self._pending.append(message)
            if not self._idle:
                return  # the writer is draining and will pick this up
            self._idle = False
        with contextlib.suppress(RuntimeError):  # the loop is gone at shutdown
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._task is None and not self._broken and not self._closing:
            self._task = self._loop.create_task(self._run(), name=f"stream-{self.target_id}")
        self._ready.set()

    async def _requests(self) -> AsyncIterator[Any]:
        """The call's request stream: everything queued, in order, then wait for more.

        gRPC consumes it in its own task and writes each message as soon as the previous
        write completed; handing the call an iterator, rather than `await call.write()` per
        message, skips the interceptor's per-write queue and task (peer channels sign calls).
        """
        while not self._broken:
            with self._lock:
                message = self._pending.popleft() if self._pending else None
                if message is None:
                    self._idle = True
            if message is None:
                await self._ready.wait()
                self._ready.clear()
            elif message is _END_OF_STREAM:
                return
            else:
                yield message

    def _broke(self, reason: str) -> None:
        if self._broken or self._closing:
            return
        self._broken = True
        self._ready.set()  # lets the request stream end
        kind = "all-reduce" if self._method == "AllReduce" else "pipeline"
        if self._encrypted and any(marker in reason for marker in _CUT_MARKERS):
            reason += f"; {CUT_UNDER_TLS}"
        log.warning("%s stream to %s broke: %s", kind, self.target_id, reason)
        self._on_broken(f"the {kind} stream to node {self.target_id} broke: {reason}")

    async def _run(self) -> None:
        channel = self._channel_for(self.target_id)
        if channel is None:
            self._broke("the node is not a healthy member")
            return
        # Peer channels sign every call (cluster.membership.signing_interceptors).
        call: Any = getattr(node_pb2_grpc.WorkerStub(channel), self._method)(self._requests())
        try:
            # The peer answers nothing; the response side ends when the stream does, so a
            # dead peer or a refused epoch shows up here (a failed write ends the call too).
            async for _ in call:
                pass
            code = await call.code()
            if code != grpc.StatusCode.OK:
                self._broke(f"{code.name}: {await call.details()}")
        except asyncio.CancelledError:
            call.cancel()
            raise
        except Exception as error:
            self._broke(_describe(error))

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            with self._lock:
                self._pending.append(_END_OF_STREAM)  # after what is queued: it still goes
                self._idle = False
            self._ready.set()
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=1.0)
            except (TimeoutError, asyncio.CancelledError, Exception):
                self._task.cancel()


_END_OF_STREAM = object()

# Under TLS a record altered in flight fails its integrity check at the receiver, which
# drops the connection; all the sender can see is the cut, so the message names both causes.
_CUT_MARKERS = ("Socket closed", "Stream removed", "Connection reset", "Broken pipe")
CUT_UNDER_TLS = (
    "the connection was cut mid-stream: the node or the network failed, or the node refused "
    "bytes that failed the TLS integrity check (altered in flight); nothing it received "
    "after that was used"
)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return f"{type(error).__name__}: {error}"
