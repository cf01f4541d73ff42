"""From token ids to text: drive one request, detokenize, apply stop strings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from ..models.tokenizer import IncrementalDetokenizer, TextTokenizer
from ..types import (
    ErrorEvent,
    FinishEvent,
    Overloaded,
    PromptEvent,
    SamplingParams,
    TokenEvent,
    TokenGenerator,
)
from .errors import GenerationError, ServerBusy
from .events import Finished
from .telemetry import current_record


class StopStringMatcher:
    """Holds back text that could be the start of a stop string, so none ever leaks."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""
        self.matched: str | None = None  # the stop string that was reached

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was reached."""
        if not self._stops:
            return text, False
        self._pending += text
        found = [(index, stop) for stop in self._stops if (index := self._pending.find(stop)) >= 0]
        if found:
            index, self.matched = min(found, key=lambda item: item[0])
            emit = self._pending[:index]
            self._pending = ""
            return emit, True
        hold = self._longest_stop_prefix_suffix(self._pending)
        emit = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return emit, False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest


async def generate_text(
    generator: TokenGenerator,
    tokenizer: TextTokenizer,
    *,
    request_id: str,
    prompt: list[int],
    sampling: SamplingParams,
    max_tokens: int,
    stop: Sequence[str] = (),
    skip_special_tokens: bool = True,
) -> AsyncIterator[str | TokenEvent | Finished]:
    """Text deltas (after its text, each token's `TokenEvent` when it carries logprobs), then
    one `Finished`; raises `GenerationError`. Cancels the generation if the consumer stops
    early."""
    loop = asyncio.get_running_loop()
    try:
        handle = generator.submit(
            request_id, prompt, sampling=sampling, max_tokens=max_tokens, loop=loop
        )
    except Overloaded as busy:
        raise ServerBusy(str(busy), retry_after_s=busy.retry_after_s) from busy
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    matcher = StopStringMatcher(stop)
    record = current_record()
    if record is not None:
        record.prompt_tokens += len(prompt)
    completion_tokens = 0
    cached_tokens = 0
    finished = False
    try:
        while True:
            event = await handle.events.get()
            if isinstance(event, PromptEvent):
                cached_tokens = event.cached_tokens
                if record is not None:
                    record.cached_tokens += cached_tokens
            elif isinstance(event, TokenEvent):
                completion_tokens += 1
                if record is not None:
                    record.token()
                text, stopped = matcher.feed(detokenizer.add(event.token_id))
                if text:
                    yield text
                if event.logprobs is not None and not stopped:
                    yield event
                if stopped:
                    handle.cancel()
                    finished = True
                    if record is not None:
                        record.finish_reason = "stop"
                    yield Finished(
                        "stop",
                        len(prompt),
                        completion_tokens,
                        0.0,
                        0.0,
                        matcher.matched,
                        cached_tokens,
                    )
                    return
            elif isinstance(event, FinishEvent):
                finished = True
                text, stopped = matcher.feed(detokenizer.flush())
                tail = text if stopped else text + matcher.flush()
                if tail:
                    yield tail
                reason = "stop" if stopped or event.reason == "stop" else event.reason
                if record is not None:
                    record.finish_reason = reason
                    record.failovers = event.failovers
                yield Finished(
                    reason,
                    event.prompt_tokens,
                    event.completion_tokens,
                    event.prefill_seconds,
                    event.decode_seconds,
                    matcher.matched,
                    event.cached_tokens,
                    event.failovers,
                )
                return
            elif isinstance(event, ErrorEvent):
                finished = True
                raise GenerationError(event.message)
    finally:
        if not finished:
            handle.cancel()
