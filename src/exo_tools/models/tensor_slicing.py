"""Cutting a model's weights down to one tensor member's share, while loading.

A member keeps the query heads of a contiguous range of KV heads (with those KV heads) and
a contiguous range of MLP columns (exo_tools.engine.tensor_parallel runs such a model).
Slicing is done on the loaded weights, quantized triples included (along whole quantization
groups), before they are dequantized, so a member never holds more than its share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from ..types import TensorSlice


class TensorPlanError(ValueError):
    """The model cannot be sliced as asked; the message says why."""


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


def check_tensor_slice(config: dict[str, Any], part: TensorSlice) -> AttentionShape:
    """The model's attention shape, once `part` is known to lie within it."""
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
    return shape


def narrow_attention(layers: list[Any], config: dict[str, Any], part: TensorSlice) -> None:
    """Tell each block's attention how many heads it now holds.

    The model is built from its own full config, so everything derived from the whole
    model (head size, rotary dimensions, scales) stays as the model defines it; only the
    head counts its forward pass reshapes by change to the member's share. The weights,
    cut by `slice_weights`, carry the narrower projections and MLP."""
    shape = check_tensor_slice(config, part)
    kv_heads = part.n_kv_heads
    for block in layers:
        attention = block.self_attn
        for name, value in list(vars(attention).items()):
            if not isinstance(value, int) or isinstance(value, bool) or "head" not in name:
                continue
            is_kv = "kv" in name or "key_value" in name
            if is_kv and value == shape.n_kv_heads:
                setattr(attention, name, kv_heads)
            elif not is_kv and value == shape.n_heads:
                setattr(attention, name, kv_heads * shape.group)


# How each block projection is cut: along its output rows or its input columns, by the
# member's range of query heads, KV heads, MLP columns or experts' MLP columns. A fused
# projection (Phi-3's qkv_proj, gate_up_proj) is cut in each of its pieces, in order.
_CUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "self_attn.q_proj": ("rows", ("query",)),
    "self_attn.k_proj": ("rows", ("kv",)),
    "self_attn.v_proj": ("rows", ("kv",)),
    "self_attn.qkv_proj": ("rows", ("query", "kv after query", "kv after query and kv")),
    "self_attn.o_proj": ("columns", ("query",)),
    "mlp.gate_proj": ("rows", ("mlp",)),
    "mlp.up_proj": ("rows", ("mlp",)),
    "mlp.gate_up_proj": ("rows", ("mlp", "mlp after mlp")),
    "mlp.down_proj": ("columns", ("mlp",)),
    # Mixture of experts: every expert keeps the same share of its columns; the router
    # ("mlp.gate") is whole on every member.
    "mlp.switch_mlp.gate_proj": ("rows", ("experts",)),
    "mlp.switch_mlp.up_proj": ("rows", ("experts",)),
    "mlp.switch_mlp.down_proj": ("columns", ("experts",)),
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


def _ranges(config: dict[str, Any], part: TensorSlice) -> dict[str, tuple[int, int]]:
    """Each cut's [start, end) in the full projection's dimension."""
    shape = AttentionShape.of(config)
    query = (
        part.kv_head_start * shape.group * shape.head_dim,
        part.kv_head_end * shape.group * shape.head_dim,
    )
    kv = (part.kv_head_start * shape.head_dim, part.kv_head_end * shape.head_dim)
    all_query = shape.n_heads * shape.head_dim
    all_kv = shape.n_kv_heads * shape.head_dim
    width = shape.intermediate_size
    experts = int(config.get("moe_intermediate_size") or 0)
    return {
        "query": query,
        "kv": kv,
        "kv after query": (all_query + kv[0], all_query + kv[1]),
        "kv after query and kv": (all_query + all_kv + kv[0], all_query + all_kv + kv[1]),
        "mlp": (part.mlp_start, part.mlp_end),
        "mlp after mlp": (width + part.mlp_start, width + part.mlp_end),
        # The same fraction of every expert's columns as of the dense MLP's.
        "experts": (part.mlp_start * experts // width, part.mlp_end * experts // width),
    }


def _take(array: mx.array, axis: int, pieces: list[tuple[int, int]]) -> mx.array:
    taken = [mx.take(array, mx.arange(start, end), axis=axis) for start, end in pieces]
    return _copy(taken[0] if len(taken) == 1 else mx.concatenate(taken, axis=axis))


def slice_weights(
    weights: dict[str, mx.array],
    quantization: dict[str, dict[str, int]],
    config: dict[str, Any],
    part: TensorSlice,
    dequantize: Callable[[str], None],
) -> None:
    """Cut every block projection of `weights` (in place) down to `part`'s share.

    Rows are a weight's second-to-last axis (its last for a bias), columns its last, so
    experts' stacked weights cut like plain ones. Quantized projections are cut along
    whole quantization groups; one whose cut does not fall on a group boundary is first
    made dense with `dequantize(module)`, which must replace its triple by a dense weight
    and drop it from `quantization`.
    """
    ranges = _ranges(config, part)
    cuts: dict[str, tuple[str, list[tuple[int, int]]]] = {}
    for name in weights:
        found = _projection_of(name)
        if found is not None:
            module, projection = found
            axis, pieces = _CUTS[projection]
            cuts[module] = (axis, [ranges[piece] for piece in pieces])
    for module, (axis, pieces) in cuts.items():
        params = quantization.get(module)
        if axis == "columns" and params is not None:
            bits, group = params["bits"], params["group_size"]
            aligned = all(
                start % group == 0 and end % group == 0 and (start * bits) % 32 == 0
                for start, end in pieces
            )
            if not aligned:
                dequantize(module)
                params = None
        if axis == "rows":
            for kind in ("weight", "scales", "biases", "bias"):
                key = f"{module}.{kind}"
                if key in weights:
                    rows_axis = -1 if kind == "bias" else -2
                    weights[key] = _take(weights[key], rows_axis, pieces)
            continue
        if params is not None:
            bits, group = params["bits"], params["group_size"]
            per_word = 32 // bits
            packed = [(start // per_word, end // per_word) for start, end in pieces]
            grouped = [(start // group, end // group) for start, end in pieces]
            weights[f"{module}.weight"] = _take(weights[f"{module}.weight"], -1, packed)
            for kind in ("scales", "biases"):
                key = f"{module}.{kind}"
                weights[key] = _take(weights[key], -1, grouped)
        else:
            weights[f"{module}.weight"] = _take(weights[f"{module}.weight"], -1, pieces)
        bias = f"{module}.bias"
        if bias in weights and not part.is_root:
            # The output bias is added once, by rank 0; the others' partials must not repeat it.
            weights[bias] = mx.zeros_like(weights[bias])


_ATTENTION = (("q_proj", "k_proj", "v_proj", "o_proj"), ("qkv_proj", "o_proj"))
_DENSE_MLP = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"))
_EXPERTS = ("gate_proj", "up_proj", "down_proj")


def _has_all(module: Any, names: tuple[str, ...]) -> bool:
    return module is not None and all(getattr(module, name, None) is not None for name in names)


def _is_cut_mlp(mlp: Any) -> bool:
    """A dense gated MLP, or a mixture of experts whose only other part is its router."""
    if any(_has_all(mlp, names) for names in _DENSE_MLP):
        return True
    experts = getattr(mlp, "switch_mlp", None)
    if mlp is None or not _has_all(experts, _EXPERTS):
        return False
    others = {key for key, value in mlp.items() if hasattr(value, "parameters")}
    return others <= {"switch_mlp", "gate"}


def tensor_refusal(model: Any, config: dict[str, Any]) -> str | None:
    """Why this model's blocks cannot be tensor-split, or None when they can.

    Read from the model's own blocks (an unevaluated skeleton is enough): every block must
    have query/key/value/output projections cut by heads (separate or fused), with any norm
    inside attention per head, and a gated MLP (or experts with only a router) cut by
    columns.
    """
    shape = AttentionShape.of(config)
    for position, block in enumerate(model.layers):
        attention: Any = getattr(block, "self_attn", None) or {}
        mlp = getattr(block, "mlp", None)
        where = f"block {position}"
        if not any(_has_all(attention, names) for names in _ATTENTION):
            found = sorted(k for k, v in attention.items() if hasattr(v, "parameters"))
            return (
                f"{where}'s attention has no q/k/v/o projections to cut by heads "
                f"(it has {', '.join(found) or 'none'})"
            )
        for name, value in attention.items():
            weight = getattr(value, "weight", None)
            per_head = weight is None or weight.ndim != 1 or weight.shape[0] == shape.head_dim
            if "norm" in name and not per_head:
                return f"{where}'s {name} normalizes across all heads, not per head"
            if "sink" in name:
                return f"{where}'s attention has per-head sinks ({name})"
        if not _is_cut_mlp(mlp):
            kind = type(mlp).__name__ if mlp is not None else "no mlp"
            return (
                f"{where}'s feed-forward ({kind}) is neither a gated MLP nor experts with a "
                "router alone to cut by columns"
            )
    return None
