"""The data plane's streams over real gRPC in one process: a `DataServer` with the cluster's
mutual TLS and call signing, the sending side's `Outbox`es and the receiving side's
`StreamReader`s (placement/streams.py), as two nodes' workers use them."""

from __future__ import annotations

import queue
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from exo_tools.cluster import data_plane
from exo_tools.cluster.auth import ClusterAuth, RejectLog
from exo_tools.cluster.data_plane import DataServer, open_data_channel
from exo_tools.cluster.tls import ClusterTLS
from exo_tools.placement import streams
from exo_tools.placement.streams import ACTIVATIONS, Outboxes, StreamReader
from exo_tools.placement.worker import DataPlaneService, Worker
from exo_tools.proto import node_pb2, node_pb2_grpc
from tests.helpers.nodes import free_port
from tests.helpers.tcp_proxy import TcpProxy

CLUSTER = "test-data-plane"
SECRET = b"data-plane-secret"
EPOCH = 7


class Sender:
    """The sending node: its outboxes served by a real data plane server."""

    def __init__(self) -> None:
        self.outboxes = Outboxes(encrypted=True)
        self.tls = ClusterTLS("sender", [SECRET], CLUSTER)
        self.server = DataServer(ClusterAuth(SECRET, CLUSTER), RejectLog(), self.tls)
        service = DataPlaneService(cast(Worker, SimpleNamespace(outboxes=self.outboxes)))
        self.server.add_servicer_hook(
            lambda server: node_pb2_grpc.add_DataPlaneServicer_to_server(service, server)
        )
        self.port = self.server.start("127.0.0.1", 0)
        self.broken: queue.SimpleQueue[str] = queue.SimpleQueue()

    def outbox(self, receiver: str = "receiver", epoch: int = EPOCH) -> Any:
        self.outboxes.replace(epoch)
        box = self.outboxes.open(receiver, ACTIVATIONS, epoch, self.broken.put)
        self.outboxes.all_open(epoch)
        return box


class Receiver:
    """The receiving node: a reader pulling one stream, recording what it accepts."""

    def __init__(
        self,
        sender: Sender,
        tls_secret: bytes = SECRET,
        signing_secret: bytes = SECRET,
        epoch: int = EPOCH,
        port: int | None = None,  # the sender's, or a proxy's in front of it
    ) -> None:
        self.got: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self.broken: queue.SimpleQueue[str] = queue.SimpleQueue()
        auth = ClusterAuth(signing_secret, CLUSTER)
        tls = ClusterTLS("receiver", [tls_secret], CLUSTER)
        self.reader = StreamReader(
            "sender",
            ACTIVATIONS,
            epoch,
            open_data_channel(f"127.0.0.1:{port or sender.port}", tls),
            lambda method: auth.sign_call("receiver", method),
            self._accept,
            self.broken.put,
            encrypted=True,
        ).start()

    def _accept(self, message: Any) -> str | None:
        self.got.put((message.request_id, threading.current_thread().name))
        return None


def _message(request_id: str) -> node_pb2.ActivationMessage:
    return node_pb2.ActivationMessage(request_id=request_id, epoch=EPOCH)


@pytest.fixture
def sender() -> Any:
    node = Sender()
    yield node
    node.outboxes.close_all()
    node.server.stop()


def test_messages_arrive_in_order_on_the_readers_own_thread(sender: Sender) -> None:
    box = sender.outbox()
    box.send(_message("queued-before-the-pull"))
    receiver = Receiver(sender)
    for index in range(50):
        box.send(_message(f"m{index}"))
    got = [receiver.got.get(timeout=10) for _ in range(51)]
    assert [request_id for request_id, _ in got] == ["queued-before-the-pull"] + [
        f"m{index}" for index in range(50)
    ]
    assert {thread for _, thread in got} == {"pull-Activations-sender"}
    # The placement is replaced: the stream ends, and neither side calls that a break.
    sender.outboxes.replace(EPOCH + 1)
    receiver.reader._thread.join(timeout=10)
    assert not receiver.reader._thread.is_alive()
    assert receiver.broken.empty() and sender.broken.empty()


def test_a_receiver_that_goes_away_breaks_the_senders_stream(sender: Sender) -> None:
    box = sender.outbox()
    receiver = Receiver(sender)
    box.send(_message("first"))
    assert receiver.got.get(timeout=10)[0] == "first"
    receiver.reader.close()
    reason = sender.broken.get(timeout=10)
    assert "the pipeline stream to node receiver broke" in reason, reason
    box.send(_message("dropped"))  # after a break: dropped, not queued for nobody
    assert receiver.got.empty()


def test_a_pull_without_the_cluster_secret_is_refused_and_breaks_the_reader(
    sender: Sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "CONNECT_TIMEOUT_S", 1.0)
    box = sender.outbox()
    # Certificates come from the secret: a caller without it never gets through the TLS
    # handshake, and its reader gives up.
    stranger = Receiver(sender, tls_secret=b"another-secret", signing_secret=b"another-secret")
    reason = stranger.broken.get(timeout=10)
    assert "the pipeline stream from node sender broke: could not connect" in reason, reason
    # Through TLS, with calls signed with another secret: the call itself is refused.
    forger = Receiver(sender, signing_secret=b"another-secret")
    reason = forger.broken.get(timeout=10)
    assert "UNAUTHENTICATED" in reason, reason
    # Neither took the stream: its receiver still gets every message.
    receiver = Receiver(sender)
    box.send(_message("for-the-receiver"))
    assert receiver.got.get(timeout=10)[0] == "for-the-receiver"
    assert stranger.got.empty() and forger.got.empty()


def test_a_pull_of_a_replaced_placement_is_refused(sender: Sender) -> None:
    sender.outbox(epoch=EPOCH + 1)
    receiver = Receiver(sender, epoch=EPOCH)  # the sender holds EPOCH + 1
    reason = receiver.broken.get(timeout=10)
    assert "FAILED_PRECONDITION" in reason and f"epoch {EPOCH}" in reason, reason


def test_a_pull_before_the_sender_installs_waits_for_its_messages(sender: Sender) -> None:
    sender.outboxes.replace(EPOCH - 1)  # the sender still holds the previous placement
    receiver = Receiver(sender)
    time.sleep(0.5)  # the pull is in
    box = sender.outbox()
    box.send(_message("after-install"))
    assert receiver.got.get(timeout=10)[0] == "after-install"
    assert receiver.broken.empty()


def test_a_receiver_that_never_pulls_breaks_the_stream(
    sender: Sender, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "ATTACH_TIMEOUT_S", 0.3)
    box = sender.outbox()
    box.send(_message("nobody-reads-this"))
    reason = sender.broken.get(timeout=10)
    assert "did not open the stream" in reason, reason


def test_a_path_that_goes_silent_breaks_both_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    # A stall (a frozen peer, TCP stuck retransmitting under loss) closes nothing: only the
    # keepalive pings can tell, and they must keep going on a long-lived pull, past gRPC's
    # default of two pings from a client that sends no data.
    monkeypatch.setattr(data_plane, "KEEPALIVE_S", 0.5)
    monkeypatch.setattr(data_plane, "KEEPALIVE_TIMEOUT_S", 1.0)
    sender = Sender()
    proxy = TcpProxy(("127.0.0.1", free_port()), ("127.0.0.1", sender.port), "127.0.0.1")
    proxy.start()
    try:
        box = sender.outbox()
        receiver = Receiver(sender, port=proxy.listen[1])
        for index in range(20):  # 4 s of a healthy stream: several pings answered
            box.send(_message(f"m{index}"))
            assert receiver.got.get(timeout=10)[0] == f"m{index}"
            time.sleep(0.2)
        assert receiver.broken.empty() and sender.broken.empty()
        proxy.stalled = True
        box.send(_message("lost"))
        assert "the pipeline stream from node sender broke" in receiver.broken.get(timeout=10)
        assert "the pipeline stream to node receiver broke" in sender.broken.get(timeout=10)
    finally:
        proxy.close()
        sender.outboxes.close_all()
        sender.server.stop()
