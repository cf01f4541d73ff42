"""Pipeline parallelism across real node processes on loopback, with the real model.

Each class starts its own cluster (the first node started is the master: the election
prefers the oldest) and tears it down before the next class starts, so at most three
node processes share this machine's cores at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from exo_tools.cluster.auth import ClusterAuth
from exo_tools.models.catalog import CATALOG
from exo_tools.models.loader import model_layout
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.proto import node_pb2, node_pb2_grpc
from tests.helpers.browser import dump_dom, screenshot
from tests.helpers.cluster_checks import peer_channel
from tests.helpers.cluster_runs import (
    MAX_TOKENS,
    MODEL,
    PROMPTS,
    SECRET,
    Cluster,
    assert_disconnect_frees_every_node,
    assert_identical,
    assert_killed_node_stream_resumes_then_re_places,
    assert_logprobs_match,
    chat,
    start_cluster,
    wait_idle,
)
from tests.helpers.concurrency import assert_concurrent_requests_match_alone
from tests.helpers.constraint_cases import assert_constrained_requests_valid
from tests.helpers.conversations import (
    assert_each_turn_reuses_the_last,
    assert_matches_cold_runs,
    converse,
)

pytestmark = pytest.mark.slow


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
        # The tied output head weighs 8 layers: it is the second stage's work (placement).
        assert [(s["node_id"], s["start_layer"], s["end_layer"]) for s in placement["stages"]] == [
            (ids[0], 0, 19),
            (ids[1], 19, 30),
        ]
        assert [(s["state"], s["layers_loaded"]) for s in placement["stages"]] == [
            ("ready", 19),
            ("ready", 11),
        ]
        # A member shows the same placement, as the master gave it.
        member_view = cluster.view(cluster.nodes[1])["placement"]
        assert member_view["epoch"] == placement["epoch"]
        assert cluster.nodes[1].health()["stage"] == {
            "epoch": placement["epoch"],
            "state": "ready",
            "start_layer": 19,
            "end_layer": 30,
            "layers_loaded": 11,
            "weight_bytes": placement["stages"][1]["weight_bytes"],
        }

    def test_constrained_requests_stay_valid(self, cluster: Cluster) -> None:
        assert_constrained_requests_valid(cluster.master.url, "pipeline")

    def test_greedy_output_is_token_identical_to_mlx_lm(
        self, cluster: Cluster, reference: dict[str, list[int]], tokenizer: TextTokenizer
    ) -> None:
        assert_identical(cluster, cluster.master, reference, tokenizer)
        # Through the other node too: it forwards to the master.
        prompt = PROMPTS[0]
        reply = chat(cluster.nodes[1], prompt, max_tokens=MAX_TOKENS).json()
        assert reply["choices"][0]["message"]["content"] == tokenizer.decode(reference[prompt])
        wait_idle(cluster)

    def test_logprobs_match_mlx_lm(self, cluster: Cluster, reference_runs: dict[str, Any]) -> None:
        # The last stage computes them and sends them back with the token.
        assert_logprobs_match(cluster.master, reference_runs)

    def test_concurrent_requests_match_each_alone(self, cluster: Cluster) -> None:
        assert_batched_requests_match_alone(cluster)

    def test_conversation_turns_reuse_every_stage_cache(
        self, cluster: Cluster, model_path: Path, tokenizer: TextTokenizer
    ) -> None:
        turns = converse(cluster.master)
        assert_each_turn_reuses_the_last(turns)
        assert_matches_cold_runs(turns, model_path, tokenizer)
        # Both stages hold the entries; the master's view reports each stage's bytes.
        stats = [node.health()["prefix_cache"] for node in cluster.nodes]
        assert stats[0]["entries"] == stats[1]["entries"] >= 1
        assert cluster.view()["prefix_cache"]["later_stage_bytes"] == [stats[1]["bytes"]]

    def test_client_disconnect_frees_every_stage(self, cluster: Cluster) -> None:
        assert_disconnect_frees_every_node(cluster)

    def test_dashboard_shows_the_cluster_live(self, cluster: Cluster) -> None:
        master, member = cluster.nodes
        view = cluster.view()
        ids = [str(node.health()["node_id"]) for node in cluster.nodes]
        member_grpc = next(node["grpc_port"] for node in view["nodes"] if node["id"] == ids[1])
        method = "/exo_tools.v1.Worker/LoadShard"
        # Without TLS a caller cannot even connect (the cluster speaks mutual TLS only).
        with (
            grpc.insecure_channel(f"127.0.0.1:{member_grpc}") as channel,
            pytest.raises(grpc.RpcError) as plain,
        ):
            list(node_pb2_grpc.WorkerStub(channel).LoadShard(node_pb2.LoadShardRequest()))
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        # A caller through TLS whose calls are signed with another secret (the second,
        # independent check): the member refuses it, and says so.
        intruder = ClusterAuth(b"not-the-cluster-secret", cluster.name)
        with (
            peer_channel(f"127.0.0.1:{member_grpc}", SECRET.encode(), cluster.name) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            list(
                node_pb2_grpc.WorkerStub(channel).LoadShard(
                    node_pb2.LoadShardRequest(),
                    metadata=intruder.sign_call("intruder", method),
                    timeout=10,
                )
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A request through the member, which forwards it to the master.
        reply = chat(member, "Tell me about the sea.", max_tokens=24)
        assert reply.status_code == 200
        request_id = reply.headers["X-Request-Id"]
        # The member's page: its figures come from the master, which gathers every node's.
        dom = dump_dom(f"{member.url}/")
        for node_id, layers in zip(ids, ("0-19", "19-30"), strict=True):
            assert f'<g data-node-id="{node_id}">' in dom  # drawn in the topology
            assert f'<g data-node-id="{node_id}" data-layers="{layers}">' in dom  # placement
        last_rate = re.search(r'id="last-request-tps" data-value="([0-9.]+)"', dom)
        assert last_rate is not None and float(last_rate.group(1)) > 0
        row = re.search(rf'<tr data-request-id="{request_id}">(.*?)</tr>', dom)
        assert row is not None, "the request is not listed"
        rate = re.search(r'<td class="tokens-per-second">([0-9.]+)</td>', row.group(1))
        assert rate is not None and float(rate.group(1)) > 0
        assert "refused peer intruder" in dom  # the member's warning, on the master's page
        assert f"{ids[1]} (this page)" in dom
        screenshot(f"{member.url}/", "dashboard-two-stages.png")
        # One access line per node for the request, under the id its response carried.
        for node, part in ((master, "completion_tokens="), (member, "forwarded_to=")):
            lines = [line for line in node.log().splitlines() if f"id={request_id} " in line]
            assert len(lines) == 1 and "POST /v1/chat/completions 200 " in lines[0], lines
            assert part in lines[0]

    def test_messages_of_another_epoch_are_refused(self, cluster: Cluster) -> None:
        view = cluster.view()
        epoch = view["placement"]["epoch"]
        member = next(n for n in view["nodes"] if n["id"] != view["master"])
        auth = ClusterAuth(SECRET.encode(), cluster.name)
        pull = "/exo_tools.v1.DataPlane/Activations"
        # The data plane: the member serves its stream only to whom it sends it, of the
        # placement it holds, and only to signed calls.
        with peer_channel(
            f"127.0.0.1:{member['data_port']}", SECRET.encode(), cluster.name
        ) as channel:
            data_plane = node_pb2_grpc.DataPlaneStub(channel)
            for caller, asked, expected in (
                (view["master"], epoch - 1, f"epoch {epoch - 1}"),
                ("tester", epoch, "for node tester"),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    list(
                        data_plane.Activations(
                            node_pb2.PullRequest(epoch=asked),
                            metadata=auth.sign_call(caller, pull),
                            timeout=10,
                        )
                    )
                assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert expected in (refused.value.details() or ""), refused.value.details()
            intruder = ClusterAuth(b"not-the-cluster-secret", cluster.name)
            with pytest.raises(grpc.RpcError) as unsigned:
                list(
                    data_plane.Activations(
                        node_pb2.PullRequest(epoch=epoch),
                        metadata=intruder.sign_call(view["master"], pull),
                        timeout=10,
                    )
                )
            assert unsigned.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with peer_channel(
            f"127.0.0.1:{member['grpc_port']}", SECRET.encode(), cluster.name
        ) as channel:
            stub = node_pb2_grpc.WorkerStub(channel)
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


def assert_batched_requests_match_alone(cluster: Cluster) -> None:
    """Batched passes through every stage: each request as it comes alone."""
    before = cluster.master.health()["scheduler"]["packed_chunks"]
    assert_concurrent_requests_match_alone(cluster.master)
    # The long prompt's chunks after its first rode in the decode passes (packed).
    assert cluster.master.health()["scheduler"]["packed_chunks"] > before
    hops = [node.health()["pipeline"]["hops_measured"] for node in cluster.nodes]
    assert all(count > 0 for count in hops), hops
    wait_idle(cluster)


class TestThreeStages:
    @pytest.fixture
    def cluster(self, three: Cluster) -> Cluster:
        return three

    def test_greedy_output_is_token_identical_to_mlx_lm(
        self, cluster: Cluster, reference: dict[str, list[int]], tokenizer: TextTokenizer
    ) -> None:
        placement = cluster.view()["placement"]
        assert [(s["start_layer"], s["end_layer"]) for s in placement["stages"]] == [
            (0, 13),
            (13, 25),
            (25, 30),
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
        layers = [stage["end_layer"] - stage["start_layer"] for stage in stages]  # 13, 12, 5
        blocks = [count * layout.layer_bytes for count in layers]
        # Stage 0 has the embedding; the last stage has the norm and, the embeddings being
        # tied, the embedding again for its output head; the middle has only its blocks.
        assert weights[0] == blocks[0] + layout.embed_bytes
        assert weights[1] == blocks[1]
        assert weights[2] == blocks[2] + layout.embed_bytes + layout.head_bytes
        for health, weight in zip(healths, weights, strict=True):
            memory = health["memory"]
            kept = int(health["prefix_cache"]["bytes"])
            # MLX holds the shard and the prefix cache's entries, nothing else (the rest of
            # the file was released).
            assert weight <= memory["mlx_active"] <= weight + kept + 16 * 2**20, memory
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

    def test_concurrent_requests_match_each_alone(self, cluster: Cluster) -> None:
        # A middle stage passes batched and packed steps on. Last in the class: its
        # requests grow the stages' memory, which the share test above measures.
        assert_batched_requests_match_alone(cluster)


class TestStageFailure:
    @pytest.fixture
    def cluster(self, three: Cluster) -> Cluster:
        return three  # the middle stage is the one killed

    def test_killed_stage_mid_stream_resumes_on_the_nodes_left(
        self, cluster: Cluster, model_path: Path, tokenizer: TextTokenizer
    ) -> None:
        assert_killed_node_stream_resumes_then_re_places(cluster, model_path, tokenizer)
