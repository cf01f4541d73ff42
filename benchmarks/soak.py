"""Soak a node: many concurrent streams of mixed APIs for minutes, watching its memory and
open file descriptors.

    .venv/bin/python benchmarks/soak.py                      # 50 streams, 10 minutes, own node
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:52415 --streams 20 --minutes 3

Each stream loops over: a streamed chat completion, a forced tool call, a streamed
Anthropic message, a streamed Responses call, a stream the client drops after a few
chunks, and a three-turn conversation (prefix-cache hits). Every minute it reads the node's
`/metrics` (`process_resident_memory_bytes`, `process_open_fds`, the prefix cache's bytes,
running and queued requests) and prints a row. The script's own node gets
`--prefix-cache-mb 256`, so the cache fills early and its growth is not mistaken for a
leak. At the end: RSS growth from minute 2 to the last, open fds idle before and after
(during the run they follow the open connections), and every error. Exit status 1 when
RSS grew more than 10 %, idle fds grew, or a request failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m"
MAX_TOKENS = 24
TIMEOUT_S = 300.0
TOPICS = [
    "the sea", "a lighthouse", "mountains", "a city at night", "coffee", "old books",
    "a train journey", "rain", "the moon", "a garden", "winter", "a market", "bees",
    "a violin", "the desert", "autumn leaves", "a bakery", "a river", "stars", "snow",
]  # fmt: skip
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    }
]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def ok(self, kind: str) -> None:
        with self.lock:
            self.done[kind] += 1

    def failed(self, kind: str, why: str) -> None:
        with self.lock:
            key = f"{kind}: {why[:80]}"
            self.errors[key] += 1
            self.examples.setdefault(key, why[:400])


def _sse_lines(response: requests.Response) -> list[str]:
    return [line for line in response.iter_lines(decode_unicode=True) if line]


def chat_stream(url: str, rng: random.Random) -> str | None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Write two lines about {rng.choice(TOPICS)}."}],
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    with requests.post(
        f"{url}/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT_S
    ) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        lines = _sse_lines(r)
    return None if lines and lines[-1] == "data: [DONE]" else f"stream ended with {lines[-1:]}"


def tool_call(url: str, rng: random.Random) -> str | None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Read notes about {rng.choice(TOPICS)}."}],
        "tools": TOOLS,
        "tool_choice": "required",
        "max_tokens": 48,
    }
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    if r.status_code != 200:
        return f"status {r.status_code}: {r.text[:200]}"
    choice = r.json()["choices"][0]
    return None if choice["finish_reason"] == "tool_calls" else f"finish {choice['finish_reason']}"


def messages_stream(url: str, rng: random.Random) -> str | None:
    body = {
        "model": MODEL,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "messages": [{"role": "user", "content": f"Describe {rng.choice(TOPICS)}."}],
    }
    with requests.post(f"{url}/v1/messages", json=body, stream=True, timeout=TIMEOUT_S) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        lines = _sse_lines(r)
    return None if "event: message_stop" in lines else f"no message_stop: {lines[-2:]}"


def responses_stream(url: str, rng: random.Random) -> str | None:
    body = {
        "model": MODEL,
        "input": f"Name three things about {rng.choice(TOPICS)}.",
        "max_output_tokens": MAX_TOKENS,
        "stream": True,
    }
    with requests.post(f"{url}/v1/responses", json=body, stream=True, timeout=TIMEOUT_S) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        lines = _sse_lines(r)
    ended = any(
        line in ("event: response.completed", "event: response.incomplete") for line in lines
    )
    return None if ended else f"no response.completed: {lines[-2:]}"


def dropped_stream(url: str, rng: random.Random) -> str | None:
    """The client goes away after three chunks: the node must free the request."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Tell a long story about {rng.choice(TOPICS)}."}],
        "max_tokens": 200,
        "stream": True,
    }
    with requests.post(
        f"{url}/v1/chat/completions", json=body, stream=True, timeout=TIMEOUT_S
    ) as r:
        if r.status_code != 200:
            return f"status {r.status_code}: {r.text[:200]}"
        chunks = 0
        for line in r.iter_lines():
            chunks += bool(line)
            if chunks >= 3:
                break
    return None


def conversation(url: str, rng: random.Random) -> str | None:
    messages = [{"role": "user", "content": f"Let's talk about {rng.choice(TOPICS)}."}]
    for turn in range(3):
        body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        if r.status_code != 200:
            return f"turn {turn}: status {r.status_code}: {r.text[:200]}"
        answer = r.json()["choices"][0]["message"]["content"] or ""
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "Go on."},
        ]
    return None


SCENARIOS = {
    "chat stream": chat_stream,
    "tool call": tool_call,
    "messages stream": messages_stream,
    "responses stream": responses_stream,
    "dropped stream": dropped_stream,
    "conversation": conversation,
}


def stream_worker(url: str, seed: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choice(list(SCENARIOS))
        try:
            problem = SCENARIOS[kind](url, rng)
        except (requests.RequestException, ValueError, KeyError) as error:
            problem = f"{type(error).__name__}: {error}"
        if problem is None:
            tally.ok(kind)
        else:
            tally.failed(kind, problem)


def sample(url: str) -> dict[str, float]:
    text = requests.get(f"{url}/metrics", timeout=30).text
    wanted = {
        "process_resident_memory_bytes",
        "process_open_fds",
        "exo_tools_prefix_cache_bytes",
        "exo_tools_requests_running",
        "exo_tools_requests_queued",
        "exo_tools_http_requests_in_flight",
    }
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in wanted
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running node (default: start one with the default model)")
    parser.add_argument("--streams", type=int, default=50, help="concurrent streams (default 50)")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long (default 10)")
    args = parser.parse_args()
    node = None
    url = args.url
    if url is None:
        from tests.helpers.nodes import node_environment, start_node

        node = start_node("--prefix-cache-mb", "256", env=node_environment(threads=2))
        url = node.url
    tally = Tally()
    rows: list[dict[str, float]] = []
    try:
        idle_before = sample(url)  # before any stream: what leaked fds are counted against
        started = time.monotonic()
        deadline = started + args.minutes * 60
        workers = [
            threading.Thread(target=stream_worker, args=(url, seed, deadline, tally), daemon=True)
            for seed in range(args.streams)
        ]
        for worker in workers:
            worker.start()
        print(f"{args.streams} streams for {args.minutes:g} minutes against {url}")
        print(
            f"{'minute':>6} {'done':>6} {'errors':>6} {'RSS MB':>8} {'fds':>5} {'cache MB':>9} {'running':>8} {'queued':>7}"
        )
        minute = 0
        while time.monotonic() < deadline:
            time.sleep(max(0.0, started + (minute + 1) * 60 - time.monotonic()))
            minute += 1
            figures = sample(url)
            figures["minute"] = minute
            rows.append(figures)
            with tally.lock:
                done, errors = sum(tally.done.values()), sum(tally.errors.values())
            print(
                f"{minute:>6} {done:>6} {errors:>6} "
                f"{figures.get('process_resident_memory_bytes', 0) / 2**20:>8.0f} "
                f"{figures.get('process_open_fds', 0):>5.0f} "
                f"{figures.get('exo_tools_prefix_cache_bytes', 0) / 2**20:>9.0f} "
                f"{figures.get('exo_tools_requests_running', 0):>8.0f} "
                f"{figures.get('exo_tools_requests_queued', 0):>7.0f}",
                flush=True,
            )
        for worker in workers:
            worker.join(timeout=TIMEOUT_S)
        time.sleep(2)  # dropped streams are freed within a decode round
        after = sample(url)
        alive = requests.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        if node is not None:
            node.stop()
    print(
        "\nrequests by kind: " + ", ".join(f"{kind} {n}" for kind, n in sorted(tally.done.items()))
    )
    for key, count in tally.errors.most_common():
        print(f"  error x{count}: {tally.examples[key]}")
    base = next((row for row in rows if row["minute"] == 2), rows[0] if rows else None)
    if base is None:
        print("too short to compare minutes")
        return 1
    last = rows[-1]
    rss_growth = last["process_resident_memory_bytes"] / base["process_resident_memory_bytes"] - 1
    # Open connections come and go with the streams: fds are compared idle, before and after.
    fd_growth = after["process_open_fds"] - idle_before["process_open_fds"]
    print(
        f"RSS minute {base['minute']:.0f} -> {last['minute']:.0f}: {rss_growth * 100:+.1f} %; "
        f"open fds idle before {idle_before['process_open_fds']:.0f}, idle after "
        f"{after['process_open_fds']:.0f}; "
        f"after the streams: {after.get('exo_tools_requests_running', 0):.0f} running, "
        f"{after.get('exo_tools_http_requests_in_flight', 0):.0f} HTTP requests in flight "
        f"(the scrape itself is one); alive: {alive}"
    )
    failed = rss_growth > 0.10 or fd_growth > 0 or bool(tally.errors) or not alive
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
