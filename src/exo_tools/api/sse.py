"""Server-sent events: the streaming transport of every API dialect."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from aiohttp import web

from ..serving.events import ChatEvent, ContentDelta, Finished, ReasoningDelta, ToolCallEvent


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    """Send the headers of an event stream; events follow with `response.write`."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # Proxies (nginx) would otherwise hold events back.
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


def sse_event(payload: dict[str, Any] | str, *, event: str | None = None) -> bytes:
    """One `data:` event: a JSON object, or a literal such as OpenAI's `[DONE]`; `event`
    names it (Anthropic's and the Responses API's SDKs dispatch on that name)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    name = f"event: {event}\n" if event else ""
    return f"{name}data: {data}\n\n".encode()


class EventSink(Protocol):
    """Where a dialect's stream writes each kind of serving event."""

    async def text(self, text: str) -> None: ...

    async def reasoning(self, text: str) -> None: ...

    async def tool_call(self, event: ToolCallEvent) -> None: ...

    async def finish(self, event: Finished) -> None: ...


async def relay(events: AsyncIterator[ChatEvent], sink: EventSink) -> None:
    """Hand each serving event to the sink (empty text and log-probabilities aside)."""
    async for event in events:
        if isinstance(event, ContentDelta) and event.text:
            await sink.text(event.text)
        elif isinstance(event, ReasoningDelta) and event.text:
            await sink.reasoning(event.text)
        elif isinstance(event, ToolCallEvent):
            await sink.tool_call(event)
        elif isinstance(event, Finished):
            await sink.finish(event)
