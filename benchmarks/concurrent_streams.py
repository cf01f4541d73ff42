"""Many agents at once: aggregate decode speed, inter-token latency, and a long prompt
arriving while streams decode. exo-tools against mlx-lm's server, one run, same weights.

    .venv/bin/python benchmarks/concurrent_streams.py [--streams 1,4,8,16]
        [--tokens 48] [--arrival-tokens 2000] [--targets node,pipeline,mlx-lm]

Targets:
- `node`: one exo-tools node serving the default model (2 BLAS threads);
- `pipeline`: two exo-tools nodes, a 2-stage pipeline (1 BLAS thread each);
- `mlx-lm`: `python -m mlx_lm.server` (its batched decode, default concurrency) on the
  same weights written as an MLX folder, with the same OpenBLAS preload (2 threads).

For each stream count, that many greedy streamed requests start at once (different short
prompts, `--tokens` each); the table shows aggregate tok/s (all streams' tokens over the
time from the first request sent to the last token) and each stream's inter-token
latency p50/p95. Then 8 streams decode and a `--arrival-tokens` prompt arrives: its time
to first token, and the running streams' ITL p95 while it prefills against their p95
before it came.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import benchmark_messages, load_default, mlx_lm_server, print_table
from tests.helpers.cluster_runs import start_cluster
from tests.helpers.model_export import export_hf_folder
from tests.helpers.nodes import node_environment, start_node

MODEL = "smollm2-135m"
TARGETS = ("node", "pipeline", "mlx-lm")
TOPICS = [
    "the sea", "mountains", "a city at night", "old trains", "the moon", "a forest",
    "bread baking", "rivers", "a lighthouse", "winter", "bees", "deserts", "a library",
    "volcanoes", "a market", "clouds",
]  # fmt: skip
ARRIVAL_STREAMS = 8


@dataclass
class Stream:
    """One streamed request's timeline: when it was sent and when each token came."""

    sent: float = 0.0
    token_times: list[float] = field(default_factory=list[float])
    tokens: int = 0
    error: str | None = None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


def stream_request(
    url: str,
    model: str,
    messages: list[dict[str, str]],
    max_tokens: int,
    stream: Stream | None = None,
) -> Stream:
    """One greedy streamed request, its timeline filled into `stream` as tokens come."""
    stream = stream or Stream()
    stream.sent = time.perf_counter()
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with requests.post(
            f"{url}/v1/chat/completions", json=body, stream=True, timeout=1800
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[len(b"data: ") :])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                usage = chunk.get("usage")
                if usage:
                    stream.tokens = int(usage.get("completion_tokens", stream.tokens))
                for choice in chunk.get("choices", []):
                    if (choice.get("delta") or {}).get("content"):
                        stream.token_times.append(time.perf_counter())
    except Exception as error:  # reported in the table's run, not raised from a thread
        stream.error = str(error)
    stream.tokens = stream.tokens or len(stream.token_times)
    return stream


def in_threads(calls: list[Any]) -> list[Stream]:
    results: list[Stream] = [Stream() for _ in calls]

    def run(index: int) -> None:
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def prompt(index: int) -> list[dict[str, str]]:
    topic = TOPICS[index % len(TOPICS)]
    return [{"role": "user", "content": f"Write a long, detailed story about {topic}."}]


def percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def concurrent_run(url: str, model: str, count: int, tokens: int) -> dict[str, float]:
    began = time.perf_counter()
    calls = [lambda i=i: stream_request(url, model, prompt(i), tokens) for i in range(count)]
    streams = in_threads(calls)
    errors = [s.error for s in streams if s.error]
    if errors:
        raise RuntimeError(errors[0])
    ended = max(s.token_times[-1] for s in streams if s.token_times)
    gaps = [gap for s in streams for gap in s.gaps]
    return {
        "tps": sum(s.tokens for s in streams) / (ended - began),
        "itl_p50_ms": statistics.median(gaps) * 1e3,
        "itl_p95_ms": percentile(gaps, 0.95) * 1e3,
    }


def arrival_run(
    url: str, model: str, long_messages: list[dict[str, str]], tokens: int
) -> dict[str, float]:
    """8 streams decode; once each has produced some tokens the long prompt arrives."""
    streams: list[Stream] = [Stream() for _ in range(ARRIVAL_STREAMS)]

    def run(index: int) -> None:
        stream_request(url, model, prompt(index), tokens, streams[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(ARRIVAL_STREAMS)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    # Wait until every stream is decoding (their prompts are in).
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        time.sleep(0.2)
        if all(len(s.token_times) >= 4 for s in streams):
            break
    time.sleep(2.0)
    long_stream = stream_request(url, model, long_messages, 4)
    if not all(thread.is_alive() for thread in threads):
        print("  (some streams ended before the long prompt's first token: use more tokens)")
    for thread in threads:
        thread.join()
    if long_stream.error or not long_stream.token_times:
        raise RuntimeError(long_stream.error or "the long prompt produced no token")
    arrived, first = long_stream.sent, long_stream.token_times[0]

    def gaps_between(start: float, end: float) -> list[float]:
        """The gaps that ended in (start, end]: a stall spanning the arrival counts."""
        return [
            b - a
            for s in streams
            for a, b in zip(s.token_times, s.token_times[1:], strict=False)
            if start < b <= end
        ]

    before = gaps_between(0.0, arrived)
    during = gaps_between(arrived, first)
    return {
        "ttft_s": first - arrived,
        "itl_p95_before_ms": percentile(before, 0.95) * 1e3,
        "itl_p95_during_ms": percentile(during, 0.95) * 1e3,
        "gaps_during": float(len(during)),
    }


def measure(
    target: str, folder: Path, args: argparse.Namespace, long_messages: list[dict[str, str]]
) -> dict[str, Any]:
    print(f"== {target}", flush=True)

    def runs(url: str, model: str) -> dict[str, Any]:
        stream_request(url, model, prompt(0), 4)  # warm-up
        result: dict[str, Any] = {}
        for count in args.streams:
            result[count] = concurrent_run(url, model, count, args.tokens)
            print(f"  {count} streams: {result[count]}", flush=True)
        # Long enough that the streams outlast the long prompt's prefill.
        result["arrival"] = arrival_run(url, model, long_messages, args.arrival_stream_tokens)
        print(f"  arrival: {result['arrival']}", flush=True)
        return result

    if target == "mlx-lm":
        with mlx_lm_server(folder) as url:
            return runs(url, str(folder))
    if target == "node":
        node = start_node(env=node_environment(threads=2))
        try:
            return runs(node.url, MODEL)
        finally:
            node.stop()
    cluster = start_cluster(2)
    try:
        return runs(cluster.master.url, MODEL)
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,4,8,16", help="comma-separated stream counts")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument("--arrival-tokens", type=int, default=2000, help="the long prompt")
    parser.add_argument(
        "--arrival-stream-tokens",
        type=int,
        default=400,
        help="tokens each running stream asks for in the arrival run",
    )
    parser.add_argument(
        "--targets", default=",".join(TARGETS), help=f"comma-separated of {', '.join(TARGETS)}"
    )
    args = parser.parse_args(argv)
    try:
        args.streams = [int(part) for part in args.streams.split(",") if part]
    except ValueError:
        parser.error("--streams: comma-separated whole numbers, e.g. 1,4,8")
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)} (choose from {', '.join(TARGETS)})")
    loaded = load_default()
    long_messages = benchmark_messages(loaded.tokenizer, args.arrival_tokens)
    with tempfile.TemporaryDirectory(prefix="concurrent-streams-") as scratch:
        folder = Path(scratch) / "SmolLM2-135M-mlx"
        if "mlx-lm" in targets:
            export_hf_folder(loaded, folder)
        del loaded
        results = {target: measure(target, folder, args, long_messages) for target in targets}

    header = ["streams"]
    for target in targets:
        header += [f"{target} tok/s", f"{target} ITL p50/p95 ms"]
    rows = []
    for count in args.streams:
        row = [str(count)]
        for target in targets:
            r = results[target][count]
            row += [f"{r['tps']:.1f}", f"{r['itl_p50_ms']:.0f}/{r['itl_p95_ms']:.0f}"]
        rows.append(row)
    print_table(
        f"Concurrent greedy streams, {args.tokens} tokens each: aggregate tok/s, ITL", header, rows
    )
    most = max(args.streams)
    summary = []
    for target in targets:
        r = results[target][most]
        versus = ""
        if "mlx-lm" in results and target != "mlx-lm":
            versus = f"{r['tps'] / results['mlx-lm'][most]['tps']:.2f}x"
        single = results[target][min(args.streams)]["tps"]
        summary.append([target, f"{r['tps']:.1f}", f"{r['tps'] / single:.2f}x", versus])
    print_table(
        f"{most} streams",
        ["target", "tok/s", f"vs {min(args.streams)} stream", "vs mlx-lm server"],
        summary,
    )
    if "node" in results and "pipeline" in results:
        for count in args.streams:
            ratio = results["pipeline"][count]["tps"] / results["node"][count]["tps"]
            print(f"pipeline / node at {count} streams: {ratio:.2f}x")
    arrival_rows = []
    for target in targets:
        a = results[target]["arrival"]
        arrival_rows.append(
            [
                target,
                f"{a['ttft_s']:.2f}",
                f"{a['itl_p95_before_ms']:.0f}",
                f"{a['itl_p95_during_ms']:.0f}",
                f"{a['itl_p95_during_ms'] / a['itl_p95_before_ms']:.2f}x",
            ]
        )
    print_table(
        f"A {args.arrival_tokens}-token prompt arrives while {ARRIVAL_STREAMS} streams decode",
        ["target", "its TTFT s", "ITL p95 before ms", "ITL p95 during ms", "during/before"],
        arrival_rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
