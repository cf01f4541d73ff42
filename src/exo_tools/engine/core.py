"""One stage's MLX thread: its typed inbox, its per-request caches, and the role it plays.

Stages form a ring S0 → S1 → … → Sk-1 → S0. Stage 0 (the master) drives the requests
(engine/driver.py), middle stages relay hidden states (engine/relay.py), the last stage
samples (engine/last_stage.py), and tensor members other than rank 0 follow rank 0's
passes (engine/follower.py). With one stage the driver runs the whole loop on this thread.
Every message of a request travels the same ordered streams, so a release or a failure
always arrives after the work it follows.

All MLX work and all per-request state live on this one thread; other threads only put
items into its inbox. Messages of many requests interleave, so while stage 1 computes
request A stage 0 is free to compute request B.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..types import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_RUNNING,
    ErrorEvent,
    FinishEvent,
    Forward,
    GenerationHandle,
    Overloaded,
    Release,
    RequestEvent,
    SamplingParams,
    StageMessage,
)
from .driver import Driver, Origin
from .follower import TensorFollower
from .last_stage import LastStage
from .prefix_cache import (
    PrefixIndex,
    PrefixStore,
    cache_length,
    cache_trimmable,
    default_budget_bytes,
    default_kv_budget_bytes,
)
from .relay import Relay
from .role import Role
from .sampling import Sampler
from .shard import ShardModel
from .tensor_parallel import TensorCollective, TensorShardModel

if TYPE_CHECKING:
    # Only for annotations: unconstrained serving never loads llguidance.
    from ..constraints import GrammarTokenizer

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
HOP_WINDOW = 128
MISSED_MEMORY = 1024
# What a refused client is told to wait before retrying (Retry-After).
RETRY_AFTER_S = 2
# How long requests that lost their placement wait for a new one to resume on (the
# coordinator fails them sooner when it finds no placement fits).
FAILOVER_WAIT_S = 30.0

Send = Callable[[StageMessage], None]


@dataclass
class InstalledStage:
    """What this node computes in placement `epoch`."""

    epoch: int
    model: ShardModel
    eos_token_ids: frozenset[int]
    n_stages: int
    # Thread-safe: hands a message to the stream towards the next stage (None: one stage).
    send: Send | None = None
    # Tensor rank 0: hands each forward pass's command to every other member.
    broadcast: Send | None = None
    # The sampling stage's tokenizer for grammar constraints (None: it cannot constrain).
    grammar_tokenizer: GrammarTokenizer | None = None

    @property
    def tensor_rank(self) -> int | None:
        """This member's tensor-parallel rank; None in a pipeline."""
        return self.model.part.rank if isinstance(self.model, TensorShardModel) else None

    @property
    def is_tensor_follower(self) -> bool:
        rank = self.tensor_rank
        return rank is not None and rank > 0

    @property
    def collective(self) -> TensorCollective | None:
        return self.model.collective if isinstance(self.model, TensorShardModel) else None

    @property
    def is_first(self) -> bool:
        return self.model.shard.is_first and not self.is_tensor_follower

    @property
    def is_last(self) -> bool:
        return self.model.shard.is_last


@dataclass
class CacheEntry:
    """One request's KV cache on this stage, and its sampler where this stage samples."""

    cache: list[Any]
    sampler: Sampler | None = None
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()  # a constrained sampler holds grammar state worth freeing


# ---------------------------------------------------------------- the inbox


@dataclass(frozen=True)
class Start:
    origin: Origin


@dataclass(frozen=True)
class Deliver:
    message: StageMessage


@dataclass(frozen=True)
class _ForRequest:
    request_id: str


class Cancel(_ForRequest):
    """The consumer went away: finish the request now."""


@dataclass(frozen=True)
class FailAll:
    reason: str


@dataclass(frozen=True)
class Install:
    stage: InstalledStage | None
    reason: str
    done: threading.Event


@dataclass(frozen=True)
class FailParked:
    message: str


@dataclass(frozen=True)
class ResumeParked:
    pass


@dataclass(frozen=True)
class Stop:
    pass


InboxItem = Start | Deliver | Cancel | FailAll | FailParked | ResumeParked | Install | Stop


class StageEngine:
    """Lifecycle: `start()`, `install(stage)` per placement, `submit`/`deliver`, `stop()`."""

    def __init__(
        self,
        *,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        prefix_cache_bytes: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_queued: int = DEFAULT_MAX_QUEUED,
        kv_budget_bytes: int | None = None,
    ) -> None:
        self._idle_timeout_s = idle_timeout_s
        if max_batch < 1 or max_running < 1 or max_queued < 0:
            raise ValueError("max_batch and max_running must be at least 1, max_queued 0")
        self.max_batch = max_batch
        # Requests running at once on stage 0, and waiting for a place; beyond both a
        # request is refused (Overloaded).
        self.max_running = max_running
        self.max_queued = max_queued
        # KV memory of the running requests (their prompt and token limit, at what the
        # cache holds per token): a request that would exceed it waits.
        self.kv_budget_bytes = (
            default_kv_budget_bytes() if kv_budget_bytes is None else kv_budget_bytes
        )
        # Requests submitted and not yet ended (running or waiting), from any thread.
        self._admission = threading.Lock()
        self._admitted = 0
        # Prefix caching is off with a budget of 0.
        budget = default_budget_bytes() if prefix_cache_bytes is None else prefix_cache_bytes
        self.prefix_store = PrefixStore(budget)
        # Requests that failed to start here (a cache miss), whose later messages are dropped.
        self._missed: dict[str, None] = {}
        self._inbox: queue.SimpleQueue[InboxItem] = queue.SimpleQueue()
        self._stage: InstalledStage | None = None
        self._role: Role | None = None
        self._driver: Driver | None = None
        self._epoch = 0
        self.caches: dict[str, CacheEntry] = {}
        self._hops: deque[float] = deque(maxlen=HOP_WINDOW)
        self._refused = 0
        self.samples_batched = 0  # decode positions sampled in batches of more than one
        # Stage 0: batched decode passes, and the request steps they ran.
        self.decode_batches = 0
        self.decode_rows_batched = 0
        # Prefill chunks packed into a decode pass, and their tokens (engine.batching).
        self.packed_chunks = 0
        self.packed_chunk_tokens = 0
        self.decode_batch_rows: Counter[int] = Counter()  # passes by their number of rows
        # Seconds the MLX thread spent on work (not waiting): with a run's token count, what
        # a token costs on this stage, the rest of its time being hops and wakeups.
        self._busy_s = 0.0
        # An inbox item taken while gathering a batch that is not part of it: next in line.
        self._carried: InboxItem | None = None
        # Requests that lost their placement, waiting to resume on the next one:
        # (request, why it was lost, give up at).
        self._parked: list[tuple[Origin, str, float]] = []
        self.failovers = 0  # requests resumed on a new placement
        self._thread = threading.Thread(target=self._run, name="exo-tools-mlx", daemon=True)
        self._last_sweep = time.monotonic()

    # ---------------------------------------------------------------- any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(Stop())
        self._thread.join(timeout=10)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def active_requests(self) -> int:
        driver = self._driver
        return len(driver.origins) if driver is not None else 0

    @property
    def cached_requests(self) -> int:
        return len(self.caches)

    def stats(self) -> dict[str, Any]:
        hops = list(self._hops)
        stage = self._stage
        collective = stage.collective if stage is not None else None
        reduces = list(collective.latencies_us) if collective is not None else []
        waits = list(collective.waits_us) if collective is not None else []
        return {
            "allreduce_us_median": round(statistics.median(reduces), 1) if reduces else None,
            "allreduce_wait_us_median": round(statistics.median(waits), 1) if waits else None,
            "allreduces_measured": len(reduces),
            "busy_s": round(self._busy_s, 6),
            "epoch": self._epoch,
            "cached_requests": len(self.caches),
            "hop_us_median": round(statistics.median(hops), 1) if hops else None,
            "hops_measured": len(hops),
            "refused_stale": self._refused,
            "samples_batched": self.samples_batched,
            "decode_batches": self.decode_batches,
            "decode_rows_batched": self.decode_rows_batched,
            "failovers": self.failovers,
        }

    def scheduler_stats(self) -> dict[str, Any]:
        """Stage 0's requests running and waiting, its limits, and its batched passes."""
        driver = self._driver
        batches = self.decode_batches
        return {
            "running": len(driver.origins) if driver is not None else 0,
            "queued": len(driver.waiting) if driver is not None else 0,
            "max_running": self.max_running,
            "max_queued": self.max_queued,
            "max_batch": self.max_batch,
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_reserved_bytes": driver.kv_reserved_bytes() if driver is not None else 0,
            "decode_batches": batches,
            "mean_batch_rows": round(self.decode_rows_batched / batches, 2) if batches else None,
            "batch_rows": {str(rows): n for rows, n in sorted(self.decode_batch_rows.items())},
            "packed_chunks": self.packed_chunks,
            "packed_chunk_tokens": self.packed_chunk_tokens,
        }

    @property
    def prefix_index(self) -> PrefixIndex | None:
        """Stage 0's index of the prefix cache (None on other stages)."""
        return self._driver.index if self._driver is not None else None

    def prefix_cache_stats(self) -> dict[str, Any]:
        """This stage's stored entries and bytes; on stage 0 also the hit rate."""
        stats: dict[str, Any] = dict(self.prefix_store.stats())
        driver = self._driver
        if driver is not None:
            stats.update(driver.index.stats())
            stats["later_stage_bytes"] = list(driver.stage_bytes)
        return stats

    def install(self, stage: InstalledStage | None, reason: str, timeout: float = 30.0) -> None:
        """Switch to `stage` (None: hold nothing) between messages; blocks until done.

        Requests of the old placement fail with `reason`; their caches are dropped."""
        self._abort_collective(reason)  # the MLX thread may be waiting on an all-reduce
        done = threading.Event()
        self._inbox.put(Install(stage, reason, done))
        deadline = time.monotonic() + timeout
        while not done.wait(0.1):
            if not self._thread.is_alive():  # stopped (shutdown): nothing will switch
                raise RuntimeError("the MLX thread has stopped")
            if time.monotonic() > deadline:
                raise TimeoutError("the MLX thread did not switch placements in time")

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        *,
        sampling: SamplingParams,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> GenerationHandle:
        """The TokenGenerator protocol: stage 0 drives the request around the ring."""
        if not prompt:
            raise ValueError("prompt is empty")
        refused = self.overloaded()
        if refused is not None:
            raise refused
        with self._admission:
            self._admitted += 1
        cancelled = threading.Event()
        handle = GenerationHandle(
            request_id, cancelled, on_cancel=lambda: self._inbox.put(Cancel(request_id))
        )
        ended = False

        def emit(event: RequestEvent) -> None:
            nonlocal ended
            if ended:
                return
            if isinstance(event, FinishEvent | ErrorEvent):
                ended = True  # every request ends with exactly one of these
                with self._admission:
                    self._admitted -= 1
            # The loop may be gone at shutdown; the event has no one to go to then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(handle.events.put_nowait, event)

        origin = Origin(
            request_id=request_id,
            epoch=self._epoch,
            prompt=list(prompt),
            max_tokens=max_tokens,
            sampling=sampling,
            emit=emit,
            cancelled=cancelled,
        )
        self._inbox.put(Start(origin))
        return handle

    def overloaded(self) -> Overloaded | None:
        """The refusal for a request submitted now, when the running requests and the
        queue are full."""
        with self._admission:
            admitted = self._admitted
        if admitted < self.max_running + self.max_queued:
            return None
        return Overloaded(
            f"this node is busy: {self.max_running} requests running and {self.max_queued} "
            "waiting (--max-running, --max-queued); retry shortly",
            RETRY_AFTER_S,
        )

    def deliver(self, message: StageMessage) -> None:
        """A message from the previous stage's stream (called on the event loop)."""
        self._inbox.put(Deliver(message))

    def fail_all(self, message: str) -> None:
        """The ring broke: the requests of this stage stop. Those that can resume wait for
        the next placement (`FAILOVER_WAIT_S` at most); the others fail with `message`."""
        self._abort_collective(message)
        self._inbox.put(FailAll(message))

    def resume_parked(self) -> None:
        """Every stage of the new placement is loaded: the requests waiting to resume
        start on it (stage 0's own install comes first, the others' may come later)."""
        self._inbox.put(ResumeParked())

    def fail_parked(self, message: str) -> None:
        """No new placement is coming (none fits the nodes left): the requests waiting to
        resume fail with `message`."""
        self._inbox.put(FailParked(message))

    def _abort_collective(self, reason: str) -> None:
        stage = self._stage
        collective = stage.collective if stage is not None else None
        if collective is not None:
            collective.abort(reason)

    # ---------------------------------------------------------------- the MLX thread

    def _run(self) -> None:
        stream = mx.new_stream(mx.default_device())
        with mx.stream(stream):
            while True:
                item: InboxItem | None
                driver = self._driver
                # Messages first (tokens, arrivals, cancels), then a round of the ready work.
                working = driver is not None and driver.has_work
                if self._carried is not None:
                    item, self._carried = self._carried, None
                else:
                    try:
                        if working:
                            item = self._inbox.get_nowait()
                        else:
                            item = self._inbox.get(timeout=SWEEP_INTERVAL_S)
                    except queue.Empty:
                        item = None
                if isinstance(item, Stop):
                    break
                began = time.perf_counter()
                try:
                    if item is not None:
                        self._handle(item)
                    elif working and driver is not None:
                        driver.run_ready()
                except Exception:  # one bad message must not stop the stage
                    log.exception(
                        "stage failed handling %s", type(item).__name__ if item else "a round"
                    )
                self._busy_s += time.perf_counter() - began
                now = time.monotonic()
                if now - self._last_sweep >= SWEEP_INTERVAL_S:
                    self._last_sweep = now
                    self._sweep(now)
        self._fail_requests("node is shutting down")
        self._fail_parked("node is shutting down")
        self.drop_all()

    def _handle(self, item: InboxItem) -> None:
        match item:
            case Deliver(message):
                if self._admit(message) and self._role is not None:
                    self._role.on_message(message)
            case Start(origin):
                self._start(origin)
            case Cancel(request_id):
                if self._driver is not None:
                    self._driver.cancel(request_id)
                self._cancel_parked(request_id)
            case FailAll(reason):
                self._park_requests(reason)
                self.drop_all()
                # The ring broke: stages may have lost entries the index still names.
                self.prefix_store.clear()
                if self._driver is not None:
                    self._driver.index.clear()
            case Install(stage, reason, done):
                try:
                    self._install(stage, reason)
                finally:
                    done.set()
            case FailParked(message):
                self._fail_parked(message)
            case ResumeParked():
                if self._driver is not None:
                    self._resume_parked()
            case Stop():
                pass

    def _start(self, origin: Origin) -> None:
        stage = self._stage
        if self._driver is None or stage is None:
            origin.emit(ErrorEvent("no model placement is ready on this node; retry shortly"))
            return
        if origin.epoch != stage.epoch:
            origin.emit(ErrorEvent("the placement changed while the request started; retry"))
            return
        self._driver.start(origin)

    def _install(self, stage: InstalledStage | None, reason: str) -> None:
        self._park_requests(reason)
        self.drop_all()
        self.prefix_store.clear()  # entries of the old placement's shards are stale
        self._missed.clear()
        self._stage = self._role = self._driver = None
        mx.clear_cache()  # hand the old shard's memory back before the new one grows
        if stage is not None:
            self._role = self._role_for(stage)
            self._stage = stage
            self._epoch = stage.epoch
        self._hops.clear()
        if stage is not None and self._driver is None:
            # This node holds a later stage now: it drives no requests.
            self._fail_parked(reason)
        # Otherwise parked requests wait for `resume_parked`: the other stages may still be
        # loading (None: the old stage is released before the new one loads).

    # ---------------------------------------------------------------- failover

    def _park_requests(self, reason: str) -> None:
        """Take every request off the placement being lost: those that can resume wait
        for the next one, the others fail with `reason`."""
        if self._driver is None:
            return
        parked = sum(self.park(origin, reason) for origin in self._driver.take_all())
        if parked:
            log.warning("%d request(s) wait for a new placement to resume on (%s)", parked, reason)

    def park(self, origin: Origin, reason: str) -> bool:
        """(The MLX thread) keep `origin`, taken off a lost placement, to resume on the
        next; or fail it with `reason` when it cannot resume. Whether it was kept."""
        # A grammar's state lives with the lost sampler: such a request cannot resume.
        if origin.cancelled.is_set() or origin.sampling.constraint is not None:
            origin.emit(ErrorEvent(reason))
            return False
        self._parked.append((origin, reason, time.monotonic() + FAILOVER_WAIT_S))
        return True

    def _resume_parked(self) -> None:
        parked, self._parked = self._parked, []
        for origin, _, _ in parked:
            assert self._driver is not None
            if origin.cancelled.is_set():
                origin.finish_cancelled()
                continue
            origin.resume(self._epoch)
            self.failovers += 1
            log.info(
                "request %s resumes on epoch %d after %d token(s)",
                origin.request_id,
                self._epoch,
                origin.generated,
            )
            self._driver.start(origin)

    def _fail_parked(self, message: str) -> None:
        parked, self._parked = self._parked, []
        for origin, reason, _ in parked:
            origin.emit(ErrorEvent(f"{reason}; {message}"))

    def _cancel_parked(self, request_id: str) -> None:
        for item in list(self._parked):
            origin = item[0]
            if origin.request_id == request_id:
                self._parked.remove(item)
                origin.finish_cancelled()

    def _role_for(self, stage: InstalledStage) -> Role:
        if stage.is_tensor_follower:
            return TensorFollower(self, stage)
        if stage.is_first:
            self._driver = Driver(self, stage)
            return self._driver
        if stage.is_last:
            return LastStage(self, stage)
        return Relay(self, stage)

    def _fail_requests(self, reason: str) -> None:
        if self._driver is not None:
            self._driver.fail_all(reason)

    def _admit(self, message: StageMessage) -> bool:
        """Whether `message` is of the epoch this stage holds (others are dropped)."""
        if message.sent_ns:
            self._hops.append((time.time_ns() - message.sent_ns) / 1000.0)
        stage = self._stage
        if stage is not None and message.epoch == stage.epoch:
            return True
        # The servicer refuses stale streams; this catches a switch between the two.
        self._refused += 1
        log.warning(
            "dropped a message of request %s for epoch %d (this stage is at epoch %d)",
            message.request_id,
            message.epoch,
            self._epoch,
        )
        return False

    def _sweep(self, now: float) -> None:
        """Drop caches of requests nobody has touched for the idle timeout; fail parked
        requests whose wait for a new placement is over."""
        expired = [item for item in self._parked if item[2] <= now]
        for item in expired:
            self._parked.remove(item)
            origin, reason, _ = item
            origin.emit(ErrorEvent(f"{reason}; no new placement within {FAILOVER_WAIT_S:.0f} s"))
        driving = self._driver.origins if self._driver is not None else {}
        stale = [
            request_id
            for request_id, entry in self.caches.items()
            if request_id not in driving and now - entry.last_used > self._idle_timeout_s
        ]
        for request_id in stale:
            log.info("dropping idle request %s", request_id)
            self.drop(request_id)

    # ---------------------------------------------------------------- for the roles

    def open_cache(
        self,
        request_id: str,
        stage: InstalledStage,
        sampling: SamplingParams | None,
        *,
        reuse_entry: int = 0,
        reuse_tokens: int = 0,
    ) -> CacheEntry:
        """A request's first message on this stage: a fresh cache, or a copy of prefix
        cache entry `reuse_entry` cut to `reuse_tokens` tokens (raises CacheMiss when this
        stage cannot); its sampler on the stage that samples. A restarted request's
        earlier state here is replaced."""
        self.drop(request_id)
        self._missed.pop(request_id, None)
        if reuse_entry:
            cache = self.prefix_store.copy_prefix(reuse_entry, reuse_tokens)
        else:
            cache = stage.model.make_cache()
        entry = CacheEntry(cache)
        if sampling is not None and stage.is_last:
            entry.sampler = Sampler(sampling, stage.grammar_tokenizer)
        self.caches[request_id] = entry
        return entry

    def cache_for(self, request_id: str) -> CacheEntry | None:
        """The cache of a request this stage holds (None: it never started here, or its
        state was lost)."""
        entry = self.caches.get(request_id)
        if entry is not None:
            entry.last_used = time.monotonic()
        return entry

    def mark_missed(self, request_id: str) -> bool:
        """Remember that `request_id` failed to start here, so its further messages are
        dropped quietly; False when it already was."""
        if request_id in self._missed:
            return False
        self._missed[request_id] = None
        while len(self._missed) > MISSED_MEMORY:
            self._missed.pop(next(iter(self._missed)))
        return True

    def release(self, stage: InstalledStage, message: Release) -> Release:
        """A request ended: drop its cache, or keep it as the prefix cache entry the
        release names; returns the release to pass on, with this stage's evictions."""
        entry = self.caches.pop(message.request_id, None)
        self._missed.pop(message.request_id, None)
        store = self.prefix_store
        store.drop(message.evict)
        if entry is not None:
            entry.close()
        if not message.keep_as:
            return message
        evict = list(message.evict)
        trimmable = message.trimmable
        local = stage.model.local_caches(entry.cache) if entry is not None else []
        if entry is None or cache_length(local) not in (None, message.keep_tokens):
            # Nothing (or not what stage 0 counted) to keep: every stage forgets the entry.
            log.warning(
                "not keeping prefix cache entry %d of request %s",
                message.keep_as,
                message.request_id,
            )
            evict.append(message.keep_as)
        else:
            trimmable = trimmable and cache_trimmable(local)
            # Tensor members follow rank 0's evictions exactly: they cannot report their own.
            budgeted = not stage.is_tensor_follower
            evict.extend(
                store.put(message.keep_as, entry.cache, message.keep_tokens, local, budgeted)
            )
        return replace(
            message,
            evict=evict,
            trimmable=trimmable,
            stage_bytes=[*message.stage_bytes, store.nbytes],
        )

    def drop(self, request_id: str) -> None:
        """Free a request's cache without keeping it."""
        entry = self.caches.pop(request_id, None)
        if entry is not None:
            entry.close()

    def drop_all(self) -> None:
        for request_id in list(self.caches):
            self.drop(request_id)

    def queued_samples(self, limit: int) -> list[Forward]:
        """Up to `limit` sampling steps of other requests queued right behind one being
        sampled, admitted (stale ones are dropped); the first other item waits as the
        next in line."""
        batch: list[Forward] = []
        while len(batch) < limit:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if not (isinstance(item, Deliver) and isinstance(item.message, Forward)):
                self._carried = item
                break
            if not item.message.sample:
                self._carried = item
                break
            if self._admit(item.message):
                batch.append(item.message)
        return batch

    def send(self, stage: InstalledStage, message: StageMessage) -> None:
        """To the next stage of the ring."""
        self._stamped(stage.send, message, "this stage has no next stage to send to")

    def broadcast(self, stage: InstalledStage, message: StageMessage) -> None:
        """From tensor rank 0 to every other member."""
        self._stamped(stage.broadcast, message, "this member does not drive tensor passes")

    @staticmethod
    def _stamped(send: Send | None, message: StageMessage, missing: str) -> None:
        if send is None:
            raise RuntimeError(missing)
        message.sent_ns = time.time_ns()  # for the receiver's per-hop statistics
        send(message)
