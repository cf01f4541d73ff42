"""What serving streams back for one request, in no API's dialect.

`ChatService.run` yields text, reasoning and tool calls as the model produces them (with
each token's log-probabilities when asked for), then one `Finished`. Each API turns these
into its own chunks or response body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..tools import ToolCall
from ..types import FinishReason


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallEvent:
    """A complete tool call (parsers emit a call only once it is whole and normalized)."""

    index: int  # its position among this answer's calls
    call: ToolCall


@dataclass(frozen=True)
class ScoredToken:
    text: str  # the token decoded on its own, special tokens included
    logprob: float


@dataclass(frozen=True)
class LogprobsDelta:
    """One generated token's log-probability and the most likely tokens at its position."""

    token: ScoredToken
    top: tuple[ScoredToken, ...]


@dataclass(frozen=True)
class Finished:
    # "tool_calls": the answer holds tool calls (set by ChatService).
    reason: FinishReason | Literal["tool_calls"]
    prompt_tokens: int
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stop_sequence: str | None = None  # the stop string that ended the text, if one did
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    failovers: int = 0  # times it resumed on a new placement after losing its own


ChatEvent = ContentDelta | ReasoningDelta | ToolCallEvent | LogprobsDelta | Finished
