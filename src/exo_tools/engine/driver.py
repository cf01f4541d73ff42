"""Stage 0's role: drive each request from prompt to finish.

The driver prefills the prompt in chunks, runs every decode step's first blocks, and emits
each token as it comes back (from the last stage, or from its own head with one stage).
Tensor rank 0 is a one-stage driver whose passes it also hands to the other members.

Scheduling is continuous batching: requests whose next step can run wait in `ready`, and
each round (`run_ready`, called whenever the inbox is empty) runs the decode steps of the
ready requests as one batched pass (engine.batching), then one prefill chunk of the next
request waiting for one, packed into the decode steps' pass where it can be. While others
decode, prompts are prefilled in short chunks, so a long prompt delays the running streams
by one short chunk per token, not by its whole prefill. On a pipeline a round sends at
most 1/stages of the decoding requests, so the batches flow as micro-batches and every
stage has one to work on; a prompt's chunks ride in their passes. A request decoding
alone on one stage, whose sampling needs nothing from the host, decodes a step ahead, as
mlx-lm's generate does.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..types import (
    ErrorEvent,
    Failure,
    FinishEvent,
    FinishReason,
    Forward,
    PromptEvent,
    Release,
    RequestEvent,
    SampledToken,
    SamplingParams,
    StageMessage,
    TokenEvent,
    TokenLogprobs,
)
from .batching import row_caches
from .prefix_cache import (
    MIN_REUSE_TOKENS,
    CacheMiss,
    PrefixIndex,
    cache_bytes,
    cache_length,
    cache_trimmable,
)
from .role import Role
from .sampling import Sampler, sample_token
from .tensor_parallel import CollectiveError
from .tensors import to_wire

if TYPE_CHECKING:
    from .core import CacheEntry, InstalledStage, StageEngine

log = logging.getLogger(__name__)

# mlx-lm's generate prefills in 2048-token chunks and runs the last prompt token on its
# own; doing the same keeps greedy output token-identical to it.
PREFILL_CHUNK = 2048
# On a pipeline the chunks stream on (stage 1 works on chunk i while stage 0 runs chunk
# i + 1), so a prompt's TTFT is about the slowest stage's share of it plus one chunk of
# each other stage: shorter chunks overlap more. 512 tokens keep the passes large enough
# to be matmul-bound on every stage.
PIPELINE_PREFILL_CHUNK = 512
# While other requests decode, a prompt is prefilled in chunks that cost about one of
# their decode rounds (measured), so a running stream waits at most about twice its usual
# time per token: at least MIN_BUSY_CHUNK tokens; before anything is measured, and for the
# rest of a prompt up to PREFILL_CHUNK_BUSY tokens (a short prompt stays one chunk),
# PREFILL_CHUNK_BUSY.
PREFILL_CHUNK_BUSY = 64
MIN_BUSY_CHUNK = 16
# A chunk is packed into the decode steps' pass (engine.batching; on a pipeline, every
# chunk after the first, which opens the request's caches on every stage): it shares
# their weight reads, so what it adds is its own tokens' compute. Its tokens are sized to
# add this share of a decode round (at least MIN_PACKED_CHUNK), so a running stream waits
# about 1 + PACKED_CHUNK_SHARE times its usual time per token while a prompt prefills.
PACKED_CHUNK_SHARE = 0.8
MIN_PACKED_CHUNK = 8
# Weight of the latest measurement in the running averages of round costs.
COST_SMOOTHING = 0.3


@dataclass
class Origin:
    """A request stage 0 drives: prompt, progress, and the handle's side of the events."""

    request_id: str
    epoch: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    emit: Callable[[RequestEvent], None]
    cancelled: threading.Event
    prompt_done: int = 0
    generated: int = 0
    next_input: int | None = None
    sent_first: bool = False
    passes: int = 0  # forward passes sent to tensor-parallel members
    # The tokens this request's cache holds, in order (what it keeps as a prefix entry).
    fed: list[int] = field(default_factory=list[int])
    reuse_entry: int = 0  # the prefix cache entry it started from (0: none)
    reused: int = 0  # prompt tokens it took from that entry
    # One-stage decode runs a step ahead: the next token, still being computed.
    ahead: mx.array | None = None
    # The micro-batch it is in flight with on a pipeline (None: none).
    group: int | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    # After a failover `prompt` is the client's prompt plus the tokens already emitted;
    # these keep what the client sees: its prompt's length, what the cache served of it
    # (as the prompt event said), the tokens emitted, and how often it resumed.
    prompt_tokens: int = 0
    cached_reported: int = 0
    emitted: list[int] = field(default_factory=list[int])
    failovers: int = 0
    wrap_up_after: int = 0  # the client's sampling's, before any failover moved it

    def __post_init__(self) -> None:
        self.prompt_tokens = self.prompt_tokens or len(self.prompt)
        self.wrap_up_after = self.wrap_up_after or self.sampling.wrap_up_after

    def finish_cancelled(self) -> None:
        """End a request cancelled while it was not running (waiting, or parked)."""
        self.emit(FinishEvent("cancelled", self.prompt_tokens, self.generated, 0.0, 0.0))

    def resume(self, epoch: int) -> None:
        """Start over on a new placement from what the client has: its prompt and the
        tokens emitted so far, which the new placement prefills; the next token it samples
        is the one the lost placement would have sampled."""
        self.prompt = self.prompt[: self.prompt_tokens] + self.emitted
        if self.wrap_up_after:
            # The new sampler counts from the first token it samples.
            left = max(1, self.wrap_up_after - len(self.emitted))
            self.sampling = replace(self.sampling, wrap_up_after=left)
        self.epoch = epoch
        self.prompt_done = 0
        self.next_input = None
        self.sent_first = False
        self.passes = 0
        self.fed = []
        self.reuse_entry = self.reused = 0
        self.ahead = None
        self.group = None
        self.failovers += 1

    @property
    def decoding(self) -> bool:
        """Its prompt is in the cache but for the last token: its steps are decode steps."""
        return self.prompt_done >= len(self.prompt) - 1


def _smoothed(average: float | None, value: float) -> float:
    return value if average is None else average + COST_SMOOTHING * (value - average)


def _reserved_tokens(origin: Origin) -> int:
    """The most tokens the request's cache will hold."""
    return len(origin.prompt) + origin.max_tokens


def _can_run_ahead(sampler: Sampler | None) -> bool:
    """Sampling needs nothing from the host between steps: no grammar mask to compute
    from the token, no log-probabilities to read, no generated tokens to penalize or to
    wrap up after."""
    return (
        sampler is not None
        and sampler.params.constraint is None
        and not sampler.params.logprobs
        and not sampler.needs_each_token
    )


class Driver(Role):
    def __init__(self, engine: StageEngine, stage: InstalledStage) -> None:
        super().__init__(engine, stage)
        self.origins: dict[str, Origin] = {}
        # Requests whose next step can run now, in the order they became ready.
        self.ready: dict[str, Origin] = {}
        # Pipelines: each micro-batch in flight, the requests not yet back, and those back
        # and held until the rest are.
        self._in_flight: dict[int, set[str]] = {}
        self._held: dict[int, list[Origin]] = {}
        self._groups = 0
        # Pipelines: prompts whose next chunk rides in the pass of the next micro-batch
        # to come back (see `_rides_next`).
        self._riders: list[Origin] = []
        # Running averages: a decode round's seconds, and a prefill token's.
        self._decode_round_s: float | None = None
        self._prefill_token_s: float | None = None
        # ... and what a token of a packed chunk adds to a decode round.
        self._packed_token_s: float | None = None
        # Requests waiting for a place (--max-running, or the KV budget), oldest first.
        self.waiting: deque[Origin] = deque()
        self.max_batch = engine.max_batch
        # What the cache holds per token on this stage, once a request has measured it.
        self._kv_bytes_per_token: float | None = None
        self.index = PrefixIndex()
        # The other stages' prefix cache bytes, as their last kept release reported them.
        self.stage_bytes: list[int] = []

    # -- from the engine's inbox

    def start(self, origin: Origin) -> None:
        running = origin.request_id in self.origins
        if running or any(o.request_id == origin.request_id for o in self.waiting):
            origin.emit(ErrorEvent(f"request id {origin.request_id} is already running"))
            return
        if self.waiting or not self._has_room(origin):
            self.waiting.append(origin)
            return
        self._begin(origin)

    def _has_room(self, origin: Origin) -> bool:
        """Whether `origin` may start now: a place among --max-running, and its KV (prompt
        and token limit) within the budget beside the running requests' (a request alone
        always starts; the context limit bounds it)."""
        engine = self._engine
        if not self.origins:
            return True
        if len(self.origins) >= engine.max_running:
            return False
        per_token = self._kv_bytes_per_token
        if per_token is None:
            return True
        tokens = sum(_reserved_tokens(o) for o in self.origins.values()) + _reserved_tokens(origin)
        return tokens * per_token <= engine.kv_budget_bytes

    def kv_reserved_bytes(self) -> int:
        """The KV the running requests may grow to (0 until a request measured it)."""
        per_token = self._kv_bytes_per_token or 0.0
        return int(sum(_reserved_tokens(o) for o in self.origins.values()) * per_token)

    def _start_waiting(self) -> None:
        while self.waiting and self._has_room(self.waiting[0]):
            origin = self.waiting.popleft()
            if origin.cancelled.is_set():
                origin.finish_cancelled()
            else:
                self._begin(origin)

    def _measure_kv(self, entry: CacheEntry) -> None:
        """Learn what the cache holds per token from a request's cache."""
        if self._kv_bytes_per_token is not None:
            return
        local = self._stage.model.local_caches(entry.cache)
        length = cache_length(local)
        if length:
            self._kv_bytes_per_token = cache_bytes(local) / length

    def _begin(self, origin: Origin) -> None:
        self.origins[origin.request_id] = origin
        try:
            self._open(origin, reuse=True)
            entry = self._engine.caches.get(origin.request_id)
            if entry is not None:
                self._size_growth(origin, entry)
        except Exception as error:
            log.exception("request %s failed to start", origin.request_id)
            self._fail(origin, f"generation failed: {error}")
            return
        self._schedule(origin)

    def cancel(self, request_id: str) -> None:
        origin = self.origins.get(request_id)
        if origin is not None:
            self._finish(origin, "cancelled")
            return
        for waiting in list(self.waiting):
            if waiting.request_id == request_id:
                self.waiting.remove(waiting)
                waiting.finish_cancelled()

    def fail_all(self, reason: str) -> None:
        for origin in self.take_all():
            origin.emit(ErrorEvent(reason))

    def take_all(self) -> list[Origin]:
        """Every running and waiting request, removed from this driver without an event
        (the engine fails them, or keeps them to resume on a new placement)."""
        taken = [*self.origins.values(), *self.waiting]
        self.origins.clear()
        self.ready.clear()
        self.waiting.clear()
        self._in_flight.clear()
        self._held.clear()
        self._riders.clear()
        return taken

    # -- rounds

    @property
    def has_work(self) -> bool:
        return bool(self.ready)

    def run_ready(self) -> None:
        """One round: the ready requests' decode steps as one batched pass, then one prefill
        chunk of the request that has waited longest for one (packed into the decode
        steps' pass when the model allows, see `_packs`)."""
        decoding = [origin for origin in self.ready.values() if origin.decoding]
        prefilling = next((o for o in self.ready.values() if not o.decoding), None)
        if decoding:
            packable = prefilling if prefilling is not None and self._packs(prefilling) else None
            began = time.perf_counter()
            chunk = self._decode_round(decoding[: self._batch_limit()], packable)
            elapsed = time.perf_counter() - began
            if chunk:
                # What the chunk added to the round, per token.
                base = self._decode_round_s if self._decode_round_s is not None else elapsed
                per_token = max(0.0, elapsed - base) / chunk
                self._packed_token_s = _smoothed(self._packed_token_s, per_token)
                prefilling = None
            else:
                self._decode_round_s = _smoothed(self._decode_round_s, elapsed)
        if prefilling is not None and self.ready.pop(prefilling.request_id, None) is not None:
            done, began = prefilling.prompt_done, time.perf_counter()
            self._step_safely(prefilling)
            fed = prefilling.prompt_done - done
            if fed > 0:
                per_token = (time.perf_counter() - began) / fed
                self._prefill_token_s = _smoothed(self._prefill_token_s, per_token)

    def _packs(self, origin: Origin) -> bool:
        """Whether `origin`'s next prefill chunk may ride in a decode pass: the model packs,
        and on a pipeline every stage holds the request's cache (its first chunk went
        alone and opened them)."""
        stage = self._stage
        return stage.model.packs and (stage.n_stages == 1 or origin.sent_first)

    def _busy_chunk(self, remaining: int) -> int:
        """The next prefill chunk while other requests decode (see PREFILL_CHUNK_BUSY)."""
        if remaining <= PREFILL_CHUNK_BUSY:
            return remaining
        round_s, token_s = self._decode_round_s, self._prefill_token_s
        if round_s is None or token_s is None or token_s <= 0:
            return PREFILL_CHUNK_BUSY
        return max(MIN_BUSY_CHUNK, min(PREFILL_CHUNK, int(round_s / token_s)))

    def _packed_chunk(self, remaining: int) -> int:
        """The next prefill chunk packed into a decode round (see PACKED_CHUNK_SHARE)."""
        round_s, token_s = self._decode_round_s, self._packed_token_s
        if round_s is None or token_s is None or token_s <= 0:
            return min(remaining, PREFILL_CHUNK_BUSY)
        fits = int(PACKED_CHUNK_SHARE * round_s / token_s)
        return min(remaining, max(MIN_PACKED_CHUNK, min(PREFILL_CHUNK, fits)))

    def _batch_limit(self) -> int:
        """How many decode steps one pass takes: on a pipeline, a share of the decoding
        requests per stage, so several micro-batches are in flight at once."""
        stages = self._stage.n_stages
        if stages == 1:
            return self.max_batch
        decoding = sum(1 for origin in self.origins.values() if origin.decoding)
        return max(1, min(self.max_batch, math.ceil(decoding / stages)))

    def _decode_round(self, batch: list[Origin], chunk: Origin | None = None) -> int:
        """The decode steps of `batch`, batched where they can be, with a prefill chunk of
        `chunk` packed into their pass where it can be; the chunk's tokens (0: it did not
        go along, and stays ready)."""
        for origin in batch:
            self.ready.pop(origin.request_id, None)
        if len(batch) > 1 or chunk is not None:
            # A request that ran a step ahead alone joins with that step's token emitted.
            for origin in batch:
                if origin.ahead is not None:
                    self._flush_ahead(origin)
        runnable: list[Origin] = []
        for origin in batch:
            if origin.request_id not in self.origins:
                continue  # finished meanwhile
            self.ready.pop(origin.request_id, None)
            if origin.cancelled.is_set():
                self._finish(origin, "cancelled")
            else:
                runnable.append(origin)
        together = [origin for origin in runnable if self._batchable(origin)]
        if chunk is not None and (chunk.cancelled.is_set() or not together):
            chunk = None
        if len(together) < 2 and chunk is None:
            together = []
        for origin in runnable:
            if origin not in together:
                self._step_safely(origin)
        if together:
            return self._decode_batch(together, chunk)
        return 0

    def _batchable(self, origin: Origin) -> bool:
        """Whether the request's next decode step can share a pass: every stage holds its
        state already (its first message went alone) and its caches batch."""
        stage = self._stage
        entry = self._engine.caches.get(origin.request_id)
        if entry is None or not stage.model.can_batch(entry.cache):
            return False
        if stage.broadcast is not None:
            return origin.passes > 0
        return stage.n_stages == 1 or origin.sent_first

    def _flush_ahead(self, origin: Origin) -> None:
        ahead, origin.ahead = origin.ahead, None
        assert ahead is not None
        self._on_token(origin, cast(int, ahead.item()))

    def on_message(self, message: StageMessage) -> None:
        """A sampled token (or a failure) came back around the ring, or a release that
        kept a prefix cache entry on every stage."""
        if isinstance(message, Release):
            self._on_kept(message)
            return
        origin = self.origins.get(message.request_id)
        if origin is None:
            return  # cancelled meanwhile; its release is already on its way
        match message:
            case SampledToken(token_id=token_id, logprobs=logprobs):
                try:
                    self._on_token(origin, token_id, logprobs)
                except Exception as error:  # the request fails, never hangs
                    log.exception("request %s failed taking its token", origin.request_id)
                    self._fail(origin, f"generation failed: {error}")
            case Failure(cache_miss=True) if origin.generated == 0:
                self._recompute(origin)
            case Failure(error=error):
                self._fail(origin, error)
            case _:
                self._fail(origin, f"stage 0 got an unexpected {type(message).__name__}")

    # -- one step of a request

    def _step_safely(self, origin: Origin) -> None:
        if origin.cancelled.is_set():
            self._finish(origin, "cancelled")
            return
        try:
            self._step(origin)
        except Exception as error:  # one request's failure must not stop the others
            log.exception("request %s failed", origin.request_id)
            self._step_failed(origin, error)

    # -- the prefix cache

    @property
    def _caching(self) -> bool:
        return self._engine.prefix_store.budget_bytes > 0

    def _open(self, origin: Origin, *, reuse: bool) -> None:
        """Open the request's cache on this stage: from the prefix cache entry sharing the
        longest prefix with its prompt, when there is one and `reuse`."""
        engine, stage = self._engine, self._stage
        hit = self.index.lookup(origin.prompt) if reuse and self._caching else None
        if hit is not None:
            try:
                engine.open_cache(
                    origin.request_id,
                    stage,
                    origin.sampling,
                    reuse_entry=hit.entry_id,
                    reuse_tokens=hit.tokens,
                )
            except CacheMiss:
                self.index.forget([hit.entry_id])
                hit = None
        if hit is None:
            engine.open_cache(origin.request_id, stage, origin.sampling)
        origin.reuse_entry = hit.entry_id if hit is not None else 0
        origin.reused = origin.prompt_done = hit.tokens if hit is not None else 0
        origin.fed = origin.prompt[: origin.reused]

    def _recompute(self, origin: Origin) -> None:
        """A stage lacked the entry the request started from: start it over, cold."""
        entry_id = origin.reuse_entry
        log.info(
            "request %s: prefix cache entry %d missed on a stage; recomputing",
            origin.request_id,
            entry_id,
        )
        self._evict_everywhere([entry_id])
        origin.sent_first = False
        origin.next_input = None
        self._open(origin, reuse=False)
        self._schedule(origin)

    def _evict_everywhere(self, entry_ids: list[int]) -> None:
        self.index.forget(entry_ids)
        self._engine.prefix_store.drop(entry_ids)
        stage = self._stage
        if stage.n_stages > 1:
            self._send(Release("", stage.epoch, evict=entry_ids))
        if stage.broadcast is not None:
            self._broadcast(Release("", stage.epoch, evict=entry_ids))

    def _keep(self, origin: Origin) -> Release:
        """Keep the ended request's cache as a prefix cache entry (when it is worth
        keeping); the release that tells the other stages to keep theirs."""
        engine, stage = self._engine, self._stage
        release = Release(origin.request_id, stage.epoch)
        entry = engine.caches.pop(origin.request_id, None)
        if entry is None:
            return release
        entry.close()
        tokens = origin.fed
        local = stage.model.local_caches(entry.cache)
        if len(tokens) < MIN_REUSE_TOKENS or cache_length(local) not in (None, len(tokens)):
            return release
        entry_id = self.index.new_id()
        trimmable = cache_trimmable(local)
        evicted = engine.prefix_store.put(entry_id, entry.cache, len(tokens), local)
        redundant = self.index.add(entry_id, tokens, trimmable)
        engine.prefix_store.drop(redundant)
        self.index.forget(evicted)
        release.evict = [*evicted, *redundant]
        if entry_id in evicted:  # larger than this node's whole budget
            release.evict.remove(entry_id)
            return release
        release.keep_as, release.keep_tokens, release.trimmable = entry_id, len(tokens), trimmable
        return release

    def _on_kept(self, release: Release) -> None:
        """The stages kept entry `keep_as`: forget what any of them evicted (and have the
        others drop it too), and whether a stage's copy cannot be cut."""
        evicted = [
            entry_id
            for entry_id in release.evict
            if entry_id in self.index or entry_id in self._engine.prefix_store
        ]
        if evicted:
            self._evict_everywhere(evicted)
        if not release.trimmable:
            self.index.mark_untrimmable(release.keep_as)
        self.stage_bytes = list(release.stage_bytes)

    # -- one step of a request

    def _schedule(self, origin: Origin) -> None:
        """Its next step runs in a coming round; on a pipeline, once the rest of its
        micro-batch is back too (their tokens come in one after another, and a round
        started on the first few would split the batch into ever smaller ones)."""
        group = self._leave_group(origin)
        if group is not None and self._in_flight[group]:
            self._held.setdefault(group, []).append(origin)
            return
        if self._rides_next(origin):
            self._riders.append(origin)
            return
        self.ready[origin.request_id] = origin

    def _rides_next(self, origin: Origin) -> bool:
        """On a pipeline, while micro-batches are in flight, a prompt's next chunk waits
        for the next one to come back and rides in its pass: run apart meanwhile, it
        would hold that micro-batch's next step up by a whole pass."""
        return (
            self._stage.n_stages > 1
            and bool(self._in_flight)
            and not origin.decoding
            and self._packs(origin)
        )

    def _leave_group(self, origin: Origin) -> int | None:
        """Take `origin` out of its in-flight micro-batch; the batch's id. When it was the
        last one out, the others held back become ready."""
        group, origin.group = origin.group, None
        if group is None:
            return None
        waiting = self._in_flight[group]
        waiting.discard(origin.request_id)
        if not waiting:
            del self._in_flight[group]
            riders, self._riders = self._riders, []
            for held in [*self._held.pop(group, []), *riders]:
                if held.request_id in self.origins:
                    self.ready[held.request_id] = held
        return group if waiting else None

    def _step(self, origin: Origin) -> None:
        stage = self._stage
        entry = self._engine.cache_for(origin.request_id)
        if entry is None:
            raise RuntimeError("the request's cache is gone")
        remaining = len(origin.prompt) - 1 - origin.prompt_done
        if remaining > 0:
            others_decode = any(o.decoding for o in self.origins.values())
            if others_decode:
                limit = self._busy_chunk(remaining)
            else:
                limit = PIPELINE_PREFILL_CHUNK if stage.n_stages > 1 else PREFILL_CHUNK
            count = min(limit, remaining)
            ids = origin.prompt[origin.prompt_done : origin.prompt_done + count]
            origin.prompt_done += count
            self._size_growth(origin, entry)
            sample = False
            origin.fed.extend(ids)
        else:
            last = origin.next_input if origin.next_input is not None else origin.prompt[-1]
            # Tensor rank 0 is one stage too, but its passes sync with the members.
            alone = stage.n_stages == 1 and stage.collective is None
            if alone and _can_run_ahead(entry.sampler):
                self._decode_ahead(origin, entry, last)
                return
            ids = [last]
            sample = True
            origin.fed.append(last)
        out = self._forward(origin, mx.array(ids)[None], entry.cache)
        if stage.n_stages == 1:
            if sample:
                token, logprobs = sample_token(entry.sampler, out[:, -1, :])
                self._on_token(origin, token, logprobs)
            else:
                mx.eval(stage.model.cache_state(entry.cache))
                self._schedule(origin)
            return
        message = Forward(
            origin.request_id,
            stage.epoch,
            origin.generated,
            to_wire(out),
            sample=sample,
            sampling=None if origin.sent_first else origin.sampling,
        )
        if not origin.sent_first:
            message.reuse_entry, message.reuse_tokens = origin.reuse_entry, origin.reused
        origin.sent_first = True
        self._send(message)
        if not sample:
            # Prefill chunks stream on: stage 1 works on this chunk while we run the next.
            self._schedule(origin)

    def _decode_batch(self, batch: list[Origin], chunk: Origin | None = None) -> int:
        """One decode step of every request of `batch` as one pass, with a prefill chunk
        of `chunk` packed into it where the model allows; the chunk's tokens (0: none)."""
        engine, stage = self._engine, self._stage
        entries = [engine.caches[origin.request_id] for origin in batch]
        inputs: list[int] = []
        for origin in batch:
            last = origin.next_input if origin.next_input is not None else origin.prompt[-1]
            origin.fed.append(last)
            inputs.append(last)
        engine.decode_batches += 1
        engine.decode_rows_batched += len(batch)
        engine.decode_batch_rows[len(batch)] += 1
        caches = [entry.cache for entry in entries]
        packed = None
        try:
            if chunk is not None:
                packed = self._packed_pass(inputs, caches, chunk)
            if packed is not None:
                assert chunk is not None
                if stage.n_stages > 1:
                    self._send_batch(batch, packed[0], chunk, len(packed[2]))
                    # Its next chunk streams on: the next stage works on this one meanwhile.
                    self._schedule(chunk)
                    return len(packed[2])
                logits = packed[0][:, -1, :]
                mx.eval(logits, *packed[1])
                self._decode_batch_sampled(batch, entries, logits, chunk)
                return len(packed[2])
            out = self._forward_rows(batch, mx.array(inputs)[:, None], caches)
            if stage.n_stages > 1:
                self._send_batch(batch, out)
                return 0
            logits = out[:, -1, :]
            mx.eval(logits)
        except Exception as error:  # the pass failed: every request in it fails
            log.exception("a batched decode step of %d requests failed", len(batch))
            failed = [*batch, chunk] if packed is not None and chunk is not None else batch
            for origin in failed:
                if origin.request_id in self.origins:
                    self._step_failed(origin, error)
            return len(packed[2]) if packed is not None else 0
        self._decode_batch_sampled(batch, entries, logits, None)
        return 0

    def _send_batch(
        self,
        batch: list[Origin],
        hidden: mx.array,
        chunk: Origin | None = None,
        chunk_tokens: int = 0,
    ) -> None:
        """A pipeline's batched decode step (with a packed prefill chunk of `chunk`) on to
        the next stage; its requests are in flight as one micro-batch until their tokens
        are all back."""
        first = batch[0]
        self._groups += 1
        self._in_flight[self._groups] = {origin.request_id for origin in batch}
        for origin in batch:
            origin.group = self._groups
        rows = [origin.request_id for origin in batch]
        if chunk is not None:
            rows.append(chunk.request_id)
        self._send(
            Forward(
                first.request_id,
                self._stage.epoch,
                first.generated,
                to_wire(hidden),
                sample=True,
                rows=rows,
                chunk_tokens=chunk_tokens,
            )
        )

    def _packed_pass(
        self, inputs: list[int], caches: list[list[object]], chunk: Origin
    ) -> tuple[mx.array, list[Any], list[int]] | None:
        """The decode steps `inputs` and the next prefill chunk of `chunk` as one packed
        pass (built, not evaluated): the decode rows' logits (on a pipeline, the packed
        hidden state for the next stage), the chunk's cache state to evaluate with them,
        and the chunk's tokens; None when it cannot pack."""
        stage = self._stage
        entry = self._engine.caches.get(chunk.request_id)
        if entry is None:
            return None
        remaining = len(chunk.prompt) - 1 - chunk.prompt_done
        ids = chunk.prompt[chunk.prompt_done : chunk.prompt_done + self._packed_chunk(remaining)]
        logits = stage.model.forward_packed(
            mx.array([*inputs, *ids])[None],
            [*caches, entry.cache],
            [1] * len(inputs) + [len(ids)],
            sampled=len(inputs),
        )
        if logits is None:
            return None
        self.ready.pop(chunk.request_id, None)
        self._engine.packed_chunks += 1
        self._engine.packed_chunk_tokens += len(ids)
        chunk.prompt_done += len(ids)
        self._size_growth(chunk, entry)
        chunk.fed.extend(ids)
        return logits, stage.model.cache_state(entry.cache), ids

    def _size_growth(self, origin: Origin, entry: CacheEntry) -> None:
        """While a prompt is prefilled in chunks its caches grow by the rest of the prompt
        at once (mlx-lm's `KVCache` grows 256 positions at a time, copying everything it
        holds each time: a 2k prompt in 20-token chunks stalled a round in ten); once it
        decodes they grow by mlx-lm's step again."""
        for layer in self._stage.model.local_caches(entry.cache):
            if type(layer) is not KVCache:
                continue
            if origin.decoding:
                vars(layer).pop("step", None)  # the class's own step
            else:
                layer.step = max(KVCache.step, len(origin.prompt) - layer.offset)

    def _decode_batch_sampled(
        self,
        batch: list[Origin],
        entries: list[CacheEntry],
        logits: mx.array,
        chunk: Origin | None,
    ) -> None:
        """Sample and emit each decode row's token from its logits; a packed chunk's
        request goes on to its next chunk (or its first token)."""
        if chunk is not None and chunk.request_id in self.origins:
            self._schedule(chunk)
        for index, (origin, entry) in enumerate(zip(batch, entries, strict=True)):
            try:
                token, logprobs = sample_token(entry.sampler, logits[index : index + 1])
            except Exception as error:
                log.exception("request %s failed to sample", origin.request_id)
                self._fail(origin, f"generation failed: {error}")
                continue
            self._on_token(origin, token, logprobs)

    def _forward_rows(
        self, batch: list[Origin], ids: mx.array, caches: list[list[object]]
    ) -> mx.array:
        stage = self._stage
        collective = stage.collective
        if collective is None or stage.broadcast is None:
            return stage.model.forward_rows(ids, caches)
        for origin in batch:
            origin.passes += 1
        first = batch[0]
        passes = first.passes
        rows = [origin.request_id for origin in batch]

        def hand_on(hidden: mx.array) -> None:
            self._broadcast(
                Forward(first.request_id, stage.epoch, passes, to_wire(hidden), rows=rows)
            )

        collective.begin(first.request_id, passes)
        return stage.model.forward(ids, row_caches(caches), input_tap=hand_on)

    def _decode_ahead(self, origin: Origin, entry: CacheEntry, last: int) -> None:
        """One decode step of a one-stage placement, run a step ahead as mlx-lm's generate
        does: the next step's graph is built on the still unevaluated token and queued
        before this token is read, so building it in Python overlaps the model's compute.
        A request that ends wastes that one step. `last` is the input when no step is
        ahead yet."""
        sampler = entry.sampler
        assert sampler is not None
        model = self._stage.model
        token = origin.ahead
        if token is None:
            token = sampler(model.forward(mx.array([[last]]), entry.cache)[:, -1, :])
            origin.fed.append(last)
            mx.async_eval(token)
        origin.ahead = None
        fed_ahead = origin.generated + 1 < origin.max_tokens
        if fed_ahead:
            following = model.forward(token[None], entry.cache)
            origin.ahead = sampler(following[:, -1, :])
            mx.async_eval(origin.ahead)
        value = cast(int, token.item())
        if fed_ahead:
            origin.fed.append(value)
        self._on_token(origin, value)

    def _forward(self, origin: Origin, ids: mx.array, cache: list[object]) -> mx.array:
        stage = self._stage
        collective = stage.collective
        if collective is None or stage.broadcast is None:
            return stage.model.forward(ids, cache)
        # Tensor rank 0: every member runs this pass on the same embedded input, handed
        # on before the first block's all-reduce needs them.
        origin.passes += 1
        passes = origin.passes

        def hand_on(hidden: mx.array) -> None:
            message = Forward(origin.request_id, stage.epoch, passes, to_wire(hidden))
            if passes == 1:
                message.reuse_entry, message.reuse_tokens = origin.reuse_entry, origin.reused
            self._broadcast(message)

        collective.begin(origin.request_id, passes)
        return stage.model.forward(ids, cache, input_tap=hand_on)

    def _send(self, message: StageMessage) -> None:
        self._engine.send(self._stage, message)

    def _broadcast(self, message: StageMessage) -> None:
        self._engine.broadcast(self._stage, message)

    # -- a request's tokens and its end

    def _on_token(self, origin: Origin, token: int, logprobs: TokenLogprobs | None = None) -> None:
        if origin.first_token_at is None:
            origin.first_token_at = time.perf_counter()
        if origin.cancelled.is_set():
            self._finish(origin, "cancelled")
            return
        if token in self._stage.eos_token_ids:
            self._finish(origin, "stop")
            return
        if origin.generated == 0:
            origin.cached_reported = origin.reused
            origin.emit(PromptEvent(origin.reused))
        origin.generated += 1
        origin.emitted.append(token)
        origin.next_input = token
        origin.emit(TokenEvent(token, logprobs))
        if origin.generated >= origin.max_tokens:
            self._finish(origin, "length")
            return
        self._schedule(origin)

    def _finish(self, origin: Origin, reason: FinishReason) -> None:
        now = time.perf_counter()
        first = origin.first_token_at or now
        origin.emit(
            FinishEvent(
                reason=reason,
                prompt_tokens=origin.prompt_tokens,
                completion_tokens=origin.generated,
                prefill_seconds=first - origin.started,
                decode_seconds=now - first,
                cached_tokens=origin.cached_reported if origin.failovers else origin.reused,
                failovers=origin.failovers,
            )
        )
        self.index.record(len(origin.prompt), origin.reused)
        self._end(origin, keep=True)

    def _fail(self, origin: Origin, message: str) -> None:
        origin.emit(ErrorEvent(message))
        self._end(origin, keep=False)

    def _step_failed(self, origin: Origin, error: Exception) -> None:
        """A step of `origin` raised. A broken tensor group is the placement's loss, not the
        request's: it waits for the next placement like the others; any other error fails
        the request."""
        if not isinstance(error, CollectiveError):
            self._fail(origin, f"generation failed: {error}")
            return
        self.origins.pop(origin.request_id, None)
        self.ready.pop(origin.request_id, None)
        self._leave_group(origin)
        self._engine.drop(origin.request_id)
        self._engine.park(origin, str(error))

    def _end(self, origin: Origin, *, keep: bool) -> None:
        self.origins.pop(origin.request_id, None)
        self.ready.pop(origin.request_id, None)
        self._leave_group(origin)
        entry = self._engine.caches.get(origin.request_id)
        if entry is not None:
            self._measure_kv(entry)
        stage = self._stage
        tensor = stage.broadcast is not None
        # Every stage holds the request's cache: it ran there.
        everywhere = origin.passes > 0 if tensor else stage.n_stages == 1 or origin.sent_first
        if keep and everywhere and self._caching:
            release = self._keep(origin)
        else:
            self._engine.drop(origin.request_id)
            release = Release(origin.request_id, stage.epoch)
        if tensor and origin.passes:
            self._broadcast(release)
        if stage.n_stages > 1 and origin.sent_first:
            # Follows the request's last work down the same streams, so it frees (or
            # keeps) every stage's cache after that stage is done with it.
            self._send(release)
        self._start_waiting()
