"""The HTTP face of a node: OpenAI- and Anthropic-compatible routes on aiohttp.

This module routes, authenticates, forwards to the master and maps errors to HTTP; each
API dialect (`openai_chat`, `anthropic_messages`, `openai_responses`) turns its bodies
into serving requests and serving events back into its bodies.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from .. import __version__
from ..serving.chat import ChatService
from ..serving.errors import ServingError
from ..serving.telemetry import RequestRecord, current_record, recording
from ..types import RelayedResponse, RelayError
from . import anthropic_messages, dashboard, openai_chat, openai_responses
from .errors import APIError, error_middleware, from_serving_error, from_validation_error
from .openapi import openapi_document
from .response_store import ResponseStore
from .schemas import ChatCompletionRequest, ModelList, ModelObject
from .telemetry import API_BY_ROUTE, Telemetry

_Body = TypeVar("_Body", bound=BaseModel)

MAX_BODY_BYTES = 8 * 1024 * 1024
# Far deeper than any real message or tool schema; deeper bodies would only exhaust the
# validators' recursion.
MAX_JSON_DEPTH = 64
_TOO_DEEP = f"it nests arrays and objects more than {MAX_JSON_DEPTH} levels deep"
# Marks a request one node already forwarded, so views that briefly disagree on the
# master never bounce a request between nodes.
FORWARDED_HEADER = "X-Exo-Tools-Forwarded-By"
# Names each request in the access log and its response; a client's own id is kept.
REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Routes that hold no data and answer without the API key: the page itself asks for it.
OPEN_ROUTES = frozenset({"/health", "/ready", "/", "/docs", "/openapi.json"})
# Routes polled by monitors and the page: their access lines are logged at DEBUG.
MONITORING_ROUTES = frozenset(
    {
        "/health",
        "/ready",
        "/metrics",
        "/v1/cluster",
        "/v1/dashboard",
        "/v1/node",
        "/",
        "/docs",
        "/openapi.json",
    }
)
log = logging.getLogger(__name__)

# How long the master waits for a member's figures when building the dashboard.
MEMBER_STATUS_TIMEOUT_S = 1.5


class NodeBackend(Protocol):
    """What the API needs from the node it runs on."""

    @property
    def model_id(self) -> str: ...

    @property
    def created(self) -> int: ...

    def chat_service(self) -> ChatService | None:
        """None while the model is still loading."""
        ...

    def health(self) -> dict[str, Any]:
        """The node's state; `ready` in it says whether a generation request sent here now
        would be served."""
        ...

    def cluster_view(self) -> dict[str, Any] | None:
        """GET /v1/cluster; None on a node that runs without the cluster layer."""
        ...

    def master_api_url(self) -> str | None:
        """Where to forward chat requests when this node is not the master."""
        ...

    async def relay(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        node_id: str | None = None,
    ) -> RelayedResponse:
        """Send an API request to node `node_id` (None: the master) over the cluster's
        encrypted channel; raises RelayError when it cannot be reached."""
        ...


def _auth_middleware(api_key: str | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if api_key and request.path not in OPEN_ROUTES:
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


def _request_id(request: web.Request) -> str:
    given = request.headers.get(REQUEST_ID_HEADER, "")
    return given if _CLIENT_REQUEST_ID.fullmatch(given) else f"req-{uuid.uuid4().hex[:16]}"


def _telemetry_middleware(telemetry: Telemetry) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Open each request's record (outermost, so it sees the status errors become), count
    it and write its access line when it ends."""

    @web.middleware
    async def observe(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        record = RequestRecord(
            request_id=_request_id(request),
            method=request.method,
            route=route,
            api=API_BY_ROUTE.get(route, "other"),
        )
        request["record"] = record
        telemetry.begin(record)
        status = 500
        try:
            with recording(record):
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention)
            raise
        finally:
            record.finish(status)
            quiet = request.path in MONITORING_ROUTES and status < 400
            telemetry.end(record, log_level=logging.DEBUG if quiet else logging.INFO)

    return observe


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    record = request.get("record")
    if isinstance(record, RequestRecord):
        response.headers[REQUEST_ID_HEADER] = record.request_id


def create_app(
    backend: NodeBackend, *, api_key: str | None = None, log_requests: Path | None = None
) -> web.Application:
    routes = _Routes(backend)
    telemetry = routes.telemetry
    middlewares = [_telemetry_middleware(telemetry), error_middleware, _auth_middleware(api_key)]
    if log_requests is not None:
        middlewares.append(_request_log_middleware(log_requests))
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app.on_response_prepare.append(_add_request_id)
    app.on_startup.append(routes.start)
    app.on_cleanup.append(routes.close)
    app.router.add_get("/", routes.page)
    app.router.add_get("/docs", routes.docs_page)
    app.router.add_get("/openapi.json", routes.openapi)
    app.router.add_get("/metrics", routes.metrics)
    app.router.add_get("/health", routes.health)
    app.router.add_get("/ready", routes.ready)
    app.router.add_get("/v1/node", routes.node_status)
    app.router.add_get("/v1/dashboard", routes.dashboard)
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
        # Responses stored for previous_response_id: on the master, which answers them.
        self.responses = ResponseStore()
        self.telemetry = Telemetry(self._health_body, backend.cluster_view)
        self._openapi: dict[str, Any] | None = None

    async def start(self, _: web.Application) -> None:
        logging.getLogger("exo_tools").addHandler(self.telemetry.warnings)

    async def close(self, _: web.Application) -> None:
        logging.getLogger("exo_tools").removeHandler(self.telemetry.warnings)

    def _health_body(self) -> dict[str, Any]:
        return {"version": __version__, **self.backend.health()}

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response(self._health_body())

    async def ready(self, _: web.Request) -> web.Response:
        """200 once generation requests are served here, 503 before (for readiness probes
        and load balancers; `/health` answers 200 whenever the process does)."""
        health = self.backend.health()
        body = {"ready": bool(health.get("ready")), "status": health.get("status")}
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def metrics(self, _: web.Request) -> web.Response:
        body = await asyncio.to_thread(self.telemetry.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, _: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = openapi_document(__version__)
        return web.json_response(self._openapi)

    async def page(self, _: web.Request) -> web.Response:
        return web.Response(text=dashboard.page_html(), content_type="text/html")

    async def docs_page(self, _: web.Request) -> web.Response:
        return web.Response(text=dashboard.docs_html(), content_type="text/html")

    def _node_status(self) -> dict[str, Any]:
        """This node alone: its health, warnings and request figures."""
        telemetry = self.telemetry
        return {
            **self._health_body(),
            "time": time.time(),
            "warnings": list(telemetry.warnings.entries),
            "tokens_generated": telemetry.tokens_generated(),
        }

    async def node_status(self, _: web.Request) -> web.Response:
        return web.json_response(self._node_status())

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        """Everything the page draws, built on the master from its own figures and each
        member's `/v1/node`; other nodes forward here."""
        if master_url := self._master_elsewhere(request):
            return await self._forward(request, master_url)
        local = self._node_status()
        view = self.backend.cluster_view()
        members = [
            node for node in (view or {}).get("nodes", []) if node.get("id") != local.get("node_id")
        ]
        statuses = await asyncio.gather(*(self._member_status(request, node) for node in members))
        telemetry = self.telemetry
        body = dashboard.dashboard_body(
            local=local,
            view=view,
            member_statuses=dict(zip((node["id"] for node in members), statuses, strict=True)),
            recent=list(telemetry.recent),
            running=telemetry.running(),
        )
        return web.json_response(body)

    async def _member_status(
        self, request: web.Request, node: dict[str, Any]
    ) -> dict[str, Any] | str:
        """A member's `/v1/node` (relayed over the cluster's channel), or why it could not be
        read."""
        headers = _passed_on(request, ("Authorization", "x-api-key"))
        node_id = str(node.get("id"))

        async def read() -> dict[str, Any] | str:
            answer = await self.backend.relay("GET", "/v1/node", headers, b"", node_id)
            body = b"".join([piece async for piece in answer.body])
            if answer.status != 200:
                return f"node {node_id} answered {answer.status}"
            return json.loads(body)

        try:
            return await asyncio.wait_for(read(), MEMBER_STATUS_TIMEOUT_S)
        except (RelayError, TimeoutError, ValueError) as error:
            return f"node {node_id} did not answer: {error or type(error).__name__}"

    async def cluster(self, _: web.Request) -> web.Response:
        view = self.backend.cluster_view()
        if view is None:
            raise APIError(404, "this node runs without the cluster layer")
        return web.json_response(view)

    async def _forward(self, request: web.Request, master_url: str) -> web.StreamResponse:
        """Relay a request to the same route on the master; stream its answer back unchanged."""
        headers = _passed_on(request, ("Authorization", "x-api-key", "Content-Type"))
        headers[FORWARDED_HEADER] = request.host
        if (record := current_record()) is not None:
            record.forwarded_to = master_url
            headers[REQUEST_ID_HEADER] = record.request_id
        body = await request.read()
        try:
            upstream = await self.backend.relay(request.method, request.path_qs, headers, body)
        except RelayError as error:
            raise APIError(
                503,
                f"the master node at {master_url} is unreachable: {error}",
                code="master_unreachable",
            ) from error
        relayed = dict(upstream.headers)
        relayed.setdefault("Content-Type", "application/json")
        response = web.StreamResponse(status=upstream.status, headers=relayed)
        await response.prepare(request)
        events = 0  # events relayed so far, for a Responses stream's sequence numbers
        last_byte = b""
        try:
            async for piece in upstream.body:
                await response.write(piece)
                events += (last_byte + piece).count(b"\n\n")
                last_byte = piece[-1:]
        except RelayError as error:
            # The answer had begun: a stream ends with an error event in its dialect.
            log.warning("relay of %s to the master broke: %s", request.path, error)
            if relayed["Content-Type"].startswith("text/event-stream"):
                lost = APIError(
                    503,
                    f"the master node at {master_url} was lost mid-answer ({error}); "
                    "the answer is incomplete: send the request again",
                    code="master_lost",
                )
                await response.write(lost.stream_event(request.path, events))
        await response.write_eof()
        return response

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
        except RecursionError as error:  # the parser's own guard, near 1,000 levels
            raise APIError(400, f"invalid request body: {_TOO_DEEP}") from error
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        if (problem := _json_problem(body, MAX_JSON_DEPTH)) is not None:
            raise APIError(400, f"invalid request body: {problem}")
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
        if (record := current_record()) is not None:
            record.model = model
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


def _passed_on(request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
    """The client's headers among `names`, for a call this node makes on its behalf."""
    return {name: request.headers[name] for name in names if name in request.headers}


# Where a value sits in the body: (its parent's place, its key or index); built into a
# dotted path only when something is wrong there.
_Place = tuple["_Place", str] | None


def _dotted(place: _Place) -> str:
    parts: list[str] = []
    while place is not None:
        place, key = place
        parts.append(key)
    return ".".join(reversed(parts)) or "the body"


def _json_problem(value: object, depth_limit: int) -> str | None:
    """What makes a parsed JSON body unusable, if anything: nesting deeper than
    `depth_limit` (checked iteratively, with no recursion for a hostile body to exhaust), or
    a string with an unpaired UTF-16 surrogate (JSON's `\\ud800` escapes allow them; no
    tokenizer or grammar can encode one)."""
    pending: list[tuple[object, int, _Place]] = [(value, 1, None)]
    while pending:
        item, depth, place = pending.pop()
        if isinstance(item, str):
            if not item.isascii() and not _encodable(item):
                return f"{_dotted(place)} holds an unpaired UTF-16 surrogate"
            continue
        children: list[tuple[str, object]]
        if isinstance(item, dict):
            entries = cast(dict[str, Any], item)
            for key in entries:
                if not key.isascii() and not _encodable(key):
                    return f"a key in {_dotted(place)} holds an unpaired UTF-16 surrogate"
            children = list(entries.items())
        elif isinstance(item, list):
            children = [(str(index), child) for index, child in enumerate(cast(list[Any], item))]
        else:
            continue
        if depth > depth_limit:
            return _TOO_DEEP
        pending.extend((child, depth + 1, (place, key)) for key, child in children)
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
