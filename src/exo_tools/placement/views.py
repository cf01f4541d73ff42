"""What the model plane shows: states as typed values, and the views at GET /v1/cluster and
in /health."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from ..types import Parallelism, Shard
from .plan import Placement


class CoordinatorState(StrEnum):
    """The master's placement work (a node that is not master is STANDBY)."""

    WAITING = "waiting"  # for --min-nodes healthy nodes, or a stable membership
    LOADING = "loading"  # placing or re-placing: not serving
    READY = "ready"
    FAILED = "failed"  # no placement fits, or loading failed; retried
    STANDBY = "standby"


class WorkerState(StrEnum):
    """This node's own shard."""

    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class PlacementState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    BROKEN = "broken"  # a stage's node left or a stream broke; re-placing


class StageState(StrEnum):
    PENDING = "pending"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ShardView(BaseModel):
    """A shard as JSON: its layer range and, for tensor members, its slice."""

    start_layer: int
    end_layer: int
    # Tensor members only: rank, and [start, end) of the KV heads and MLP columns held.
    tensor_rank: int | None = None
    kv_heads: list[int] | None = None
    mlp_columns: list[int] | None = None

    @staticmethod
    def fields_of(shard: Shard) -> dict[str, Any]:
        """The fields of `shard`, for this view and the views built on it."""
        part = shard.tensor
        return {
            "start_layer": shard.start_layer,
            "end_layer": shard.end_layer,
            "tensor_rank": part.rank if part else None,
            "kv_heads": [part.kv_head_start, part.kv_head_end] if part else None,
            "mlp_columns": [part.mlp_start, part.mlp_end] if part else None,
        }


class StageView(ShardView):
    """One stage of the placement at GET /v1/cluster, as the master tracks its load."""

    index: int
    node_id: str
    state: StageState = StageState.PENDING
    layers_loaded: int = 0
    error: str | None = None
    weight_bytes: int = 0
    rss: int = 0
    mlx_active: int = 0


class PlacementView(BaseModel):
    epoch: int
    model: str
    parallelism: Parallelism = Parallelism.PIPELINE
    n_layers: int
    state: PlacementState
    stages: list[StageView] = Field(default_factory=list)
    error: str | None = None

    @classmethod
    def of(cls, placement: Placement, state: PlacementState) -> PlacementView:
        return cls(
            epoch=placement.epoch,
            model=placement.model_id,
            parallelism=placement.parallelism,
            n_layers=placement.n_layers,
            state=state,
            stages=[
                StageView(index=index, node_id=stage.node_id, **ShardView.fields_of(stage.shard))
                for index, stage in enumerate(placement.stages)
            ],
        )


class WorkerView(BaseModel):
    """This node's own shard in /health (absent fields are left out)."""

    epoch: int
    state: WorkerState
    start_layer: int | None = None
    end_layer: int | None = None
    layers_loaded: int | None = None
    tensor_rank: int | None = None
    kv_heads: list[int] | None = None
    mlp_columns: list[int] | None = None
    weight_bytes: int | None = None
    error: str | None = None
