"""The OpenAI Responses dialect: `POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`.

The one place that speaks it: a validated `ResponsesRequest` (its `input` items after
those of `previous_response_id`, from the `ResponseStore`) becomes a serving
`ChatRequest`, and the serving events become a `response` object or a stream of
`response.*` events that ends with `response.completed` (or `.incomplete`, `.failed`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    field_validator,
)

from ..serving.chat import ChatService
from ..serving.errors import ServingError
from ..serving.events import ChatEvent, ContentDelta, Finished, ReasoningDelta, ToolCallEvent
from ..serving.request import ChatRequest, ResponseFormat
from .errors import APIError, from_serving_error, validated_list
from .response_store import ResponseStore, StoredResponse
from .schemas import SparseBody
from .sse import open_event_stream, relay, sse_event

log = logging.getLogger(__name__)

# Where this body holds the serving request's fields that it names differently.
PARAM_BY_FIELD = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.schema": "text.format.schema",
}


# ---------------------------------------------------------------- the request


class _Lenient(BaseModel):
    # Clients send fields serving has no use for (reasoning, include, truncation,
    # prompt_cache_key, service_tier, user, ...): accepted and ignored.
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None
    refusal: str | None = None

    def as_text(self, where: str) -> str:
        if self.type in ("input_text", "output_text", "text") and self.text is not None:
            return self.text
        if self.type == "refusal" and self.refusal is not None:
            return self.refusal
        raise APIError(
            400, f"content part type {self.type!r} is not supported; only text", param=where
        )


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = "{}"


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningItem(_Lenient):
    # The model's earlier reasoning; the prompt leaves it out, as chat completions do.
    type: Literal["reasoning"]


def _item_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind or "message"  # an "easy input message" has only role and content


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]
_ITEMS = TypeAdapter(list[InputItem])


class FunctionTool(_Lenient):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class HostedTool(_Lenient):
    # web_search, file_search, custom, local_shell, mcp, ...: not offered to the model.
    type: str


def _tool_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return "function" if kind == "function" else "hosted"


AnyTool = Annotated[
    Annotated[FunctionTool, Tag("function")] | Annotated[HostedTool, Tag("hosted")],
    Discriminator(_tool_type),
]


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None


class ResponsesRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[Any]  # after validation: str | list[InputItem]
    instructions: str | None = None
    tools: list[AnyTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None

    @field_validator("input")
    @classmethod
    def _items(cls, value: str | list[Any]) -> str | list[Any]:
        """The items, validated here so that an error names the item, not the str branch."""
        if isinstance(value, str):
            return value
        return validated_list(_ITEMS, value, "input item")

    def input_items(self) -> list[dict[str, Any]]:
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [item.model_dump(exclude_none=True) for item in self.input]

    def function_tools(self) -> list[FunctionTool]:
        return [tool for tool in self.tools or [] if isinstance(tool, FunctionTool)]


def conversation_items(body: ResponsesRequest, store: ResponseStore) -> list[dict[str, Any]]:
    """The whole conversation as input items: those of `previous_response_id` first."""
    items = body.input_items()
    if body.previous_response_id is None:
        return items
    previous = store.get(body.previous_response_id)
    if previous is None:
        raise APIError(
            400,
            f"Previous response with id '{body.previous_response_id}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    return [*previous.items, *items]


def to_chat_request(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatRequest:
    """The serving request for a body whose conversation is `items`."""
    hosted = [tool.type for tool in body.tools or [] if isinstance(tool, HostedTool)]
    if hosted:
        log.info("tools of types %s are not offered: only function tools run here", hosted)
    tools = [
        {"type": "function", "function": tool.model_dump(exclude_none=True, exclude={"type"})}
        for tool in body.function_tools()
    ]
    text_format = body.text.format if body.text else None
    return ChatRequest(
        messages=_template_messages(body.instructions, _ITEMS.validate_python(items)),
        tools=tools,
        tool_choice=body.tool_choice,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        response_format=None
        if text_format is None or text_format.type == "text"
        else ResponseFormat(text_format.type, text_format.json_schema),
    )


def _text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.as_text(f"{where}[{n}]") for n, part in enumerate(content))


def _template_messages(instructions: str | None, items: list[InputItem]) -> list[dict[str, Any]]:
    """The conversation in the chat-template form of `serving.ChatRequest`: calls join the
    assistant message they follow, each output is a tool message."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for n, item in enumerate(items):
        where = f"input[{n}]"
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text(item.content, f"{where}.content")})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            output = _text(item.output, f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
    return messages


# ---------------------------------------------------------------- the response bodies


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    call_id: str
    name: str
    arguments: str


class OutputReasoning(BaseModel):
    id: str
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText]


OutputItem = OutputMessage | OutputFunctionCall | OutputReasoning


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(SparseBody):
    _omitted_when_none = frozenset({"failovers"})

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: Usage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    # Set when the generation lost its placement and resumed on a new one (exo-tools).
    failovers: int | None = None


def _usage(finished: Finished) -> Usage:
    return Usage(
        input_tokens=finished.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=finished.cached_tokens),
        output_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _function_call(event: ToolCallEvent) -> OutputFunctionCall:
    call = event.call
    return OutputFunctionCall(
        id=_item_id("fc"), call_id=call.id, name=call.name, arguments=call.arguments_json
    )


def _finish(response: ResponseObject, finished: Finished) -> None:
    response.usage = _usage(finished)
    response.failovers = finished.failovers or None
    if finished.reason == "length":
        response.status = "incomplete"
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
    else:
        response.status = "completed"


@dataclass
class _Answer:
    """One answer in the making: the response object, and what storing it needs."""

    response: ResponseObject
    items: list[dict[str, Any]]  # the conversation it answers
    store: ResponseStore
    keep: bool  # the request's `store`
    output: list[OutputItem] = field(default_factory=list)

    def finish(self, finished: Finished) -> None:
        self.response.output = self.output
        _finish(self.response, finished)
        if self.keep:
            output = [item.model_dump() for item in self.output]
            self.store.put(StoredResponse(self.response.model_dump(), (*self.items, *output)))


async def respond(
    request: web.Request, service: ChatService, body: ResponsesRequest, store: ResponseStore
) -> web.StreamResponse:
    """Answer one request. Raises APIError, and ServingError (for the caller to map) until
    a stream has started; after that, errors travel as a `response.failed` event."""
    response_id = _item_id("resp")
    items = conversation_items(body, store)
    prepared = service.prepare(to_chat_request(body, items), request_id=response_id)
    text_format = body.text.format if body.text and body.text.format else None
    response = ResponseObject(
        id=response_id,
        created_at=int(time.time()),
        status="in_progress",
        instructions=body.instructions,
        max_output_tokens=body.max_output_tokens,
        model=service.model_id,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        previous_response_id=body.previous_response_id,
        store=body.store,
        temperature=prepared.sampling.temperature,
        text={"format": text_format.model_dump(by_alias=True) if text_format else {"type": "text"}},
        tool_choice=body.tool_choice or ("auto" if prepared.tools else "none"),
        tools=[tool.model_dump(exclude_none=True) for tool in body.function_tools()],
        top_p=prepared.sampling.top_p,
        metadata=body.metadata or {},
    )
    answer = _Answer(response, items, store, body.store)
    events = service.run(prepared)
    if body.stream:
        return await _stream(request, events, answer)
    await _complete(events, answer)
    return web.json_response(answer.response.model_dump())


async def _complete(events: AsyncIterator[ChatEvent], answer: _Answer) -> None:
    # Built from the same events as the stream, so both modes always agree.
    output = answer.output
    async for event in events:
        last = output[-1] if output else None
        if isinstance(event, ContentDelta) and event.text:
            if isinstance(last, OutputMessage):
                last.content[0].text += event.text
            else:
                output.append(
                    OutputMessage(id=_item_id("msg"), content=[OutputText(text=event.text)])
                )
        elif isinstance(event, ReasoningDelta) and event.text:
            if isinstance(last, OutputReasoning):
                last.content[0].text += event.text
            else:
                reasoning = [ReasoningText(text=event.text)]
                output.append(OutputReasoning(id=_item_id("rs"), content=reasoning))
        elif isinstance(event, ToolCallEvent):
            output.append(_function_call(event))
        elif isinstance(event, Finished):
            answer.finish(event)


class _EventStream:
    """Writes `response.*` events with their sequence numbers; one text item (a message
    or reasoning) open at a time."""

    def __init__(self, response: web.StreamResponse, answer: _Answer) -> None:
        self._response = response
        self._answer = answer
        self._sequence = 0
        self._open: OutputMessage | OutputReasoning | None = None

    async def send(self, kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        await self._response.write(sse_event(payload, event=kind))

    async def _add(self, item: OutputItem) -> int:
        self._answer.output.append(item)
        index = len(self._answer.output) - 1
        await self.send("response.output_item.added", output_index=index, item=item.model_dump())
        return index

    def _where(self, item: OutputItem) -> dict[str, Any]:
        index = self._answer.output.index(item)
        return {"item_id": item.id, "output_index": index, "content_index": 0}

    async def text(self, text: str) -> None:
        item = self._open
        if not isinstance(item, OutputMessage):
            await self.close()
            item = OutputMessage(id=_item_id("msg"), status="in_progress", content=[])
            self._open = item
            await self._add(item)
            item.content.append(OutputText(text=""))
            part = item.content[0].model_dump()
            await self.send("response.content_part.added", **self._where(item), part=part)
        item.content[0].text += text
        await self.send("response.output_text.delta", **self._where(item), delta=text, logprobs=[])

    async def reasoning(self, text: str) -> None:
        item = self._open
        if not isinstance(item, OutputReasoning):
            await self.close()
            item = OutputReasoning(id=_item_id("rs"), content=[])
            self._open = item
            await self._add(item)
            item.content.append(ReasoningText(text=""))
        item.content[0].text += text
        await self.send("response.reasoning_text.delta", **self._where(item), delta=text)

    async def close(self) -> None:
        """Finish the open text item: its `.done` events."""
        item, self._open = self._open, None
        if item is None:
            return
        where = self._where(item)
        if isinstance(item, OutputMessage):
            item.status = "completed"
            part = item.content[0]
            await self.send("response.output_text.done", **where, text=part.text, logprobs=[])
            await self.send("response.content_part.done", **where, part=part.model_dump())
        else:
            text = item.content[0].text
            await self.send("response.reasoning_text.done", **where, text=text)
        await self.send(
            "response.output_item.done", output_index=where["output_index"], item=item.model_dump()
        )

    async def tool_call(self, event: ToolCallEvent) -> None:
        await self.close()
        done = _function_call(event)
        index = await self._add(done.model_copy(update={"status": "in_progress", "arguments": ""}))
        self._answer.output[index] = done
        where = {"item_id": done.id, "output_index": index}
        # The call is whole when serving emits it: its arguments travel as one delta.
        await self.send("response.function_call_arguments.delta", **where, delta=done.arguments)
        await self.send(
            "response.function_call_arguments.done",
            **where,
            name=done.name,
            arguments=done.arguments,
        )
        await self.send("response.output_item.done", output_index=index, item=done.model_dump())

    async def finish(self, event: Finished) -> None:
        await self.close()
        self._answer.finish(event)
        response = self._answer.response
        await self.send(f"response.{response.status}", response=response.model_dump())


async def _stream(
    request: web.Request, events: AsyncIterator[ChatEvent], answer: _Answer
) -> web.StreamResponse:
    response = await open_event_stream(request)
    stream = _EventStream(response, answer)
    started = time.perf_counter()
    try:
        created = answer.response.model_dump()
        await stream.send("response.created", response=created)
        await stream.send("response.in_progress", response=created)
        await relay(events, stream)
    except ConnectionError:
        log.info(
            "client went away during %s after %.1f s",
            answer.response.id,
            time.perf_counter() - started,
        )
        return response
    except Exception as error:
        # Headers are gone already: the failure travels as the stream's last event.
        if isinstance(error, ServingError):
            failed = from_serving_error(error, PARAM_BY_FIELD)
        else:
            log.exception("stream %s failed", answer.response.id)
            failed = APIError(500, "internal server error", error_type="server_error")
        answer.response.status = "failed"
        answer.response.error = ResponseError(
            code=failed.code or failed.error_type, message=failed.message
        )
        await stream.send("response.failed", response=answer.response.model_dump())
    await response.write_eof()
    return response


def stored(store: ResponseStore, response_id: str) -> StoredResponse:
    """A stored response; 404 when the store has no such id."""
    found = store.get(response_id)
    if found is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
    return found
