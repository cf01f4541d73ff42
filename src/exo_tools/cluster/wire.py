"""Every conversion between the package's types and their protobuf form, in one place.

Nothing below the cluster layer sees a proto: the engine speaks `exo_tools.types`'
messages, the Worker service and the stream senders convert here on the way in and out.
"""

from __future__ import annotations

from dataclasses import fields

from ..proto import node_pb2
from ..types import (
    Failure,
    Forward,
    LoadOrder,
    LoadProgress,
    Partial,
    Release,
    SampledToken,
    SamplingParams,
    Shard,
    StageMessage,
    TensorSlice,
    TokenLogprobs,
    WireTensor,
)
from .view import Capabilities, NodeInfo

# ---------------------------------------------------------------- nodes


_CAPABILITY_FIELDS = ("memory_total", "memory_available", "chip", "mlx_device", "matmul_gflops")


def info_to_proto(info: NodeInfo, cluster_name: str) -> node_pb2.NodeInfo:
    caps = info.capabilities
    return node_pb2.NodeInfo(
        node_id=info.id,
        addresses=info.addresses,
        grpc_port=info.grpc_port,
        data_port=info.data_port,
        api_port=info.api_port,
        version=info.version,
        cluster_name=cluster_name,
        start_time=info.start_time,
        capabilities=node_pb2.Capabilities(
            **{name: getattr(caps, name) for name in _CAPABILITY_FIELDS}
        ),
        broken_epoch=info.broken_epoch,
        broken_reason=info.broken_reason,
        broken_peer=info.broken_peer,
    )


def info_from_proto(message: node_pb2.NodeInfo) -> NodeInfo:
    caps = message.capabilities
    return NodeInfo(
        id=message.node_id,
        addresses=list(message.addresses),
        grpc_port=message.grpc_port,
        data_port=message.data_port,
        api_port=message.api_port,
        version=message.version,
        start_time=message.start_time,
        capabilities=Capabilities(**{name: getattr(caps, name) for name in _CAPABILITY_FIELDS}),
        broken_epoch=message.broken_epoch,
        broken_reason=message.broken_reason,
        broken_peer=message.broken_peer,
    )


def parse_grpc_peer(peer: str) -> str | None:
    """IPv4 host of a grpc `context.peer()` string such as "ipv4:10.0.0.2:51234"."""
    if peer.startswith("ipv4:"):
        host, _, _ = peer[len("ipv4:") :].rpartition(":")
        return host or None
    return None


# ---------------------------------------------------------------- loading


def load_order_to_proto(order: LoadOrder) -> node_pb2.LoadShardRequest:
    shard = order.shard
    spec = node_pb2.ShardSpec(
        model_id=shard.model_id,
        start_layer=shard.start_layer,
        end_layer=shard.end_layer,
        n_layers=shard.n_layers,
        tp_size=1,
    )
    part = shard.tensor
    if part is not None:
        spec.tp_rank, spec.tp_size = part.rank, part.size
        spec.kv_head_start, spec.kv_head_end = part.kv_head_start, part.kv_head_end
        spec.mlp_start, spec.mlp_end = part.mlp_start, part.mlp_end
        spec.tp_members.extend(order.tensor_members)
    return node_pb2.LoadShardRequest(
        epoch=order.epoch,
        shard=spec,
        next_node_id=order.next_node_id,
        previous_node_id=order.previous_node_id,
        dtype=order.dtype,
        stage_index=order.stage_index,
        n_stages=order.n_stages,
        placement_json=order.placement_json,
    )


def load_order_from_proto(request: node_pb2.LoadShardRequest) -> LoadOrder:
    """Raises ValueError for a shard or tensor plan that cannot be."""
    spec = request.shard
    tensor = None
    if spec.tp_size > 1:
        if len(spec.tp_members) != spec.tp_size or spec.tp_rank >= spec.tp_size:
            raise ValueError(
                f"malformed tensor plan: rank {spec.tp_rank} of {spec.tp_size} "
                f"with {len(spec.tp_members)} members"
            )
        tensor = TensorSlice(
            spec.tp_rank,
            spec.tp_size,
            spec.kv_head_start,
            spec.kv_head_end,
            spec.mlp_start,
            spec.mlp_end,
        )
    shard = Shard(spec.model_id, spec.start_layer, spec.end_layer, spec.n_layers, tensor)
    return LoadOrder(
        epoch=request.epoch,
        shard=shard,
        dtype=request.dtype or "auto",
        stage_index=request.stage_index,
        n_stages=max(1, request.n_stages),
        next_node_id=request.next_node_id,
        previous_node_id=request.previous_node_id,
        tensor_members=tuple(spec.tp_members),
        placement_json=request.placement_json,
    )


_PROGRESS_FIELDS = tuple(field.name for field in fields(LoadProgress))


def progress_to_proto(progress: LoadProgress) -> node_pb2.LoadShardProgress:
    return node_pb2.LoadShardProgress(
        **{name: getattr(progress, name) for name in _PROGRESS_FIELDS}
    )


def progress_from_proto(message: node_pb2.LoadShardProgress) -> LoadProgress:
    return LoadProgress(**{name: getattr(message, name) for name in _PROGRESS_FIELDS})


# ---------------------------------------------------------------- the data plane


def tensor_to_proto(tensor: WireTensor) -> node_pb2.Tensor:
    return node_pb2.Tensor(data=tensor.data, dtype=tensor.dtype, shape=tensor.shape)


def tensor_from_proto(message: node_pb2.Tensor) -> WireTensor:
    return WireTensor(message.data, message.dtype, tuple(message.shape))


def sampling_to_proto(params: SamplingParams) -> node_pb2.SamplingParams:
    return node_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        repetition_penalty=params.repetition_penalty,
        dry_multiplier=params.dry_multiplier,
        dry_base=params.dry_base,
        dry_allowed_length=params.dry_allowed_length,
        wrap_up_after=params.wrap_up_after,
        seed=params.seed or 0,
        has_seed=params.seed is not None,
        constraint=params.constraint or "",
        has_constraint=params.constraint is not None,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


def sampling_from_proto(message: node_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        repetition_penalty=message.repetition_penalty or 1.0,
        dry_multiplier=message.dry_multiplier,
        dry_base=message.dry_base,
        dry_allowed_length=message.dry_allowed_length,
        wrap_up_after=message.wrap_up_after,
        seed=int(message.seed) if message.has_seed else None,
        constraint=message.constraint if message.has_constraint else None,
        logprobs=message.logprobs,
        top_logprobs=message.top_logprobs,
    )


def stage_message_to_proto(message: StageMessage) -> node_pb2.ActivationMessage:
    envelope = node_pb2.ActivationMessage(
        request_id=message.request_id, epoch=message.epoch, sent_ns=message.sent_ns
    )
    match message:
        case Forward():
            forward = envelope.forward
            forward.step = message.step
            forward.hidden.CopyFrom(tensor_to_proto(message.hidden))
            forward.sample = message.sample
            if message.sampling is not None:
                forward.sampling.CopyFrom(sampling_to_proto(message.sampling))
            forward.reuse_entry, forward.reuse_tokens = message.reuse_entry, message.reuse_tokens
            forward.rows.extend(message.rows)
            forward.chunk_tokens = message.chunk_tokens
        case SampledToken():
            token = envelope.token
            token.step, token.token_id = message.step, message.token_id
            if message.logprobs is not None:
                token.has_logprobs = True
                token.logprob = message.logprobs.logprob
                token.top_token_ids.extend(token_id for token_id, _ in message.logprobs.top)
                token.top_logprobs.extend(logprob for _, logprob in message.logprobs.top)
        case Release():
            release = envelope.release
            release.SetInParent()
            release.keep_as, release.keep_tokens = message.keep_as, message.keep_tokens
            release.evict.extend(message.evict)
            release.untrimmable = not message.trimmable
            release.stage_bytes.extend(message.stage_bytes)
        case Failure():
            envelope.failure.error = message.error
            envelope.failure.cache_miss = message.cache_miss
    return envelope


def stage_message_from_proto(envelope: node_pb2.ActivationMessage) -> StageMessage:
    """Raises ValueError for a message of no known kind."""
    request_id, epoch, sent_ns = envelope.request_id, envelope.epoch, envelope.sent_ns
    kind = envelope.WhichOneof("kind")
    if kind == "forward":
        forward = envelope.forward
        return Forward(
            request_id,
            epoch,
            forward.step,
            tensor_from_proto(forward.hidden),
            sample=forward.sample,
            sampling=sampling_from_proto(forward.sampling)
            if forward.HasField("sampling")
            else None,
            sent_ns=sent_ns,
            reuse_entry=forward.reuse_entry,
            reuse_tokens=forward.reuse_tokens,
            rows=list(forward.rows),
            chunk_tokens=forward.chunk_tokens,
        )
    if kind == "token":
        token = envelope.token
        logprobs = None
        if token.has_logprobs:
            top = zip(token.top_token_ids, token.top_logprobs, strict=True)
            logprobs = TokenLogprobs(token.logprob, tuple((int(i), v) for i, v in top))
        return SampledToken(
            request_id, epoch, token.step, int(token.token_id), logprobs, sent_ns=sent_ns
        )
    if kind == "release":
        release = envelope.release
        return Release(
            request_id,
            epoch,
            sent_ns=sent_ns,
            keep_as=release.keep_as,
            keep_tokens=release.keep_tokens,
            evict=[int(entry_id) for entry_id in release.evict],
            trimmable=not release.untrimmable,
            stage_bytes=[int(size) for size in release.stage_bytes],
        )
    if kind == "failure":
        failure = envelope.failure
        return Failure(
            request_id, epoch, failure.error, sent_ns=sent_ns, cache_miss=failure.cache_miss
        )
    raise ValueError(f"activation message of request {request_id!r} has no kind")


def partial_to_proto(partial: Partial) -> node_pb2.AllReduceMessage:
    message = node_pb2.AllReduceMessage(
        request_id=partial.request_id,
        epoch=partial.epoch,
        step=partial.step,
        layer=partial.layer,
        phase=partial.phase,
        rank=partial.rank,
        error=partial.error,
    )
    if partial.tensor is not None:
        message.tensor.CopyFrom(tensor_to_proto(partial.tensor))
    return message


def partial_from_proto(message: node_pb2.AllReduceMessage) -> Partial:
    return Partial(
        request_id=message.request_id,
        epoch=message.epoch,
        step=message.step,
        layer=message.layer,
        phase=message.phase,
        rank=message.rank,
        tensor=tensor_from_proto(message.tensor) if message.HasField("tensor") else None,
        error=message.error,
    )
