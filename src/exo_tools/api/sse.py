"""Server-sent events: the streaming transport of every API dialect."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


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


def sse_event(payload: dict[str, Any] | str) -> bytes:
    """One `data:` event: a JSON object, or a literal such as OpenAI's `[DONE]`."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
