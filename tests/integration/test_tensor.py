"""Tensor parallelism across real node processes on loopback, with the real model.

Every member holds all 30 layers of SmolLM2-135M but only some of its 3 KV heads (with
their query heads) and MLP columns; the members sum their partial outputs over gRPC
all-reduce streams twice per layer. The shares are uneven by design: 3 KV heads over 2
members, and rank 0 (which also runs the output head) takes less of the blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exo_tools.models.catalog import CATALOG
from exo_tools.models.loader import model_layout
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.types import TensorSlice
from tests.helpers.browser import dump_dom
from tests.helpers.cluster_runs import (
    MODEL,
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


def start_tensor_cluster(count: int) -> Cluster:
    return start_cluster(count, "--parallelism", "tensor")


@pytest.fixture(scope="class")
def two() -> Iterator[Cluster]:
    cluster = start_tensor_cluster(2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="class")
def three() -> Iterator[Cluster]:
    cluster = start_tensor_cluster(3)
    yield cluster
    cluster.stop()


def slices(placement: dict[str, Any]) -> list[TensorSlice]:
    size = len(placement["stages"])
    return [
        TensorSlice(s["index"], size, *s["kv_heads"], *s["mlp_columns"])
        for s in placement["stages"]
    ]


def assert_covers_model(placement: dict[str, Any]) -> None:
    """The members' shares tile the 3 KV heads and 1536 MLP columns, each taking some."""
    assert placement["parallelism"] == "tensor"
    parts = slices(placement)
    assert parts[0].kv_head_start == 0 and parts[-1].kv_head_end == 3
    assert parts[0].mlp_start == 0 and parts[-1].mlp_end == 1536
    for before, after in itertools.pairwise(parts):
        assert before.kv_head_end == after.kv_head_start
        assert before.mlp_end == after.mlp_start
    for part in parts:
        assert part.kv_head_end > part.kv_head_start and part.mlp_end > part.mlp_start
    for stage in placement["stages"]:
        assert (stage["start_layer"], stage["end_layer"], stage["state"]) == (0, 30, "ready")


def assert_weights_are_shares(cluster: Cluster, model_path: Path) -> None:
    layout = model_layout(CATALOG[MODEL], model_path, dtype="float32")
    full_model = layout.n_layers * layout.layer_bytes + layout.embed_bytes + layout.head_bytes
    placement = cluster.view()["placement"]
    by_id = {str(h["node_id"]): h for h in (node.health() for node in cluster.nodes)}
    for stage, part in zip(placement["stages"], slices(placement), strict=True):
        health = by_id[stage["node_id"]]
        weight = int(health["stage"]["weight_bytes"])
        assert weight == layout.tensor_weight_bytes(part), (stage, part)
        memory = health["memory"]
        kept = int(health["prefix_cache"]["bytes"])
        # MLX holds the slice and the prefix cache's entries, nothing else (the rest of the
        # file was released).
        assert weight <= memory["mlx_active"] <= weight + kept + 16 * 2**20, memory
        assert memory["rss"] - weight < 400 * 2**20, memory
        assert weight < full_model * 0.8
    print(
        "tensor weight MB:",
        [round(by_id[s["node_id"]]["stage"]["weight_bytes"] / 1e6, 1) for s in placement["stages"]],
    )


class TestTwoMembers:
    @pytest.fixture
    def cluster(self, two: Cluster) -> Cluster:
        return two

    def test_placement_splits_unevenly(self, cluster: Cluster) -> None:
        placement = cluster.view()["placement"]
        assert_covers_model(placement)
        parts = slices(placement)
        # 3 KV heads do not halve: one member holds two.
        assert sorted(p.kv_head_end - p.kv_head_start for p in parts) == [1, 2]
        master = str(cluster.master.health()["node_id"])
        assert placement["stages"][0]["node_id"] == master
        # The page draws each member's share across every layer.
        dom = dump_dom(f"{cluster.master.url}/")
        for stage in placement["stages"]:
            start, end = stage["kv_heads"]
            assert f'<g data-node-id="{stage["node_id"]}" data-layers="0-30">' in dom
            heads = f"KV head {start}" if end - start == 1 else f"KV heads {start}\u2013{end - 1}"
            assert heads in dom
        member = cluster.nodes[1].health()["stage"]
        assert (
            member["tensor_rank"] == 1 and member["kv_heads"] == placement["stages"][1]["kv_heads"]
        )

    def test_constrained_requests_stay_valid(self, cluster: Cluster) -> None:
        assert_constrained_requests_valid(cluster.master.url, "tensor")

    def test_greedy_output_matches_mlx_lm(
        self,
        cluster: Cluster,
        reference: dict[str, list[int]],
        tokenizer: TextTokenizer,
    ) -> None:
        assert_identical(cluster, cluster.master, reference, tokenizer)
        # Through the member too: it forwards to the master.
        prompt = next(iter(reference))
        reply = chat(cluster.nodes[1], prompt, max_tokens=len(reference[prompt])).json()
        assert reply["choices"][0]["message"]["content"] == tokenizer.decode(reference[prompt])
        stats = [node.health()["pipeline"] for node in cluster.nodes]
        assert all(s["allreduces_measured"] > 0 for s in stats), stats
        wait_idle(cluster)

    def test_logprobs_match_mlx_lm(self, cluster: Cluster, reference_runs: dict[str, Any]) -> None:
        assert_logprobs_match(cluster.master, reference_runs)

    def test_each_member_holds_only_its_share(self, cluster: Cluster, model_path: Path) -> None:
        assert_weights_are_shares(cluster, model_path)

    def test_conversation_turns_reuse_every_member_cache(
        self, cluster: Cluster, model_path: Path, tokenizer: TextTokenizer
    ) -> None:
        turns = converse(cluster.master)
        assert_each_turn_reuses_the_last(turns)
        assert_matches_cold_runs(turns, model_path, tokenizer)
        # Every member keeps (and evicts) the same entries, of its own heads.
        stats = [node.health()["prefix_cache"] for node in cluster.nodes]
        assert stats[0]["entries"] == stats[1]["entries"] >= 1
        assert all(member["bytes"] > 0 for member in stats)

    def test_client_disconnect_frees_every_member(self, cluster: Cluster) -> None:
        assert_disconnect_frees_every_node(cluster)

    def test_concurrent_requests_match_each_alone(self, cluster: Cluster) -> None:
        # Batched passes on both members: each request as it comes alone.
        assert_concurrent_requests_match_alone(cluster.master)
        wait_idle(cluster)


class TestThreeMembers:
    @pytest.fixture
    def cluster(self, three: Cluster) -> Cluster:
        return three

    def test_greedy_tokens_and_logprobs_match_mlx_lm(
        self,
        cluster: Cluster,
        reference: dict[str, list[int]],
        reference_runs: dict[str, Any],
        tokenizer: TextTokenizer,
    ) -> None:
        placement = cluster.view()["placement"]
        assert_covers_model(placement)
        assert [p.kv_head_end - p.kv_head_start for p in slices(placement)] == [1, 1, 1]
        assert_identical(cluster, cluster.master, reference, tokenizer)
        assert_logprobs_match(cluster.master, reference_runs)
        wait_idle(cluster)

    def test_each_member_holds_only_its_share(self, cluster: Cluster, model_path: Path) -> None:
        assert_weights_are_shares(cluster, model_path)


class TestMemberFailure:
    @pytest.fixture
    def cluster(self, two: Cluster) -> Cluster:
        return two

    def test_killed_member_mid_stream_resumes_on_the_nodes_left(
        self, cluster: Cluster, model_path: Path, tokenizer: TextTokenizer
    ) -> None:
        assert_killed_node_stream_resumes_then_re_places(cluster, model_path, tokenizer)
