"""The HTTP face of a node: OpenAI-compatible routes on aiohttp."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from pydantic import ValidationError

from .. import __version__
from ..serving.chat import (
    ChatEvent,
    ChatFinished,
    ChatService,
    ContentDelta,
    LogprobsDelta,
    PreparedChat,
    ReasoningDelta,
    ToolCallEvent,
)
from .errors import APIError, error_middleware, from_validation_error
from .schemas import ChatCompletionRequest, ModelList, ModelObject, Usage

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
# Marks a request one node already forwarded, so views that briefly disagree on the
# master never bounce a request between nodes.
FORWARDED_HEADER = "X-Exo-Tools-Forwarded-By"


class NodeBackend(Protocol):
    """What the API needs from the node it runs on."""

    @property
    def model_id(self) -> str: ...

    @property
    def created(self) -> int: ...

    def chat_service(self) -> ChatService | None:
        """None while the model is still loading."""
        ...

    def health(self) -> dict[str, Any]: ...

    def cluster_view(self) -> dict[str, Any] | None:
        """GET /v1/cluster; None on a node that runs without the cluster layer."""
        ...

    def master_api_url(self) -> str | None:
        """Where to forward chat requests when this node is not the master."""
        ...


def _auth_middleware(api_key: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if api_key and request.path != "/health":
            header = request.headers.get("Authorization", "")
            token = header.removeprefix("Bearer ").strip()
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    return check


def create_app(backend: NodeBackend, *, api_key: str | None = None) -> web.Application:
    app = web.Application(
        client_max_size=MAX_BODY_BYTES,
        middlewares=[error_middleware, _auth_middleware(api_key)],
    )
    routes = _Routes(backend)
    app.on_cleanup.append(routes.close)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/v1/cluster", routes.cluster)
    app.router.add_get("/v1/models", routes.list_models)
    app.router.add_get("/v1/models/{model_id:.+}", routes.get_model)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    return app


def _delta(event: ChatEvent) -> dict[str, Any]:
    """The `delta` object of a streamed chunk for one chat event."""
    if isinstance(event, ToolCallEvent):
        return {"tool_calls": [dict(event.delta)]}
    if isinstance(event, ReasoningDelta):
        return {"reasoning_content": event.text}
    assert isinstance(event, ContentDelta)
    return {"content": event.text}


def _merge_tool_call(calls: list[dict[str, Any]], event: ToolCallEvent) -> None:
    """Accumulate streamed tool-call deltas into complete OpenAI tool calls."""
    delta = event.delta
    index = delta["index"]
    while len(calls) <= index:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    if "id" in delta:
        call["id"] = delta["id"]
    function = delta["function"]
    if "name" in function:
        call["function"]["name"] = function["name"]
    call["function"]["arguments"] += function.get("arguments", "")


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class _Routes:
    def __init__(self, backend: NodeBackend) -> None:
        self.backend = backend
        self._session: aiohttp.ClientSession | None = None

    async def close(self, _: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    async def health(self, _: web.Request) -> web.Response:
        body = {"version": __version__, **self.backend.health()}
        return web.json_response(body)

    async def cluster(self, _: web.Request) -> web.Response:
        view = self.backend.cluster_view()
        if view is None:
            raise APIError(404, "this node runs without the cluster layer")
        return web.json_response(view)

    async def _forward(self, request: web.Request, master_url: str) -> web.StreamResponse:
        """Relay a chat request to the master and stream its answer back unchanged."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
            )
        headers = {
            name: request.headers[name]
            for name in ("Authorization", "Content-Type")
            if name in request.headers
        }
        headers[FORWARDED_HEADER] = request.host
        body = await request.read()
        try:
            async with self._session.post(
                f"{master_url}/v1/chat/completions", data=body, headers=headers
            ) as upstream:
                response = web.StreamResponse(
                    status=upstream.status,
                    headers={
                        "Content-Type": upstream.headers.get("Content-Type", "application/json")
                    },
                )
                await response.prepare(request)
                async for piece in upstream.content.iter_any():
                    await response.write(piece)
                await response.write_eof()
                return response
        except aiohttp.ClientError as error:
            raise APIError(
                503,
                f"the master node at {master_url} is unreachable: {error}",
                code="master_unreachable",
            ) from error

    def _model_object(self) -> ModelObject:
        return ModelObject(id=self.backend.model_id, created=self.backend.created)

    async def list_models(self, _: web.Request) -> web.Response:
        return web.json_response(ModelList(data=[self._model_object()]).model_dump())

    async def get_model(self, request: web.Request) -> web.Response:
        model_id = request.match_info["model_id"]
        if model_id != self.backend.model_id:
            raise APIError(
                404, f"model '{model_id}' does not exist", param="model", code="model_not_found"
            )
        return web.json_response(self._model_object().model_dump())

    async def _parse(self, request: web.Request) -> ChatCompletionRequest:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"request body is not valid JSON: {error}") from error
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return ChatCompletionRequest.model_validate(body)
        except ValidationError as error:
            raise from_validation_error(error) from error

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        master_url = self.backend.master_api_url()
        if master_url and FORWARDED_HEADER not in request.headers:
            return await self._forward(request, master_url)
        chat = await self._parse(request)
        if chat.model != self.backend.model_id:
            raise APIError(
                404,
                f"model '{chat.model}' does not exist; this cluster serves "
                f"'{self.backend.model_id}'",
                param="model",
                code="model_not_found",
            )
        service = self.backend.chat_service()
        if service is None:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
        prepared = service.prepare(chat)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return await self._stream(request, service, prepared, include_usage)
        return await self._complete(service, prepared)

    async def _complete(self, service: ChatService, prepared: PreparedChat) -> web.Response:
        # Built from the same events as the stream, so both modes always agree.
        parts: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        logprobs: list[dict[str, Any]] = []
        finished: ChatFinished | None = None
        async for event in service.run(prepared):
            if isinstance(event, LogprobsDelta):
                logprobs.append(event.entry)
            elif isinstance(event, ContentDelta):
                parts.append(event.text)
            elif isinstance(event, ReasoningDelta):
                reasoning.append(event.text)
            elif isinstance(event, ToolCallEvent):
                _merge_tool_call(calls, event)
            else:
                finished = event
        assert finished is not None
        content = "".join(parts)
        message: dict[str, Any] = {
            "role": "assistant",
            # OpenAI sends null content beside tool calls when there is no text.
            "content": content if content or not calls else None,
        }
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        usage = Usage(
            prompt_tokens=finished.prompt_tokens,
            completion_tokens=finished.completion_tokens,
            total_tokens=finished.prompt_tokens + finished.completion_tokens,
        )
        body = {
            "id": prepared.request_id,
            "object": "chat.completion",
            "created": prepared.created,
            "model": service.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finished.finish_reason,
                    "logprobs": {"content": logprobs} if prepared.sampling.logprobs else None,
                }
            ],
            "usage": usage.model_dump(),
        }
        return web.json_response(body)

    async def _stream(
        self,
        request: web.Request,
        service: ChatService,
        prepared: PreparedChat,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)

        # A token's log-probabilities ride on the next chunk written after it.
        pending: list[dict[str, Any]] = []

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            logprobs = None
            if pending:
                logprobs = {"content": list(pending)}
                pending.clear()
            return {
                "id": prepared.request_id,
                "object": "chat.completion.chunk",
                "created": prepared.created,
                "model": service.model_id,
                "choices": [
                    {
                        "index": 0,
                        "delta": delta,
                        "finish_reason": finish_reason,
                        "logprobs": logprobs,
                    }
                ],
            }

        started = time.perf_counter()
        await response.write(_sse(chunk({"role": "assistant", "content": ""})))
        try:
            async for event in service.run(prepared):
                if isinstance(event, LogprobsDelta):
                    pending.append(event.entry)
                    continue
                if not isinstance(event, ChatFinished):
                    await response.write(_sse(chunk(_delta(event))))
                    continue
                await response.write(_sse(chunk({}, event.finish_reason)))
                if include_usage:
                    usage = Usage(
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        total_tokens=event.prompt_tokens + event.completion_tokens,
                    )
                    final = chunk({})
                    final["choices"] = []
                    final["usage"] = usage.model_dump()
                    await response.write(_sse(final))
        except APIError as error:
            # Headers are gone already: the error travels as an SSE event.
            await response.write(_sse(error.body()))
        except (ConnectionResetError, ConnectionError):
            log.info(
                "client went away during %s after %.1f s",
                prepared.request_id,
                time.perf_counter() - started,
            )
            return response
        await response.write(_sse("[DONE]"))
        await response.write_eof()
        return response
