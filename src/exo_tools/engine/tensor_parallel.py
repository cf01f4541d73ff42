"""Tensor parallelism: each member holds every layer but only a slice of it.

A member keeps the query heads of a contiguous range of KV heads (with those KV heads) and
a contiguous range of MLP columns. Its attention output projection and MLP down projection
then produce partial sums of the full hidden state; `TensorCollective.all_reduce` adds the
members' partials (in rank order, so every member holds bit-identical sums) and the next
layer goes on from there. Rank 0 (the master) embeds the input, sends the embedding to the
others with the step's command, and alone holds the final norm and output head.

Slicing is done on the loaded weights, quantized triples included (along whole quantization
groups), before they are dequantized, so a member never holds more than its share.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..proto import node_pb2
from ..types import Shard, TensorSlice
from .shard import ShardModel
from .tensors import from_proto, to_proto

ALL_REDUCE_TIMEOUT_S = 30.0
LATENCY_WINDOW = 2048

PHASE_ATTENTION = 0
PHASE_MLP = 1


class TensorPlanError(ValueError):
    """The model cannot be sliced as asked; the message says why."""


class CollectiveError(RuntimeError):
    """The all-reduce cannot complete: a member failed, left, or the placement changed."""


@dataclass(frozen=True)
class AttentionShape:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> AttentionShape:
        n_heads = int(config["num_attention_heads"])
        n_kv = int(config.get("num_key_value_heads") or n_heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // n_heads)
        if n_heads % n_kv:
            raise TensorPlanError(f"{n_heads} query heads do not group over {n_kv} KV heads")
        return cls(n_heads, n_kv, head_dim, int(config["intermediate_size"]))

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads


def tensor_config(config: dict[str, Any], part: TensorSlice) -> dict[str, Any]:
    """The config of a model whose blocks hold only `part`'s heads and MLP columns."""
    shape = AttentionShape.of(config)
    if not 0 <= part.kv_head_start < part.kv_head_end <= shape.n_kv_heads:
        raise TensorPlanError(
            f"KV heads [{part.kv_head_start}, {part.kv_head_end}) are not within the "
            f"model's {shape.n_kv_heads}"
        )
    if not 0 <= part.mlp_start < part.mlp_end <= shape.intermediate_size:
        raise TensorPlanError(
            f"MLP columns [{part.mlp_start}, {part.mlp_end}) are not within the model's "
            f"{shape.intermediate_size}"
        )
    kv_heads = part.kv_head_end - part.kv_head_start
    local = dict(config)
    local["num_attention_heads"] = kv_heads * shape.group
    local["num_key_value_heads"] = kv_heads
    local["head_dim"] = shape.head_dim  # no longer hidden_size // heads
    local["intermediate_size"] = part.mlp_end - part.mlp_start
    return local


# How each block projection is cut: along its output rows or its input columns, by the
# member's range of query heads, KV heads or MLP columns.
_CUTS = {
    "self_attn.q_proj": ("rows", "query"),
    "self_attn.k_proj": ("rows", "kv"),
    "self_attn.v_proj": ("rows", "kv"),
    "self_attn.o_proj": ("columns", "query"),
    "mlp.gate_proj": ("rows", "mlp"),
    "mlp.up_proj": ("rows", "mlp"),
    "mlp.down_proj": ("columns", "mlp"),
}


def _projection_of(name: str) -> tuple[str, str] | None:
    """("model.layers.N.self_attn.q_proj", "self_attn.q_proj") for a block projection's
    parameter, None for anything else."""
    parts = name.split(".")
    if len(parts) < 6 or parts[0] != "model" or parts[1] != "layers":
        return None
    projection = ".".join(parts[3:-1])
    if projection not in _CUTS:
        return None
    return ".".join(parts[:-1]), projection


def _copy(array: mx.array) -> mx.array:
    # A slice can share the full tensor's buffer; a copy lets the full tensor go.
    return mx.contiguous(array)


def slice_weights(
    weights: dict[str, mx.array],
    quantization: dict[str, dict[str, int]],
    config: dict[str, Any],
    part: TensorSlice,
    dequantize: Callable[[str], None],
) -> None:
    """Cut every block projection of `weights` (in place) down to `part`'s share.

    Quantized projections are cut along whole quantization groups; one whose cut does not
    fall on a group boundary is first made dense with `dequantize(module)`, which must
    replace its triple by a dense weight and drop it from `quantization`.
    """
    shape = AttentionShape.of(config)
    ranges = {
        "query": (
            part.kv_head_start * shape.group * shape.head_dim,
            part.kv_head_end * shape.group * shape.head_dim,
        ),
        "kv": (part.kv_head_start * shape.head_dim, part.kv_head_end * shape.head_dim),
        "mlp": (part.mlp_start, part.mlp_end),
    }
    cuts: dict[str, tuple[str, tuple[int, int]]] = {}
    for name in weights:
        found = _projection_of(name)
        if found is not None:
            module, projection = found
            axis, by = _CUTS[projection]
            cuts[module] = (axis, ranges[by])
    for module, (axis, (start, end)) in cuts.items():
        params = quantization.get(module)
        if axis == "columns" and params is not None:
            bits, group = params["bits"], params["group_size"]
            aligned = start % group == 0 and end % group == 0 and (start * bits) % 32 == 0
            if not aligned:
                dequantize(module)
                params = None
        if axis == "rows":
            for kind in ("weight", "scales", "biases", "bias"):
                key = f"{module}.{kind}"
                if key in weights:
                    weights[key] = _copy(weights[key][start:end])
            continue
        weight = weights[f"{module}.weight"]
        if params is not None:
            bits, group = params["bits"], params["group_size"]
            per_word = 32 // bits
            weights[f"{module}.weight"] = _copy(weight[:, start // per_word : end // per_word])
            for kind in ("scales", "biases"):
                key = f"{module}.{kind}"
                weights[key] = _copy(weights[key][:, start // group : end // group])
        else:
            weights[f"{module}.weight"] = _copy(weight[:, start:end])
        bias = f"{module}.bias"
        if bias in weights and not part.is_root:
            # The output bias is added once, by rank 0; the others' partials must not repeat it.
            weights[bias] = mx.zeros_like(weights[bias])


class _AllReduced(nn.Module):
    """Runs an mlx-lm submodule on this member's slice, then sums the members' partials."""

    def __init__(self, inner: nn.Module, reduce: Callable[[mx.array], mx.array]) -> None:
        super().__init__()
        self.inner = inner
        self._reduce = reduce

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self._reduce(self.inner(*args, **kwargs))


class TensorCollective:
    """The all-reduce among a placement's members, called on the MLX thread.

    Partials go to every other member over persistent streams (`send(peer_rank, message)`)
    and arrive through `deliver` (any thread). Each is tagged with request, forward pass,
    layer and phase, so concurrent requests never mix; members run passes in the order
    rank 0 sends them, so they always wait on the same tag.
    """

    def __init__(
        self,
        *,
        rank: int,
        size: int,
        epoch: int,
        send: Callable[[int, node_pb2.AllReduceMessage], None],
        timeout_s: float = ALL_REDUCE_TIMEOUT_S,
    ) -> None:
        self.rank = rank
        self.size = size
        self.epoch = epoch
        self._send = send
        self._timeout_s = timeout_s
        self._condition = threading.Condition()
        self._parts: dict[tuple[str, int, int, int], dict[int, node_pb2.Tensor]] = {}
        self._error: str | None = None
        self._request_id = ""
        self._step = 0
        # Whole all-reduce calls, and the part of each spent waiting for the other members
        # (the rest is this member's own serialization, sending and summing).
        self.latencies_us: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.waits_us: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # -- any thread

    def deliver(self, message: node_pb2.AllReduceMessage) -> None:
        with self._condition:
            if message.error:
                self._error = self._error or message.error
            else:
                key = (message.request_id, message.step, message.layer, message.phase)
                self._parts.setdefault(key, {})[message.rank] = message.tensor
            self._condition.notify_all()

    def abort(self, reason: str) -> None:
        """Wake every wait with `reason`; the collective stays failed (a re-placement makes
        a new one)."""
        with self._condition:
            if self._error is None:
                self._error = reason
            self._parts.clear()
            self._condition.notify_all()

    @property
    def error(self) -> str | None:
        return self._error

    # -- the MLX thread

    def begin(self, request_id: str, step: int) -> None:
        """Tag the all-reduces of the next forward pass."""
        self._request_id, self._step = request_id, step

    def fail_peers(self, reason: str) -> None:
        """Tell every other member to give up (this member cannot contribute)."""
        message = node_pb2.AllReduceMessage(
            request_id=self._request_id, epoch=self.epoch, rank=self.rank, error=reason
        )
        for peer in range(self.size):
            if peer != self.rank:
                self._send(peer, message)
        self.abort(reason)

    def all_reduce(self, partial: mx.array, layer: int, phase: int) -> mx.array:
        mx.eval(partial)  # this member's compute, kept out of the all-reduce's time
        started = time.perf_counter()
        tensor = to_proto(partial)
        message = node_pb2.AllReduceMessage(
            request_id=self._request_id,
            epoch=self.epoch,
            step=self._step,
            layer=layer,
            phase=phase,
            rank=self.rank,
            tensor=tensor,
        )
        for peer in range(self.size):
            if peer != self.rank:
                self._send(peer, message)
        key = (self._request_id, self._step, layer, phase)
        sent = time.perf_counter()
        deadline = started + self._timeout_s
        with self._condition:
            while True:
                if self._error is not None:
                    raise CollectiveError(self._error)
                parts = self._parts.get(key)
                if parts is not None and len(parts) == self.size - 1:
                    del self._parts[key]
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise CollectiveError(
                        f"all-reduce of layer {layer} timed out after {self._timeout_s:.0f} s "
                        "waiting for the other members"
                    )
                self._condition.wait(left)
        self.waits_us.append((time.perf_counter() - sent) * 1e6)
        total: mx.array | None = None
        for rank in range(self.size):
            piece = partial if rank == self.rank else from_proto(parts[rank])
            total = piece if total is None else total + piece
        self.latencies_us.append((time.perf_counter() - started) * 1e6)
        assert total is not None
        return total


class TensorShardModel(ShardModel):
    """An mlx-lm model sliced for one member; its blocks sum partials through `collective`.

    Rank 0 embeds (`embed`) and runs the head; every member runs `forward` on the same
    embedded input, in the same order of passes.
    """

    def __init__(
        self, model: nn.Module, shard: Shard, part: TensorSlice, collective: TensorCollective
    ) -> None:
        super().__init__(model, shard)
        self.part = part
        self.collective = collective
        for index, layer in enumerate(self._layers):
            layer.self_attn = _AllReduced(
                layer.self_attn, _reducer(collective, index, PHASE_ATTENTION)
            )
            layer.mlp = _AllReduced(layer.mlp, _reducer(collective, index, PHASE_MLP))

    def forward(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """Embedded hidden states in; logits out on rank 0, the final hidden state elsewhere."""
        hidden = self.blocks(inputs, cache)
        return self.head(hidden) if self.part.is_root else hidden


def _reducer(
    collective: TensorCollective, layer: int, phase: int
) -> Callable[[mx.array], mx.array]:
    return lambda partial: collective.all_reduce(partial, layer, phase)
