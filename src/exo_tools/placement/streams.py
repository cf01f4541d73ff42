"""Persistent data plane streams between nodes: what every pipeline hop, tensor command and
all-reduce partial travels on.

The receiver pulls. At install, each node opens a server stream to every node that sends
to it (`StreamReader`: its previous stage; a tensor member's rank 0 and every other
member) on that node's data plane server (`cluster/data_plane.py`), and reads it on a
thread of its own that hands each message straight to the engine. The sender's MLX thread
queues its messages in an `Outbox`, which the gRPC handler thread serving the receiver's
call writes out as they come. No event loop is on the path, on either side: a hop is one
handoff on each side (MLX thread to handler thread, reader thread to MLX thread) plus
the network (`benchmarks/transport_latency.py` measures the floor).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..proto import node_pb2, node_pb2_grpc

log = logging.getLogger(__name__)

ACTIVATIONS = "Activations"  # pipeline activations and tokens; a tensor root's commands
ALL_REDUCE = "AllReduce"  # tensor all-reduce partials
_KIND = {ACTIVATIONS: "pipeline", ALL_REDUCE: "all-reduce"}
METHOD_PATHS = {method: f"/exo_tools.v1.DataPlane/{method}" for method in _KIND}

# A receiver opens its streams when it installs its stage, before the master lets any
# request run there; one that has not this long after the first message never will.
ATTACH_TIMEOUT_S = 5.0
# How long a reader keeps trying to connect (a fresh connection per stream: a handshake can
# fail while a node is busy installing its stage; gRPC retries it with backoff).
CONNECT_TIMEOUT_S = 10.0

# Told why a stream broke and the node at its other end ("" when none is to blame), once;
# called on whatever thread saw it.
BrokenListener = Callable[[str, str], None]
# The receiving side's check of one message: why it refuses it (None: delivered).
Accept = Callable[[Any], "str | None"]
DataChannelFor = Callable[[str], "grpc.Channel | None"]
SignCall = Callable[[str], list[tuple[str, str]]]

_END = object()

# Under TLS a record altered in flight fails its integrity check at the receiver, which
# drops the connection; all the sender can see is the cut, so the message names both causes.
_CUT_MARKERS = ("Socket closed", "Stream removed", "Connection reset", "Broken pipe")
CUT_UNDER_TLS = (
    "the connection was cut mid-stream: the node or the network failed, or the node refused "
    "bytes that failed the TLS integrity check (altered in flight); nothing it received "
    "after that was used"
)


class Outbox:
    """What this node sends one receiver on one stream of one placement: `send` queues
    (from any thread), the receiver's pull (`serve`, on a data plane handler thread) writes.

    When the receiver's call ends before the outbox was closed, or it never opens it, the
    stream is broken: `on_broken` hears why, once, and later messages are dropped."""

    def __init__(self, receiver_id: str, method: str, epoch: int, encrypted: bool) -> None:
        self.receiver_id = receiver_id
        self.method = method
        self.epoch = epoch
        self._encrypted = encrypted
        self.on_broken: BrokenListener | None = None  # the sending stage's, once installed
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._attached = False
        self._ended = False  # closed or broken: nothing more goes out
        self._closed = False
        self._timer: threading.Timer | None = None

    def send(self, message: Any) -> None:
        if self._ended:
            return
        self._queue.put(message)
        if self._attached or self._timer is not None:
            return
        with self._lock:
            if self._attached or self._timer is not None:
                return
            self._timer = threading.Timer(ATTACH_TIMEOUT_S, self._unattached)
            self._timer.daemon = True
            self._timer.start()

    def _unattached(self) -> None:
        if not self._attached:
            self._broke(f"it did not open the stream within {ATTACH_TIMEOUT_S:.0f} s")

    def serve(self, context: grpc.ServicerContext) -> Iterator[Any]:
        """The receiver's call: everything queued, in order, then what comes, until the
        outbox is closed (the stream ends OK) or the call ends."""
        with self._lock:
            refused = "already open" if self._attached else "ended" if self._ended else None
            self._attached = True
        if refused is not None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the {_KIND[self.method]} stream of epoch {self.epoch} to node "
                f"{self.receiver_id} is {refused}",
            )
        # Runs when the call ends for any reason; it frees this thread from its wait.
        context.add_callback(self._call_ended)
        while (message := self._queue.get()) is not _END:
            yield message

    def _call_ended(self) -> None:
        self._queue.put(_END)
        if not self._closed:
            # All a sender sees of a dead node, a cut link or a refused TLS record.
            reason = "the call ended before the placement did"
            self._broke(f"{reason}; {CUT_UNDER_TLS}" if self._encrypted else reason)

    def close(self) -> None:
        """The placement is over: what is queued still goes, then the stream ends."""
        with self._lock:
            self._closed = self._ended = True
            if self._timer is not None:
                self._timer.cancel()
        self._queue.put(_END)

    def _broke(self, reason: str) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
            if self._timer is not None:
                self._timer.cancel()
        self._queue.put(_END)
        kind = _KIND[self.method]
        log.warning("%s stream to %s broke: %s", kind, self.receiver_id, reason)
        if self.on_broken is not None:
            self.on_broken(
                f"the {kind} stream to node {self.receiver_id} broke: {reason}", self.receiver_id
            )


class Outboxes:
    """Every outbox this node serves, by (receiver, method, epoch). A pull may come before
    this node has installed that placement (the receiver was faster): it waits in the
    outbox the sender will then fill. Pulls of replaced placements are refused."""

    def __init__(self, encrypted: bool) -> None:
        self._encrypted = encrypted
        self._lock = threading.Lock()
        self._boxes: dict[tuple[str, str, int], Outbox] = {}
        self._current = 0  # the placement this node is installing or holds
        self._opened = 0  # the placement whose outboxes are all open

    def _box(self, receiver_id: str, method: str, epoch: int) -> Outbox:
        key = (receiver_id, method, epoch)
        box = self._boxes.get(key)
        if box is None:
            box = self._boxes[key] = Outbox(receiver_id, method, epoch, self._encrypted)
        return box

    def open(self, receiver_id: str, method: str, epoch: int, on_broken: BrokenListener) -> Outbox:
        """The sending stage's outbox for `receiver_id` (at install)."""
        with self._lock:
            box = self._box(receiver_id, method, epoch)
        box.on_broken = on_broken
        return box

    def all_open(self, epoch: int) -> None:
        """Placement `epoch`'s outboxes are open: pulls for any other are refused."""
        with self._lock:
            self._opened = epoch

    def for_pull(self, receiver_id: str, method: str, epoch: int) -> Outbox | str:
        """The outbox `receiver_id` pulls, or why there is none."""
        with self._lock:
            key = (receiver_id, method, epoch)
            if key in self._boxes:
                return self._boxes[key]
            if epoch < self._current or epoch <= self._opened:
                return (
                    f"this node has no {_KIND[method]} stream of placement epoch {epoch} for "
                    f"node {receiver_id} (it holds epoch {self._current})"
                )
            return self._box(receiver_id, method, epoch)

    def close_all(self) -> None:
        """The node stops: every stream it serves ends."""
        with self._lock:
            boxes = list(self._boxes.values())
            self._boxes.clear()
            self._opened = self._current = 2**63
        for box in boxes:
            box.close()

    def replace(self, epoch: int) -> None:
        """A new placement: the streams of every older one end."""
        with self._lock:
            self._current = max(self._current, epoch)
            old = [key for key in self._boxes if key[2] < epoch]
            boxes = [self._boxes.pop(key) for key in old]
        for box in boxes:
            box.close()


class StreamReader:
    """The receiving end of one stream: pulls it from `sender_id` on a thread of its own
    and hands each message to `accept`. A refused message ends the stream (the sender
    hears it as a break); a call that fails is a break here, which `on_broken` hears."""

    def __init__(
        self,
        sender_id: str,
        method: str,
        epoch: int,
        channel: grpc.Channel | None,
        sign: SignCall,
        accept: Accept,
        on_broken: BrokenListener,
        encrypted: bool,
    ) -> None:
        self.sender_id = sender_id
        self._method = method
        self._epoch = epoch
        self._channel = channel
        self._sign = sign
        self._accept = accept
        self._on_broken = on_broken
        self._encrypted = encrypted
        self._lock = threading.Lock()
        self._call: Any = None
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name=f"pull-{method}-{sender_id}", daemon=True
        )

    def start(self) -> StreamReader:
        self._thread.start()
        return self

    def _run(self) -> None:
        channel = self._channel
        if channel is None:
            self._broke("the node is not a healthy member")
            return
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            channel.close()
            if not self._closing:
                self._broke(
                    f"could not connect to its data plane port within {CONNECT_TIMEOUT_S:.0f} s "
                    "(a firewall must allow every node's --data-port as well as its --grpc-port)"
                )
            return
        try:
            method = getattr(node_pb2_grpc.DataPlaneStub(channel), self._method)
            metadata = self._sign(METHOD_PATHS[self._method])
            with self._lock:
                if self._closing:
                    return
                self._call = method(
                    node_pb2.PullRequest(epoch=self._epoch), metadata=metadata, wait_for_ready=True
                )
            for message in self._call:
                refused = self._accept(message)
                if refused is not None:
                    log.warning("%s (from %s)", refused, self.sender_id)
                    self._call.cancel()
                    return
        except Exception as error:  # a failed call, or a message that did not convert
            if not self._closing:
                if isinstance(error, grpc.Call):
                    self._broke(f"{error.code().name}: {error.details()}")
                else:
                    self._broke(str(error))
        finally:
            channel.close()

    def _broke(self, detail: str) -> None:
        reason = f"the {_KIND[self._method]} stream from node {self.sender_id} broke: {detail}"
        if self._encrypted and any(marker in reason for marker in _CUT_MARKERS):
            reason += f"; {CUT_UNDER_TLS}"
        log.warning("%s", reason)
        self._on_broken(reason, self.sender_id)

    def close(self) -> None:
        """Stop reading (the placement is replaced); does not wait for the thread."""
        with self._lock:
            self._closing = True
            call = self._call
        if call is not None:
            call.cancel()
