"""What one API request did, measured where it happens, for the access log and metrics.

The API opens a `RequestRecord` for each HTTP request and makes it current (a context
variable, so it follows the handler's task without being threaded through every call);
generation fills in the tokens and their timing, the chat service the finish reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    request_id: str
    method: str
    route: str
    api: str  # "chat.completions", "messages", "responses", ... or "other"
    started_at: float = field(default_factory=time.time)  # wall clock, for display
    started: float = field(default_factory=time.perf_counter)
    model: str | None = None
    status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    first_token_s: float | None = None  # from the request's start to its first token
    decode_s: float = 0.0  # from the first token to the last
    duration_s: float | None = None
    forwarded_to: str | None = None  # the master's URL when this node relayed it
    failovers: int = 0  # times the generation resumed on a new placement
    # Gaps between consecutive tokens, in seconds; taken (and cleared) by the metrics.
    token_gaps: list[float] = field(default_factory=list)
    _last_token: float | None = None

    def token(self) -> None:
        """One generated token arrived."""
        now = time.perf_counter()
        if self._last_token is None:
            self.first_token_s = now - self.started
        else:
            self.token_gaps.append(now - self._last_token)
            self.decode_s = now - self.started - (self.first_token_s or 0.0)
        self._last_token = now
        self.completion_tokens += 1

    def finish(self, status: int) -> None:
        self.status = status
        self.duration_s = time.perf_counter() - self.started

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time they took: the request's decode speed."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.completion_tokens - 1) / self.decode_s


_current: ContextVar[RequestRecord | None] = ContextVar("exo_tools_request", default=None)


def current_record() -> RequestRecord | None:
    """The record of the API request being served in this task, if any."""
    return _current.get()


@contextmanager
def recording(record: RequestRecord) -> Iterator[RequestRecord]:
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)
