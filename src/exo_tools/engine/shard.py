"""What part of a model one node computes, and the forward pass over that part."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from ..types import Shard

# Blocks per asynchronous evaluation in a forward pass. Measured on 15 SmolLM2 blocks
# (2-core x86, float32): every 1-5 blocks all save ~2.5 ms of ~38 ms per decode step;
# larger groups mean fewer synchronization points on a GPU.
ASYNC_EVAL_LAYERS = 4


class ShardModel:
    """Runs an mlx-lm model's embedding, its shard's blocks and the head.

    The mlx-lm model object holds only this shard's blocks (renumbered from 0); the
    blocks themselves are mlx-lm's, so a full shard computes exactly what mlx-lm does.
    """

    def __init__(self, model: nn.Module, shard: Shard) -> None:
        self.model = model
        self.shard = shard
        inner: Any = model.model  # type: ignore[attr-defined]
        self._inner = inner
        self._layers: list[Any] = list(inner.layers)
        self._tied = bool(getattr(model, "args", None) and model.args.tie_word_embeddings)  # type: ignore[attr-defined]

    def make_cache(self) -> list[Any]:
        maker = getattr(self.model, "make_cache", None)
        if callable(maker):
            return list(maker())  # type: ignore[arg-type]
        return [KVCache() for _ in self._layers]

    def embed(self, token_ids: mx.array) -> mx.array:
        return self._inner.embed_tokens(token_ids)

    def blocks(self, hidden: mx.array, cache: list[Any]) -> mx.array:
        mask = create_attention_mask(hidden, cache[0])
        for index, (layer, layer_cache) in enumerate(zip(self._layers, cache, strict=True)):
            hidden = layer(hidden, mask, cache=layer_cache)
            if index % ASYNC_EVAL_LAYERS == ASYNC_EVAL_LAYERS - 1:
                # Start computing these blocks while Python builds the next ones' graph
                # (~160 µs a block here). mlx-lm's generate hides graph building by running
                # a step ahead; a pipeline stage cannot, its input arrives over the network.
                mx.async_eval(hidden)
        return hidden

    def head(self, hidden: mx.array) -> mx.array:
        hidden = self._inner.norm(hidden)
        if self._tied:
            return self._inner.embed_tokens.as_linear(hidden)
        return self.model.lm_head(hidden)  # type: ignore[attr-defined]

    def forward(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """Token ids (first stage) or hidden states in; hidden states or logits out."""
        hidden = self.embed(inputs) if self.shard.is_first else inputs
        hidden = self.blocks(hidden, cache)
        return self.head(hidden) if self.shard.is_last else hidden
