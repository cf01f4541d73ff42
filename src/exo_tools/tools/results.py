"""Result types of the tool-call parsers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

from ._scan import dumps, openai_call_id


@dataclass(slots=True)
class ToolCall:
    """One parsed call. ``arguments`` is already normalized against the tool's schema."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=openai_call_id)

    @property
    def arguments_json(self) -> str:
        """The OpenAI wire form of the arguments (``"{}"`` when there are none)."""
        return dumps(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        """``{"id", "type": "function", "function": {"name", "arguments": <json string>}}``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }


@dataclass(slots=True)
class ParsedOutput:
    """A completed generation split into user-visible text, reasoning and calls.

    ``content``/``reasoning`` are stripped of surrounding whitespace and ``None``
    when empty.
    """

    content: str | None
    tool_calls: list[ToolCall]
    reasoning: str | None = None


class FunctionDelta(TypedDict):
    name: NotRequired[str]
    arguments: str


class ToolCallDelta(TypedDict):
    """One entry of ``choices[0].delta.tool_calls`` in a chat.completion.chunk."""

    index: int
    id: NotRequired[str]
    type: NotRequired[str]
    function: FunctionDelta


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """Exactly one of ``content``, ``reasoning`` or ``tool_call`` is set."""

    content: str | None = None
    reasoning: str | None = None
    tool_call: ToolCallDelta | None = None
