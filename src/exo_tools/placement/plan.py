"""Which nodes compute which part of the model (pure, no I/O).

The master calls `plan_placement` with the model's layout and the healthy nodes.

Pipeline: layers are split in proportion to each node's available memory, the output
head counted as the last stage's work (at least one layer per node; layers alone when
that split does not fit). Tensor: every member holds every layer but only a
share of its KV-head groups and MLP columns, sized by the member's measured speed (memory
when speed is unknown); rank 0 also runs the output head, so its share of the blocks is
smaller by that much. Either way each node's weights plus a KV-cache budget must fit its
memory, and the master is the first stage (rank 0): prompt ids never leave it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from ..types import ModelLayout, Parallelism, Shard, TensorSlice

PARALLELISM_CHOICES: tuple[str, ...] = tuple(choice.value for choice in Parallelism)

# Memory a node keeps for the OS, Python, MLX's caches and activations: placement only uses
# this fraction of what a node reports as available.
MEMORY_HEADROOM = 0.8


class PlacementError(RuntimeError):
    """No placement satisfies the request; the message says why."""


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    memory_available: int
    gflops: float = 0.0  # measured matmul speed; 0 when unknown


@dataclass(frozen=True)
class Stage:
    """One node's part of a placement."""

    node_id: str
    shard: Shard

    @property
    def start_layer(self) -> int:
        return self.shard.start_layer

    @property
    def end_layer(self) -> int:
        return self.shard.end_layer

    @property
    def tensor(self) -> TensorSlice | None:
        return self.shard.tensor


@dataclass(frozen=True)
class Placement:
    epoch: int
    model_id: str
    n_layers: int
    stages: tuple[Stage, ...]
    parallelism: Parallelism = Parallelism.PIPELINE  # never AUTO once placed
    node_ids: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_ids", tuple(stage.node_id for stage in self.stages))

    def next_node(self, index: int) -> str:
        """Where stage `index` streams its output; the last stage's successor is stage 0."""
        return self.stages[(index + 1) % len(self.stages)].node_id

    def previous_node(self, index: int) -> str:
        """Whose output stage `index` takes; stage 0's predecessor is the last stage."""
        return self.stages[(index - 1) % len(self.stages)].node_id


def split_layers(n_layers: int, weights: list[float], unit: str = "layer") -> list[int]:
    """Counts of `n_layers` units proportional to `weights` (largest remainder), each at
    least one."""
    count = len(weights)
    if count == 0:
        raise PlacementError("no nodes to place on")
    if count > n_layers:
        raise PlacementError(f"{count} nodes but only {n_layers} {unit}s: each needs one")
    total = sum(max(w, 0) for w in weights)
    if total <= 0:
        weights, total = [1.0] * count, float(count)
    spare = n_layers - count  # each node gets one layer up front, the rest by weight
    quotas = [spare * max(w, 0) / total for w in weights]
    counts = [int(q) for q in quotas]
    left = spare - sum(counts)
    # Largest fractional parts first; ties go to the heavier node, then the earlier one.
    order = sorted(range(count), key=lambda i: (-(quotas[i] - counts[i]), -weights[i], i))
    for i in order[:left]:
        counts[i] += 1
    return [c + 1 for c in counts]


def _ordered(nodes: list[NodeResources], master_id: str) -> list[NodeResources]:
    """The master first (it is stage 0), then the roomiest nodes, ties by id."""
    master = [n for n in nodes if n.node_id == master_id]
    if not master:
        raise PlacementError(f"the master {master_id} is not among the nodes")
    others = sorted(
        (n for n in nodes if n.node_id != master_id),
        key=lambda n: (-n.memory_available, n.node_id),
    )
    return master + others


def _misfit(layout: ModelLayout, chosen: list[NodeResources], stages: list[Stage]) -> str | None:
    """Why the first stage whose weights plus KV budget outgrow its node does not fit."""
    for node, stage in zip(chosen, stages, strict=True):
        need = layout.shard_bytes(stage.shard)
        have = int(node.memory_available * MEMORY_HEADROOM)
        if need > have:
            return (
                f"node {node.node_id} would hold {stage.shard.describe()} needing {need / 2**20:.0f} MiB "
                f"(weights + KV budget) but has {have / 2**20:.0f} MiB usable"
            )
    return None


def split_weighted_layers(
    layer_bytes: tuple[int, ...], weights: list[float], last_extra: int = 0
) -> list[int]:
    """Counts of consecutive layers whose bytes are in proportion to `weights` (layers weigh
    differently in mixtures of experts with dense first layers), each at least one: stage
    i ends at the layer where the running bytes come closest to its running share.
    `last_extra`: work the last stage does besides its layers (the output head), counted in
    its share."""
    count, n_layers = len(weights), len(layer_bytes)
    if count == 0:
        raise PlacementError("no nodes to place on")
    if count > n_layers:
        raise PlacementError(f"{count} nodes but only {n_layers} layers: each needs one")
    positive = [max(w, 0.0) for w in weights]
    total_weight = sum(positive)
    shares = [w / total_weight for w in positive] if total_weight > 0 else [1 / count] * count
    total_bytes = sum(layer_bytes) + last_extra
    running = [0]
    for size in layer_bytes:
        running.append(running[-1] + size)
    ends: list[int] = []
    target = 0.0
    for index in range(count - 1):
        target += shares[index] * total_bytes
        low = (ends[-1] if ends else 0) + 1  # at least one layer for this stage
        high = n_layers - (count - 1 - index)  # and one for each stage after it
        ends.append(min(range(low, high + 1), key=lambda end: abs(running[end] - target)))
    ends.append(n_layers)
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _head_work(layout: ModelLayout) -> int:
    """Bytes a decode step reads in the output head (the embedding when tied)."""
    return layout.embed_bytes if layout.tied_embeddings else layout.head_bytes


def _try(layout: ModelLayout, chosen: list[NodeResources]) -> tuple[list[Stage], str | None]:
    """Layers in proportion to memory, the last stage's output head counted as its work
    (a decode step reads it: for SmolLM2 it weighs about 8 of its 30 layers), so the
    stages of a pipeline take about as long; where that split does not fit, layers alone
    in proportion to memory."""
    memory = [float(n.memory_available) for n in chosen]
    per_layer = layout.per_layer_bytes or (layout.layer_bytes,) * layout.n_layers
    balanced = _stages(layout, chosen, split_weighted_layers(per_layer, memory, _head_work(layout)))
    problem = _misfit(layout, chosen, balanced)
    if problem is None or len(chosen) == 1:
        return balanced, problem
    if len(set(per_layer)) <= 1:
        counts = split_layers(layout.n_layers, memory)
    else:
        counts = split_weighted_layers(per_layer, memory)
    stages = _stages(layout, chosen, counts)
    return stages, _misfit(layout, chosen, stages)


def _stages(layout: ModelLayout, chosen: list[NodeResources], counts: list[int]) -> list[Stage]:
    stages: list[Stage] = []
    start = 0
    for node, count in zip(chosen, counts, strict=True):
        shard = Shard(layout.model_id, start, start + count, layout.n_layers)
        stages.append(Stage(node.node_id, shard))
        start += count
    return stages


# MLP columns are cut in multiples of this (or the largest power of two dividing the width),
# so quantized down projections are cut along whole quantization groups.
MLP_COLUMN_UNIT = 64


def _mlp_unit(width: int) -> int:
    unit = MLP_COLUMN_UNIT
    while width % unit:
        unit //= 2
    return unit


def _capability_weights(nodes: list[NodeResources]) -> list[float]:
    if all(node.gflops > 0 for node in nodes):
        return [node.gflops for node in nodes]
    return [float(node.memory_available) for node in nodes]


def split_tensor(layout: ModelLayout, weights: list[float]) -> list[TensorSlice]:
    """Members' shares of KV-head groups and MLP columns, each member's total work (its
    share of the blocks, plus the output head on rank 0) in proportion to its weight."""
    size = len(weights)
    if layout.n_kv_heads <= 0 or layout.intermediate_size <= 0:
        raise PlacementError(f"{layout.model_id} has no attention/MLP layout to slice")
    if size > layout.n_kv_heads:
        raise PlacementError(
            f"tensor parallelism over {size} nodes needs at least {size} KV heads; "
            f"{layout.model_id} has {layout.n_kv_heads} (use fewer nodes or --parallelism "
            "pipeline)"
        )
    unit = _mlp_unit(layout.intermediate_size)
    units = layout.intermediate_size // unit
    # Bytes read per token stand in for work: decoding is bound by memory bandwidth.
    group_cost = layout.n_layers * layout.attention_bytes / layout.n_kv_heads
    unit_cost = layout.n_layers * layout.mlp_bytes * unit / layout.intermediate_size
    head_cost = _head_work(layout)
    total = group_cost * layout.n_kv_heads + unit_cost * units + head_cost
    weight_sum = sum(max(w, 0.0) for w in weights) or float(size)
    budgets = [
        max(total * max(w, 0.0) / weight_sum - (head_cost if rank == 0 else 0.0), 0.0)
        for rank, w in enumerate(weights)
    ]
    groups = split_layers(layout.n_kv_heads, budgets, unit="KV head")
    left = [max(b - g * group_cost, 0.0) for b, g in zip(budgets, groups, strict=True)]
    columns = split_layers(units, left, unit=f"{unit}-column MLP block")
    slices: list[TensorSlice] = []
    kv_start = mlp_start = 0
    for rank, (g, c) in enumerate(zip(groups, columns, strict=True)):
        slices.append(
            TensorSlice(rank, size, kv_start, kv_start + g, mlp_start, mlp_start + c * unit)
        )
        kv_start += g
        mlp_start += c * unit
    return slices


def _try_tensor(layout: ModelLayout, chosen: list[NodeResources]) -> tuple[list[Stage], str | None]:
    slices = split_tensor(layout, _capability_weights(chosen))
    stages = [
        Stage(node.node_id, Shard(layout.model_id, 0, layout.n_layers, layout.n_layers, part))
        for node, part in zip(chosen, slices, strict=True)
    ]
    return stages, _misfit(layout, chosen, stages)


def plan_placement(
    layout: ModelLayout,
    nodes: list[NodeResources],
    *,
    master_id: str,
    epoch: int,
    parallelism: Parallelism | str = Parallelism.AUTO,
    min_nodes: int = 1,
) -> Placement:
    """The fewest nodes (at least `min_nodes`, the master first) whose shares all fit.

    `auto` places pipeline stages: on the machines measured so far tensor parallelism pays a
    network round trip per layer that costs more than it saves (docs/TENSOR.md)."""
    if parallelism not in PARALLELISM_CHOICES:
        raise PlacementError(f"unknown parallelism {parallelism!r}")
    if min_nodes < 1:
        raise PlacementError("--min-nodes must be at least 1")
    ordered = _ordered(nodes, master_id)
    if min_nodes > len(ordered):
        raise PlacementError(f"--min-nodes {min_nodes} but only {len(ordered)} node(s) are healthy")
    tensor = parallelism == Parallelism.TENSOR
    if tensor and min_nodes > layout.n_kv_heads:
        split_tensor(layout, [1.0] * min_nodes)  # raises the error that explains why
    most = min(len(ordered), layout.n_kv_heads if tensor else layout.n_layers)
    problem = ""
    for count in range(min_nodes, most + 1):
        chosen = ordered[:count]
        # One node is the same computation either way; a 1-stage pipeline needs no peers.
        as_tensor = tensor and count > 1
        if as_tensor and layout.tensor_refusal:
            raise PlacementError(
                f"{layout.model_id} ({layout.model_type}) cannot be tensor-split: "
                f"{layout.tensor_refusal}; use --parallelism pipeline"
            )
        stages, problem_here = _try_tensor(layout, chosen) if as_tensor else _try(layout, chosen)
        if problem_here is None:
            return Placement(
                epoch=epoch,
                model_id=layout.model_id,
                n_layers=layout.n_layers,
                stages=tuple(stages),
                parallelism=Parallelism.TENSOR if as_tensor else Parallelism.PIPELINE,
            )
        problem = problem_here
    raise PlacementError(f"{layout.model_id} does not fit on {len(ordered)} node(s): {problem}")


# ---------------------------------------------------------------- command line


def _min_nodes(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError("--min-nodes must be at least 1")
    return value


def add_placement_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--parallelism",
        choices=PARALLELISM_CHOICES,
        default="auto",
        help="how the master splits the model: pipeline (contiguous layer ranges per node), "
        "tensor (every node holds all layers but a share of their attention heads and MLP "
        "columns, sized by measured speed; at most one node per KV head), auto (pipeline "
        "on the fewest nodes that fit; default). Both use the fewest nodes that fit, at "
        "least --min-nodes",
    )
    group.add_argument(
        "--min-nodes",
        type=_min_nodes,
        default=1,
        metavar="N",
        help="spread the model over at least N nodes; the first placement waits for N "
        "healthy nodes (default 1)",
    )
