from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Capabilities(_message.Message):
    __slots__ = ("chip", "memory_available", "memory_total", "mlx_device")
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    CHIP_FIELD_NUMBER: _ClassVar[int]
    MLX_DEVICE_FIELD_NUMBER: _ClassVar[int]
    memory_total: int
    memory_available: int
    chip: str
    mlx_device: str
    def __init__(
        self,
        memory_total: int | None = ...,
        memory_available: int | None = ...,
        chip: str | None = ...,
        mlx_device: str | None = ...,
    ) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = (
        "addresses",
        "api_port",
        "capabilities",
        "cluster_name",
        "grpc_port",
        "node_id",
        "start_time",
        "version",
    )
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    GRPC_PORT_FIELD_NUMBER: _ClassVar[int]
    API_PORT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    grpc_port: int
    api_port: int
    version: str
    cluster_name: str
    start_time: float
    capabilities: Capabilities
    def __init__(
        self,
        node_id: str | None = ...,
        addresses: _Iterable[str] | None = ...,
        grpc_port: int | None = ...,
        api_port: int | None = ...,
        version: str | None = ...,
        cluster_name: str | None = ...,
        start_time: float | None = ...,
        capabilities: Capabilities | _Mapping | None = ...,
    ) -> None: ...

class PeerEntry(_message.Message):
    __slots__ = ("grpc_target", "latency_ms", "node_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    GRPC_TARGET_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    grpc_target: str
    latency_ms: float
    def __init__(
        self,
        node_id: str | None = ...,
        grpc_target: str | None = ...,
        latency_ms: float | None = ...,
    ) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("cluster_name", "node_id", "nonce")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cluster_name: str
    nonce: bytes
    def __init__(
        self, node_id: str | None = ..., cluster_name: str | None = ..., nonce: bytes | None = ...
    ) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("cluster_name", "node_id", "nonce", "proof")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_NAME_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    cluster_name: str
    nonce: bytes
    proof: bytes
    def __init__(
        self,
        node_id: str | None = ...,
        cluster_name: str | None = ...,
        nonce: bytes | None = ...,
        proof: bytes | None = ...,
    ) -> None: ...

class AdmitRequest(_message.Message):
    __slots__ = ("client_nonce", "info", "node_id", "proof", "server_nonce")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    SERVER_NONCE_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    client_nonce: bytes
    server_nonce: bytes
    proof: bytes
    info: NodeInfo
    def __init__(
        self,
        node_id: str | None = ...,
        client_nonce: bytes | None = ...,
        server_nonce: bytes | None = ...,
        proof: bytes | None = ...,
        info: NodeInfo | _Mapping | None = ...,
    ) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("info", "peers")
    INFO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    peers: _containers.RepeatedCompositeFieldContainer[PeerEntry]
    def __init__(
        self,
        info: NodeInfo | _Mapping | None = ...,
        peers: _Iterable[PeerEntry | _Mapping] | None = ...,
    ) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("info", "nonce", "peers")
    INFO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    peers: _containers.RepeatedCompositeFieldContainer[PeerEntry]
    nonce: bytes
    def __init__(
        self,
        info: NodeInfo | _Mapping | None = ...,
        peers: _Iterable[PeerEntry | _Mapping] | None = ...,
        nonce: bytes | None = ...,
    ) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("info", "peers", "proof")
    INFO_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    peers: _containers.RepeatedCompositeFieldContainer[PeerEntry]
    proof: bytes
    def __init__(
        self,
        info: NodeInfo | _Mapping | None = ...,
        peers: _Iterable[PeerEntry | _Mapping] | None = ...,
        proof: bytes | None = ...,
    ) -> None: ...

class GetViewRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ViewNode(_message.Message):
    __slots__ = ("healthy", "info")
    INFO_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    healthy: bool
    def __init__(
        self, info: NodeInfo | _Mapping | None = ..., healthy: bool | None = ...
    ) -> None: ...

class Link(_message.Message):
    __slots__ = ("latency_ms", "source", "target")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    latency_ms: float
    def __init__(
        self, source: str | None = ..., target: str | None = ..., latency_ms: float | None = ...
    ) -> None: ...

class ClusterView(_message.Message):
    __slots__ = ("links", "master", "nodes", "self_id")
    SELF_ID_FIELD_NUMBER: _ClassVar[int]
    MASTER_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    self_id: str
    master: str
    nodes: _containers.RepeatedCompositeFieldContainer[ViewNode]
    links: _containers.RepeatedCompositeFieldContainer[Link]
    def __init__(
        self,
        self_id: str | None = ...,
        master: str | None = ...,
        nodes: _Iterable[ViewNode | _Mapping] | None = ...,
        links: _Iterable[Link | _Mapping] | None = ...,
    ) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(
        self, data: bytes | None = ..., dtype: str | None = ..., shape: _Iterable[int] | None = ...
    ) -> None: ...

class ShardSpec(_message.Message):
    __slots__ = ("end_layer", "model_id", "n_layers", "start_layer", "tp_rank", "tp_size")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    END_LAYER_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int
    tp_rank: int
    tp_size: int
    def __init__(
        self,
        model_id: str | None = ...,
        start_layer: int | None = ...,
        end_layer: int | None = ...,
        n_layers: int | None = ...,
        tp_rank: int | None = ...,
        tp_size: int | None = ...,
    ) -> None: ...

class LoadShardRequest(_message.Message):
    __slots__ = ("epoch", "placement_id", "shard")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    shard: ShardSpec
    placement_id: str
    def __init__(
        self,
        epoch: int | None = ...,
        shard: ShardSpec | _Mapping | None = ...,
        placement_id: str | None = ...,
    ) -> None: ...

class LoadShardProgress(_message.Message):
    __slots__ = ("done", "epoch", "error", "finished", "stage", "total")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    stage: str
    done: int
    total: int
    finished: bool
    error: str
    def __init__(
        self,
        epoch: int | None = ...,
        stage: str | None = ...,
        done: int | None = ...,
        total: int | None = ...,
        finished: bool | None = ...,
        error: str | None = ...,
    ) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("has_seed", "seed", "temperature", "top_k", "top_p")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    has_seed: bool
    def __init__(
        self,
        temperature: float | None = ...,
        top_p: float | None = ...,
        top_k: int | None = ...,
        seed: int | None = ...,
        has_seed: bool | None = ...,
    ) -> None: ...

class ActivationMessage(_message.Message):
    __slots__ = ("epoch", "error", "hidden", "request_id", "sampling", "step", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    step: int
    hidden: Tensor
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    error: str
    def __init__(
        self,
        request_id: str | None = ...,
        epoch: int | None = ...,
        step: int | None = ...,
        hidden: Tensor | _Mapping | None = ...,
        token_ids: _Iterable[int] | None = ...,
        sampling: SamplingParams | _Mapping | None = ...,
        error: str | None = ...,
    ) -> None: ...

class AllReduceMessage(_message.Message):
    __slots__ = ("epoch", "error", "layer", "phase", "rank", "request_id", "step", "tensor")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    step: int
    layer: int
    phase: int
    rank: int
    tensor: Tensor
    error: str
    def __init__(
        self,
        request_id: str | None = ...,
        epoch: int | None = ...,
        step: int | None = ...,
        layer: int | None = ...,
        phase: int | None = ...,
        rank: int | None = ...,
        tensor: Tensor | _Mapping | None = ...,
        error: str | None = ...,
    ) -> None: ...

class ReleaseRequestRequest(_message.Message):
    __slots__ = ("epoch", "request_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    epoch: int
    def __init__(self, request_id: str | None = ..., epoch: int | None = ...) -> None: ...

class ReleaseRequestResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: bool | None = ...) -> None: ...
