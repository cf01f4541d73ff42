"""A middle stage's role: run its blocks on each step and pass the result on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

from ..types import Failure, Forward, Release, StageMessage
from .batching import packed_lengths, packed_segments, packed_steps
from .prefix_cache import CacheMiss
from .role import Role
from .tensors import from_wire, to_wire

if TYPE_CHECKING:
    from .core import CacheEntry

log = logging.getLogger(__name__)


@dataclass
class HeldRows:
    """The rows of a batched step that this stage holds: their requests, caches and part
    of the hidden state; packed (`chunk_tokens` > 0), the last request's prefill chunk
    follows the others' decode steps along the sequence."""

    request_ids: list[str]
    entries: list[CacheEntry]
    hidden: mx.array
    chunk_tokens: int = 0

    @property
    def caches(self) -> list[list[object]]:
        return [entry.cache for entry in self.entries]

    @property
    def decode_steps(self) -> int:
        return len(self.request_ids) - (1 if self.chunk_tokens else 0)

    @property
    def lengths(self) -> list[int]:
        return packed_lengths(self.decode_steps, self.chunk_tokens)

    def apart(self) -> tuple[HeldRows | None, HeldRows]:
        """A packed step as its decode steps (None: none) and its chunk, each unpacked."""
        steps = self.decode_steps
        chunk = HeldRows(self.request_ids[-1:], self.entries[-1:], self.hidden[:, steps:, :])
        if not steps:
            return None, chunk
        decode = HeldRows(
            self.request_ids[:steps], self.entries[:steps], packed_steps(self.hidden, steps)
        )
        return decode, chunk


class Relay(Role):
    def on_message(self, message: StageMessage) -> None:
        match message:
            case Forward(rows=rows) if rows:
                self._forward_rows(message)
            case Forward():
                try:
                    entry = self.entry_for(message)
                    if entry is not None:
                        self._forward(message, entry)
                except Exception as error:
                    self.fail(message, error)
            case Release():
                self.send(self._engine.release(self._stage, message))
            case Failure():
                # On down the ring to stage 0, which reports it (or recomputes on a miss).
                self._engine.drop(message.request_id)
                self.send(message)
            case _:
                log.warning("a middle stage got an unexpected %s", type(message).__name__)

    def entry_for(self, message: Forward) -> CacheEntry | None:
        """The request's cache here: opened by its first message (from a prefix cache
        entry when stage 0 chose one). None when the request cannot go on here; stage 0
        has been told (a cache miss, or state lost)."""
        engine, stage = self._engine, self._stage
        if message.sampling is not None:
            try:
                return engine.open_cache(
                    message.request_id,
                    stage,
                    message.sampling,
                    reuse_entry=message.reuse_entry,
                    reuse_tokens=message.reuse_tokens,
                )
            except CacheMiss as miss:
                log.info("request %s: %s; stage 0 recomputes it", message.request_id, miss)
                engine.mark_missed(message.request_id)
                self.send(Failure(message.request_id, stage.epoch, str(miss), cache_miss=True))
                return None
        return self._held(message.request_id)

    def _held(self, request_id: str) -> CacheEntry | None:
        """The cache of a request that started here; None (and stage 0 told, once) when
        it did not, or was dropped as idle: going on from a fresh cache would be a wrong
        answer."""
        engine = self._engine
        entry = engine.cache_for(request_id)
        if entry is None and engine.mark_missed(request_id):
            self.send(
                Failure(
                    request_id,
                    self._stage.epoch,
                    f"{self.describe()} holds no state for this request (idle too long?)",
                )
            )
        return entry

    def held_rows(self, message: Forward) -> HeldRows | None:
        """A batched step's requests this stage holds, their caches and their part of the
        hidden state (None: it holds none of them)."""
        kept: list[int] = []
        request_ids: list[str] = []
        entries: list[CacheEntry] = []
        for index, request_id in enumerate(message.rows):
            entry = self._held(request_id)
            if entry is not None:
                kept.append(index)
                request_ids.append(request_id)
                entries.append(entry)
        if not kept:
            return None
        hidden = from_wire(message.hidden)
        chunk_tokens = message.chunk_tokens
        if len(kept) < len(message.rows):
            if chunk_tokens:
                lengths = packed_lengths(len(message.rows) - 1, chunk_tokens)
                hidden = packed_segments(hidden, lengths, kept)
                if kept[-1] != len(message.rows) - 1:  # the chunk's request is gone
                    hidden = packed_steps(hidden, len(kept))
                    chunk_tokens = 0
            else:
                hidden = hidden[mx.array(kept)]
        return HeldRows(request_ids, entries, hidden, chunk_tokens)

    def _forward_rows(self, message: Forward) -> None:
        held = self.held_rows(message)
        if held is None:
            return
        model = self._stage.model
        if held.chunk_tokens:
            try:
                out = model.forward_packed(
                    held.hidden, held.caches, held.lengths, held.decode_steps
                )
            except Exception as error:
                self.fail_rows(held.request_ids, error)
                return
            if out is not None:
                self._send_rows(held, out, message.step, message.sample)
                return
            # This stage cannot pack: the decode steps and the chunk go on apart.
            steps, chunk = held.apart()
            if steps is not None:
                self._forward_held(steps, message.step, message.sample)
            self._forward_held(chunk, 0, False)
            return
        self._forward_held(held, message.step, message.sample)

    def _forward_held(self, held: HeldRows, step: int, sample: bool) -> None:
        try:
            out = self._stage.model.forward_rows(held.hidden, held.caches)
        except Exception as error:
            self.fail_rows(held.request_ids, error)
            return
        self._send_rows(held, out, step, sample)

    def _send_rows(self, held: HeldRows, out: mx.array, step: int, sample: bool) -> None:
        try:
            wire = to_wire(out)
        except Exception as error:
            self.fail_rows(held.request_ids, error)
            return
        rows = held.request_ids if len(held.request_ids) > 1 or held.chunk_tokens else []
        self.send(
            Forward(
                held.request_ids[0],
                self._stage.epoch,
                step,
                wire,
                sample=sample,
                rows=rows,
                chunk_tokens=held.chunk_tokens,
            )
        )

    def _forward(self, message: Forward, entry: CacheEntry) -> None:
        stage = self._stage
        out = stage.model.forward(from_wire(message.hidden), entry.cache)
        self.send(
            Forward(
                message.request_id,
                stage.epoch,
                message.step,
                to_wire(out),
                sample=message.sample,
                sampling=message.sampling,
                reuse_entry=message.reuse_entry,
                reuse_tokens=message.reuse_tokens,
            )
        )

    def send(self, message: StageMessage) -> None:
        self._engine.send(self._stage, message)

    def describe(self) -> str:
        shard = self._stage.model.shard
        return f"stage [{shard.start_layer}, {shard.end_layer})"

    def fail(self, message: StageMessage, error: Exception) -> None:
        """This request failed here: drop it and tell stage 0 (down the ring)."""
        self.fail_request(message.request_id, error)

    def fail_rows(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            self.fail_request(request_id, error)

    def fail_request(self, request_id: str, error: Exception) -> None:
        log.exception("request %s failed on this stage", request_id)
        self._engine.drop(request_id)
        self._engine.mark_missed(request_id)
        self.send(Failure(request_id, self._stage.epoch, f"{self.describe()} failed: {error}"))
