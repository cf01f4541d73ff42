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
    assert cluster.master.health()["active_requests"] == 1
    assert cluster.nodes[1].health()["pipeline"]["cached_requests"] == 1
    response.close()
    wait_idle(cluster)
    assert chat(cluster.master, "Hi", max_tokens=2).status_code == 200


def assert_killed_node_fails_fast_then_re_places(
    cluster: Cluster, model_path: Path, tokenizer: TextTokenizer
) -> None:
    """SIGKILL of the second node mid-stream: the client gets an error within 5 s, the
    master re-places on itself alone, and the next request succeeds. A conversation's
    prefix cache entries went with the old placement: its next turn is computed from the
    first token, and answers as a cold run does."""
    epoch = cluster.view()["placement"]["epoch"]
    before = converse(cluster.master, QUESTIONS[:2])
    assert_each_turn_reuses_the_last(before)
    body = {
        "model": MODEL,
        "messages": user("Write a very long essay about the history of Europe."),
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    events: list[dict[str, Any]] = []
    with requests.post(
        f"{cluster.master.url}/v1/chat/completions", json=body, stream=True, timeout=30
    ) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
            if len(events) >= 4:
                break
        cluster.nodes[1].stop(signal.SIGKILL)
        killed = time.monotonic()
        for line in lines:
            if line.startswith(b"data: {"):
                events.append(json.loads(line[6:]))
                if "error" in events[-1]:
                    break
        waited = time.monotonic() - killed
    error = events[-1].get("error")
    assert error is not None, events[-3:]
    assert waited < 5.0, f"the client waited {waited:.1f} s for the error"
    assert "node" in error["message"], error
    placement = cluster.wait_placed(1, timeout=60, after_epoch=epoch)
    assert placement["stages"][0]["node_id"] == cluster.master.health()["node_id"]
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
