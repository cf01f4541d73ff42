"""The floor of 2-member tensor-parallel decode against one process, on the machine it runs on.

    .venv/bin/python benchmarks/tensor_floor.py [--passes 300]

A decode step of one sequence reads every weight once; tensor parallelism splits those
reads between members, which must then add their partial outputs twice per layer (after
attention and after the MLP: 60 exchanges a token for the default model). This times only
the weight reads and multiplies of one token row (the default model's real float32
matrices, sliced by the placement's own `split_tensor` and the loader's own slicing, the
tied output head on rank 0; no attention over a cache, no norms, no Python around the
model), with the OpenBLAS preload and 1 BLAS thread per process:

- one process, the whole model, one graph a token (`graph`), and the same with an
  evaluation at each of the 60 points where members exchange (`eval`);
- two member processes at once, each its slice: one graph a token and no exchange (the
  compute alone), an evaluation at each exchange point, and the partials exchanged over a
  raw TCP socket between the two processes at each point (the bare-socket floor: no
  gRPC, no threads, no serialization beyond the array's bytes).

A member's token costs the slower member's time. Last, a projection: the socket row with
each of the 60 exchanges at gRPC's cheapest shape instead (`benchmarks/transport_latency.py`'s
raw socket and gRPC sync pull, one-way, measured here in the same run, after 1 ms of
compute as between two exchanges). The ratios are what these floors allow against one
process; `benchmarks/pipeline.py --tensor 2` measures the product on top of them.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import default_model_path, print_table, start_worker, worker_result
from benchmarks.transport_latency import WARMUP, measure

MODES = ("graph", "eval", "socket")
EXCHANGES = 60  # 30 layers, after attention and after the MLP
HIDDEN_BYTES = 2304  # one float32 hidden state of the default model
MESSAGES = 200


def _load(rank: int | None) -> Any:
    """The default model in float32: whole (rank None), or member `rank` of 2's slice."""
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model, model_layout
    from exo_tools.placement.plan import split_tensor

    card, path = CATALOG[DEFAULT_MODEL_ID], default_model_path()
    tensor = None
    if rank is not None:
        tensor = split_tensor(model_layout(card, path, dtype="float32"), [1.0, 1.0])[rank]
    return load_model(card, path, dtype="float32", progress=False, tensor=tensor).model


def _exchange(peer: socket.socket, partial: Any) -> Any:
    """`partial` plus the other member's, both sent at once over the raw socket."""
    import mlx.core as mx
    import numpy as np

    mine = np.array(partial, copy=False)
    data = mine.tobytes()
    peer.sendall(data)
    received = bytearray()
    while len(received) < len(data):
        chunk = peer.recv(len(data) - len(received))
        if not chunk:
            raise ConnectionError("the other member went away")
        received += chunk
    theirs = np.frombuffer(bytes(received), dtype=mine.dtype).reshape(mine.shape)
    return partial + mx.array(theirs)


def worker(rank: int | None, mode: str, passes: int, port: int) -> dict[str, float]:
    """Milliseconds a token of this process's weights, in `mode`."""
    import mlx.core as mx

    model = _load(rank)
    layers = model.model.layers
    table = model.model.embed_tokens.weight if rank in (None, 0) else None
    hidden = mx.random.normal((1, layers[0].mlp.down_proj.weight.shape[0]))
    mx.eval(hidden)
    peer: socket.socket | None = None
    if mode == "socket":
        if rank == 0:
            server = socket.create_server(("127.0.0.1", port))
            peer, _ = server.accept()
            server.close()
        else:
            for _ in range(200):
                try:
                    peer = socket.create_connection(("127.0.0.1", port))
                    break
                except OSError:
                    time.sleep(0.05)
        if peer is None:
            raise ConnectionError("the members did not connect")
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def point(partial: Any) -> Any:
        """Where the members add their partial outputs."""
        if mode == "graph":
            return partial
        mx.eval(partial)
        return partial if peer is None else _exchange(peer, partial)

    def one_token() -> None:
        x = hidden
        for layer in layers:
            attention, mlp = layer.self_attn, layer.mlp
            queries = x @ attention.q_proj.weight.T
            queries = queries + mx.mean(x @ attention.k_proj.weight.T)
            queries = queries + mx.mean(x @ attention.v_proj.weight.T)
            x = x + point(queries @ attention.o_proj.weight.T)
            gated = (x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            x = x + point(gated @ mlp.down_proj.weight.T)
        if table is not None:
            x = x @ table.T
        mx.eval(x)

    for _ in range(5):
        one_token()
    began = time.perf_counter()
    for _ in range(passes):
        one_token()
    elapsed = time.perf_counter() - began
    return {"ms_per_token": 1e3 * elapsed / passes}


def start(rank: int | None, mode: str, passes: int, port: int) -> Any:
    return start_worker(__file__, [rank, mode, passes, port], threads=1)


def result(process: Any) -> float:
    return worker_result(process)["ms_per_token"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=300, help="timed tokens per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.passes < 1:
        parser.error("--passes must be at least 1")
    from tests.helpers.nodes import free_port

    single = {mode: result(start(None, mode, args.passes, 0)) for mode in ("graph", "eval")}
    members: dict[str, tuple[float, float]] = {}
    for mode in MODES:
        port = free_port()
        both = [start(rank, mode, args.passes, port) for rank in (0, 1)]
        first, second = (result(process) for process in both)
        members[mode] = (first, second)
    baseline = single["graph"]
    descriptions = {
        "graph": "one graph a token",
        "eval": "an evaluation at each of the 60 exchange points",
        "socket": "partials exchanged over a raw TCP socket at each point",
    }
    rows = [
        ["one process, " + descriptions[mode], f"{ms:.1f}", "", f"{baseline / ms:.2f}x"]
        for mode, ms in single.items()
    ]
    rows += [
        [
            "2 members at once, " + descriptions[mode],
            f"{first:.1f}",
            f"{second:.1f}",
            f"{baseline / max(first, second):.2f}x",
        ]
        for mode, (first, second) in members.items()
    ]
    print_table(
        "Weight reads and matmuls of one token row, 1 BLAS thread per process",
        ["case", "ms a token (rank 0)", "rank 1", "tok/s vs one process, one graph"],
        rows,
    )
    exchanges = members["socket"][0] - members["eval"][0]
    print(f"raw-socket exchange: {1e3 * exchanges / 60:.0f} us each on rank 0 (60 a token)")
    one_way = {
        transport: statistics.median(
            measure(transport, WARMUP + MESSAGES, 0.001, HIDDEN_BYTES)[WARMUP:]
        )
        for transport in ("socket", "grpc-pull")
    }
    over_socket_ms = EXCHANGES * (one_way["grpc-pull"] - one_way["socket"]) / 1e3
    projected = max(members["socket"]) + over_socket_ms
    print(
        f"one-way latency, raw socket {one_way['socket']:.0f} us, gRPC sync pull "
        f"{one_way['grpc-pull']:.0f} us; 2 members with gRPC sync pull exchanges "
        f"(projected): {projected:.1f} ms a token, {baseline / projected:.2f}x one process"
    )


if __name__ == "__main__":
    main()
