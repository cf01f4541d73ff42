"""Pipeline parallelism across real node processes on loopback, with the real model.

Each class starts its own cluster (the first node started is the master: the election
prefers the oldest) and tears it down before the next class starts, so at most three
node processes share this machine's cores at a time.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests

from exo_tools.cluster.auth import ClusterAuth
from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
from exo_tools.models.loader import load_model, model_layout
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.proto import node_pb2, node_pb2_grpc
from tests.helpers.mlx_lm_reference import reference_generate
from tests.helpers.nodes import NodeProcess, node_environment, start_cluster_nodes

pytestmark = pytest.mark.slow
MODEL = DEFAULT_MODEL_ID
SECRET = "pipeline-test-secret"
MAX_TOKENS = 12
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def reference(model_path: Path) -> dict[str, list[int]]:
    """mlx-lm's own greedy tokens for each prompt (float32, like the nodes on this CPU)."""
    cases = [{"messages": user(p), "max_tokens": MAX_TOKENS} for p in PROMPTS]
    return dict(zip(PROMPTS, reference_generate(model_path, "float32", cases), strict=True))


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> TextTokenizer:
    return load_model(CATALOG[MODEL], model_path, dtype="native", progress=False).tokenizer


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


@pytest.fixture(scope="class")
def two() -> Iterator[Cluster]:
    cluster = start_cluster(2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="class")
def three() -> Iterator[Cluster]:
    cluster = start_cluster(3)
    yield cluster
    cluster.stop()


class TestTwoStages:
    @pytest.fixture
    def cluster(self, two: Cluster) -> Cluster:
        return two

    def test_placement_view(self, cluster: Cluster) -> None:
        ids = [str(node.health()["node_id"]) for node in cluster.nodes]
        placement = cluster.view()["placement"]
        assert placement["model"] == MODEL and placement["parallelism"] == "pipeline"
        assert [(s["node_id"], s["start_layer"], s["end_layer"]) for s in placement["stages"]] == [
            (ids[0], 0, 15),
            (ids[1], 15, 30),
        ]
        assert all(s["state"] == "ready" and s["layers_loaded"] == 15 for s in placement["stages"])
        # A member shows the same placement, as the master gave it.
        member_view = cluster.view(cluster.nodes[1])["placement"]
        assert member_view["epoch"] == placement["epoch"]
        assert cluster.nodes[1].health()["stage"] == {
            "epoch": placement["epoch"],
            "state": "ready",
            "start_layer": 15,
            "end_layer": 30,
            "layers_loaded": 15,
            "weight_bytes": placement["stages"][1]["weight_bytes"],
        }

    def test_greedy_output_is_token_identical_to_mlx_lm(
        self, cluster: Cluster, reference: dict[str, list[int]], tokenizer: TextTokenizer
    ) -> None:
        assert_identical(cluster, cluster.master, reference, tokenizer)
        # Through the other node too: it forwards to the master.
        prompt = PROMPTS[0]
        reply = chat(cluster.nodes[1], prompt, max_tokens=MAX_TOKENS).json()
        assert reply["choices"][0]["message"]["content"] == tokenizer.decode(reference[prompt])
        wait_idle(cluster)

    def test_concurrent_requests_stay_apart(
        self, cluster: Cluster, reference: dict[str, list[int]], tokenizer: TextTokenizer
    ) -> None:
        results: dict[str, str] = {}

        def run(prompt: str) -> None:
            results[prompt] = chat(cluster.master, prompt, max_tokens=MAX_TOKENS).json()["choices"][
                0
            ]["message"]["content"]

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert results == {p: tokenizer.decode(ids) for p, ids in reference.items()}
        hops = [node.health()["pipeline"]["hops_measured"] for node in cluster.nodes]
        assert all(count > 0 for count in hops), hops
        wait_idle(cluster)

    def test_client_disconnect_frees_every_stage(self, cluster: Cluster) -> None:
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

    def test_messages_of_another_epoch_are_refused(self, cluster: Cluster) -> None:
        view = cluster.view()
        epoch = view["placement"]["epoch"]
        member = next(n for n in view["nodes"] if n["id"] != view["master"])
        auth = ClusterAuth(SECRET.encode(), cluster.name)
        method = "/exo_tools.v1.Worker/Activations"
        with grpc.insecure_channel(f"127.0.0.1:{member['grpc_port']}") as channel:
            stub = node_pb2_grpc.WorkerStub(channel)
            stale = node_pb2.ActivationMessage(request_id="old", epoch=epoch - 1)
            with pytest.raises(grpc.RpcError) as refused:
                list(
                    stub.Activations(
                        iter([stale]), metadata=auth.sign_call("tester", method), timeout=10
                    )
                )
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"epoch {epoch - 1}" in (refused.value.details() or "")
            load = node_pb2.LoadShardRequest(
                epoch=epoch - 1,
                shard=node_pb2.ShardSpec(model_id=MODEL, start_layer=0, end_layer=30, n_layers=30),
            )
            progress = list(
                stub.LoadShard(
                    load,
                    metadata=auth.sign_call("tester", "/exo_tools.v1.Worker/LoadShard"),
                    timeout=10,
                )
            )
            assert "older than" in progress[-1].error
        # Nothing changed: the member still holds its stage and the cluster still serves.
        assert cluster.nodes[1].health()["stage"]["epoch"] == epoch
        assert chat(cluster.master, "Hi", max_tokens=2).status_code == 200


class TestThreeStages:
    @pytest.fixture
    def cluster(self, three: Cluster) -> Cluster:
        return three

    def test_greedy_output_is_token_identical_to_mlx_lm(
        self, cluster: Cluster, reference: dict[str, list[int]], tokenizer: TextTokenizer
    ) -> None:
        placement = cluster.view()["placement"]
        assert [(s["start_layer"], s["end_layer"]) for s in placement["stages"]] == [
            (0, 10),
            (10, 20),
            (20, 30),
        ]
        assert_identical(cluster, cluster.master, reference, tokenizer)
        wait_idle(cluster)

    def test_each_member_holds_only_its_share(self, cluster: Cluster, model_path: Path) -> None:
        layout = model_layout(CATALOG[MODEL], model_path, dtype="float32")
        full_model = layout.n_layers * layout.layer_bytes + layout.embed_bytes + layout.head_bytes
        by_id = {str(h["node_id"]): h for h in (node.health() for node in cluster.nodes)}
        stages = cluster.view()["placement"]["stages"]
        healths = [by_id[stage["node_id"]] for stage in stages]  # in stage order
        weights = [int(h["weight_bytes"]) for h in healths]
        ten_layers = 10 * layout.layer_bytes
        # Stage 0 has the embedding; the last stage has the norm and, the embeddings being
        # tied, the embedding again for its output head; the middle has only its blocks.
        assert weights[0] == ten_layers + layout.embed_bytes
        assert weights[1] == ten_layers
        assert weights[2] == ten_layers + layout.embed_bytes + layout.head_bytes
        for health, weight in zip(healths, weights, strict=True):
            memory = health["memory"]
            # MLX holds the shard and nothing else (the rest of the file was released).
            assert weight <= memory["mlx_active"] <= weight + 16 * 2**20, memory
            # Resident memory is the shard plus a fixed interpreter/library overhead.
            assert memory["rss"] - weight < 400 * 2**20, memory
        middle_rss = healths[1]["memory"]["rss"]
        assert middle_rss < full_model, "the middle stage is as big as the whole model"
        assert middle_rss < healths[0]["memory"]["rss"] - layout.embed_bytes // 2
        print(
            "per-node weight MB:",
            [round(w / 1e6, 1) for w in weights],
            "rss MB:",
            [round(h["memory"]["rss"] / 1e6, 1) for h in healths],
        )


class TestStageFailure:
    @pytest.fixture
    def cluster(self, two: Cluster) -> Cluster:
        return two

    def test_killed_stage_fails_fast_then_cluster_re_places(self, cluster: Cluster) -> None:
        epoch = cluster.view()["placement"]["epoch"]
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
        # Re-placed on the master alone, the next request succeeds.
        placement = cluster.wait_placed(1, timeout=60, after_epoch=epoch)
        assert placement["stages"][0]["node_id"] == cluster.master.health()["node_id"]
        reply = chat(cluster.master, "What is the capital of France?", max_tokens=8)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        assert cluster.master.health()["active_requests"] == 0
