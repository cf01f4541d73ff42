"""The matmul floor of a 2-stage pipeline against one node, on the machine it runs on.

    .venv/bin/python benchmarks/pipeline_floor.py [--seconds 10] [--streams 8] [--split 19]

A decode pass reads every weight of a stage; this times only those reads and their
multiplies (the default model's real float32 projection matrices and its tied output
head, one token row per stream, no attention, no Python around the model), with the
OpenBLAS preload a node uses:

- one node: the whole model, `--streams` rows a pass, 2 BLAS threads (the node's setting);
- a 2-stage pipeline as exo-tools runs it: two processes at once, 1 BLAS thread each,
  micro-batches of streams/2 rows (stage 0: layers [0, split); stage 1: the rest and the
  head); every stream's token costs a pass of each micro-batch on both stages, so tok/s
  is rows x the slower stage's passes per second;
- the same two stages one after the other with one micro-batch of every stream, each
  stage alone (no other process running), both at once with 2 BLAS threads each, and
  the node with 1 thread.

The last line is the pipeline's best aggregate over the node's, as far as weight reads
and matmuls go: what `benchmarks/concurrent_streams.py` measures on top of this is
attention, per-row work, Python and the network, which both targets pay.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_default, print_table, start_worker, worker_result

# Each block's matrices, by submodule, in the order `one_pass` multiplies them.
PROJECTIONS = (
    ("self_attn", "q_proj"),
    ("self_attn", "k_proj"),
    ("self_attn", "v_proj"),
    ("self_attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)


def worker(first: int, end: int, head: bool, rows: int, seconds: float) -> dict[str, float]:
    """Passes per second of layers [first, end) (and the head) on `rows` token rows."""
    import mlx.core as mx

    model = load_default().model
    layers = model.model.layers[first:end]
    weights = [
        [getattr(getattr(layer, part), name).weight for part, name in PROJECTIONS]
        for layer in layers
    ]
    table = model.model.embed_tokens.weight if head else None
    hidden = mx.random.normal((rows, weights[0][0].shape[1]))

    def one_pass() -> None:
        x = hidden
        for q, k, v, o, gate, up, down in weights:
            attended = (x @ q.T) + mx.mean(x @ k.T) + mx.mean(x @ v.T)
            x = x + attended @ o.T
            x = x + ((x @ gate.T) * (x @ up.T)) @ down.T
        if table is not None:
            x = x @ table.T
        mx.eval(x)

    for _ in range(3):
        one_pass()
    passes, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        one_pass()
        passes += 1
    elapsed = time.perf_counter() - began
    return {"passes_per_s": passes / elapsed, "ms_per_pass": 1e3 * elapsed / passes}


def start(first: int, end: int, head: bool, rows: int, threads: int, seconds: float) -> Any:
    return start_worker(__file__, [first, end, head, rows, seconds], threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per case")
    parser.add_argument("--streams", type=int, default=8, help="token rows per node pass")
    parser.add_argument("--split", type=int, default=19, help="stage 1's first layer")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return
    if args.streams < 2 or args.streams % 2:
        parser.error("--streams must be an even number of at least 2")
    n_layers = len(load_default().model.model.layers)
    if not 0 < args.split < n_layers:
        parser.error(f"--split must be in [1, {n_layers - 1}]")
    rows, half, seconds = args.streams, args.streams // 2, args.seconds
    node = worker_result(start(0, n_layers, True, rows, 2, seconds))
    both = [
        start(0, args.split, False, half, 1, seconds),
        start(args.split, n_layers, True, half, 1, seconds),
    ]
    stage0, stage1 = (worker_result(process) for process in both)
    alone0 = worker_result(start(0, args.split, False, half, 1, seconds))
    alone1 = worker_result(start(args.split, n_layers, True, half, 1, seconds))
    whole0 = worker_result(start(0, args.split, False, rows, 1, seconds))
    whole1 = worker_result(start(args.split, n_layers, True, rows, 1, seconds))
    node_one_thread = worker_result(start(0, n_layers, True, rows, 1, seconds))
    two_each = [
        start(0, args.split, False, half, 2, seconds),
        start(args.split, n_layers, True, half, 2, seconds),
    ]
    crowded0, crowded1 = (worker_result(process) for process in two_each)

    def line(
        case: str,
        rows: int,
        first: dict[str, float],
        second: dict[str, float] | None,
        tps: float | None,
    ) -> list[str]:
        return [
            case,
            str(rows),
            f"{first['ms_per_pass']:.1f}",
            f"{second['ms_per_pass']:.1f}" if second else "",
            f"{tps:.0f}" if tps else "",
        ]

    def pipelined(first: dict[str, float], second: dict[str, float]) -> float:
        return half * min(first["passes_per_s"], second["passes_per_s"])

    node_tps = rows * node["passes_per_s"]
    pipeline_tps = pipelined(stage0, stage1)
    one_batch_tps = rows * 1e3 / (whole0["ms_per_pass"] + whole1["ms_per_pass"])
    table = [
        line("one node, 2 threads", rows, node, None, node_tps),
        line("pipeline, both stages at once, 1 thread each", half, stage0, stage1, pipeline_tps),
        line("each stage alone, 1 thread", half, alone0, alone1, None),
        line("one micro-batch, stages in turn, 1 thread", rows, whole0, whole1, one_batch_tps),
        line(
            "pipeline, both stages at once, 2 threads each",
            half,
            crowded0,
            crowded1,
            pipelined(crowded0, crowded1),
        ),
        line(
            "one node, 1 thread",
            rows,
            node_one_thread,
            None,
            rows * node_one_thread["passes_per_s"],
        ),
    ]
    print_table(
        f"Weight reads and matmuls only, {rows} streams, stages [0, {args.split}) and [{args.split}, {n_layers}) + head",
        ["case", "rows a pass", "stage 0 (or node) ms a pass", "stage 1 ms a pass", "tok/s"],
        table,
    )
    print(f"pipeline / node floor: {pipeline_tps / node_tps:.2f}x")


if __name__ == "__main__":
    main()
