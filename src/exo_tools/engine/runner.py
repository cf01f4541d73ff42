"""What the MLX thread tells the event loop about one request.

The engine (exo_tools.engine.pipeline.StageEngine) runs all MLX work on one thread; a
request's events reach the aiohttp event loop through its GenerationHandle.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .sampling import TokenLogprobs

# mlx-lm's generate prefills in 2048-token chunks and runs the last prompt token on its
# own; doing the same keeps greedy output token-identical to it.
PREFILL_CHUNK = 2048


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprobs: TokenLogprobs | None = None  # when the request asked for them


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
