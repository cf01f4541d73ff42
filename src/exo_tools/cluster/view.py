"""Pydantic models of the cluster view served at GET /v1/cluster."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field


class Capabilities(BaseModel):
    memory_total: int = 0
    memory_available: int = 0
    chip: str = ""
    mlx_device: str = ""
    matmul_gflops: float = 0.0  # MLX matrix-vector speed; tensor placement sizes shares by it


class NodeInfo(BaseModel):
    id: str
    addresses: list[str] = Field(default_factory=list)
    grpc_port: int = 0
    data_port: int = 0
    api_port: int = 0
    version: str = ""
    start_time: float = 0.0
    capabilities: Capabilities = Field(default_factory=Capabilities)
    healthy: bool = True
    # The last placement epoch whose ring broke at this node (0: none), why, and the node
    # at the stream's other end ("" when unknown).
    broken_epoch: int = 0
    broken_reason: str = ""
    broken_peer: str = ""


class LinkInfo(BaseModel):
    source: str
    target: str
    latency_ms: float


class ClusterView(BaseModel):
    """`self_id` serializes as "self" (use model_dump(by_alias=True))."""

    model_config = ConfigDict(populate_by_name=True)

    self_id: str = Field(
        serialization_alias="self", validation_alias=AliasChoices("self", "self_id")
    )
    cluster: str = ""
    master: str
    nodes: list[NodeInfo]
    links: list[LinkInfo] = Field(default_factory=list)
