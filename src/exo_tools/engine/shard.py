"""The forward pass over the part of a model one node computes, by the model's own code.

A stage runs the mlx-lm model's own `__call__`, whatever its architecture: embedding
transforms, per-layer-type masks (sliding, chunked, full), per-layer caches, multipliers,
final norm and head are the model's. The model object holds every layer position: the
stage's blocks are real, the others are `SkippedLayer` placeholders (models.pruning) that
pass the hidden state through and answer attribute questions (a layer's type) for the
model's loop. Around the stage's own blocks this module adds three hooks:

- the first block of a stage that does not embed takes the hidden state that came over the
  network instead of what the model computed from placeholder input;
- the last block of a stage that is not the last stops the pass there (the norm and head
  are the last stage's);
- every few blocks an asynchronous evaluation starts, so Python builds the next blocks'
  graph while the previous ones compute.

Caches: the model's `make_cache()` for every position; a skipped position shares the cache
of one of this stage's blocks of the same kind, so masks the model derives from a
position's cache (offsets, windows) are right for the blocks that use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache

from ..models.pruning import SkippedLayer, embedding_key, layers_path, module_at
from ..types import Shard
from . import cpu_attention
from .batching import batchable, install_packed_rope, packed_steps, row_caches

log = logging.getLogger(__name__)

# Blocks per asynchronous evaluation in a forward pass. Measured on 15 SmolLM2 blocks
# (2-core x86, float32): every 1-5 blocks all save ~2.5 ms of ~38 ms per decode step;
# larger groups mean fewer synchronization points on a GPU.
ASYNC_EVAL_LAYERS = 4


class ShardError(ValueError):
    """The model cannot be run split this way; the message names the model type and why."""


class _StageOutput(Exception):
    """Carries a stage's hidden state out of the model's loop at the stage's last block."""

    def __init__(self, hidden: mx.array) -> None:
        super().__init__()
        self.hidden = hidden


class _StageBlock:
    """One of the stage's own blocks, with the stage's hooks around it (in the layer list
    the model's loop sees during a pass; the model itself keeps the bare block)."""

    def __init__(self, block: nn.Module, owner: ShardModel, position: int) -> None:
        self._block = block
        self._owner = owner
        self._first = position == owner.shard.start_layer
        self._stop = position == owner.shard.end_layer - 1 and owner.stops_early
        self._evaluate = (position - owner.shard.start_layer) % ASYNC_EVAL_LAYERS == (
            ASYNC_EVAL_LAYERS - 1
        )

    def __getattr__(self, name: str) -> Any:
        # The model's loop may ask a block what it is (sliding, linear, ...).
        return getattr(self._block, name)

    def __call__(self, hidden: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if self._first:
            hidden = self._owner.stage_input(hidden)
        out = self._block(hidden, *args, **kwargs)
        if self._stop:
            raise _StageOutput(out)
        if self._evaluate:
            mx.async_eval(out)
        return out


class _PlaceholderEmbedding:
    """A stage that does not embed: the model's loop still starts from an embedding, so
    this hands it zeros shaped like the incoming hidden state (the first block replaces
    them); the real table stays on the first stage."""

    def __init__(self, owner: ShardModel) -> None:
        self._owner = owner

    def __call__(self, token_ids: mx.array) -> mx.array:
        incoming = self._owner.incoming
        if incoming is None:
            raise RuntimeError("this stage does not embed token ids")
        return mx.zeros_like(incoming)


class _Returning:
    """The inner model replaced for one call: returns given hidden states, so the outer
    model's own head code (tied or not, scales, soft caps) runs on them alone."""

    def __init__(self, inner: nn.Module, hidden: mx.array) -> None:
        self._inner = inner
        self._hidden = hidden

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self._hidden


def _cache_kind(cache: Any) -> tuple[Any, ...]:
    """What makes two fresh caches behave alike: their class and settings."""
    settings = sorted(
        (name, value)
        for name, value in vars(cache).items()
        if isinstance(value, int | float | str | bool | type(None))
    )
    return (type(cache), tuple(settings))


class ShardModel:
    """Runs an mlx-lm model's own forward pass over one shard's blocks (and, on the first
    and last stages, its embedding and head)."""

    def __init__(self, model: nn.Module, shard: Shard) -> None:
        self.model = model
        self.shard = shard
        model_type = getattr(model, "model_type", None) or type(model).__module__.split(".")[-1]
        path = layers_path(model)
        if path is None:
            raise ShardError(f"{model_type}: found no list of layers in the model to split")
        inner: nn.Module = module_at(model, path)
        layers: list[Any] = inner["layers"]
        # The inner model's parent and key: `head` stands in for the inner model there.
        parent_path, _, self._inner_key = path.rpartition(".")
        self._inner_parent: nn.Module = module_at(model, parent_path) if parent_path else model
        if len(layers) != shard.n_layers:
            raise ShardError(
                f"{model_type}: the model object has {len(layers)} layer positions, the "
                f"shard is of {shard.n_layers}"
            )
        self._inner = inner
        self.model_type = str(model_type)
        # Batched passes need the model's attention to go through the hook.
        self.batches = cpu_attention.install(model)
        # Packed passes (a prefill chunk beside decode steps) also need the rotary
        # embeddings to take a position per token; a tensor group's passes do not pack.
        self.packs = self.batches and shard.tensor is None and install_packed_rope(model) > 0
        # Tensor members other than rank 0 run every block on rank 0's embedded input and
        # leave the head to rank 0.
        follower = shard.tensor is not None and not shard.tensor.is_root
        self.embeds = shard.is_first and not follower
        # A stage that is not the last stops at its last block; a tensor follower too.
        self.stops_early = not shard.is_last or follower
        self.incoming: mx.array | None = None
        self._input_tap: Callable[[mx.array], None] | None = None
        self._install(layers)

    def _install(self, layers: list[Any]) -> None:
        hooked = list(layers)
        for position in range(self.shard.start_layer, self.shard.end_layer):
            block = layers[position]
            if isinstance(block, SkippedLayer):
                raise ShardError(f"{self.model_type}: block {position} was not loaded")
            hooked[position] = _StageBlock(block, self, position)
        # The model's own list keeps the bare blocks (its parameters stay as loaded); the
        # hooked list stands in for it during a pass.
        self._layers = layers
        self._hooked = hooked
        if not self.embeds:
            key = embedding_key(self._inner)
            if key is None:
                raise ShardError(f"{self.model_type}: found no token embedding to stand in for")
            if not isinstance(self._inner[key], nn.Module):
                # Not held here (the last stage of a tied model keeps the real one).
                self._inner[key] = _PlaceholderEmbedding(self)

    # -- caches

    def make_cache(self) -> list[Any]:
        """One cache per layer position: this stage's blocks' own, shared by the skipped
        positions of the same kind (for the masks the model derives from them)."""
        maker = getattr(self.model, "make_cache", None)
        made: Any = maker() if callable(maker) else [KVCache() for _ in self._layers]
        caches = list(made)
        local = range(self.shard.start_layer, self.shard.end_layer)
        by_kind: dict[tuple[Any, ...], Any] = {}
        for position in local:
            by_kind.setdefault(_cache_kind(caches[position]), caches[position])
        for position, cache in enumerate(caches):
            if position not in local:
                caches[position] = by_kind.get(_cache_kind(cache), cache)
        return caches

    def local_caches(self, cache: list[Any]) -> list[Any]:
        """The caches this stage's blocks write (to evaluate or measure them)."""
        return cache[self.shard.start_layer : self.shard.end_layer]

    def cache_state(self, cache: list[Any]) -> list[Any]:
        return [layer_cache.state for layer_cache in self.local_caches(cache)]

    # -- the forward pass

    @property
    def own_blocks(self) -> list[Any]:
        """The mlx-lm blocks this stage computes, in order."""
        return self._layers[self.shard.start_layer : self.shard.end_layer]

    def stage_input(self, computed: mx.array) -> mx.array:
        """The first block's input: what came over the network, or what the model's own
        embedding computed on the stage that embeds (shown to the input tap)."""
        incoming = self.incoming
        if incoming is not None:
            return incoming
        if self._input_tap is not None:
            self._input_tap(computed)
        return computed

    def _run(
        self,
        call: Callable[[mx.array], mx.array],
        inputs: mx.array,
        input_tap: Callable[[mx.array], None] | None = None,
    ) -> mx.array:
        self._input_tap = input_tap
        self._inner["layers"] = self._hooked
        if self.embeds:
            self.incoming = None
            token_ids = inputs
        else:
            self.incoming = inputs
            # Token ids in the shape of the incoming hidden state, for the model's loop.
            token_ids = mx.zeros(inputs.shape[:2], dtype=mx.int32)
        try:
            return call(token_ids)
        except _StageOutput as output:
            return output.hidden
        finally:
            self._inner["layers"] = self._layers
            self.incoming = None
            self._input_tap = None

    def forward(
        self,
        inputs: mx.array,
        cache: list[Any],
        *,
        input_tap: Callable[[mx.array], None] | None = None,
    ) -> mx.array:
        """Token ids (a stage that embeds) or hidden states in; the hidden state after
        this stage's last block, or the logits on the last stage. `input_tap` sees the
        first block's input on a stage that embeds (tensor rank 0 hands it on)."""
        return self._run(lambda token_ids: self.model(token_ids, cache=cache), inputs, input_tap)

    def can_batch(self, cache: list[Any]) -> bool:
        """Whether a request with this cache can join batched passes (engine.batching)."""
        return self.batches and batchable(cache)

    def forward_rows(self, inputs: mx.array, caches: list[list[Any]]) -> mx.array:
        """One decode step of several requests as one pass: row i of `inputs` (one token
        id, or one hidden state) is request i's, attending to its own `caches[i]`."""
        return self._rows(self.forward, inputs, caches)

    def blocks_rows(self, inputs: mx.array, caches: list[list[Any]]) -> mx.array:
        """`blocks` of a batched decode step (see `forward_rows`)."""
        return self._rows(self.blocks, inputs, caches)

    def _rows(
        self,
        run: Callable[[mx.array, list[Any]], mx.array],
        inputs: mx.array,
        caches: list[list[Any]],
    ) -> mx.array:
        if all(self.can_batch(cache) for cache in caches):
            before = [self._offsets(cache) for cache in caches]
            try:
                return run(inputs, row_caches(caches))
            except (AttributeError, TypeError) as error:
                if "PerRow" not in str(error) and "RowCaches" not in str(error):
                    raise
                # The model works on the keys or the caches itself (DeepSeek's MLA, ...):
                # undo the rows' cache updates and decode one request a pass from now on.
                self.batches = False
                self._fall_back(
                    caches,
                    before,
                    f"its attention does not take batched rows ({error})",
                    "decoding one request a pass",
                )
        outputs = [run(inputs[index : index + 1], cache) for index, cache in enumerate(caches)]
        return mx.concatenate(outputs, axis=0)

    def forward_packed(
        self, inputs: mx.array, caches: list[list[Any]], lengths: list[int], sampled: int
    ) -> mx.array | None:
        """One pass over several requests' segments packed in one sequence (`inputs` is
        (1, sum(lengths)) token ids, or that many hidden states; segment i is request
        i's, attending to its own `caches[i]`). On the last stage, the logits of the first
        `sampled` segments, which are one token each (decode steps), as (sampled, 1,
        vocab); the later segments (prefill chunks) only fill their caches. On another
        stage, the packed hidden state for the next. None when the model cannot run packed
        passes (its caches are as before)."""
        hidden = self.blocks_packed(inputs, caches, lengths)
        if hidden is None or self.stops_early:
            return hidden
        return self.head(packed_steps(hidden, sampled))

    def blocks_packed(
        self, inputs: mx.array, caches: list[list[Any]], lengths: list[int]
    ) -> mx.array | None:
        """`blocks` of a packed pass (see `forward_packed`): the packed hidden state."""
        if not self.packs or not all(self.can_batch(cache) for cache in caches):
            return None
        before = [self._offsets(cache) for cache in caches]
        try:
            return self.blocks(inputs, row_caches(caches, lengths))
        except (AttributeError, TypeError, ValueError) as error:
            # The model does more with a position than its rotary embedding takes: undo
            # the rows' cache updates and run decode steps and chunks apart from now on.
            self.packs = False
            self._fall_back(
                caches,
                before,
                f"its layers do not take packed passes ({error})",
                "a prefill chunk runs apart from the decode steps",
            )
            return None

    def _offsets(self, cache: list[Any]) -> list[int]:
        return [int(layer.offset) for layer in self.local_caches(cache)]

    def _fall_back(
        self, caches: list[list[Any]], offsets: list[list[int]], failure: str, instead: str
    ) -> None:
        """A batched pass failed: rewind its caches to `offsets` and say what runs now."""
        self._rewind(caches, offsets)
        log.warning("%s: %s; %s", self.model_type, failure, instead)

    def _rewind(self, caches: list[list[Any]], offsets: list[list[int]]) -> None:
        for cache, before in zip(caches, offsets, strict=True):
            for layer, offset in zip(self.local_caches(cache), before, strict=True):
                grown = int(layer.offset) - offset
                if grown and layer.trim(grown) != grown:
                    raise RuntimeError("a batched pass failed and its cache cannot be rewound")

    def blocks(self, inputs: mx.array, cache: list[Any]) -> mx.array:
        """The last stage without its head: the inner model's output (after its final
        norm), so several requests can share one `head` pass."""
        return self._run(lambda token_ids: self._inner(token_ids, cache=cache), inputs)

    def head(self, hidden: mx.array) -> mx.array:
        """The outer model's own code after the inner model (output head, tied or not,
        logit scales and caps), on `hidden` alone."""
        token_ids = mx.zeros(hidden.shape[:2], dtype=mx.int32)
        parent, key = self._inner_parent, self._inner_key
        parent[key] = _Returning(self._inner, hidden)
        try:
            return self.model(token_ids, cache=None)
        finally:
            parent[key] = self._inner
