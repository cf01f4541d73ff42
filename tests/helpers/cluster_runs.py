"""A cluster of real node processes for the parallelism tests, and what they check.

Each test class starts its own cluster (the first node started is the master: the election
prefers the oldest) and tears it down before the next class starts, so at most three node
processes share this machine's cores at a time.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from exo_tools.models.catalog import DEFAULT_MODEL_ID
from exo_tools.models.tokenizer import TextTokenizer
from tests.helpers.conversations import (
    QUESTIONS,
    SYSTEM,
    ask,
    assert_each_turn_reuses_the_last,
    assert_matches_cold_runs,
    converse,
)
from tests.helpers.nodes import NodeProcess, node_environment, start_cluster_nodes

MODEL = DEFAULT_MODEL_ID
SECRET = "pipeline-test-secret"
MAX_TOKENS = 12
TOP_LOGPROBS = 5
# Log-probabilities through a cluster agree with one mlx-lm process to within this: the
# members add partial sums in another order than one matmul does (float32 rounding).
LOGPROB_TOLERANCE = 2e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


class Cluster:
    def __init__(self, nodes: list[NodeProcess], name: str) -> None:
        self.nodes = nodes
        self.name = name

    @property
    def master(self) -> NodeProcess:
        """The node the cluster elected (usually the first started; under CPU contention a
        later one can win, since the election compares cluster start times)."""
        for node in self.nodes:
            try:
                view = requests.get(f"{node.url}/v1/cluster", timeout=5).json()
                health = node.health()
            except requests.RequestException:
                continue
            if view.get("master") == health.get("node_id"):
                return node
        return self.nodes[0]

    def view(self, node: NodeProcess | None = None) -> dict[str, Any]:
        url = (node or self.master).url
        return requests.get(f"{url}/v1/cluster", timeout=5).json()

    def wait_placed(
        self, stages: int, timeout: float = 120.0, after_epoch: int = 0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.view().get("placement")
                if (
                    last
                    and last["state"] == "ready"
                    and len(last["stages"]) == stages
                    and last["epoch"] > after_epoch
                    and self.master.health()["status"] == "ready"
                ):
                    return last
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"no ready {stages}-stage placement: {last}\n{self.master.log()}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(count: int, *extra: str) -> Cluster:
    env = node_environment()
    env["EXO_TOOLS_SECRET"] = SECRET
    name = f"test-pipe-{uuid.uuid4().hex[:8]}"
    args = ("--cluster", name, "--min-nodes", str(count), *extra)
    nodes = start_cluster_nodes(count, *args, env=env)
    cluster = Cluster(nodes, name)
    try:
        cluster.wait_placed(count)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def chat(node: NodeProcess, prompt: str, **body: Any) -> requests.Response:
    body = {"model": MODEL, "messages": user(prompt), "temperature": 0, **body}
    return requests.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)


def stream_text(node: NodeProcess, prompt: str, max_tokens: int = MAX_TOKENS) -> str:
    body = {
        "model": MODEL,
        "messages": user(prompt),
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    parts: list[str] = []
    with requests.post(
        f"{node.url}/v1/chat/completions", json=body, stream=True, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[len(b"data: ") :])
            assert "error" not in chunk, chunk
            parts += [c["delta"].get("content") or "" for c in chunk["choices"]]
    return "".join(parts)


def assert_identical(
    cluster: Cluster, node: NodeProcess, reference: dict[str, list[int]], tok: TextTokenizer
) -> None:
    for prompt, expected_ids in reference.items():
        expected = tok.decode(expected_ids)
        reply = chat(node, prompt, max_tokens=MAX_TOKENS)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"] == expected, prompt
        assert body["usage"]["completion_tokens"] == len(expected_ids)
        assert stream_text(node, prompt) == expected, prompt


def wait_idle(cluster: Cluster, timeout: float = 10.0) -> None:
    """Every stage freed every request's state."""
    deadline = time.monotonic() + timeout
    while True:
        healths = [node.health() for node in cluster.nodes]
        busy = [
            (h["node_id"], h["active_requests"], h["pipeline"]["cached_requests"])
            for h in healths
            if h["active_requests"] or h["pipeline"]["cached_requests"]
        ]
        if not busy:
            return
        assert time.monotonic() < deadline, f"state kept after requests ended: {busy}"
        time.sleep(0.1)


def assert_logprobs_match(node: NodeProcess, runs: dict[str, dict[str, Any]]) -> None:
    """The first positions' log-probabilities (chosen and top alternatives) match mlx-lm's."""
    positions = 4
    for prompt, run in runs.items():
        reply = chat(node, prompt, max_tokens=positions, logprobs=True, top_logprobs=TOP_LOGPROBS)
        assert reply.status_code == 200, reply.text
        entries = reply.json()["choices"][0]["logprobs"]["content"]
        expected = run["logprobs"][:positions]
        assert len(entries) == len(expected), (prompt, entries)
        for entry, (logprob, top) in zip(entries, expected, strict=True):
            assert abs(entry["logprob"] - logprob) <= LOGPROB_TOLERANCE, (prompt, entry, logprob)
            got = [alternative["logprob"] for alternative in entry["top_logprobs"]]
            want = [value for _, value in top]
            assert len(got) == TOP_LOGPROBS
            assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= LOGPROB_TOLERANCE


def assert_disconnect_frees_every_node(cluster: Cluster) -> None:
    """A client that goes away mid-stream frees the request's state on every node."""
    # The previous test's requests may still be releasing their state (a release crosses
    # every stage after the client has its answer); this one counts only its own.
    wait_idle(cluster)
    body = {
        "model": MODEL,
        "messages": user("Write a very long essay about the history of Europe."),
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    response = requests.post(
        f"{cluster.master.url}/v1/chat/completions", json=body, stream=True, timeout=60
    )
    received = 0
    for line in response.iter_lines():
        received += bool(line)
        if received >= 3:
            break
    health = cluster.master.health()
    assert health["active_requests"] == 1, (received, health)
    assert cluster.nodes[1].health()["pipeline"]["cached_requests"] == 1
    response.close()
    wait_idle(cluster)
    assert chat(cluster.master, "Hi", max_tokens=2).status_code == 200


def _stream_events(node: NodeProcess, body: dict[str, Any], kill: NodeProcess | None = None):
    """A streamed chat request's chunks; with `kill`, that node is SIGKILLed after the
    fourth chunk. Returns (chunks, seconds from the kill to the stream's end)."""
    events: list[dict[str, Any]] = []
    killed: float | None = None
    with requests.post(
        f"{node.url}/v1/chat/completions", json=body, stream=True, timeout=60
    ) as response:
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                if "error" in events[-1]:
                    break
            if kill is not None and killed is None and len(events) >= 4:
                kill.stop(signal.SIGKILL)
                killed = time.monotonic()
    return events, (time.monotonic() - killed) if killed is not None else 0.0


def _text(events: list[dict[str, Any]]) -> str:
    return "".join(
        choice["delta"].get("content") or "" for event in events for choice in event["choices"]
    )


def assert_killed_node_stream_resumes_then_re_places(
    cluster: Cluster, model_path: Path, tokenizer: TextTokenizer
) -> None:
    """SIGKILL of a node mid-stream: the master re-places on the nodes left and resumes
    the stream there, so the client sees a pause and then the rest of the very answer an
    uninterrupted greedy run gives, marked as failed over. A conversation's prefix cache
    entries went with the old placement: its next turn is computed from the first token,
    and answers as a cold run does."""
    epoch = cluster.view()["placement"]["epoch"]
    stages = len(cluster.view()["placement"]["stages"])
    before = converse(cluster.master, QUESTIONS[:2])
    assert_each_turn_reuses_the_last(before)
    body = {
        "model": MODEL,
        "messages": user("Write a short story about a lighthouse keeper."),
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    uninterrupted, _ = _stream_events(cluster.master, body)
    events, waited = _stream_events(cluster.master, body, kill=cluster.nodes[1])
    assert "error" not in events[-1], events[-3:]
    finishing = [
        event for event in events if event["choices"] and event["choices"][0]["finish_reason"]
    ]
    # One failover, or two when the view changed again while the first re-placement ran.
    assert finishing and finishing[0].get("failovers", 0) >= 1, events[-3:]
    assert "failovers" not in uninterrupted[-2], uninterrupted[-2]
    assert _text(events) == _text(uninterrupted)
    assert (
        events[-1]["usage"]["completion_tokens"] == uninterrupted[-1]["usage"]["completion_tokens"]
    )
    assert waited < 15.0, f"the stream ended {waited:.1f} s after the kill"
    placement = cluster.wait_placed(stages - 1, timeout=60, after_epoch=epoch)
    assert placement["stages"][0]["node_id"] == cluster.master.health()["node_id"]
    health = cluster.master.health()
    assert health["pipeline"]["failovers"] >= 1, health["pipeline"]
    lines = [line for line in cluster.master.log().splitlines() if " failovers=" in line]
    assert lines and "POST /v1/chat/completions 200" in lines[-1], lines
    reply = chat(cluster.master, "What is the capital of France?", max_tokens=8)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    assert cluster.master.health()["active_requests"] == 0
    after = ask(
        cluster.master,
        [
            *before[-1].messages,
            {"role": "assistant", "content": before[-1].text},
            {"role": "user", "content": QUESTIONS[2]},
        ],
    )
    assert after.cached_tokens < len(tokenizer.encode(SYSTEM)), after  # at most a default
    assert_matches_cold_runs([*before, after], model_path, tokenizer)
