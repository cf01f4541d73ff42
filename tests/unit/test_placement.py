"""Memory-weighted pipeline placement (pure logic)."""

from __future__ import annotations

import pytest

from exo_tools.cluster.placement import (
    ModelLayout,
    NodeResources,
    PlacementError,
    plan_placement,
    split_layers,
)

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
    with pytest.raises(PlacementError, match="needs a layer"):
        split_layers(2, [1, 1, 1])


def test_auto_uses_the_fewest_nodes_that_fit_master_first() -> None:
    placement = plan_placement(SMOL, nodes(8, 16, 16), master_id="n0", epoch=7)
    assert placement.epoch == 7
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == [("n0", 0, 30)]


def test_min_nodes_forces_a_spread_in_proportion_to_memory() -> None:
    placement = plan_placement(SMOL, nodes(8, 16, 8), master_id="n0", epoch=1, min_nodes=2)
    # The master is stage 0, then the roomiest other node.
    assert [(s.node_id, s.start_layer, s.end_layer) for s in placement.stages] == [
        ("n0", 0, 10),
        ("n1", 10, 30),
    ]
    assert placement.next_node(0) == "n1" and placement.next_node(1) == "n0"
    three = plan_placement(SMOL, nodes(4, 4, 4), master_id="n1", epoch=1, min_nodes=3)
    assert [s.node_id for s in three.stages] == ["n1", "n0", "n2"]
    assert [s.n_layers for s in three.stages] == [10, 10, 10]


def test_spreads_wider_when_one_node_is_too_small() -> None:
    # Whole model + KV budget is ~0.9 GiB; 0.7 GiB nodes need two stages between them.
    placement = plan_placement(SMOL, nodes(0.7, 0.7, 0.7), master_id="n0", epoch=1)
    assert len(placement.stages) == 2


def test_clear_error_when_nothing_fits() -> None:
    with pytest.raises(PlacementError, match="does not fit on 2 node"):
        plan_placement(SMOL, nodes(0.1, 0.1), master_id="n0", epoch=1)
    with pytest.raises(PlacementError, match="only 1 node"):
        plan_placement(SMOL, nodes(8), master_id="n0", epoch=1, min_nodes=2)
    with pytest.raises(PlacementError, match="not implemented yet"):
        plan_placement(SMOL, nodes(8), master_id="n0", epoch=1, parallelism="tensor")
    with pytest.raises(PlacementError, match="master"):
        plan_placement(SMOL, nodes(8), master_id="elsewhere", epoch=1)


def test_stage_bytes_count_embedding_and_tied_head() -> None:
    per_layer = SMOL.layer_bytes + SMOL.kv_bytes_per_token * SMOL.kv_budget_tokens
    assert SMOL.stage_bytes(10, 20) == 10 * per_layer
    assert SMOL.stage_bytes(0, 10) == 10 * per_layer + SMOL.embed_bytes
    # The last stage of a tied model holds the embedding too, for its output head.
    assert SMOL.stage_bytes(20, 30) == 10 * per_layer + SMOL.head_bytes + SMOL.embed_bytes
    assert SMOL.stage_bytes(0, 30) == 30 * per_layer + SMOL.embed_bytes + SMOL.head_bytes
