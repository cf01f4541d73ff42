"""`/openapi.json`: every route, with request and response bodies generated from the same
pydantic models that parse and build them (OpenAPI 3.1, whose schemas are JSON Schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from . import anthropic_messages, openai_chat, openai_responses
from .schemas import ChatCompletionRequest, ErrorResponse, ModelList, ModelObject

_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class _Route:
    method: str
    path: str
    summary: str
    tag: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    # Routes that can stream answer `text/event-stream` as well.
    streams: bool = False
    response_text: str | None = None  # a non-JSON answer's media type
    open_route: bool = False  # answers without the API key


_ROUTES = (
    _Route(
        "post",
        "/v1/chat/completions",
        "OpenAI chat completions (tools, guided output, streaming)",
        "OpenAI",
        ChatCompletionRequest,
        openai_chat.ChatCompletion,
        streams=True,
    ),
    _Route(
        "post",
        "/v1/responses",
        "OpenAI Responses (items, function calls, previous_response_id, streaming)",
        "OpenAI",
        openai_responses.ResponsesRequest,
        openai_responses.ResponseObject,
        streams=True,
    ),
    _Route(
        "get",
        "/v1/responses/{response_id}",
        "A stored response",
        "OpenAI",
        response=openai_responses.ResponseObject,
    ),
    _Route("delete", "/v1/responses/{response_id}", "Delete a stored response", "OpenAI"),
    _Route("get", "/v1/models", "The model this cluster serves", "OpenAI", response=ModelList),
    _Route("get", "/v1/models/{model_id}", "One model", "OpenAI", response=ModelObject),
    _Route(
        "post",
        "/v1/messages",
        "Anthropic Messages (tool_use, streaming events)",
        "Anthropic",
        anthropic_messages.MessagesRequest,
        anthropic_messages.Message,
        streams=True,
    ),
    _Route(
        "post",
        "/v1/messages/count_tokens",
        "Anthropic token counting: the prompt's input_tokens",
        "Anthropic",
        anthropic_messages.CountTokensRequest,
    ),
    _Route("get", "/v1/cluster", "Nodes, links, placement and prefix cache", "Cluster"),
    _Route(
        "get",
        "/v1/dashboard",
        "What the dashboard draws: every node's figures, gathered by the master",
        "Cluster",
    ),
    _Route("get", "/v1/node", "This node alone: health, warnings, tokens generated", "Cluster"),
    _Route(
        "get",
        "/health",
        "Liveness: 200 while the process answers, with its state",
        "Operations",
        open_route=True,
    ),
    _Route(
        "get",
        "/ready",
        "Readiness: 200 once generation is served here, 503 until then",
        "Operations",
        open_route=True,
    ),
    _Route(
        "get",
        "/metrics",
        "Prometheus metrics",
        "Operations",
        response_text="text/plain; version=0.0.4",
    ),
    _Route("get", "/", "The dashboard page", "Pages", response_text="text/html", open_route=True),
    _Route(
        "get",
        "/docs",
        "This API's routes, readable",
        "Pages",
        response_text="text/html",
        open_route=True,
    ),
    _Route("get", "/openapi.json", "This document", "Operations", open_route=True),
)


def _operation_id(route: _Route) -> str:
    words = [part.strip("{}").replace(".", "_") for part in route.path.split("/") if part]
    return "_".join([route.method, *words]) if words else f"{route.method}_page"


def _path_parameters(path: str) -> list[dict[str, Any]]:
    names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in names
    ]


def _ref(model: type[BaseModel], mode: JsonSchemaMode, refs: dict[Any, Any]) -> dict[str, Any]:
    return dict(refs[(model, mode)])


def openapi_document(version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of a node's HTTP API."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(ErrorResponse, "serialization")]
    for route in _ROUTES:
        if route.request is not None:
            wanted.append((route.request, "validation"))
        if route.response is not None:
            wanted.append((route.response, "serialization"))
    refs, definitions = models_json_schema(list(dict.fromkeys(wanted)), ref_template=_REF)
    error = {
        "description": "An error in the API's own shape (Anthropic's on /v1/messages)",
        "content": {"application/json": {"schema": _ref(ErrorResponse, "serialization", refs)}},
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in _ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": _operation_id(route),
        }
        if parameters := _path_parameters(route.path):
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": _ref(route.request, "validation", refs)}
                },
            }
        content: dict[str, Any]
        if route.response_text is not None:
            content = {route.response_text: {"schema": {"type": "string"}}}
        elif route.response is not None:
            content = {"application/json": {"schema": _ref(route.response, "serialization", refs)}}
        else:
            content = {"application/json": {"schema": {"type": "object"}}}
        if route.streams:
            content["text/event-stream"] = {
                "schema": {"type": "string", "description": "Server-sent events (stream: true)"}
            }
        responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
        if not route.open_route:
            responses["401"] = error
        if route.request is not None:
            responses["400"] = error
        if route.streams:
            responses["503"] = {
                **error,
                "description": "The model is loading or the queue is full (see Retry-After)",
            }
        if route.path == "/ready":
            responses["503"] = {"description": "Not ready yet: the model is being placed or loaded"}
        operation["responses"] = responses
        if not route.open_route:
            operation["security"] = [{"bearer": []}, {"apiKey": []}]
        paths.setdefault(route.path, {})[route.method] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "exo-tools node API",
            "version": version,
            "description": (
                "A distributed MLX inference cluster: OpenAI chat completions and Responses, "
                "Anthropic Messages. Any node answers; members forward generation to the master."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
