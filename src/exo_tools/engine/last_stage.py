"""The last stage's role in a multi-stage pipeline: run its blocks and sample.

Sampling steps queued together share one output-head pass: each request's blocks run on
its own cache, then the final norm and head run once for all of them, so the head's
weights (the whole vocabulary) are read once per batch rather than once per request.
With several streams the last stage, which also holds the head, is the pipeline's
slowest; one request is a batch of one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import mlx.core as mx

from ..types import Forward, Release, SampledToken, StageMessage
from .batching import packed_steps
from .relay import HeldRows, Relay
from .sampling import sample_token
from .tensors import from_wire

if TYPE_CHECKING:
    from .core import CacheEntry

log = logging.getLogger(__name__)

# Sampling steps the last stage takes off its inbox at once to share one output-head pass.
MAX_SAMPLE_BATCH = 16


class LastStage(Relay):
    def on_message(self, message: StageMessage) -> None:
        match message:
            case Forward(sample=True):
                self._sample_batch([message, *self._engine.queued_samples(MAX_SAMPLE_BATCH - 1)])
            case Forward():
                try:
                    entry = self.entry_for(message)
                    if entry is not None:
                        self._prefill(entry, from_wire(message.hidden))
                except Exception as error:
                    self.fail(message, error)
            case Release():
                release = self._engine.release(self._stage, message)
                if release.keep_as:
                    # Back to stage 0, whose index learns what the stages evicted.
                    self.send(release)
            case _:
                super().on_message(message)

    def _prefill(self, entry: CacheEntry, hidden: mx.array) -> None:
        """A prefill chunk: the cache is all it leaves."""
        self._stage.model.forward(hidden, entry.cache)
        mx.eval(self._stage.model.cache_state(entry.cache))

    def _sample_batch(self, messages: list[Forward]) -> None:
        stage = self._stage
        # Each request's row: its id, step, cache and last hidden state.
        finished: list[tuple[str, int, CacheEntry, mx.array]] = []
        for message in messages:
            if message.rows:
                finished.extend(self._rows_blocks(message))
                continue
            try:
                entry = self.entry_for(message)
                if entry is None:
                    continue
                hidden = stage.model.blocks(from_wire(message.hidden), entry.cache)
                finished.append((message.request_id, message.step, entry, hidden[:, -1, :]))
            except Exception as error:
                self.fail(message, error)
        if not finished:
            return
        if len(finished) > 1:
            self._engine.samples_batched += len(finished)
        try:
            logits = stage.model.head(mx.concatenate([row for *_, row in finished], axis=0))
        except Exception as error:
            for request_id, *_ in finished:
                self.fail_request(request_id, error)
            return
        for index, (request_id, step, entry, _) in enumerate(finished):
            try:
                token, logprobs = sample_token(entry.sampler, logits[index : index + 1])
                self.send(SampledToken(request_id, stage.epoch, step, token, logprobs))
            except Exception as error:
                self.fail_request(request_id, error)

    def _rows_blocks(self, message: Forward) -> list[tuple[str, int, CacheEntry, mx.array]]:
        """A batched decode step's blocks, one pass for its rows (packed: with a prefill
        chunk, which only fills its cache)."""
        held = self.held_rows(message)
        if held is None:
            return []
        try:
            if held.chunk_tokens:
                out = self._packed_blocks(held)
            else:
                out = self._stage.model.blocks_rows(held.hidden, held.caches)
        except Exception as error:
            self.fail_rows(held.request_ids, error)
            return []
        steps = held.decode_steps
        return [
            (request_id, message.step, entry, out[index : index + 1, -1, :])
            for index, (request_id, entry) in enumerate(
                zip(held.request_ids[:steps], held.entries[:steps], strict=True)
            )
        ]

    def _packed_blocks(self, held: HeldRows) -> mx.array:
        """A packed step's blocks: the decode steps' rows; the chunk fills its cache."""
        model = self._stage.model
        packed = model.blocks_packed(held.hidden, held.caches, held.lengths)
        if packed is not None:
            mx.eval(packed, model.cache_state(held.entries[-1].cache))
            return packed_steps(packed, held.decode_steps)
        # This stage cannot pack: the chunk goes apart.
        steps, chunk = held.apart()
        self._prefill(chunk.entries[0], chunk.hidden)
        if steps is None:
            return packed_steps(held.hidden, 0)
        return model.blocks_rows(steps.hidden, steps.caches)
