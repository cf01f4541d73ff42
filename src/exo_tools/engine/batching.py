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

Only caches whose behaviour is fully known here batch (`KVCache`, `RotatingKVCache`); a
model with any other kind (state-space layers, Llama 4's chunked caches, quantized KV), or
whose attention works on the keys itself (`ShardModel` finds out on its first batched
pass, undoes it and stops batching), decodes one request at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

BATCHABLE_CACHES = (KVCache, RotatingKVCache)


@dataclass(frozen=True)
class PerRow:
    """One array per row of the batch (each row's keys, values or mask)."""

    rows: list[Any]


def batchable(cache: Sequence[Any]) -> bool:
    """Whether a request's per-layer caches can join a batched pass."""
    return all(type(layer) in BATCHABLE_CACHES for layer in cache)


class RowCaches:
    """One layer position's caches of every row of a batched pass, as the model's code
    sees a cache."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self._offsets: mx.array | None = None

    @property
    def offset(self) -> mx.array:
        # Rotary embeddings take an offset per batch row (asked for twice a layer, before
        # the update).
        if self._offsets is None:
            self._offsets = mx.array([row.offset for row in self.rows])
        return self._offsets

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[PerRow, PerRow]:
        self._offsets = None
        count = len(self.rows)
        # One split per array, not one slice per row: a pass's op count is its cost here.
        key_rows = mx.split(keys, count, axis=0) if count > 1 else [keys]
        value_rows = mx.split(values, count, axis=0) if count > 1 else [values]
        fetched = [
            row.update_and_fetch(key, value)
            for row, key, value in zip(self.rows, key_rows, value_rows, strict=True)
        ]
        return PerRow([k for k, _ in fetched]), PerRow([v for _, v in fetched])

    def make_mask(self, length: int, **kwargs: Any) -> PerRow | None:
        masks = [row.make_mask(length, **kwargs) for row in self.rows]
        if all(mask is None for mask in masks):
            return None
        return PerRow(masks)

    @property
    def state(self) -> list[Any]:
        return [row.state for row in self.rows]

    def __bool__(self) -> bool:
        # `if cache:` in the models' mask helpers must see a cache, whatever its length.
        return True


def row_caches(caches: Sequence[Sequence[Any]]) -> list[RowCaches]:
    """Per layer position, the rows' caches of that position (every request's cache list
    has the same positions)."""
    return [RowCaches([cache[position] for cache in caches]) for position in range(len(caches[0]))]


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
    same request computes alone), stacked back into the batch."""
    count = len(keys.rows)
    rows = cache.rows if isinstance(cache, RowCaches) else [None] * count
    masks = mask.rows if isinstance(mask, PerRow) else [mask] * count
    query_rows = mx.split(queries, count, axis=0) if count > 1 else [queries]
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
    return mx.concatenate(outputs, axis=0)
