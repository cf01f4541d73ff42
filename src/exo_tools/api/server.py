"""The HTTP face of a node: OpenAI- and Anthropic-compatible routes on aiohttp.

This module routes, authenticates, forwards to the master and maps errors to HTTP; each
API dialect (`openai_chat`, `anthropic_messages`, `openai_responses`) turns its bodies
into serving requests and serving events back into its bodies.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..serving.chat import ChatService
from ..serving.errors import ServingError
from . import anthropic_messages, openai_chat, openai_responses
from .errors import APIError, error_middleware, from_serving_error, from_validation_error
from .response_store import ResponseStore
from .schemas import ChatCompletionRequest, ModelList, ModelObject

_Body = TypeVar("_Body", bound=BaseModel)

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
            # OpenAI clients send a bearer token, Anthropic's SDK and Claude Code `x-api-key`.
            bearer = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            tokens = (bearer, request.headers.get("x-api-key", "").strip())
            if not any(hmac.compare_digest(token.encode(), api_key.encode()) for token in tokens):
                raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    return check


# The routes whose bodies `--log-requests` records: what a client's session sends.
LOGGED_ROUTES = frozenset({"/v1/chat/completions", "/v1/messages", "/v1/responses"})


def _request_log_middleware(path: Path) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Append each generation request's body to `path` as one JSON line (for replays)."""

    @web.middleware
    async def record(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.method == "POST" and request.path in LOGGED_ROUTES:
            raw = await request.read()  # aiohttp keeps it for the handler
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            line = json.dumps({"time": time.time(), "path": request.path, "body": body})
            with path.open("a", encoding="utf-8") as log_file:
                log_file.write(line + "\n")
        return await handler(request)

    return record


def create_app(
    backend: NodeBackend, *, api_key: str | None = None, log_requests: Path | None = None
) -> web.Application:
    middlewares = [error_middleware, _auth_middleware(api_key)]
    if log_requests is not None:
        middlewares.append(_request_log_middleware(log_requests))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    routes = _Routes(backend)
    app.on_cleanup.append(routes.close)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/v1/cluster", routes.cluster)
    app.router.add_get("/v1/models", routes.list_models)
    app.router.add_get("/v1/models/{model_id:.+}", routes.get_model)
    app.router.add_post("/v1/chat/completions", routes.chat_completions)
    app.router.add_post("/v1/messages", routes.messages)
    app.router.add_post("/v1/messages/count_tokens", routes.count_tokens)
    app.router.add_post("/v1/responses", routes.create_response)
    app.router.add_get("/v1/responses/{response_id}", routes.get_response)
    app.router.add_delete("/v1/responses/{response_id}", routes.delete_response)
    return app


class _Routes:
    def __init__(self, backend: NodeBackend) -> None:
        self.backend = backend
        self._session: aiohttp.ClientSession | None = None
        # Responses stored for previous_response_id: on the master, which answers them.
        self.responses = ResponseStore()

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
        """Relay a request to the same route on the master; stream its answer back unchanged."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5)
            )
        headers = {
            name: request.headers[name]
            for name in ("Authorization", "x-api-key", "Content-Type")
            if name in request.headers
        }
        headers[FORWARDED_HEADER] = request.host
        body = await request.read()
        try:
            async with self._session.request(
                request.method, f"{master_url}{request.path_qs}", data=body, headers=headers
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

    async def _parse(self, request: web.Request, schema: type[_Body]) -> _Body:
        """The request's JSON body as `schema`; 400 naming what is wrong with it."""
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise APIError(400, f"request body is not valid JSON: {error}") from error
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return schema.model_validate(body)
        except ValidationError as error:
            raise from_validation_error(error) from error

    def _chat_service(self, model: str) -> ChatService:
        """The service for a request naming `model`; 404 for another model, 503 while loading."""
        if model != self.backend.model_id:
            raise APIError(
                404,
                f"model '{model}' does not exist; this cluster serves '{self.backend.model_id}'",
                param="model",
                code="model_not_found",
            )
        service = self.backend.chat_service()
        if service is None:
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading")
        return service

    def _master_elsewhere(self, request: web.Request) -> str | None:
        """The master's URL when this node should forward `request` there."""
        master_url = self.backend.master_api_url()
        return master_url if master_url and FORWARDED_HEADER not in request.headers else None

    async def _serve(
        self,
        request: web.Request,
        schema: type[_Body],
        answer: Callable[[_Body], Awaitable[web.StreamResponse]],
        param_by_field: Mapping[str, str] | None = None,
    ) -> web.StreamResponse:
        """Forward to the master, or parse the body as `schema` and answer it; serving
        errors become HTTP errors naming the body's own fields."""
        if master_url := self._master_elsewhere(request):
            return await self._forward(request, master_url)
        body = await self._parse(request, schema)
        try:
            return await answer(body)
        except ServingError as error:
            raise from_serving_error(error, param_by_field) from error

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        async def answer(body: ChatCompletionRequest) -> web.StreamResponse:
            return await openai_chat.respond(request, self._chat_service(body.model), body)

        return await self._serve(request, ChatCompletionRequest, answer, openai_chat.PARAM_BY_FIELD)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        async def answer(body: anthropic_messages.MessagesRequest) -> web.StreamResponse:
            service = self._chat_service(body.model)
            return await anthropic_messages.respond(request, service, body)

        schema = anthropic_messages.MessagesRequest
        return await self._serve(request, schema, answer, anthropic_messages.PARAM_BY_FIELD)

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        async def answer(body: anthropic_messages.CountTokensRequest) -> web.StreamResponse:
            service = self._chat_service(body.model)
            return web.json_response(anthropic_messages.count_tokens(service, body))

        return await self._serve(request, anthropic_messages.CountTokensRequest, answer)

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        async def answer(body: openai_responses.ResponsesRequest) -> web.StreamResponse:
            service = self._chat_service(body.model)
            return await openai_responses.respond(request, service, body, self.responses)

        schema = openai_responses.ResponsesRequest
        return await self._serve(request, schema, answer, openai_responses.PARAM_BY_FIELD)

    async def get_response(self, request: web.Request) -> web.StreamResponse:
        if master_url := self._master_elsewhere(request):
            return await self._forward(request, master_url)
        found = openai_responses.stored(self.responses, request.match_info["response_id"])
        return web.json_response(found.body)

    async def delete_response(self, request: web.Request) -> web.StreamResponse:
        if master_url := self._master_elsewhere(request):
            return await self._forward(request, master_url)
        response_id = request.match_info["response_id"]
        openai_responses.stored(self.responses, response_id)
        self.responses.delete(response_id)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})
