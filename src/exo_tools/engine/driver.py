"""Stage 0's role: drive each request from prompt to finish.

The driver prefills the prompt in chunks, runs every decode step's first blocks, and emits
each token as it comes back (from the last stage, or from its own head with one stage).
Tensor rank 0 is a one-stage driver whose passes it also hands to the other members. A
one-stage driver whose sampling needs nothing from the host decodes a step ahead, as
mlx-lm's generate does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import mlx.core as mx

from ..types import (
    ErrorEvent,
    Failure,
    FinishEvent,
    FinishReason,
    Forward,
    Release,
    RequestEvent,
    SampledToken,
    SamplingParams,
    StageMessage,
    TokenEvent,
    TokenLogprobs,
)
from .role import Role
from .sampling import Sampler, sample_token
from .tensors import to_wire

if TYPE_CHECKING:
    from .core import CacheEntry, InstalledStage, StageEngine

log = logging.getLogger(__name__)

# mlx-lm's generate prefills in 2048-token chunks and runs the last prompt token on its
# own; doing the same keeps greedy output token-identical to it.
PREFILL_CHUNK = 2048


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
    # One-stage decode runs a step ahead: the next token, still being computed.
    ahead: mx.array | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


def _can_run_ahead(sampler: Sampler | None) -> bool:
    """Sampling needs nothing from the host between steps: no grammar mask to compute
    from the token, no log-probabilities to read."""
    return sampler is not None and sampler.params.constraint is None and not sampler.params.logprobs


class Driver(Role):
    def __init__(self, engine: StageEngine, stage: InstalledStage) -> None:
        super().__init__(engine, stage)
        self.origins: dict[str, Origin] = {}

    # -- from the engine's inbox

    def start(self, origin: Origin) -> None:
        if origin.request_id in self.origins:
            origin.emit(ErrorEvent(f"request id {origin.request_id} is already running"))
            return
        self.origins[origin.request_id] = origin
        self._step_safely(origin)

    def step(self, request_id: str) -> None:
        origin = self.origins.get(request_id)
        if origin is not None:
            self._step_safely(origin)

    def cancel(self, request_id: str) -> None:
        origin = self.origins.get(request_id)
        if origin is not None:
            self._finish(origin, "cancelled")

    def fail_all(self, reason: str) -> None:
        for origin in list(self.origins.values()):
            origin.emit(ErrorEvent(reason))
        self.origins.clear()

    def on_message(self, message: StageMessage) -> None:
        """A sampled token (or a failure) came back around the ring."""
        origin = self.origins.get(message.request_id)
        if origin is None:
            return  # cancelled meanwhile; its release is already on its way
        match message:
            case SampledToken(token_id=token_id, logprobs=logprobs):
                self._on_token(origin, token_id, logprobs)
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
            self._fail(origin, f"generation failed: {error}")

    def _step(self, origin: Origin) -> None:
        stage = self._stage
        entry = self._engine.cache_for(origin.request_id, stage, origin.sampling)
        remaining = len(origin.prompt) - 1 - origin.prompt_done
        if remaining > 0:
            count = min(PREFILL_CHUNK, remaining)
            ids = origin.prompt[origin.prompt_done : origin.prompt_done + count]
            origin.prompt_done += count
            sample = False
        else:
            last = origin.next_input if origin.next_input is not None else origin.prompt[-1]
            # Tensor rank 0 is one stage too, but its passes sync with the members.
            alone = stage.n_stages == 1 and stage.collective is None
            if alone and _can_run_ahead(entry.sampler):
                self._decode_ahead(origin, entry, last)
                return
            ids = [last]
            sample = True
        out = self._forward(origin, mx.array(ids)[None], entry.cache)
        if stage.n_stages == 1:
            if sample:
                token, logprobs = sample_token(entry.sampler, out[:, -1, :])
                self._on_token(origin, token, logprobs)
            else:
                mx.eval(stage.model.cache_state(entry.cache))
                self._engine.schedule(origin.request_id)
            return
        message = Forward(
            origin.request_id,
            stage.epoch,
            origin.generated,
            to_wire(out),
            sample=sample,
            sampling=None if origin.sent_first else origin.sampling,
        )
        origin.sent_first = True
        self._send(message)
        if not sample:
            # Prefill chunks stream on: stage 1 works on this chunk while we run the next.
            self._engine.schedule(origin.request_id)

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
            mx.async_eval(token)
        origin.ahead = None
        if origin.generated + 1 < origin.max_tokens:
            following = model.forward(token[None], entry.cache)
            origin.ahead = sampler(following[:, -1, :])
            mx.async_eval(origin.ahead)
        self._on_token(origin, cast(int, token.item()))

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
            self._broadcast(Forward(origin.request_id, stage.epoch, passes, to_wire(hidden)))

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
        origin.generated += 1
        origin.next_input = token
        origin.emit(TokenEvent(token, logprobs))
        if origin.generated >= origin.max_tokens:
            self._finish(origin, "length")
            return
        self._engine.schedule(origin.request_id)

    def _finish(self, origin: Origin, reason: FinishReason) -> None:
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

    def _fail(self, origin: Origin, message: str) -> None:
        origin.emit(ErrorEvent(message))
        self._end(origin)

    def _end(self, origin: Origin) -> None:
        self.origins.pop(origin.request_id, None)
        self._engine.drop(origin.request_id)
        stage = self._stage
        if stage.broadcast is not None and origin.passes:
            self._broadcast(Release(origin.request_id, stage.epoch))
        if stage.n_stages > 1 and origin.sent_first:
            # Follows the request's last work down the same streams, so it frees every
            # stage's cache after that stage is done with it.
            self._send(Release(origin.request_id, stage.epoch))
