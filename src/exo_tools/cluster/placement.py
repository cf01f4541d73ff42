"""Which nodes run which layers: memory-weighted pipeline placement (pure, no I/O).

The master calls `plan_placement` with the model's layout and the healthy nodes. Layers are
split in proportion to each node's available memory (largest remainder, at least one layer
per node), and each node's weights plus a KV-cache budget must fit its memory. The master is
always stage 0: prompt ids never leave it and the ring of stages closes at it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

Parallelism = Literal["auto", "pipeline", "tensor"]
PARALLELISM_CHOICES: tuple[str, ...] = ("auto", "pipeline", "tensor")

# Memory a node keeps for the OS, Python, MLX's caches and activations: placement only uses
# this fraction of what a node reports as available.
MEMORY_HEADROOM = 0.8


class PlacementError(RuntimeError):
    """No placement satisfies the request; the message says why."""


@dataclass(frozen=True)
class ModelLayout:
    """The sizes placement needs, in bytes at the dtype the nodes will load."""

    model_id: str
    n_layers: int
    layer_bytes: int  # one transformer block
    embed_bytes: int  # token embedding (first stage; also the last when tied)
    head_bytes: int  # final norm + untied output head (last stage)
    tied_embeddings: bool
    kv_bytes_per_token: int  # per layer: keys + values of one token
    kv_budget_tokens: int  # tokens of KV cache each stage must have room for

    def stage_bytes(self, start: int, end: int) -> int:
        """Weights plus the KV budget of a stage holding layers [start, end)."""
        total = (end - start) * (self.layer_bytes + self.kv_bytes_per_token * self.kv_budget_tokens)
        if start == 0:
            total += self.embed_bytes
        if end == self.n_layers:
            total += self.head_bytes
            if self.tied_embeddings and start != 0:
                total += self.embed_bytes
        return total


@dataclass(frozen=True)
class NodeResources:
    node_id: str
    memory_available: int


@dataclass(frozen=True)
class Stage:
    node_id: str
    start_layer: int
    end_layer: int

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer


@dataclass(frozen=True)
class Placement:
    epoch: int
    model_id: str
    n_layers: int
    stages: tuple[Stage, ...]
    parallelism: str = "pipeline"
    node_ids: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_ids", tuple(stage.node_id for stage in self.stages))

    def next_node(self, index: int) -> str:
        """Where stage `index` streams its output; the last stage's successor is stage 0."""
        return self.stages[(index + 1) % len(self.stages)].node_id


def split_layers(n_layers: int, weights: list[int]) -> list[int]:
    """Layer counts proportional to `weights` (largest remainder), each at least one."""
    count = len(weights)
    if count == 0:
        raise PlacementError("no nodes to place on")
    if count > n_layers:
        raise PlacementError(f"{count} nodes but only {n_layers} layers: a stage needs a layer")
    total = sum(max(w, 0) for w in weights)
    if total <= 0:
        weights, total = [1] * count, count
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


def _try(layout: ModelLayout, chosen: list[NodeResources]) -> tuple[list[Stage], str | None]:
    counts = split_layers(layout.n_layers, [n.memory_available for n in chosen])
    stages: list[Stage] = []
    start = 0
    problem: str | None = None
    for node, count in zip(chosen, counts, strict=True):
        stage = Stage(node.node_id, start, start + count)
        need = layout.stage_bytes(stage.start_layer, stage.end_layer)
        have = int(node.memory_available * MEMORY_HEADROOM)
        if need > have and problem is None:
            problem = (
                f"node {node.node_id} would hold layers [{stage.start_layer}, {stage.end_layer}) "
                f"needing {need / 2**20:.0f} MiB (weights + KV budget) but has "
                f"{have / 2**20:.0f} MiB usable"
            )
        stages.append(stage)
        start += count
    return stages, problem


def plan_placement(
    layout: ModelLayout,
    nodes: list[NodeResources],
    *,
    master_id: str,
    epoch: int,
    parallelism: str = "auto",
    min_nodes: int = 1,
) -> Placement:
    """The fewest nodes (at least `min_nodes`, the master first) whose shares all fit."""
    if parallelism == "tensor":
        raise PlacementError(
            "tensor parallelism is not implemented yet; use --parallelism pipeline or auto"
        )
    if parallelism not in ("auto", "pipeline"):
        raise PlacementError(f"unknown parallelism {parallelism!r}")
    if min_nodes < 1:
        raise PlacementError("--min-nodes must be at least 1")
    ordered = _ordered(nodes, master_id)
    if min_nodes > len(ordered):
        raise PlacementError(f"--min-nodes {min_nodes} but only {len(ordered)} node(s) are healthy")
    problem = ""
    for count in range(min_nodes, min(len(ordered), layout.n_layers) + 1):
        stages, problem_here = _try(layout, ordered[:count])
        if problem_here is None:
            return Placement(
                epoch=epoch,
                model_id=layout.model_id,
                n_layers=layout.n_layers,
                stages=tuple(stages),
            )
        problem = problem_here
    raise PlacementError(f"{layout.model_id} does not fit on {len(ordered)} node(s): {problem}")


# ---------------------------------------------------------------- the view at GET /v1/cluster


class StageView(BaseModel):
    index: int
    node_id: str
    start_layer: int
    end_layer: int
    state: str = "pending"  # pending, loading, ready, failed
    layers_loaded: int = 0
    error: str | None = None
    weight_bytes: int = 0
    rss: int = 0
    mlx_active: int = 0


class PlacementView(BaseModel):
    epoch: int
    model: str
    parallelism: str = "pipeline"
    n_layers: int
    state: str  # loading, ready, failed, superseded
    stages: list[StageView] = Field(default_factory=list)
    error: str | None = None

    @classmethod
    def of(cls, placement: Placement, state: str = "loading") -> PlacementView:
        return cls(
            epoch=placement.epoch,
            model=placement.model_id,
            parallelism=placement.parallelism,
            n_layers=placement.n_layers,
            state=state,
            stages=[
                StageView(
                    index=i, node_id=s.node_id, start_layer=s.start_layer, end_layer=s.end_layer
                )
                for i, s in enumerate(placement.stages)
            ],
        )


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
        "tensor (not implemented yet), auto (pipeline on the fewest nodes that fit; "
        "default)",
    )
    group.add_argument(
        "--min-nodes",
        type=_min_nodes,
        default=1,
        metavar="N",
        help="spread the model over at least N nodes; the first placement waits for N "
        "healthy nodes (default 1)",
    )
