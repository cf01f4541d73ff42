"""Placement: memory-weighted pipeline stages and capability-weighted tensor slices (pure
logic)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from exo_tools.placement.plan import (
    NodeResources,
    PlacementError,
    plan_placement,
    split_layers,
    split_tensor,
    split_weighted_layers,
)
from exo_tools.types import ModelLayout, TensorSlice

GIB = 2**30
# SmolLM2-135M at float32, as exo_tools.models.loader.model_layout reports it.
SMOL = ModelLayout(
    model_id="smollm2-135m",
    n_layers=30,
    layer_bytes=14_160_384,
    embed_bytes=113_246_208,
    head_bytes=2_304,
    tied_embeddings=True,
    kv_bytes_per_token=1_536,
    kv_budget_tokens=8_192,
    n_kv_heads=3,
    intermediate_size=1_536,
    attention_bytes=3_538_944,
    mlp_bytes=10_616_832,
)


def nodes(*memory_gib: float) -> list[NodeResources]:
    return [NodeResources(f"n{i}", int(m * GIB)) for i, m in enumerate(memory_gib)]


def test_split_is_proportional_with_largest_remainder() -> None:
    assert split_layers(30, [1, 1]) == [15, 15]
    assert split_layers(30, [1, 1, 1]) == [10, 10, 10]
    assert split_layers(30, [2, 1]) == [20, 10]
    # 29 spare layers by 3:1:1 → 17.4, 5.8, 5.8: the two .8 remainders get the spare layers.
    assert split_layers(32, [3, 1, 1]) == [18, 7, 7]
    assert sum(split_layers(7, [5, 3, 2, 1])) == 7


def test_every_node_gets_at_least_one_layer() -> None:
    assert split_layers(4, [1000, 1, 1]) == [2, 1, 1]
    with pytest.raises(PlacementError, match="only 2 layers"):
        split_layers(2, [1, 1, 1])


def test_auto_uses_the_fewest_nodes_that_fit_master_first() -> None:
    placement = plan_placement(SMOL, nodes(8, 16, 16), master_id="n0", epoch=7)
    assert placement.epoch == 7
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == [("n0", 0, 30)]


def test_min_nodes_forces_a_spread_in_proportion_to_memory() -> None:
    placement = plan_placement(SMOL, nodes(8, 16, 8), master_id="n0", epoch=1, min_nodes=2)
    # The master is stage 0, then the roomiest other node; the tied head (8 layers' worth)
    # is the last stage's work: 30 + 8 in proportion 1:2 is 13 and 17 + 8.
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == [
        ("n0", 0, 13),
        ("n1", 13, 30),
    ]
    assert placement.next_node(0) == "n1" and placement.next_node(1) == "n0"
    three = plan_placement(SMOL, nodes(4, 4, 4), master_id="n1", epoch=1, min_nodes=3)
    assert [s.node_id for s in three.stages] == ["n1", "n0", "n2"]
    assert [s.shard.n_local_layers for s in three.stages] == [13, 12, 5]


def test_the_last_stage_counts_its_head_unless_that_split_does_not_fit() -> None:
    even = plan_placement(SMOL, nodes(8, 8), master_id="n0", epoch=1, min_nodes=2)
    assert [s.shard.n_local_layers for s in even.stages] == [19, 11]  # 19 = 11 + 8
    # At 0.7 GiB (with headroom) a node holds 18 layers and their KV besides the
    # embedding: 19 on the first stage do not fit, 15 and 15 do.
    tight = plan_placement(SMOL, nodes(0.7, 0.7), master_id="n0", epoch=1)
    assert [s.shard.n_local_layers for s in tight.stages] == [15, 15]


def test_spreads_wider_when_one_node_is_too_small() -> None:
    # Whole model + KV budget is ~0.9 GiB; 0.7 GiB nodes need two stages between them.
    placement = plan_placement(SMOL, nodes(0.7, 0.7, 0.7), master_id="n0", epoch=1)
    assert len(placement.stages) == 2


def test_clear_error_when_nothing_fits() -> None:
    with pytest.raises(PlacementError, match="does not fit on 2 node"):
        plan_placement(SMOL, nodes(0.1, 0.1), master_id="n0", epoch=1)
    with pytest.raises(PlacementError, match="only 1 node"):
        plan_placement(SMOL, nodes(8), master_id="n0", epoch=1, min_nodes=2)
    with pytest.raises(PlacementError, match="unknown parallelism"):
        plan_placement(SMOL, nodes(8), master_id="n0", epoch=1, parallelism="data")
    with pytest.raises(PlacementError, match="master"):
        plan_placement(SMOL, nodes(8), master_id="elsewhere", epoch=1)


def test_stage_bytes_count_embedding_and_tied_head() -> None:
    per_layer = SMOL.layer_bytes + SMOL.kv_bytes_per_token * SMOL.kv_budget_tokens
    assert SMOL.stage_bytes(10, 20) == 10 * per_layer
    assert SMOL.stage_bytes(0, 10) == 10 * per_layer + SMOL.embed_bytes
    # The last stage of a tied model holds the embedding too, for its output head.
    assert SMOL.stage_bytes(20, 30) == 10 * per_layer + SMOL.head_bytes + SMOL.embed_bytes
    assert SMOL.stage_bytes(0, 30) == 30 * per_layer + SMOL.embed_bytes + SMOL.head_bytes


def work(part: TensorSlice) -> float:
    """Bytes a member reads per decoded token: its share of the blocks, plus the head."""
    heads = (part.kv_head_end - part.kv_head_start) / SMOL.n_kv_heads
    columns = (part.mlp_end - part.mlp_start) / SMOL.intermediate_size
    blocks = SMOL.n_layers * (SMOL.attention_bytes * heads + SMOL.mlp_bytes * columns)
    return blocks + (SMOL.embed_bytes if part.is_root else 0)


def test_tensor_slices_tile_heads_and_columns_and_balance_work() -> None:
    for weights in ([1.0, 1.0], [1.0, 1.0, 1.0], [3.0, 1.0], [1.0, 2.0, 4.0]):
        parts = split_tensor(SMOL, weights)
        assert [p.rank for p in parts] == list(range(len(weights)))
        assert parts[0].kv_head_start == 0 and parts[-1].kv_head_end == 3
        assert parts[0].mlp_start == 0 and parts[-1].mlp_end == 1536
        for before, after in itertools.pairwise(parts):
            assert before.kv_head_end == after.kv_head_start
            assert before.mlp_end == after.mlp_start
        for part in parts:
            assert part.kv_head_end > part.kv_head_start
            # Whole 64-column blocks, so quantization groups are never cut.
            assert part.mlp_end > part.mlp_start and part.mlp_start % 64 == 0


def test_tensor_work_follows_the_weights_where_it_can() -> None:
    one_head = SMOL.n_layers * SMOL.attention_bytes / 3
    for weights in ([1.0, 1.0], [1.0, 1.0, 1.0], [3.0, 1.0]):
        parts = split_tensor(SMOL, weights)
        total = sum(work(p) for p in parts)
        # Each member's work is within one KV head's worth of its weighted share.
        for part, weight in zip(parts, weights, strict=True):
            assert abs(work(part) - total * weight / sum(weights)) <= one_head, (weights, parts)
    # A slow master cannot shed the output head: it keeps the least it can hold.
    root, *_ = split_tensor(SMOL, [1.0, 2.0, 4.0])
    assert (root.kv_head_end - root.kv_head_start, root.mlp_end - root.mlp_start) == (1, 64)


def test_two_equal_members_split_three_kv_heads_unevenly() -> None:
    parts = split_tensor(SMOL, [1.0, 1.0])
    # Rank 0 also runs the output head (the tied 113 MB embedding), so it takes less of
    # the blocks: one KV head and fewer MLP columns.
    assert [(p.kv_head_start, p.kv_head_end) for p in parts] == [(0, 1), (1, 3)]
    assert parts[0].mlp_end - parts[0].mlp_start < parts[1].mlp_end - parts[1].mlp_start


def test_tensor_placement_and_its_limits() -> None:
    placement = plan_placement(
        SMOL, nodes(8, 8), master_id="n0", epoch=3, parallelism="tensor", min_nodes=2
    )
    assert placement.parallelism == "tensor"
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == [
        ("n0", 0, 30),
        ("n1", 0, 30),
    ]
    assert [s.tensor.rank for s in placement.stages if s.tensor] == [0, 1]
    # A faster member takes more (measured speed outranks memory when every node has it).
    fast = [NodeResources("n0", 8 * GIB, 10.0), NodeResources("n1", 8 * GIB, 30.0)]
    skewed = plan_placement(SMOL, fast, master_id="n0", epoch=1, parallelism="tensor", min_nodes=2)
    shares = [s.tensor for s in skewed.stages if s.tensor]
    assert work(shares[1]) > 2 * work(shares[0])
    # One node: the same computation as a 1-stage pipeline.
    alone = plan_placement(SMOL, nodes(8), master_id="n0", epoch=1, parallelism="tensor")
    assert alone.parallelism == "pipeline" and len(alone.stages) == 1
    with pytest.raises(PlacementError, match="needs at least 4 KV heads; smollm2-135m has 3"):
        plan_placement(
            SMOL, nodes(8, 8, 8, 8), master_id="n0", epoch=1, parallelism="tensor", min_nodes=4
        )
    # Memory is checked per member: weights of its slice plus its share of the KV budget.
    with pytest.raises(PlacementError, match="KV heads"):
        plan_placement(
            SMOL, nodes(0.2, 0.2), master_id="n0", epoch=1, parallelism="tensor", min_nodes=2
        )


def test_tensor_bytes_count_slices_and_root_extras() -> None:
    root, member = split_tensor(SMOL, [1.0, 1.0])
    norms = SMOL.layer_bytes - SMOL.attention_bytes - SMOL.mlp_bytes
    assert SMOL.tensor_weight_bytes(member) == SMOL.n_layers * (
        norms
        + SMOL.attention_bytes * 2 // 3
        + SMOL.mlp_bytes * (member.mlp_end - member.mlp_start) // 1536
    )
    both = SMOL.tensor_weight_bytes(root) + SMOL.tensor_weight_bytes(member)
    # The blocks are split, not copied; the norms are in both; the head only on rank 0.
    assert both == SMOL.n_layers * (SMOL.layer_bytes + norms) + SMOL.embed_bytes + SMOL.head_bytes


def test_layers_of_unequal_weight_split_by_bytes() -> None:
    # A dense first layer, then mixture-of-experts layers four times as heavy.
    layers = (10, 40, 40, 40, 40, 40, 40)
    assert split_weighted_layers(layers, [1.0, 1.0]) == [4, 3]  # 130 / 120 bytes
    assert split_weighted_layers(layers, [3.0, 1.0]) == [5, 2]  # 170 / 80
    assert split_weighted_layers(layers, [1.0, 1.0, 1.0]) == [3, 2, 2]
    assert sum(split_weighted_layers(layers, [0.0, 0.0])) == len(layers)
    with pytest.raises(PlacementError, match="each needs one"):
        split_weighted_layers((1, 1), [1.0, 1.0, 1.0])


def test_placement_uses_per_layer_bytes() -> None:
    heavy = ModelLayout(
        model_id="moe",
        n_layers=4,
        layer_bytes=400,
        embed_bytes=0,
        head_bytes=0,
        tied_embeddings=False,
        kv_bytes_per_token=0,
        kv_budget_tokens=0,
        per_layer_bytes=(100, 100, 100, 700),
    )
    placement = plan_placement(heavy, nodes(1, 1), master_id="n0", epoch=1, min_nodes=2)
    # Two layers each would give the first node 200 bytes and the second 800.
    assert [(s.start_layer, s.end_layer) for s in placement.stages] == [(0, 3), (3, 4)]


def test_a_model_that_cannot_be_tensor_split_is_refused_by_name() -> None:
    moe = replace(SMOL, model_type="qwen3_moe", tensor_refusal="block 0's feed-forward is MoE")
    with pytest.raises(PlacementError, match=r"\(qwen3_moe\) cannot be tensor-split: block 0"):
        plan_placement(moe, nodes(8, 8), master_id="n0", epoch=1, parallelism="tensor", min_nodes=2)
    # One node is no split: it serves as it is.
    single = plan_placement(moe, nodes(8), master_id="n0", epoch=1, parallelism="tensor")
    assert len(single.stages) == 1
