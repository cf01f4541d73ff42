"""The Anthropic Messages dialect: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

The one place that speaks it: a validated `MessagesRequest` becomes a serving
`ChatRequest` (the same engine path, tool parsing, grammar and history rewrite as chat
completions), and the serving events become a `message` body or Anthropic's stream of
`message_start` … `message_stop` events. Errors take Anthropic's shape in
`errors.APIError.response`, by route.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from ..serving.chat import ChatService
from ..serving.errors import ServingError
from ..serving.events import (
    ChatEvent,
    ContentDelta,
    Finished,
    ReasoningDelta,
    ToolCallEvent,
)
from ..serving.request import ChatRequest, ResponseFormat
from .errors import APIError, from_serving_error, validated_list
from .schemas import SparseBody
from .sse import open_event_stream, relay, sse_event

log = logging.getLogger(__name__)

# Where this body holds the serving request's fields that it names differently.
PARAM_BY_FIELD = {
    "response_format": "output_config.format",
    "response_format.schema": "output_config.format.schema",
}


# ---------------------------------------------------------------- the request


class _Lenient(BaseModel):
    # Claude Code sends fields serving has no use for (thinking, context_management,
    # output_config, cache_control, citations, ...): accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ThinkingBlock(_Lenient):
    # The model's earlier reasoning; the prompt leaves it out, as chat completions do.
    type: Literal["thinking", "redacted_thinking"]


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool = False

    def text(self) -> str:
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            text = "\n".join(block.text for block in self.content)
        return f"Error: {text}" if self.is_error else text


ContentBlock = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")
]
_BLOCKS = TypeAdapter(list[ContentBlock])


class InputMessage(_Lenient):
    # "system" is not Anthropic's, but Claude Code and Xcode send it inside messages.
    role: Literal["user", "assistant", "system"]
    content: str | list[Any]  # after validation: str | list[ContentBlock]

    @field_validator("content")
    @classmethod
    def _blocks(cls, content: str | list[Any]) -> str | list[Any]:
        """The blocks, validated here so that an error names the block, not the str branch;
        blocks of other types (image, document, ...) are a 400 naming the type."""
        if isinstance(content, str):
            return content
        return validated_list(_BLOCKS, content, "content block")


class Tool(_Lenient):
    # Custom tools have no type (or "custom"); server tools (web_search_..., bash_...)
    # carry a versioned type and run on Anthropic's side, which a node cannot.
    type: str | None = None
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @property
    def is_custom(self) -> bool:
        return self.type in (None, "custom")


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class OutputFormat(_Lenient):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    # `effort` is accepted and ignored.
    format: OutputFormat | None = None


class CountTokensRequest(_Lenient):
    """The prompt part of a request, all that `count_tokens` takes."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    # Accepted; the sampler has no top-k filter yet, so it does not change the output.
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    output_config: OutputConfig | None = None  # structured outputs: `format`


def to_chat_request(body: CountTokensRequest) -> ChatRequest:
    """The serving request for a body (a `count_tokens` body gets serving's defaults)."""
    tools = [_chat_tool(tool) for tool in body.tools or [] if tool.is_custom]
    dropped = [tool.name for tool in body.tools or [] if not tool.is_custom]
    if dropped:
        log.info("server tools %s are not offered: only custom tools run here", dropped)
    choice = body.tool_choice
    conversation = ChatRequest(
        messages=_template_messages(body),
        tools=tools,
        tool_choice=None if choice is None else _chat_tool_choice(choice),
        parallel_tool_calls=choice is None or not choice.disable_parallel_tool_use,
    )
    if not isinstance(body, MessagesRequest):
        return conversation
    output_format = body.output_config.format if body.output_config else None
    return replace(
        conversation,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=tuple(body.stop_sequences or ()),
        response_format=None
        if output_format is None
        else ResponseFormat("json_schema", output_format.json_schema),
    )


def _chat_tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.input_schema is not None:
        function["parameters"] = tool.input_schema
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.type == "any":
        return "required"
    if choice.type == "tool":
        # A missing name fails in serving's tool-choice check, with its message.
        return {"type": "function", "function": {"name": choice.name or ""}}
    return choice.type


def _template_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation in the chat-template form of `serving.ChatRequest`.

    System text (the `system` field, then any `system` messages, in order) becomes one
    system message first; tool results become `tool` messages in their place.
    """
    system = body.system
    system_texts = [system] if isinstance(system, str) else [b.text for b in system or []]
    # Claude Code's first system block is a per-request header (its version, entry point
    # and a hash that changes per request): not instructions, and in the prompt it would
    # end every conversation's cached prefix at its first tokens.
    system_texts = [text for text in system_texts if not _is_request_header(text)]
    messages: list[dict[str, Any]] = []
    for message in body.messages:
        content = message.content
        if message.role == "system":
            system_texts.append(content if isinstance(content, str) else _joined_text(content))
        elif isinstance(content, str):
            messages.append({"role": message.role, "content": content})
        elif message.role == "assistant":
            messages.append(_assistant_message(content))
        else:
            messages += _user_messages(content)
    system_text = "\n\n".join(text for text in system_texts if text)
    if system_text:
        messages.insert(0, {"role": "system", "content": system_text})
    return messages


def _joined_text(blocks: list[ContentBlock]) -> str:
    return "\n".join(block.text for block in blocks if isinstance(block, TextBlock))


def _assistant_message(blocks: list[ContentBlock]) -> dict[str, Any]:
    calls = [
        {
            "id": block.id,
            "type": "function",
            "function": {"name": block.name, "arguments": json.dumps(block.input)},
        }
        for block in blocks
        if isinstance(block, ToolUseBlock)
    ]
    message: dict[str, Any] = {"role": "assistant", "content": _joined_text(blocks)}
    if calls:
        message["tool_calls"] = calls
    return message


def _user_messages(blocks: list[ContentBlock]) -> list[dict[str, Any]]:
    """A user turn's blocks, in order: runs of text become user messages, each tool result
    a tool message."""
    messages: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            if texts:
                messages.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            messages.append(
                {"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()}
            )
        elif isinstance(block, TextBlock):
            texts.append(block.text)
    if texts or not messages:
        messages.append({"role": "user", "content": "\n".join(texts)})
    return messages


# ---------------------------------------------------------------- the response bodies


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingContent(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""  # nothing signs a local model's reasoning


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def _usage(finished: Finished) -> Usage:
    # Anthropic counts cache reads apart: the prompt is input plus cache reads.
    return Usage(
        input_tokens=finished.prompt_tokens - finished.cached_tokens,
        output_tokens=finished.completion_tokens,
        cache_read_input_tokens=finished.cached_tokens,
    )


REQUEST_HEADER_PREFIXES = ("x-anthropic-billing-header:",)


def _is_request_header(text: str) -> bool:
    return text.lstrip().lower().startswith(REQUEST_HEADER_PREFIXES)


class Message(SparseBody):
    _omitted_when_none = frozenset({"failovers"})

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[TextContent | ThinkingContent | ToolUseContent]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: Usage
    # Set when the generation lost its placement and resumed on a new one (exo-tools).
    failovers: int | None = None


def _stop_reason(
    finished: Finished,
) -> Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]:
    if finished.reason == "tool_calls":
        return "tool_use"
    if finished.reason == "length":
        return "max_tokens"
    return "stop_sequence" if finished.stop_sequence else "end_turn"


def _tool_use(event: ToolCallEvent) -> ToolUseContent:
    return ToolUseContent(id=event.call.id, name=event.call.name, input=event.call.arguments)


async def respond(
    request: web.Request, service: ChatService, body: MessagesRequest
) -> web.StreamResponse:
    """Answer one request. Raises ServingError (for the caller to map) until a stream has
    started; after that, errors travel as an `error` event of the stream."""
    message_id = f"msg_{uuid.uuid4().hex}"
    prepared = service.prepare(to_chat_request(body), request_id=message_id)
    events = service.run(prepared)
    start = Message(
        id=message_id,
        model=service.model_id,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=Usage(input_tokens=len(prepared.prompt_ids), output_tokens=0),
    )
    if body.stream:
        return await _stream(request, events, start)
    return web.json_response((await _complete(events, start)).model_dump())


def count_tokens(service: ChatService, body: CountTokensRequest) -> dict[str, int]:
    """`{"input_tokens": N}`: the prompt `respond` would send for the same body."""
    return {"input_tokens": service.count_prompt_tokens(to_chat_request(body))}


async def _complete(events: AsyncIterator[ChatEvent], start: Message) -> Message:
    # Built from the same events as the stream, so both modes always agree.
    content: list[TextContent | ThinkingContent | ToolUseContent] = []
    finished: Finished | None = None
    async for event in events:
        last = content[-1] if content else None
        if isinstance(event, ContentDelta) and event.text:
            if isinstance(last, TextContent):
                last.text += event.text
            else:
                content.append(TextContent(text=event.text))
        elif isinstance(event, ReasoningDelta) and event.text:
            if isinstance(last, ThinkingContent):
                last.thinking += event.text
            else:
                content.append(ThinkingContent(thinking=event.text))
        elif isinstance(event, ToolCallEvent):
            content.append(_tool_use(event))
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return start.model_copy(
        update={
            "content": content,
            "stop_reason": _stop_reason(finished),
            "stop_sequence": finished.stop_sequence,
            "usage": _usage(finished),
            "failovers": finished.failovers or None,
        }
    )


_Send = Callable[..., Awaitable[None]]


class _Blocks:
    """The content blocks of a stream: one open at a time, each started, grown by deltas
    and stopped in order."""

    def __init__(self, send: _Send) -> None:
        self._send = send
        self._index = -1
        self._open: str | None = None  # "text" or "thinking"

    async def _start(self, block: BaseModel) -> None:
        await self.stop()
        self._index += 1
        await self._send("content_block_start", index=self._index, content_block=block.model_dump())

    async def stop(self) -> None:
        if self._open is not None:
            await self._send("content_block_stop", index=self._index)
            self._open = None

    async def text(self, text: str) -> None:
        if self._open != "text":
            await self._start(TextContent(text=""))
            self._open = "text"
        await self._send(
            "content_block_delta", index=self._index, delta={"type": "text_delta", "text": text}
        )

    async def reasoning(self, text: str) -> None:
        if self._open != "thinking":
            await self._start(ThinkingContent(thinking=""))
            self._open = "thinking"
        delta = {"type": "thinking_delta", "thinking": text}
        await self._send("content_block_delta", index=self._index, delta=delta)

    async def tool_call(self, event: ToolCallEvent) -> None:
        # The call is whole when serving emits it: its input travels as one delta.
        await self._start(_tool_use(event).model_copy(update={"input": {}}))
        self._open = "tool_use"
        delta = {"type": "input_json_delta", "partial_json": event.call.arguments_json}
        await self._send("content_block_delta", index=self._index, delta=delta)
        await self.stop()

    async def finish(self, event: Finished) -> None:
        await self.stop()
        delta = {"stop_reason": _stop_reason(event), "stop_sequence": event.stop_sequence}
        resumed = {"failovers": event.failovers} if event.failovers else {}
        await self._send("message_delta", delta=delta, usage=_usage(event).model_dump(), **resumed)
        await self._send("message_stop")


async def _stream(
    request: web.Request, events: AsyncIterator[ChatEvent], start: Message
) -> web.StreamResponse:
    response = await open_event_stream(request)

    async def send(kind: str, **fields: Any) -> None:
        await response.write(sse_event({"type": kind, **fields}, event=kind))

    blocks = _Blocks(send)
    started = time.perf_counter()
    try:
        await send("message_start", message=start.model_dump())
        await send("ping")
        await relay(events, blocks)
    except ConnectionError:
        log.info("client went away during %s after %.1f s", start.id, time.perf_counter() - started)
        return response
    except Exception as error:
        # Headers are gone already: the error travels as an `error` event.
        if isinstance(error, ServingError):
            failure = from_serving_error(error, PARAM_BY_FIELD)
        else:
            log.exception("stream %s failed", start.id)
            failure = APIError(500, "internal server error", error_type="server_error")
        await response.write(sse_event(failure.anthropic_body(), event="error"))
    await response.write_eof()
    return response
