"""Batched decode over requests that keep their own caches ("ragged" batching).

A decode step reads every weight of a stage once whatever the number of rows, so the
decode steps of several requests run as one pass: their tokens (or hidden states) are
stacked as rows of one batch, and every position-wise part of the model (projections,
MLP, norms, head) computes all rows at once. Attention is the one part that differs per
row: each request keeps its own per-layer caches (the same objects it uses alone, so the
prefix cache, releases and rotating windows need nothing new), and each row attends to
its own cache, with its own mask and rotary offset.

This is done by handing the model's own `__call__` a `RowCaches` per layer position: it
updates each row's cache with that row's keys and values and answers the model's
questions (offsets, masks) per row; the keys and values it returns are `PerRow` lists,
which the model passes unopened to `scaled_dot_product_attention`, where
`attention_per_row` (installed by engine.cpu_attention) computes each row against its
own cache. mlx-lm's `BatchKVCache` pads every request to the longest and is rebuilt when
requests join or leave; keeping the requests' caches avoids both.

A pass can also be *packed*: one sequence of tokens made of several requests' segments
(the decode steps of the running requests, one token each, and a prefill chunk of a new
prompt), so the chunk shares the decode step's weight reads instead of costing a pass of
its own. `RowCaches` then knows each row's segment length: it splits the keys and values
along the sequence, asks each row's cache for the mask of its own segment, and its
`offset` is a `TokenPositions` (one position per token), which the rotary embeddings take
through `PackedRope` (installed over the model's rotary modules).

Only caches whose behaviour is fully known here batch (`KVCache`, `RotatingKVCache`); a
model with any other kind (state-space layers, Llama 4's chunked caches, quantized KV), or
whose attention works on the keys itself (`ShardModel` finds out on its first batched
pass, undoes it and stops batching), decodes one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, RotatingKVCache

BATCHABLE_CACHES = (KVCache, RotatingKVCache)


@dataclass(frozen=True)
class PerRow:
    """One array per row of the batch (each row's keys, values or mask)."""

    rows: list[Any]


@dataclass(frozen=True)
class TokenPositions:
    """The position of every token of a packed pass, in place of a cache's offset. It has
    no arithmetic on purpose: model code that does more with an offset than hand it to
    its rotary embedding fails loudly, and the stage stops packing."""

    positions: mx.array


class PackedRope(nn.Module):
    """A model's rotary embedding that also takes `TokenPositions`: every token becomes a
    batch row of its own, and rotary embeddings take one offset per batch row."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._inner = inner  # private: the model's parameter tree stays as loaded

    def __call__(self, x: mx.array, offset: Any = 0) -> mx.array:
        if isinstance(offset, TokenPositions):
            # (1, heads, tokens, dim) -> (tokens, heads, 1, dim) and back.
            return self._inner(x.swapaxes(0, 2), offset=offset.positions).swapaxes(0, 2)
        return self._inner(x, offset=offset)


def _is_rope(part: object) -> bool:
    name = type(part).__name__.lower()
    return isinstance(part, nn.RoPE) or "rope" in name or "rotary" in name


def install_packed_rope(model: nn.Module) -> int:
    """Wrap every rotary embedding module of `model` in `PackedRope` (once); how many
    the model has. A model with none cannot run packed passes."""
    count = 0
    for _, part in model.named_modules():
        for key, child in list(part.children().items()):
            if isinstance(child, PackedRope):
                count += 1
            elif isinstance(child, nn.Module) and _is_rope(child):
                setattr(part, key, PackedRope(child))
                count += 1
    return count


def batchable(cache: Sequence[Any]) -> bool:
    """Whether a request's per-layer caches can join a batched pass."""
    return all(type(layer) in BATCHABLE_CACHES for layer in cache)


class RowCaches:
    """One layer position's caches of every row of a batched pass, as the model's code
    sees a cache."""

    def __init__(self, rows: list[Any], lengths: list[int] | None = None) -> None:
        self.rows = rows
        # A packed pass: row i's segment of `lengths[i]` tokens, in order along the
        # sequence axis of one batch row (None: one batch row per request).
        self.lengths = lengths
        self._offsets: mx.array | TokenPositions | None = None

    @property
    def offset(self) -> mx.array | TokenPositions:
        # Rotary embeddings take an offset per batch row, or a position per token when
        # packed (asked for twice a layer, before the update).
        if self._offsets is None:
            if self.lengths is None:
                self._offsets = mx.array([row.offset for row in self.rows])
            else:
                positions = [
                    position
                    for row, length in zip(self.rows, self.lengths, strict=True)
                    for position in range(row.offset, row.offset + length)
                ]
                self._offsets = TokenPositions(mx.array(positions))
        return self._offsets

    def split(self, array: mx.array, axis: int) -> list[mx.array]:
        """`array`'s part of each row: along the batch axis, or (packed) the rows'
        segments along the sequence axis `axis`. One split per array, not one slice per
        row: a pass's op count is its cost here."""
        count = len(self.rows)
        if self.lengths is not None:
            if count == 1:
                return [array]
            ends = list(accumulate(self.lengths))[:-1]
            return cast(list[mx.array], mx.split(array, ends, axis=axis))
        return cast(list[mx.array], mx.split(array, count, axis=0)) if count > 1 else [array]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[PerRow, PerRow]:
        self._offsets = None
        key_rows = self.split(keys, axis=-2)
        value_rows = self.split(values, axis=-2)
        fetched = [
            row.update_and_fetch(key, value)
            for row, key, value in zip(self.rows, key_rows, value_rows, strict=True)
        ]
        return PerRow([k for k, _ in fetched]), PerRow([v for _, v in fetched])

    def make_mask(self, length: int, **kwargs: Any) -> PerRow | None:
        lengths = self.lengths or [length] * len(self.rows)
        masks = [row.make_mask(own, **kwargs) for row, own in zip(self.rows, lengths, strict=True)]
        if all(mask is None for mask in masks):
            return None
        return PerRow(masks)

    @property
    def state(self) -> list[Any]:
        return [row.state for row in self.rows]

    def __bool__(self) -> bool:
        # `if cache:` in the models' mask helpers must see a cache, whatever its length.
        return True


def row_caches(
    caches: Sequence[Sequence[Any]], lengths: list[int] | None = None
) -> list[RowCaches]:
    """Per layer position, the rows' caches of that position (every request's cache list
    has the same positions); `lengths` for a packed pass (see `RowCaches`)."""
    return [
        RowCaches([cache[position] for cache in caches], lengths)
        for position in range(len(caches[0]))
    ]


def packed_lengths(decode_steps: int, chunk_tokens: int) -> list[int]:
    """The segment lengths of a packed pass: one token per decode step, then the chunk."""
    return [1] * decode_steps + [chunk_tokens]


def packed_steps(hidden: mx.array, steps: int) -> mx.array:
    """The decode steps' rows of a packed hidden state (they come first, one token each),
    as a batch of `steps` rows of one token."""
    return hidden[:, :steps, :].reshape(steps, 1, hidden.shape[-1])


def packed_segments(hidden: mx.array, lengths: list[int], kept: list[int]) -> mx.array:
    """The segments `kept` (indices into `lengths`) of a packed hidden state, in order."""
    starts = [0, *accumulate(lengths)]
    positions = [p for index in kept for p in range(starts[index], starts[index + 1])]
    return hidden[:, mx.array(positions), :]


Attention = Callable[..., mx.array]


def attention_per_row(
    attend: Attention,
    queries: mx.array,
    keys: PerRow,
    values: PerRow,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: Any,
) -> mx.array:
    """A batched pass's attention: each row against its own keys and values (what the
    same request computes alone), stacked back into the batch (or, packed, back along
    the sequence)."""
    count = len(keys.rows)
    masks = mask.rows if isinstance(mask, PerRow) else [mask] * count
    if isinstance(cache, RowCaches):
        rows: list[Any] = cache.rows
        query_rows = cache.split(queries, axis=-2)
        packed = cache.lengths is not None
    else:  # a layer that reads another layer's keys and values
        rows = [None] * count
        query_rows = mx.split(queries, count, axis=0) if count > 1 else [queries]
        packed = False
    outputs = [
        attend(
            query_rows[index],
            keys.rows[index],
            values.rows[index],
            cache=rows[index],
            scale=scale,
            mask=masks[index],
            sinks=sinks,
        )
        for index in range(count)
    ]
    return mx.concatenate(outputs, axis=-2 if packed else 0)
