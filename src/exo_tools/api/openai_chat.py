"""The OpenAI chat completions dialect: `POST /v1/chat/completions`.

The one place that speaks it: a validated `ChatCompletionRequest` becomes a serving
`ChatRequest`, and the serving events become a `chat.completion` body or a stream of
`chat.completion.chunk` events.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from ..serving.chat import ChatService
from ..serving.errors import ServingError
from ..serving.events import (
    ChatEvent,
    ContentDelta,
    Finished,
    LogprobsDelta,
    ReasoningDelta,
    ScoredToken,
    ToolCallEvent,
)
from ..serving.request import ChatRequest, GuidedKind, GuidedOutput, ResponseFormat
from .errors import APIError, from_serving_error
from .schemas import ChatCompletionRequest, ChatMessage, GuidedGenerationFields, SparseBody
from .sse import open_event_stream, sse_event

log = logging.getLogger(__name__)

# Where this body holds the serving request's fields that it names differently.
PARAM_BY_FIELD = {"response_format.schema": "response_format.json_schema.schema"}


# ---------------------------------------------------------------- the request


def to_chat_request(body: ChatCompletionRequest) -> ChatRequest:
    """The serving request for a body; raises APIError (400) for fields serving lacks."""
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    penalties = (
        ("frequency_penalty", body.frequency_penalty),
        ("presence_penalty", body.presence_penalty),
    )
    for name, value in penalties:
        if value:
            raise APIError(400, f"{name} is not supported; omit it or use 0", param=name)
    response_format = body.response_format
    return ChatRequest(
        messages=[_template_message(message) for message in body.messages],
        tools=[tool.model_dump(exclude_none=True) for tool in body.tools or []],
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        max_tokens=body.token_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repetition_penalty=body.repetition_penalty,
        dry_multiplier=body.dry_multiplier,
        dry_base=body.dry_base,
        dry_allowed_length=body.dry_allowed_length,
        seed=body.seed,
        stop=tuple(body.stop_list()),
        response_format=None
        if response_format is None
        else ResponseFormat(
            response_format.type, (response_format.json_schema or {}).get("schema")
        ),
        logprobs=bool(body.logprobs),
        top_logprobs=body.top_logprobs or 0,
        guided=guided_output(body),
    )


def guided_output(body: GuidedGenerationFields) -> GuidedOutput | None:
    """The one output constraint beyond response_format that the body names (vLLM's
    structured outputs or guided_* fields, llama.cpp's grammar or json_schema); APIError
    (400) when it names two, or one this server cannot apply."""
    named: list[tuple[str, GuidedKind, object]] = []
    outputs = body.structured_outputs
    if outputs is not None:
        if outputs.structural_tag is not None:
            raise APIError(
                400,
                "structured_outputs.structural_tag is not supported; use json, regex, "
                "choice or grammar",
                param="structured_outputs.structural_tag",
            )
        named += [
            ("structured_outputs.json", "json_schema", outputs.json_schema),
            ("structured_outputs.regex", "regex", outputs.regex),
            ("structured_outputs.choice", "choice", outputs.choice),
            ("structured_outputs.grammar", "grammar", outputs.grammar),
            ("structured_outputs.json_object", "json_object", outputs.json_object or None),
        ]
    named += [
        ("guided_json", "json_schema", body.guided_json),
        ("guided_regex", "regex", body.guided_regex),
        ("guided_choice", "choice", body.guided_choice),
        ("guided_grammar", "grammar", body.guided_grammar),
        ("grammar", "grammar", body.grammar or None),  # llama.cpp sends "" for none
        ("json_schema", "json_schema", body.json_schema),
    ]
    found = [
        GuidedOutput(kind, value, source) for source, kind, value in named if value is not None
    ]
    if len(found) > 1:
        sources = " and ".join(guided.source for guided in found)
        raise APIError(
            400,
            f"{sources} each constrain the output; send one constraint per request",
            param=found[1].source,
        )
    return found[0] if found else None


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message in the chat-template form (content parts flattened to text)."""
    entry: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.role == "developer":
        entry["role"] = "system"
    if message.name:
        entry["name"] = message.name
    if message.tool_calls:
        entry["tool_calls"] = [call.model_dump(exclude_none=True) for call in message.tool_calls]
    if message.tool_call_id:
        entry["tool_call_id"] = message.tool_call_id
    return entry


# ---------------------------------------------------------------- the response bodies


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(SparseBody):
    _omitted_when_none = frozenset({"tool_calls", "reasoning_content"})

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None


class ChatCompletion(SparseBody):
    _omitted_when_none = frozenset({"failovers"})

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    # Set when the generation lost its placement and resumed on a new one (exo-tools).
    failovers: int | None = None


class ChunkFunction(SparseBody):
    _omitted_when_none = frozenset({"name"})

    name: str | None = None
    arguments: str


class ChunkToolCall(SparseBody):
    _omitted_when_none = frozenset({"id", "type"})

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(SparseBody):
    _omitted_when_none = frozenset({"role", "content", "reasoning_content", "tool_calls"})

    role: Literal["assistant"] | None = None
    content: str | None = None
    # The field DeepSeek and vLLM clients read reasoning from.
    reasoning_content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(SparseBody):
    _omitted_when_none = frozenset({"usage", "failovers"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only on the last chunk, with no choices
    failovers: int | None = None  # on the finishing chunk, when the generation resumed


# ---------------------------------------------------------------- events to bodies


def _usage(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=finished.cached_tokens),
    )


def _top_logprob(token: ScoredToken) -> TopLogprob:
    return TopLogprob(token=token.text, logprob=token.logprob, bytes=list(token.text.encode()))


def _token_logprob(event: LogprobsDelta) -> TokenLogprob:
    chosen = event.token
    return TokenLogprob(
        token=chosen.text,
        logprob=chosen.logprob,
        bytes=list(chosen.text.encode()),
        top_logprobs=[_top_logprob(token) for token in event.top],
    )


def _tool_call(event: ToolCallEvent) -> ToolCall:
    call = event.call
    return ToolCall(
        id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments_json)
    )


def _chunk_deltas(event: ContentDelta | ReasoningDelta | ToolCallEvent) -> list[ChunkDelta]:
    """The deltas that stream one event."""
    if isinstance(event, ContentDelta):
        return [ChunkDelta(content=event.text)]
    if isinstance(event, ReasoningDelta):
        return [ChunkDelta(reasoning_content=event.text)]
    # A call streams as its header with empty arguments, then all its arguments at once.
    call = event.call
    header = ChunkToolCall(
        index=event.index,
        id=call.id,
        type="function",
        function=ChunkFunction(name=call.name, arguments=""),
    )
    arguments = ChunkToolCall(
        index=event.index, function=ChunkFunction(arguments=call.arguments_json)
    )
    return [ChunkDelta(tool_calls=[header]), ChunkDelta(tool_calls=[arguments])]


@dataclass(frozen=True)
class _Answer:
    """What every body of one answer repeats."""

    id: str
    created: int
    model: str


async def respond(
    request: web.Request, service: ChatService, body: ChatCompletionRequest
) -> web.StreamResponse:
    """Answer one request. Raises APIError, and ServingError (for the caller to map) until
    a stream has started; after that, errors travel as an event of the stream."""
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    prepared = service.prepare(to_chat_request(body), request_id=response_id)
    answer = _Answer(response_id, int(time.time()), service.model_id)
    events = service.run(prepared)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _stream(request, events, answer, include_usage=include_usage)
    completion = await _complete(events, answer, logprobs=prepared.sampling.logprobs)
    return web.json_response(completion.model_dump())


async def _complete(
    events: AsyncIterator[ChatEvent], answer: _Answer, *, logprobs: bool
) -> ChatCompletion:
    # Built from the same events as the stream, so both modes always agree.
    parts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    entries: list[TokenLogprob] = []
    finished: Finished | None = None
    async for event in events:
        if isinstance(event, LogprobsDelta):
            entries.append(_token_logprob(event))
        elif isinstance(event, ContentDelta):
            parts.append(event.text)
        elif isinstance(event, ReasoningDelta):
            reasoning.append(event.text)
        elif isinstance(event, ToolCallEvent):
            calls.append(_tool_call(event))
        else:
            finished = event
    assert finished is not None
    content = "".join(parts)
    message = AssistantMessage(
        # OpenAI sends null content beside tool calls when there is no text.
        content=content if content or not calls else None,
        tool_calls=calls or None,
        reasoning_content="".join(reasoning) if reasoning else None,
    )
    choice = CompletionChoice(
        message=message,
        finish_reason=finished.reason,
        logprobs=ChoiceLogprobs(content=entries) if logprobs else None,
    )
    return ChatCompletion(
        id=answer.id,
        created=answer.created,
        model=answer.model,
        choices=[choice],
        usage=_usage(finished),
        failovers=finished.failovers or None,
    )


async def _stream(
    request: web.Request,
    events: AsyncIterator[ChatEvent],
    answer: _Answer,
    *,
    include_usage: bool,
) -> web.StreamResponse:
    response = await open_event_stream(request)

    async def write(chunk: ChatCompletionChunk) -> None:
        await response.write(sse_event(chunk.model_dump()))

    # A token's log-probabilities ride on the next chunk written after it.
    pending: list[TokenLogprob] = []

    async def write_delta(
        delta: ChunkDelta, finish_reason: str | None = None, failovers: int | None = None
    ) -> None:
        logprobs = ChoiceLogprobs(content=list(pending)) if pending else None
        pending.clear()
        choice = ChunkChoice(delta=delta, finish_reason=finish_reason, logprobs=logprobs)
        chunk = _chunk(answer, [choice])
        chunk.failovers = failovers
        await write(chunk)

    started = time.perf_counter()
    await write_delta(ChunkDelta(role="assistant", content=""))
    try:
        async for event in events:
            if isinstance(event, LogprobsDelta):
                pending.append(_token_logprob(event))
            elif isinstance(event, Finished):
                await write_delta(ChunkDelta(), event.reason, event.failovers or None)
                if include_usage:
                    await write(_chunk(answer, [], usage=_usage(event)))
            else:
                for delta in _chunk_deltas(event):
                    await write_delta(delta)
    except ServingError as error:
        # Headers are gone already: the error travels as an SSE event.
        await response.write(sse_event(from_serving_error(error, PARAM_BY_FIELD).body()))
    except ConnectionError:
        log.info(
            "client went away during %s after %.1f s", answer.id, time.perf_counter() - started
        )
        return response
    await response.write(sse_event("[DONE]"))
    await response.write_eof()
    return response


def _chunk(
    answer: _Answer, choices: list[ChunkChoice], usage: Usage | None = None
) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=answer.id, created=answer.created, model=answer.model, choices=choices, usage=usage
    )
