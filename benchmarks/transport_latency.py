"""One-way latency of one activation message between two processes, by transport.

    .venv/bin/python benchmarks/transport_latency.py [--messages 300] [--gap-ms 20]

What a pipeline hop costs below the node's own code: a sender thread that computes
(numpy matmuls that release the GIL, as MLX's evaluation does) and then sends one
message, and a receiver whose network thread hands each message to a consumer thread
(the receiving node's MLX thread), which stamps its arrival. Latency is the consumer's
wall clock minus the sender's stamp (same host). Transports:
- thread handoff: no network at all, one thread wakes another in the same process
  (`SimpleQueue`), the cost of the handoff every row below includes at least once;
- raw TCP socket (TCP_NODELAY, length-prefixed frames): the floor for any Python design;
- gRPC sync API: a client stream fed from a queue, a thread-pool server handler;
- gRPC sync pull: the fewest thread handoffs gRPC's Python API allows. The receiver is
  the client of a server stream and its consumer thread reads the call itself
  (`SingleThreadedUnaryStream`: no channel thread, no handoff on the receiving side);
  the sender's server handler takes each message from a queue;
- gRPC sync pull + handoff: the same, and the reading thread hands each message to a
  consumer thread, as a node's stream reader hands it to its MLX thread: the node's
  data plane shape (`placement/streams.py`), without TLS and call signing;
- gRPC asyncio: the node's shape until 12-03 (an event-loop sender with a request
  iterator, an aio server handler), without the node's call-signing interceptors.

Then (unless `--no-nodes`) the same figures inside real nodes, each with one BLAS thread:
the median hop of a 2-stage pipeline (`/health` `pipeline.hop_us_median`, from the
sender's stamp to the receiving MLX thread taking the message) and the median all-reduce
of a 2-member tensor group, over a 64-token greedy decode each.

Prints one table: median and p90 per transport, the ratio to the raw socket and to gRPC's
cheapest shape (sync pull), which the data plane's targets are ratios to.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
# One BLAS thread per process, as the nodes run (set before numpy loads OpenBLAS).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import grpc
import grpc.experimental
import numpy as np

from benchmarks.common import print_table
from exo_tools.proto import node_pb2

TRANSPORTS = ("thread", "socket", "grpc-sync", "grpc-pull", "grpc-pull-handoff", "grpc-aio")
PULLS = ("grpc-pull", "grpc-pull-handoff")
LABELS = {
    "thread": "thread handoff, no network",
    "socket": "raw TCP socket",
    "grpc-sync": "gRPC sync API",
    "grpc-pull": "gRPC sync pull (receiver reads the call)",
    "grpc-pull-handoff": "gRPC sync pull + handoff to a consumer thread (the node's shape)",
    "grpc-aio": "gRPC asyncio (the node's shape until 12-03)",
}
# The first messages warm connections and caches; they are not counted.
WARMUP = 20
_FRAME = struct.Struct("<QI")  # sent_ns, payload length


def _paced(count: int, gap_s: float) -> Iterator[None]:
    """`count` turns, each after `gap_s` of GIL-releasing compute (a stage's work)."""
    matrix = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    for _ in range(count):
        end = time.perf_counter() + gap_s
        while time.perf_counter() < end:
            matrix @ matrix
        yield


# ---------------------------------------------------------------- receiver side


def _record(arrivals: queue.SimpleQueue[int | None], count: int) -> list[float]:
    """The consumer thread's work: latency in µs of each message as it is picked up."""
    latencies: list[float] = []
    while len(latencies) < count:
        sent_ns = arrivals.get()
        if sent_ns is None:
            break
        latencies.append((time.time_ns() - sent_ns) / 1000.0)
    return latencies


_SERVICE = "exo_tools.bench.Transport"
_PUSH_METHOD = f"/{_SERVICE}/Push"
_PULL_METHOD = f"/{_SERVICE}/Pull"


def _push_handler(handler: Any) -> Any:
    """The receiving server's bidirectional "Push" method (sync or asyncio `handler`)."""
    return grpc.method_handlers_generic_handler(
        _SERVICE,
        {
            "Push": grpc.stream_stream_rpc_method_handler(
                handler,
                request_deserializer=node_pb2.ActivationMessage.FromString,
                response_serializer=node_pb2.ActivationMessage.SerializeToString,
            )
        },
    )


def _push_call(channel: Any) -> Any:
    return channel.stream_stream(
        _PUSH_METHOD,
        request_serializer=node_pb2.ActivationMessage.SerializeToString,
        response_deserializer=node_pb2.ActivationMessage.FromString,
    )


def _serve_socket(listener: socket.socket, arrivals: queue.SimpleQueue[int | None]) -> None:
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = connection.makefile("rb")
    while header := stream.read(_FRAME.size):
        sent_ns, length = _FRAME.unpack(header)
        stream.read(length)
        arrivals.put(sent_ns)
    arrivals.put(None)


def _pull(port: int, count: int, handoff: bool) -> list[float]:
    """The receiving thread reads the sender's server stream itself: no handoff on arrival
    unless `handoff` (then it hands each message to a consumer thread, as a node's reader
    hands it to the MLX thread)."""
    arrivals: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    latencies: list[float] = []
    consumer = threading.Thread(target=lambda: latencies.extend(_record(arrivals, count)))
    if handoff:
        consumer.start()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)],
    )
    call = channel.unary_stream(
        _PULL_METHOD,
        request_serializer=node_pb2.ActivationMessage.SerializeToString,
        response_deserializer=node_pb2.ActivationMessage.FromString,
    )(node_pb2.ActivationMessage())
    for received, message in enumerate(call, start=1):
        if handoff:
            arrivals.put(message.sent_ns)
        else:
            latencies.append((time.time_ns() - message.sent_ns) / 1000.0)
        if received == count:
            break
    call.cancel()
    if handoff:
        consumer.join()
    return latencies


def receive(transport: str, count: int, port: int) -> None:
    """Child process: print the port, then the latencies as JSON once `count` arrived.
    For "grpc-pull" the sender serves and `port` is its port."""
    if transport in PULLS:
        print(json.dumps(_pull(port, count, handoff=transport == "grpc-pull-handoff")), flush=True)
        return
    arrivals: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    if transport == "socket":
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        threading.Thread(target=_serve_socket, args=(listener, arrivals), daemon=True).start()
    elif transport == "grpc-sync":

        def push(request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
            for message in request_iterator:
                arrivals.put(message.sent_ns)
            return iter(())

        server = grpc.server(futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers((_push_handler(push),))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
    else:
        started: queue.SimpleQueue[int] = queue.SimpleQueue()

        async def push(request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for message in request_iterator:
                arrivals.put(message.sent_ns)
            return
            yield

        async def serve() -> None:
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_push_handler(push),))
            started.put(server.add_insecure_port("127.0.0.1:0"))
            await server.start()
            await server.wait_for_termination()

        threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
        port = started.get()
    print(port, flush=True)
    print(json.dumps(_record(arrivals, count)), flush=True)
    threading.Event().wait()  # keep serving until the sender is done and kills us


# ---------------------------------------------------------------- sender side


def _message(payload: bytes) -> Any:
    forward = node_pb2.ForwardPass(hidden=node_pb2.Tensor(data=payload))
    message = node_pb2.ActivationMessage(request_id="r", forward=forward)
    message.sent_ns = time.time_ns()
    return message


def send(transport: str, port: int, count: int, gap_s: float, payload: bytes) -> None:
    target = f"127.0.0.1:{port}"
    if transport == "socket":
        connection = socket.create_connection(("127.0.0.1", port))
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in _paced(count, gap_s):
            connection.sendall(_FRAME.pack(time.time_ns(), len(payload)) + payload)
        connection.close()
        return
    if transport == "grpc-sync":
        outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
        channel = grpc.insecure_channel(target)
        call = _push_call(channel)(iter(outgoing.get, None))
        drained = threading.Thread(target=lambda: list(call), daemon=True)
        drained.start()
        for _ in _paced(count, gap_s):
            outgoing.put(_message(payload))
        outgoing.put(None)
        drained.join(timeout=10)
        channel.close()
        return
    # grpc-aio: the node's shape before the pull data plane (deque + one event-loop wakeup
    # per message, the call's own request iterator).
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    pending: list[Any] = []
    lock = threading.Lock()
    ready = asyncio.Event()

    async def requests() -> AsyncIterator[Any]:
        while True:
            with lock:
                message = pending.pop(0) if pending else None
            if message is None:
                await ready.wait()
                ready.clear()
            elif message is False:
                return
            else:
                yield message

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            async for _ in _push_call(channel)(requests()):
                pass

    def post(message: Any) -> None:
        with lock:
            pending.append(message)
        loop.call_soon_threadsafe(ready.set)

    done = asyncio.run_coroutine_threadsafe(run(), loop)
    for _ in _paced(count, gap_s):
        post(_message(payload))
    post(False)  # the end of the stream
    done.result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)


def _thread_handoff(count: int, gap_s: float) -> list[float]:
    arrivals: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    latencies: list[float] = []
    consumer = threading.Thread(target=lambda: latencies.extend(_record(arrivals, count)))
    consumer.start()
    for _ in _paced(count, gap_s):
        arrivals.put(time.time_ns())
    consumer.join()
    return latencies


def _spawn_receiver(transport: str, count: int, port: int = 0) -> subprocess.Popen[str]:
    arguments = ["--receive", transport, "--messages", str(count), "--port", str(port)]
    return subprocess.Popen(
        [sys.executable, __file__, *arguments],
        stdout=subprocess.PIPE,
        text=True,
    )


def _measure_pull(transport: str, count: int, gap_s: float, payload: bytes) -> list[float]:
    """The sender serves the stream; the receiver process subscribes to it."""
    outgoing: queue.SimpleQueue[Any] = queue.SimpleQueue()
    subscribed = threading.Event()

    def serve_pull(request: Any, context: Any) -> Iterator[Any]:
        subscribed.set()
        while (message := outgoing.get()) is not None:
            yield message

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                _PULL_METHOD.split("/")[1],
                {
                    "Pull": grpc.unary_stream_rpc_method_handler(
                        serve_pull,
                        request_deserializer=node_pb2.ActivationMessage.FromString,
                        response_serializer=node_pb2.ActivationMessage.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    receiver = _spawn_receiver(transport, count, port)
    try:
        if not subscribed.wait(timeout=30):
            raise RuntimeError("the receiver did not subscribe")
        for _ in _paced(count, gap_s):
            outgoing.put(_message(payload))
        assert receiver.stdout is not None
        return json.loads(receiver.stdout.readline())
    finally:
        outgoing.put(None)
        receiver.kill()
        receiver.wait()
        server.stop(0)


def measure(transport: str, count: int, gap_s: float, payload_bytes: int) -> list[float]:
    payload = b"\0" * payload_bytes
    if transport == "thread":
        return _thread_handoff(count, gap_s)
    if transport in PULLS:
        return _measure_pull(transport, count, gap_s, payload)
    receiver = _spawn_receiver(transport, count)
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline())
        send(transport, port, count, gap_s, payload)
        return json.loads(receiver.stdout.readline())
    finally:
        receiver.kill()
        receiver.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=300, help="messages per transport")
    parser.add_argument(
        "--gap-ms", type=float, default=20.0, help="compute between messages (a stage's work)"
    )
    parser.add_argument(
        "--bytes", type=int, default=2304, help="payload (SmolLM2's float32 hidden state)"
    )
    parser.add_argument(
        "--no-nodes",
        action="store_true",
        help="skip the rows measured inside real nodes (2-stage pipeline, 2-member tensor)",
    )
    parser.add_argument("--receive", choices=TRANSPORTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.messages <= WARMUP:
        parser.error(f"--messages must be more than {WARMUP} (the warm-up)")
    if args.receive:
        receive(args.receive, args.messages, args.port)
        return
    medians: dict[str, tuple[float, float | None]] = {}
    labels = dict(LABELS)
    for transport in TRANSPORTS:
        latencies = sorted(
            measure(transport, args.messages, args.gap_ms / 1000, args.bytes)[WARMUP:]
        )
        medians[transport] = (statistics.median(latencies), latencies[int(0.9 * len(latencies))])
    if not args.no_nodes:
        for name, label, median in _node_rows():
            labels[name] = label
            medians[name] = (median, None)
    floor, pull = medians["socket"][0], medians["grpc-pull"][0]
    print_table(
        f"One-way latency, {args.bytes}-byte message after {args.gap_ms:g} ms of compute, "
        f"{args.messages - WARMUP} messages per transport, loopback",
        ["transport", "median µs", "p90 µs", "vs raw socket", "vs gRPC sync pull"],
        [
            [
                labels[name],
                f"{median:.0f}",
                "-" if p90 is None else f"{p90:.0f}",
                f"{median / floor:.2f}x",
                f"{median / pull:.2f}x",
            ]
            for name, (median, p90) in medians.items()
        ],
    )


def _node_rows() -> list[tuple[str, str, float]]:
    """(name, label, median µs) of a 2-stage pipeline's hop and a 2-member tensor group's
    all-reduce, measured by the nodes themselves."""
    from benchmarks.common import benchmark_messages, default_model_path
    from benchmarks.pipeline import measure_pipeline
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    card = CATALOG[DEFAULT_MODEL_ID]
    loaded = load_model(card, default_model_path(), dtype="native", progress=False)
    messages = benchmark_messages(loaded.tokenizer, 128)
    del loaded
    pipeline = measure_pipeline(2, messages, 64, 1)
    tensor = measure_pipeline(2, messages, 64, 1, parallelism="tensor")
    return [
        ("node-hop", "node hop, 2-stage pipeline (in the nodes, mutual TLS)", pipeline["hop_us"]),
        (
            "node-allreduce",
            "tensor all-reduce, 2 members (in the nodes, mutual TLS)",
            tensor["allreduce_us"],
        ),
    ]


if __name__ == "__main__":
    main()
