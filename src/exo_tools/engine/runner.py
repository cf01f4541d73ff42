"""The one thread that runs MLX on a node.

All MLX work happens here so the aiohttp event loop never blocks on compute. Requests are
interleaved one step at a time (a prefill chunk or one decoded token), each with its own
KV cache that is dropped the moment the request ends for any reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from .sampling import Sampler, SamplingParams
from .shard import ShardModel

log = logging.getLogger(__name__)

# mlx-lm's generate prefills in 2048-token chunks and runs the last prompt token on its
# own; doing the same keeps greedy output token-identical to it.
PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (end of sequence), "length" (max_tokens), "cancelled"
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float


@dataclass(frozen=True)
class ErrorEvent:
    message: str


RunnerEvent = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class _RequestState:
    request_id: str
    prompt: list[int]
    max_tokens: int
    sampler: Sampler
    emit: Callable[[RunnerEvent], None]
    cache: list[Any] | None = None
    prompt_done: int = 0
    generated: int = 0
    next_input: int | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class GenerationHandle:
    """The event loop's side of one request: an async stream of runner events."""

    def __init__(
        self,
        request_id: str,
        cancelled: threading.Event,
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.request_id = request_id
        self.events: asyncio.Queue[RunnerEvent] = asyncio.Queue()
        self._cancelled = cancelled
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Stop generating; the runner frees the request's state at its next step."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            # Wakes an engine whose request is waiting on other stages.
            self._on_cancel()


class Runner:
    def __init__(self, model: ShardModel, eos_token_ids: frozenset[int]) -> None:
        self._model = model
        self._eos = eos_token_ids
        self._inbox: queue.Queue[_RequestState | None] = queue.Queue()
        self._active: dict[str, _RequestState] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="exo-tools-mlx", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=10)

    @property
    def active_requests(self) -> int:
        with self._lock:
            return len(self._active)

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        *,
        sampling: SamplingParams,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> GenerationHandle:
        if not prompt:
            raise ValueError("prompt is empty")
        cancelled = threading.Event()
        handle = GenerationHandle(request_id, cancelled)

        def emit(event: RunnerEvent) -> None:
            # The loop may be gone at shutdown; the event has no one to go to then.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(handle.events.put_nowait, event)

        state = _RequestState(
            request_id=request_id,
            prompt=list(prompt),
            max_tokens=max_tokens,
            sampler=Sampler(sampling),
            emit=emit,
            cancelled=cancelled,
        )
        self._inbox.put(state)
        return handle

    # Everything below runs on the MLX thread.

    def _run(self) -> None:
        stream = mx.new_stream(mx.default_device())
        with mx.stream(stream):
            while True:
                if not self._drain_inbox(block=not self._active):
                    break
                for state in list(self._active.values()):
                    self._step_safely(state)
        with self._lock:
            for state in self._active.values():
                state.emit(ErrorEvent("node is shutting down"))
            self._active.clear()

    def _drain_inbox(self, *, block: bool) -> bool:
        """Take new requests; False when asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                return False
            with self._lock:
                self._active[item.request_id] = item

    def _finish(self, state: _RequestState, reason: str) -> None:
        now = time.perf_counter()
        first = state.first_token_at or now
        state.emit(
            FinishEvent(
                reason=reason,
                prompt_tokens=len(state.prompt),
                completion_tokens=state.generated,
                prefill_seconds=first - state.started,
                decode_seconds=now - first,
            )
        )
        self._release(state)

    def _release(self, state: _RequestState) -> None:
        state.cache = None
        with self._lock:
            self._active.pop(state.request_id, None)

    def _step_safely(self, state: _RequestState) -> None:
        if state.cancelled.is_set():
            self._finish(state, "cancelled")
            return
        try:
            self._step(state)
        except Exception as error:  # one request's failure must not stop the others
            log.exception("request %s failed", state.request_id)
            state.emit(ErrorEvent(f"generation failed: {error}"))
            self._release(state)

    def _step(self, state: _RequestState) -> None:
        if state.cache is None:
            state.cache = self._model.make_cache()
        remaining_prompt = len(state.prompt) - 1 - state.prompt_done
        if remaining_prompt > 0:
            count = min(PREFILL_CHUNK, remaining_prompt)
            chunk = state.prompt[state.prompt_done : state.prompt_done + count]
            self._model.forward(mx.array(chunk)[None], state.cache)
            mx.eval([layer_cache.state for layer_cache in state.cache])
            state.prompt_done += count
            return
        token_input = state.next_input if state.next_input is not None else state.prompt[-1]
        logits = self._model.forward(mx.array([[token_input]]), state.cache)[:, -1, :]
        token: int = state.sampler(logits).tolist()[0]  # type: ignore[assignment]
        if state.first_token_at is None:
            state.first_token_at = time.perf_counter()
        if token in self._eos:
            self._finish(state, "stop")
            return
        state.generated += 1
        state.next_input = token
        state.emit(TokenEvent(token))
        if state.generated >= state.max_tokens:
            self._finish(state, "length")
