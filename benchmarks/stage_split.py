"""What splitting the model in two stages costs, in one process with no network.

    .venv/bin/python benchmarks/stage_split.py [--steps 30] [--idle-ms 40] [--split N]

A 2-stage pipeline's single-stream token is stage 0's pass, a hop, stage 1's pass (blocks,
head, sampling) and a hop back. This times the two stage passes (with the activation's
trip through the wire format) against the whole model's pass, each decode step fed one
token id: back to back, after sleeping `--idle-ms` (in a real pipeline each stage waits
that long while the other computes), and after `--idle-ms` of tiny MLX evaluations (the
wait spent keeping MLX's worker busy). Every pass ends in a host read, as a stage's does.
Prints one table of medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import default_model_path, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per case")
    parser.add_argument("--idle-ms", type=float, default=40.0, help="idle time before a pass")
    parser.add_argument(
        "--split", type=int, default=0, help="stage 1's first layer (default: half the layers)"
    )
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    # One BLAS thread, as the nodes run (set before the re-exec loads OpenBLAS).
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from exo_tools.blas import reexec_with_fast_blas

    reexec_with_fast_blas([__file__, *sys.argv[1:]])

    import mlx.core as mx

    from exo_tools.cluster.wire import tensor_from_proto, tensor_to_proto
    from exo_tools.engine.shard import ShardModel
    from exo_tools.engine.tensors import from_wire, to_wire
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model
    from exo_tools.proto import node_pb2
    from exo_tools.types import Shard

    card = CATALOG[DEFAULT_MODEL_ID]
    path = default_model_path()

    def shard_model(shard: Shard | None) -> ShardModel:
        loaded = load_model(card, path, shard=shard, dtype="auto", progress=False)
        return ShardModel(loaded.model, loaded.shard)

    whole = shard_model(None)
    n_layers = whole.shard.n_layers
    half = args.split or n_layers // 2
    first = shard_model(Shard(card.id, 0, half, n_layers))
    last = shard_model(Shard(card.id, half, n_layers, n_layers))
    caches = {id(model): model.make_cache() for model in (whole, first, last)}
    prompt = mx.array([list(range(100, 200))])
    mx.eval(whole.forward(prompt, caches[id(whole)]))
    mx.eval(last.forward(first.forward(prompt, caches[id(first)]), caches[id(last)]))

    token = mx.array([[5]])

    def to_proto(array: mx.array) -> Any:
        return tensor_to_proto(to_wire(array)).SerializeToString()

    def from_proto(data: Any) -> mx.array:
        return from_wire(tensor_from_proto(node_pb2.Tensor.FromString(data)))

    wire = to_proto(first.forward(token, caches[id(first)]))

    def whole_pass() -> None:
        mx.argmax(whole.forward(token, caches[id(whole)])[:, -1, :], axis=-1).item()

    def first_pass() -> None:
        nonlocal wire
        wire = to_proto(first.forward(token, caches[id(first)]))

    def last_pass() -> None:
        hidden = from_proto(wire)
        mx.argmax(last.forward(hidden, caches[id(last)])[:, -1, :], axis=-1).item()

    cases: dict[str, Callable[[], None]] = {
        "whole model": whole_pass,
        f"stage 0: embedding + blocks 0-{half - 1}": first_pass,
        f"stage 1: blocks {half}-{n_layers - 1} + head + sampling": last_pass,
    }
    idle_s = args.idle_ms / 1000
    busywork = mx.ones((64, 64))

    def sleep() -> None:
        time.sleep(idle_s)

    def keep_mlx_busy() -> None:
        # Tiny evaluations: MLX's worker thread (and its core) never goes idle.
        end = time.perf_counter() + idle_s
        while time.perf_counter() < end:
            mx.eval(busywork @ busywork)

    waits: dict[str, Callable[[], None]] = {
        "back to back ms": lambda: None,
        f"after {args.idle_ms:g} ms asleep ms": sleep,
        f"after {args.idle_ms:g} ms of tiny MLX work ms": keep_mlx_busy,
    }
    timings = {name: {wait: list[float]() for wait in waits} for name in cases}
    for _ in range(args.steps):
        for wait_name, wait in waits.items():
            for name, run in cases.items():
                wait()
                started = time.perf_counter()
                run()
                timings[name][wait_name].append((time.perf_counter() - started) * 1000)

    medians = {
        name: {wait: statistics.median(times) for wait, times in runs.items()}
        for name, runs in timings.items()
    }
    stages = [name for name in cases if name.startswith("stage")]
    medians["stage 0 + stage 1"] = {
        wait: sum(medians[name][wait] for name in stages) for wait in waits
    }
    print_table(
        f"{card.id} split in two stages, one process, float32, median of {args.steps} decode steps",
        ["pass", *waits],
        [[name, *(f"{m[wait]:.2f}" for wait in waits)] for name, m in medians.items()],
    )


if __name__ == "__main__":
    main()
