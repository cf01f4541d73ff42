"""The stage's hook on the model's attention: batched passes, and prefill on CPUs.

Batched decode passes (engine.batching) hand the attention one set of keys and values per
row; the hook computes each row against its own (on every device).

On CPUs, prefill attention computes the softmax in numpy and the products in MLX.

A warm agent turn is a prefill of a few hundred new tokens over thousands of cached ones,
and on a CPU its cost is the attention softmax: for 9 x 186 x 4186 scores MLX's CPU
softmax takes ~140-180 ms a layer, numpy's ~55 ms (measured on this 2-core x86; MLX's CPU
`exp` is the slow part, docs/PREFIX_CACHE.md). So on a CPU device, a prefill chunk's
attention computes its scores and weighted values with MLX (BLAS matmuls) and the softmax
with numpy in between. Decode steps, short chunks, quantized caches and attention sinks
keep mlx-lm's own `scaled_dot_product_attention`; GPUs never take this path.

The model's own code calls `scaled_dot_product_attention` from its module's globals
(imported from `mlx_lm.models.base`), so `install` rebinds that name in the model's
module, once per process.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .batching import PerRow, RowCaches, attention_per_row

# Fewer queries than this (decode steps, a prompt's last token) keep MLX's fused kernel:
# their scores are too few for the softmax to matter.
MIN_QUERIES = 16
# ... except a chunk packed beside decode steps (engine.batching), which is kept short: an
# 8-token chunk over 1800 cached positions, beside 8 decode steps, added 112 ms to the
# pass with MLX's kernel and 50 ms with numpy's softmax (2-core x86, float32).
MIN_PACKED_QUERIES = 2
_NAME = "scaled_dot_product_attention"

Attention = Callable[..., mx.array]


def _softmax_rows(scores: mx.array, causal_tail: int) -> mx.array:
    """Softmax over the last axis in numpy; with `causal_tail` > 0 the last that many
    columns are causally masked against the rows first."""
    array = np.array(scores, copy=True)
    if causal_tail:
        rows = array.shape[-2]
        future = np.triu(np.ones((rows, causal_tail), dtype=bool), k=1 + causal_tail - rows)
        array[..., -causal_tail:][..., future] = -np.inf
    array -= array.max(axis=-1, keepdims=True)
    np.exp(array, out=array)
    array /= array.sum(axis=-1, keepdims=True)
    return mx.array(array)


def _grouped_mask(mask: mx.array, kv_heads: int, repeats: int) -> mx.array:
    """A mask shaped for (batch, heads, queries, keys) reshaped for the grouped scores."""
    if mask.ndim == 4 and mask.shape[1] == kv_heads * repeats and repeats > 1:
        return mask.reshape(mask.shape[0], kv_heads, repeats, *mask.shape[2:])
    if mask.ndim == 4:
        return mx.expand_dims(mask, 2)
    return mask


def make_attention(original: Attention, *, cpu: bool) -> Attention:
    def attention(
        queries: mx.array,
        keys: Any,
        values: Any,
        cache: Any,
        scale: float,
        mask: Any,
        sinks: Any = None,
        min_queries: int = MIN_QUERIES,
    ) -> mx.array:
        if isinstance(keys, PerRow):
            packed = isinstance(cache, RowCaches) and cache.lengths is not None
            attend = partial(attention, min_queries=MIN_PACKED_QUERIES) if packed else attention
            return attention_per_row(attend, queries, keys, values, cache, scale, mask, sinks)
        batch, heads, length, dim = queries.shape
        if (
            not cpu
            or length < min_queries
            or sinks is not None
            or hasattr(cache, "bits")  # quantized KV: mlx-lm's own quantized kernel
            or not isinstance(keys, mx.array)
            or queries.dtype != mx.float32
            or (mask is not None and not isinstance(mask, mx.array) and mask != "causal")
        ):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        kv_heads = keys.shape[1]
        repeats = heads // kv_heads
        grouped = (queries * scale).reshape(batch, kv_heads, repeats, length, dim)
        scores = grouped @ mx.expand_dims(keys, 2).swapaxes(-1, -2)
        causal_tail = 0
        if isinstance(mask, mx.array):
            grouped_mask = _grouped_mask(mask, kv_heads, repeats)
            if grouped_mask.dtype == mx.bool_:
                scores = mx.where(grouped_mask, scores, -mx.inf)
            else:
                scores = scores + grouped_mask
        elif mask == "causal":
            causal_tail = length
        weights = _softmax_rows(scores, causal_tail)
        out = weights @ mx.expand_dims(values, 2)
        return out.reshape(batch, heads, length, values.shape[-1])

    attention.__wrapped__ = original  # type: ignore[attr-defined]
    return attention


def install(model: nn.Module) -> bool:
    """Route the attention of `model`'s architecture through this module; whether it did
    (a model that does not call `scaled_dot_product_attention` keeps its own, and cannot
    run batched passes).

    Every module defining one of the model's submodules is patched: a family's attention
    may live in another family's module (a wrapper model, shared blocks)."""
    cpu = mx.default_device().type == mx.DeviceType.cpu
    names = {type(part).__module__ for _, part in model.named_modules()}
    names.add(type(model).__module__)
    patched = False
    for name in sorted(names):
        module = sys.modules.get(name)
        original = getattr(module, _NAME, None) if module is not None else None
        if module is None or not callable(original):
            continue
        if getattr(original, "__wrapped__", None) is None:
            setattr(module, _NAME, make_attention(cast(Attention, original), cpu=cpu))
        patched = True
    return patched
