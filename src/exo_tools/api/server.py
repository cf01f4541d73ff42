"""The HTTP face of a node: OpenAI-compatible routes on aiohttp.

This module routes, authenticates, forwards to the master and maps errors to HTTP; each
API dialect (`openai_chat`) turns its bodies into serving requests and serving events
back into its bodies.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..serving.chat import ChatService
from ..serving.errors import ServingError
from . import openai_chat
from .errors import APIError, error_middleware, from_serving_error, from_validation_error
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
        """Relay a request to the same route on the master; stream its answer back unchanged."""
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
                f"{master_url}{request.path}", data=body, headers=headers
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

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        master_url = self.backend.master_api_url()
        if master_url and FORWARDED_HEADER not in request.headers:
            return await self._forward(request, master_url)
        body = await self._parse(request, ChatCompletionRequest)
        service = self._chat_service(body.model)
        try:
            return await openai_chat.respond(request, service, body)
        except ServingError as error:
            raise from_serving_error(error, openai_chat.PARAM_BY_FIELD) from error
