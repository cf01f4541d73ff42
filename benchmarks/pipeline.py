"""Model parallelism: single-process mlx-lm against 1-, 2- and 3-node pipelines, 2- and
3-member tensor parallelism, and MLX's own distributed pipeline and tensor parallelism.

One run prints one table: TTFT, single-stream decode tok/s, per-hop overhead, each node's
own work per token (its MLX thread's busy time, so TPOT minus their sum is the time tokens
spend between nodes), all-reduce latency, per-node peak memory, and aggregate tok/s with 1
and 4 concurrent streams. Every process (the mlx-lm baseline and peers too) gets
OPENBLAS_NUM_THREADS=1, so on a 2-core machine the nodes do not oversubscribe the cores.
Ratios are against the baseline measured in the same run.

    python benchmarks/pipeline.py [--prompt-tokens 128] [--max-tokens 64] [--repeats 2]
        [--nodes 1,2,3] [--tensor 2,3] [--pipeline-peer 2] [--peer 3] [--tls on|off|both]

`--tls both` measures every multi-node row with the cluster's mutual TLS and again with
`--no-cluster-tls`, and adds a table of what TLS costs (decode tok/s, hop, all-reduce).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    benchmark_messages,
    default_model_path,
    measure_mlx_lm,
    median_run,
    print_table,
)

MODEL = "smollm2-135m"


def stream_once(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, float]:
    import requests

    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                first = first or now
                last = now
    return {
        "ttft_s": first - started,
        "decode_tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0,
        "tokens": float(tokens),
        "wall_s": time.perf_counter() - started,
    }


def aggregate(url: str, messages: list[dict[str, str]], max_tokens: int, streams: int) -> float:
    results: list[dict[str, float]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(stream_once(url, messages, max_tokens))
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(streams)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(r["tokens"] for r in results) / (time.perf_counter() - started)


def start_pipeline(count: int, parallelism: str = "pipeline", tls: bool = True) -> list[Any]:
    from tests.helpers.nodes import node_environment, start_cluster_nodes

    env = node_environment(threads=1)
    env["EXO_TOOLS_SECRET"] = uuid.uuid4().hex
    args = ("--cluster", f"bench-{uuid.uuid4().hex[:8]}", "--min-nodes", str(count))
    args += ("--parallelism", parallelism)
    if not tls:
        args += ("--no-cluster-tls",)
    nodes = start_cluster_nodes(count, *args, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            health = nodes[0].health()
            if health.get("status") == "ready" and len(health_stages(nodes[0])) == count:
                return nodes
        except Exception:
            pass
        time.sleep(0.3)
    logs = "\n".join(node.log()[-2000:] for node in nodes)
    for node in nodes:
        node.stop()
    raise TimeoutError(f"{count}-node {parallelism} did not become ready:\n{logs}")


def _busy_s(nodes: list[Any]) -> list[float]:
    return [node.health()["pipeline"]["busy_s"] for node in nodes]


def health_stages(node: Any) -> list[dict[str, Any]]:
    import requests

    placement = requests.get(f"{node.url}/v1/cluster", timeout=5).json().get("placement") or {}
    return placement.get("stages", []) if placement.get("state") == "ready" else []


def measure_pipeline(
    count: int,
    messages: list[dict[str, str]],
    max_tokens: int,
    repeats: int,
    parallelism: str = "pipeline",
    tls: bool = True,
) -> dict[str, Any]:
    nodes = start_pipeline(count, parallelism, tls)
    url = nodes[0].url
    try:
        stream_once(url, messages, 8)  # warm-up: streams opened, caches allocated
        # Each node's MLX-thread work per decode step: a run's work less a one-token run's
        # (the prefill), over the run's decode steps, as TPOT counts them. TPOT minus the
        # nodes' sum is the time a token spends between stages.
        before = _busy_s(nodes)
        stream_once(url, messages, 1)
        prefill = [after - was for was, after in zip(before, _busy_s(nodes), strict=True)]
        before = _busy_s(nodes)
        runs = [stream_once(url, messages, max_tokens) for _ in range(repeats)]
        single = median_run(runs)
        # Read right after the single-stream runs: the window holds their hops only.
        healths = [node.health() for node in nodes]
        steps = statistics.mean(run["tokens"] for run in runs) - 1
        busy_ms = [
            ((h["pipeline"]["busy_s"] - was) / repeats - first) / steps * 1000
            for h, was, first in zip(healths, before, prefill, strict=True)
        ]
        hops = [h["pipeline"]["hop_us_median"] for h in healths if count > 1]
        reduces = [h["pipeline"].get("allreduce_us_median") for h in healths]
        waits = [h["pipeline"].get("allreduce_wait_us_median") for h in healths]
        one = aggregate(url, messages, max_tokens, 1)
        four = aggregate(url, messages, max_tokens, 4)
        healths = [node.health() for node in nodes]
    finally:
        for node in nodes:
            node.stop()
    return {
        **single,
        "hop_us": _median_of(hops),
        "busy_ms": busy_ms,
        "allreduce_us": _median_of(reduces),
        "allreduce_wait_us": _median_of(waits),
        "peaks_mb": [h["memory"]["mlx_peak"] / 1e6 for h in healths],
        "rss_mb": [h["memory"]["rss"] / 1e6 for h in healths],
        "agg1": one,
        "agg4": four,
    }


def _median_of(values: list[Any]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nodes", default="1,2,3", help="pipeline sizes to measure")
    parser.add_argument(
        "--tensor", default="2,3", help="tensor-parallel sizes to measure ('' for none)"
    )
    parser.add_argument(
        "--pipeline-peer",
        type=int,
        default=2,
        help="processes for MLX's own pipeline (mx.distributed ring + mlx-lm's pipeline); "
        "0 skips it",
    )
    parser.add_argument(
        "--peer",
        type=int,
        default=3,
        help="processes for MLX's own tensor parallelism (mx.distributed ring + mlx-lm "
        "shard); must divide the KV heads (3 for SmolLM2); 0 skips it",
    )
    parser.add_argument(
        "--tls",
        choices=("on", "off", "both"),
        default="on",
        help="inter-node mutual TLS for the multi-node rows (both: each row twice, plus a "
        "table of the cost)",
    )
    args = parser.parse_args()

    # One BLAS thread for the baseline too (set before the re-exec loads OpenBLAS).
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from exo_tools.blas import reexec_with_fast_blas

    reexec_with_fast_blas([__file__, *sys.argv[1:]])

    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.loader import load_model

    model_path = default_model_path()
    loaded = load_model(CATALOG[DEFAULT_MODEL_ID], model_path, dtype="auto", progress=False)
    messages = benchmark_messages(loaded.tokenizer, args.prompt_tokens)
    prompt = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages))
    measure_mlx_lm(loaded, prompt, 4, 1)
    baseline = measure_mlx_lm(loaded, prompt, args.max_tokens, args.repeats)
    del loaded

    settings = {"on": [True], "off": [False], "both": [True, False]}[args.tls]
    results: dict[int, dict[str, Any]] = {}
    plain: dict[str, tuple[int, dict[str, Any]]] = {}  # label -> (nodes, the row without TLS)
    for n in [int(x) for x in args.nodes.split(",") if x]:
        for tls in settings if n > 1 else settings[:1]:
            run = measure_pipeline(n, messages, args.max_tokens, args.repeats, tls=tls)
            if tls or len(settings) == 1:
                results[n] = run
            else:
                plain[f"{n}-node pipeline"] = (n, run)
    tensor: dict[int, dict[str, Any]] = {}
    for n in [int(x) for x in args.tensor.split(",") if x]:
        for tls in settings:
            run = measure_pipeline(n, messages, args.max_tokens, args.repeats, "tensor", tls)
            if tls or len(settings) == 1:
                tensor[n] = run
            else:
                plain[f"tensor, {n} members"] = (n, run)
    from benchmarks.mlx_peer import measure_mlx_peer

    peers = {
        mode: measure_mlx_peer(mode, processes, args.prompt_tokens, args.max_tokens)
        for mode, processes in (("pipeline", args.pipeline_peer), ("tensor", args.peer))
        if processes
    }

    base_tps = baseline["decode_tps"]
    one_node_tpot = 1 / results[1]["decode_tps"] if 1 in results else None
    rows = [
        [
            "mlx-lm single process",
            f"{baseline['ttft_s'] * 1000:.0f}",
            f"{base_tps:.2f}",
            "1.00x",
            "-",
            "-",
            "-",
            "-",
            "-",
            f"{baseline['mlx_peak_mb']:.0f}",
            "n/a",
            "n/a",
            "",
        ]
    ]
    suffix = " (no TLS)" if args.tls == "off" else ""
    labelled = [(f"{n}-node pipeline{suffix}", n, r) for n, r in results.items()]
    labelled += [(f"tensor, {n} members{suffix}", n, r) for n, r in tensor.items()]
    labelled += [(f"{label} (no TLS)", n, r) for label, (n, r) in plain.items()]
    for label, count, r in labelled:
        # Tensor members work at the same time, waiting inside their all-reduces: their
        # busy times neither add up to a token nor exclude the network.
        pipelined = "pipeline" in label and r["decode_tps"] > 0
        from_tpot = ""
        if one_node_tpot is not None and count > 1 and pipelined:
            from_tpot = f"{(1 / r['decode_tps'] - one_node_tpot) / count * 1e6:.0f}"
        reduce = "-"
        if r["allreduce_us"] is not None:
            reduce = f"{r['allreduce_us']:.0f} / {r['allreduce_wait_us']:.0f}"
        rows.append(
            [
                label,
                f"{r['ttft_s'] * 1000:.0f}",
                f"{r['decode_tps']:.2f}",
                f"{r['decode_tps'] / base_tps:.2f}x",
                f"{r['hop_us']:.0f}" if r["hop_us"] is not None else "-",
                from_tpot or "-",
                " / ".join(f"{busy:.1f}" for busy in r["busy_ms"]) if pipelined else "-",
                f"{1000 / r['decode_tps'] - sum(r['busy_ms']):.1f}" if pipelined else "-",
                reduce,
                " / ".join(f"{p:.0f}" for p in r["peaks_mb"]),
                f"{r['agg1']:.2f}",
                f"{r['agg4']:.2f}",
                f"{r['agg4'] / r['agg1']:.2f}x",
            ]
        )
    for mode, peer in peers.items():
        processes = args.pipeline_peer if mode == "pipeline" else args.peer
        rows.append(
            [
                f"MLX distributed (ring) {mode}, {processes} processes",
                f"{peer['ttft_s'] * 1000:.0f}",
                f"{peer['decode_tps']:.2f}",
                f"{peer['decode_tps'] / base_tps:.2f}x",
                "",
                "",
                "",
                "",
                "",
                f"{peer['mlx_peak_mb']:.0f} (rank 0)",
                "",
                "",
                "",
            ]
        )
    print(
        f"\nmodel {DEFAULT_MODEL_ID}, float32 + OpenBLAS, OPENBLAS_NUM_THREADS=1 per process, "
        f"prompt {len(prompt)} tokens, {args.max_tokens} generated, median of {args.repeats}, "
        f"{os.cpu_count()} CPU cores"
    )
    print_table(
        "Pipeline and tensor parallelism over gRPC (loopback)",
        [
            "",
            "TTFT ms",
            "decode tok/s",
            "vs mlx-lm",
            "hop µs (median, measured)",
            "overhead/hop µs (from TPOT vs 1-node)",
            "per-node work ms/token",
            "TPOT - work ms",
            "all-reduce µs (median call / wait)",
            "per-node MLX peak MB",
            "agg tok/s 1 stream",
            "agg tok/s 4 streams",
            "4 / 1",
        ],
        rows,
    )
    if plain:
        print_tls_cost(results, tensor, plain)


def print_tls_cost(
    results: dict[int, dict[str, Any]],
    tensor: dict[int, dict[str, Any]],
    plain: dict[str, tuple[int, dict[str, Any]]],
) -> None:
    encrypted = {f"{n}-node pipeline": r for n, r in results.items()}
    encrypted |= {f"tensor, {n} members": r for n, r in tensor.items()}

    def pair(key: str, on: dict[str, Any], off: dict[str, Any]) -> str:
        if on.get(key) is None or off.get(key) is None:
            return "-"
        return f"{on[key]:.0f} / {off[key]:.0f}"

    rows = []
    for label, (_, off) in plain.items():
        on = encrypted[label]
        rows.append(
            [
                label,
                f"{on['decode_tps']:.2f} / {off['decode_tps']:.2f}",
                f"{on['decode_tps'] / off['decode_tps'] - 1:+.1%}",
                pair("hop_us", on, off),
                pair("allreduce_us", on, off),
                f"{on['ttft_s'] * 1000:.0f} / {off['ttft_s'] * 1000:.0f}",
                f"{on['agg4']:.2f} / {off['agg4']:.2f}",
            ]
        )
    print_table(
        "What the cluster's mutual TLS costs (TLS / plain, same run)",
        [
            "",
            "decode tok/s",
            "decode change",
            "hop µs",
            "all-reduce µs",
            "TTFT ms",
            "agg tok/s 4 streams",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
