"""One pipeline stage's MLX thread: its layers, per-request KV caches, and (on stage 0) the
requests it drives.

Stages form a ring S0 → S1 → … → Sk-1 → S0. Stage 0 is the master: it turns prompt ids into
hidden states, the last stage samples and sends the token back to stage 0, which emits it
and feeds it in as the next input. Every message of a request travels the same ordered
streams, so a release or an error always arrives after the work it follows. With one stage
the whole loop runs on this thread without any network.

All MLX work, and all per-request state, live on this one thread; the event loop only puts
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
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx

from ..proto import node_pb2
from ..types import (
    ErrorEvent,
    FinishEvent,
    FinishReason,
    GenerationHandle,
    RequestEvent,
    SamplingParams,
    TokenEvent,
    TokenLogprobs,
)
from .sampling import Sampler, token_logprobs
from .shard import ShardModel
from .tensor_parallel import CollectiveError, TensorCollective, TensorShardModel
from .tensors import from_proto, to_proto

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
HOP_WINDOW = 128
# mlx-lm's generate prefills in 2048-token chunks and runs the last prompt token on its
# own; doing the same keeps greedy output token-identical to it.
PREFILL_CHUNK = 2048
# Decode messages the last stage takes off its inbox at once to share one output-head pass.
MAX_SAMPLE_BATCH = 16

Send = Callable[[node_pb2.ActivationMessage], None]


def sampling_to_proto(params: SamplingParams) -> node_pb2.SamplingParams:
    return node_pb2.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed or 0,
        has_seed=params.seed is not None,
        constraint=params.constraint or "",
        has_constraint=params.constraint is not None,
        logprobs=params.logprobs,
        top_logprobs=params.top_logprobs,
    )


def sampling_from_proto(msg: node_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        seed=int(msg.seed) if msg.has_seed else None,
        constraint=msg.constraint if msg.has_constraint else None,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
    )


class EpochError(RuntimeError):
    """A message for a placement epoch this stage does not hold."""


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
class _Cache:
    cache: list[Any]
    sampler: Sampler | None = None
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        # A constrained sampler holds grammar state worth freeing promptly.
        close = getattr(self.sampler, "close", None)
        if callable(close):
            close()


@dataclass
class _Origin:
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
    waiting: bool = False  # a sampling step is out on the other stages
    passes: int = 0  # forward passes sent to tensor-parallel members
    # One-stage decode runs a step ahead: the next token, still being computed.
    ahead: mx.array | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


def _can_run_ahead(sampler: Sampler | None) -> bool:
    """Sampling needs nothing from the host between steps: no grammar mask to compute
    from the token, no log-probabilities to read."""
    return sampler is not None and sampler.params.constraint is None and not sampler.params.logprobs


class StageEngine:
    """Lifecycle: `start()`, `install(stage)` per placement, `submit`/`deliver`, `stop()`."""

    def __init__(self, *, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self._idle_timeout_s = idle_timeout_s
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stage: InstalledStage | None = None
        self._epoch = 0
        self._caches: dict[str, _Cache] = {}
        self._origins: dict[str, _Origin] = {}
        self._hops: deque[float] = deque(maxlen=HOP_WINDOW)
        self._refused = 0
        self._samples_batched = 0  # decode positions sampled in batches of more than one
        # Seconds the MLX thread spent on work (not waiting): with a run's token count, what
        # a token costs on this stage, the rest of its time being hops and wakeups.
        self._busy_s = 0.0
        # An inbox item taken while gathering a batch that is not part of it: next in line.
        self._carried: tuple[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="exo-tools-mlx", daemon=True)
        self._last_sweep = time.monotonic()

    # ---------------------------------------------------------------- any thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=10)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def active_requests(self) -> int:
        return len(self._origins)

    @property
    def cached_requests(self) -> int:
        return len(self._caches)

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
            "cached_requests": len(self._caches),
            "hop_us_median": round(statistics.median(hops), 1) if hops else None,
            "hops_measured": len(hops),
            "refused_stale": self._refused,
            "samples_batched": self._samples_batched,
        }

    def install(self, stage: InstalledStage | None, reason: str, timeout: float = 30.0) -> None:
        """Switch to `stage` (None: hold nothing) between messages; blocks until done.

        Requests of the old placement fail with `reason`; their caches are dropped."""
        self._abort_collective(reason)  # the MLX thread may be waiting on an all-reduce
        done = threading.Event()
        self._inbox.put(("install", (stage, reason, done)))
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
        cancelled = threading.Event()
        handle = GenerationHandle(
            request_id, cancelled, on_cancel=lambda: self._inbox.put(("cancel", request_id))
        )

        def emit(event: RequestEvent) -> None:
            # The loop may be gone at shutdown; the event has no one to go to then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(handle.events.put_nowait, event)

        origin = _Origin(
            request_id=request_id,
            epoch=self._epoch,
            prompt=list(prompt),
            max_tokens=max_tokens,
            sampling=sampling,
            emit=emit,
            cancelled=cancelled,
        )
        self._inbox.put(("start", origin))
        return handle

    def deliver(self, message: node_pb2.ActivationMessage) -> None:
        """A message from the previous stage's stream (called on the event loop)."""
        self._inbox.put(("net", message))

    def release(self, request_id: str) -> None:
        self._inbox.put(("release", request_id))

    def fail_all(self, message: str) -> None:
        """The ring broke: every request of this stage fails with `message`."""
        self._abort_collective(message)
        self._inbox.put(("fail", message))

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
                if self._carried is not None:
                    (kind, payload), self._carried = self._carried, None
                else:
                    try:
                        kind, payload = self._inbox.get(timeout=SWEEP_INTERVAL_S)
                    except queue.Empty:
                        kind, payload = "idle", None
                if kind == "stop":
                    break
                began = time.perf_counter()
                try:
                    self._handle(kind, payload)
                except Exception:  # one bad message must not stop the stage
                    log.exception("stage failed handling %s", kind)
                self._busy_s += time.perf_counter() - began
                now = time.monotonic()
                if now - self._last_sweep >= SWEEP_INTERVAL_S:
                    self._last_sweep = now
                    self._sweep(now)
        self._fail_origins("node is shutting down")
        self._drop_all()

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "net":
            self._on_message(payload)
        elif kind == "step":
            origin = self._origins.get(payload)
            if origin is not None:
                self._step_safely(origin)
        elif kind == "start":
            self._on_start(payload)
        elif kind == "cancel":
            origin = self._origins.get(payload)
            if origin is not None:
                self._finish(origin, "cancelled")
        elif kind == "release":
            self._drop(payload)
        elif kind == "fail":
            self._fail_origins(payload)
            self._drop_all()
        elif kind == "install":
            stage, reason, done = payload
            try:
                self._install(stage, reason)
            finally:
                done.set()

    def _install(self, stage: InstalledStage | None, reason: str) -> None:
        self._fail_origins(reason)
        self._drop_all()
        self._stage = None
        mx.clear_cache()  # hand the old shard's memory back before the new one grows
        self._stage = stage
        self._epoch = stage.epoch if stage is not None else self._epoch
        self._hops.clear()

    def _sweep(self, now: float) -> None:
        """Drop caches of requests nobody has touched for the idle timeout."""
        stale = [
            request_id
            for request_id, entry in self._caches.items()
            if request_id not in self._origins and now - entry.last_used > self._idle_timeout_s
        ]
        for request_id in stale:
            log.info("dropping idle request %s", request_id)
            self._drop(request_id)

    def _drop(self, request_id: str) -> None:
        entry = self._caches.pop(request_id, None)
        if entry is not None:
            entry.close()

    def _drop_all(self) -> None:
        for request_id in list(self._caches):
            self._drop(request_id)

    def _cache_for(
        self, request_id: str, stage: InstalledStage, sampling: SamplingParams | None
    ) -> _Cache:
        entry = self._caches.get(request_id)
        if entry is None:
            entry = _Cache(stage.model.make_cache())
            self._caches[request_id] = entry
        if entry.sampler is None and sampling is not None and stage.is_last:
            entry.sampler = Sampler(sampling)
        entry.last_used = time.monotonic()
        return entry

    def _entry_for(self, stage: InstalledStage, message: node_pb2.ActivationMessage) -> _Cache:
        """The request's cache; its sampling parameters ride on its first message."""
        sampling = sampling_from_proto(message.sampling) if message.HasField("sampling") else None
        return self._cache_for(message.request_id, stage, sampling)

    # -- stage 0: the requests it drives

    def _on_start(self, origin: _Origin) -> None:
        stage = self._stage
        if stage is None or not stage.is_first:
            origin.emit(ErrorEvent("no model placement is ready on this node; retry shortly"))
            return
        if origin.epoch != stage.epoch:
            origin.emit(ErrorEvent("the placement changed while the request started; retry"))
            return
        if origin.request_id in self._origins:
            origin.emit(ErrorEvent(f"request id {origin.request_id} is already running"))
            return
        self._origins[origin.request_id] = origin
        self._step_safely(origin)

    def _step_safely(self, origin: _Origin) -> None:
        if origin.cancelled.is_set():
            self._finish(origin, "cancelled")
            return
        try:
            self._step(origin)
        except Exception as error:  # one request's failure must not stop the others
            log.exception("request %s failed", origin.request_id)
            self._fail(origin, f"generation failed: {error}")

    def _step(self, origin: _Origin) -> None:
        stage = self._stage
        assert stage is not None
        entry = self._cache_for(origin.request_id, stage, origin.sampling)
        remaining = len(origin.prompt) - 1 - origin.prompt_done
        if remaining > 0:
            # mlx-lm's generate prefills prompt[:-1] in 2048-token chunks and runs the last
            # prompt token on its own; the same split keeps greedy output identical to it.
            count = min(PREFILL_CHUNK, remaining)
            ids = origin.prompt[origin.prompt_done : origin.prompt_done + count]
            origin.prompt_done += count
            sample = False
        else:
            last = origin.next_input if origin.next_input is not None else origin.prompt[-1]
            # Tensor rank 0 is one stage too, but its passes sync with the members.
            alone = stage.n_stages == 1 and stage.collective is None
            if alone and _can_run_ahead(entry.sampler):
                self._decode_ahead(stage, origin, entry, last)
                return
            ids = [last]
            sample = True
        out = self._forward_first(stage, origin, mx.array(ids)[None], entry.cache)
        if stage.n_stages == 1:
            if sample:
                token, logprobs = self._sample(entry, out[:, -1, :])
                self._on_token(origin, token, logprobs)
            else:
                mx.eval([layer_cache.state for layer_cache in entry.cache])
                self._inbox.put(("step", origin.request_id))
            return
        message = node_pb2.ActivationMessage(
            request_id=origin.request_id,
            epoch=stage.epoch,
            step=origin.generated,
            hidden=to_proto(out),
            sample=sample,
        )
        if not origin.sent_first:
            message.sampling.CopyFrom(sampling_to_proto(origin.sampling))
            origin.sent_first = True
        self._send(stage, message)
        if sample:
            origin.waiting = True
        else:
            # Prefill chunks stream on: stage 1 works on this chunk while we run the next.
            self._inbox.put(("step", origin.request_id))

    def _decode_ahead(
        self, stage: InstalledStage, origin: _Origin, entry: _Cache, last: int
    ) -> None:
        """One decode step of a one-stage placement, run a step ahead as mlx-lm's generate
        does: the next step's graph is built on the still unevaluated token and queued
        before this token is read, so building it in Python overlaps the model's compute.
        A request that ends wastes that one step. `last` is the input when no step is
        ahead yet."""
        sampler = entry.sampler
        assert sampler is not None
        token = origin.ahead
        if token is None:
            token = sampler(stage.model.forward(mx.array([[last]]), entry.cache)[:, -1, :])
            mx.async_eval(token)
        origin.ahead = None
        if origin.generated + 1 < origin.max_tokens:
            following = stage.model.forward(token[None], entry.cache)
            origin.ahead = sampler(following[:, -1, :])
            mx.async_eval(origin.ahead)
        self._on_token(origin, cast(int, token.item()))

    def _forward_first(
        self, stage: InstalledStage, origin: _Origin, ids: mx.array, cache: list[Any]
    ) -> mx.array:
        collective = stage.collective
        if collective is None or stage.broadcast is None:
            return stage.model.forward(ids, cache)
        # Tensor rank 0: every member runs this pass on the same embedded input.
        origin.passes += 1
        hidden = stage.model.embed(ids)
        message = node_pb2.ActivationMessage(
            request_id=origin.request_id,
            epoch=stage.epoch,
            step=origin.passes,
            hidden=to_proto(hidden),
        )
        self._broadcast(stage, message)
        collective.begin(origin.request_id, origin.passes)
        return stage.model.forward(hidden, cache)

    @staticmethod
    def _sample(entry: _Cache, logits: mx.array) -> tuple[int, TokenLogprobs | None]:
        sampler = entry.sampler
        if sampler is None:
            raise RuntimeError("no sampling parameters arrived for this request")
        token = int(sampler(logits).item())  # type: ignore[misc]
        params = sampler.params
        if not params.logprobs:
            return token, None
        return token, token_logprobs(logits, token, params.top_logprobs)

    def _on_token(self, origin: _Origin, token: int, logprobs: TokenLogprobs | None = None) -> None:
        origin.waiting = False
        if origin.first_token_at is None:
            origin.first_token_at = time.perf_counter()
        if origin.cancelled.is_set():
            self._finish(origin, "cancelled")
            return
        stage = self._stage
        assert stage is not None
        if token in stage.eos_token_ids:
            self._finish(origin, "stop")
            return
        origin.generated += 1
        origin.next_input = token
        origin.emit(TokenEvent(token, logprobs))
        if origin.generated >= origin.max_tokens:
            self._finish(origin, "length")
            return
        # Queued rather than run now so other requests' work interleaves fairly.
        self._inbox.put(("step", origin.request_id))

    def _finish(self, origin: _Origin, reason: FinishReason) -> None:
        now = time.perf_counter()
        first = origin.first_token_at or now
        origin.emit(
            FinishEvent(
                reason=reason,
                prompt_tokens=len(origin.prompt),
                completion_tokens=origin.generated,
                prefill_seconds=first - origin.started,
                decode_seconds=now - first,
            )
        )
        self._end(origin)

    def _fail(self, origin: _Origin, message: str) -> None:
        origin.emit(ErrorEvent(message))
        self._end(origin)

    def _end(self, origin: _Origin) -> None:
        self._origins.pop(origin.request_id, None)
        self._drop(origin.request_id)
        stage = self._stage
        if stage is not None and stage.broadcast is not None and origin.passes:
            self._broadcast(
                stage,
                node_pb2.ActivationMessage(
                    request_id=origin.request_id, epoch=stage.epoch, release=True
                ),
            )
        if stage is not None and stage.n_stages > 1 and origin.sent_first:
            # Follows the request's last work down the same streams, so it frees every
            # stage's cache after that stage is done with it.
            self._send(
                stage,
                node_pb2.ActivationMessage(
                    request_id=origin.request_id, epoch=stage.epoch, release=True
                ),
            )

    def _fail_origins(self, message: str) -> None:
        for origin in list(self._origins.values()):
            origin.emit(ErrorEvent(message))
        self._origins.clear()

    # -- messages from the previous stage

    def _admit(self, message: node_pb2.ActivationMessage) -> InstalledStage | None:
        """The stage to run `message` on; None (dropped) when it is of another epoch."""
        if message.sent_ns:
            self._hops.append((time.time_ns() - message.sent_ns) / 1000.0)
        stage = self._stage
        if stage is None or message.epoch != stage.epoch:
            # The servicer refuses stale streams; this catches a switch between the two.
            self._refused += 1
            log.warning(
                "dropped a message of request %s for epoch %d (this stage is at epoch %d)",
                message.request_id,
                message.epoch,
                self._epoch,
            )
            return None
        return stage

    def _on_message(self, message: node_pb2.ActivationMessage) -> None:
        stage = self._admit(message)
        if stage is None:
            return
        if stage.is_tensor_follower:
            self._follow(stage, message)
            return
        if stage.is_first:
            self._on_return(stage, message)
            return
        if message.release or message.error:
            self._drop(message.request_id)
            if not stage.is_last or message.error:
                self._send(stage, message)  # on down the ring; an error goes back to stage 0
            return
        if stage.is_last and message.sample:
            self._sample_batch(stage, [message, *self._queued_samples()])
            return
        try:
            self._forward(stage, message)
        except Exception as error:
            self._fail_message(stage, message, error)

    def _fail_message(
        self, stage: InstalledStage, message: node_pb2.ActivationMessage, error: Exception
    ) -> None:
        """This request failed here: drop it and tell stage 0 (down the ring)."""
        log.exception("request %s failed on this stage", message.request_id)
        self._drop(message.request_id)
        self._send(
            stage,
            node_pb2.ActivationMessage(
                request_id=message.request_id,
                epoch=stage.epoch,
                error=f"stage [{stage.model.shard.start_layer}, "
                f"{stage.model.shard.end_layer}) failed: {error}",
            ),
        )

    # -- the last stage of a multi-stage pipeline: one output-head pass per batch

    def _queued_samples(self) -> list[node_pb2.ActivationMessage]:
        """Decode messages of other requests queued right behind one being sampled, admitted
        (stale ones are dropped); the first other item waits as the next in line."""
        batch: list[node_pb2.ActivationMessage] = []
        while len(batch) < MAX_SAMPLE_BATCH - 1:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            kind, message = item
            if kind != "net" or not message.sample or message.release or message.error:
                self._carried = item
                break
            if self._admit(message) is not None:
                batch.append(message)
        return batch

    def _sample_batch(
        self, stage: InstalledStage, messages: list[node_pb2.ActivationMessage]
    ) -> None:
        """Each request's blocks on its own cache, then the final norm and output head once
        for all of them: the head's weights (the whole vocabulary) are read once per batch
        rather than once per request. With several streams the last stage, which also holds
        the head, is the pipeline's slowest; one request is a batch of one."""
        finished: list[tuple[node_pb2.ActivationMessage, _Cache, mx.array]] = []
        for message in messages:
            try:
                entry = self._entry_for(stage, message)
                hidden = stage.model.blocks(from_proto(message.hidden), entry.cache)
                finished.append((message, entry, hidden[:, -1, :]))
            except Exception as error:
                self._fail_message(stage, message, error)
        if not finished:
            return
        if len(finished) > 1:
            self._samples_batched += len(finished)
        try:
            logits = stage.model.head(mx.concatenate([row for *_, row in finished], axis=0))
        except Exception as error:
            for message, _, _ in finished:
                self._fail_message(stage, message, error)
            return
        for index, (message, entry, _) in enumerate(finished):
            try:
                self._reply_token(stage, message, entry, logits[index : index + 1])
            except Exception as error:
                self._fail_message(stage, message, error)

    def _follow(self, stage: InstalledStage, message: node_pb2.ActivationMessage) -> None:
        """Tensor member of rank > 0: run rank 0's pass on this member's slice."""
        if message.release or message.error:
            self._drop(message.request_id)
            return
        collective = stage.collective
        assert collective is not None
        entry = self._cache_for(message.request_id, stage, None)
        try:
            collective.begin(message.request_id, message.step)
            out = stage.model.forward(from_proto(message.hidden), entry.cache)
            mx.eval(out, [layer_cache.state for layer_cache in entry.cache])
        except CollectiveError as error:
            # The placement is broken; rank 0 fails the requests and the master re-places.
            log.warning("request %s stopped: %s", message.request_id, error)
            self._drop_all()
        except Exception as error:
            log.exception("request %s failed on this member", message.request_id)
            collective.fail_peers(f"tensor member {stage.tensor_rank} failed: {error}")
            self._drop_all()

    def _on_return(self, stage: InstalledStage, message: node_pb2.ActivationMessage) -> None:
        """Stage 0: a sampled token (or an error) came back around the ring."""
        origin = self._origins.get(message.request_id)
        if origin is None:
            return  # cancelled meanwhile; its release is already on its way
        if message.error:
            self._fail(origin, message.error)
            return
        if not message.token_ids:
            self._fail(origin, "the last stage returned no token")
            return
        logprobs = None
        if origin.sampling.logprobs:
            top = zip(message.top_token_ids, message.top_logprobs, strict=True)
            logprobs = TokenLogprobs(message.logprob, tuple((int(i), v) for i, v in top))
        self._on_token(origin, int(message.token_ids[0]), logprobs)

    def _forward(self, stage: InstalledStage, message: node_pb2.ActivationMessage) -> None:
        entry = self._entry_for(stage, message)
        out = stage.model.forward(from_proto(message.hidden), entry.cache)
        if not stage.is_last:
            forward = node_pb2.ActivationMessage(
                request_id=message.request_id,
                epoch=stage.epoch,
                step=message.step,
                hidden=to_proto(out),
                sample=message.sample,
            )
            if message.HasField("sampling"):
                forward.sampling.CopyFrom(message.sampling)
            self._send(stage, forward)
            return
        # A prefill chunk: the cache is all it leaves (samples go to `_sample_batch`).
        mx.eval([layer_cache.state for layer_cache in entry.cache])

    def _reply_token(
        self,
        stage: InstalledStage,
        message: node_pb2.ActivationMessage,
        entry: _Cache,
        logits: mx.array,
    ) -> None:
        """Sample the request's next token from `logits` and send it to stage 0."""
        token, logprobs = self._sample(entry, logits)
        reply = node_pb2.ActivationMessage(
            request_id=message.request_id,
            epoch=stage.epoch,
            step=message.step,
            token_ids=[token],
        )
        if logprobs is not None:
            reply.logprob = logprobs.logprob
            reply.top_token_ids.extend(i for i, _ in logprobs.top)
            reply.top_logprobs.extend(v for _, v in logprobs.top)
        self._send(stage, reply)

    def _send(self, stage: InstalledStage, message: node_pb2.ActivationMessage) -> None:
        self._stamped(stage.send, message, "this stage has no next stage to send to")

    def _broadcast(self, stage: InstalledStage, message: node_pb2.ActivationMessage) -> None:
        self._stamped(stage.broadcast, message, "this member does not drive tensor passes")

    @staticmethod
    def _stamped(send: Send | None, message: node_pb2.ActivationMessage, missing: str) -> None:
        if send is None:
            raise RuntimeError(missing)
        message.sent_ns = time.time_ns()  # for the receiver's per-hop statistics
        send(message)
