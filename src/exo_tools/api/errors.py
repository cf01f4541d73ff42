"""API errors with the right status, in each dialect's shape: OpenAI's
`{"error": {"message", "type", "param", "code"}}`, and Anthropic's
`{"type": "error", "error": {"type", "message"}}` on the Messages routes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from ..serving.errors import (
    ContextLengthExceeded,
    InvalidChatRequest,
    ServerBusy,
    ServingError,
    UnsupportedSchema,
)
from .schemas import ErrorBody, ErrorResponse
from .sse import sse_event

log = logging.getLogger(__name__)
_Item = TypeVar("_Item")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}

_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Routes that answer in Anthropic's dialect, errors included.
ANTHROPIC_ROUTE_PREFIX = "/v1/messages"
RESPONSES_ROUTE_PREFIX = "/v1/responses"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "server_error")

    def body(self) -> dict[str, object]:
        return ErrorResponse(
            error=ErrorBody(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        ).model_dump()

    def anthropic_body(self) -> dict[str, object]:
        error_type = _ANTHROPIC_TYPE_BY_STATUS.get(self.status, "api_error")
        return {"type": "error", "error": {"type": error_type, "message": self.message}}

    def response(self, request: web.Request | None = None) -> web.Response:
        """The error in the dialect of the route `request` went to (OpenAI's by default)."""
        anthropic = request is not None and _under(request.path, ANTHROPIC_ROUTE_PREFIX)
        body = self.anthropic_body() if anthropic else self.body()
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s else None
        return web.json_response(body, status=self.status, headers=headers)

    def stream_event(self, path: str, sequence_number: int) -> bytes:
        """The error as the last event of a stream on route `path` that has begun: an
        Anthropic `error` event, a Responses `error` event (the `sequence_number`-th of
        its stream), or a chat completion chunk holding `error`."""
        if _under(path, ANTHROPIC_ROUTE_PREFIX):
            return sse_event(self.anthropic_body(), event="error")
        if _under(path, RESPONSES_ROUTE_PREFIX):
            event = {
                "type": "error",
                "code": self.code or self.error_type,
                "message": self.message,
                "param": self.param,
                "sequence_number": sequence_number,
            }
            return sse_event(event, event="error")
        return sse_event(self.body())


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(f"{prefix}/")


def from_validation_error(error: ValidationError) -> APIError:
    """A 400 naming the first invalid field the way OpenAI does (`param` = dotted path)."""
    first = error.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"]
    if first["type"] == "missing":
        message = f"missing required field '{location}'"
    elif location:
        message = f"invalid '{location}': {message}"
    return APIError(400, message, param=location or None, code="invalid_value")


def validated_list(adapter: TypeAdapter[list[_Item]], value: list[Any], noun: str) -> list[_Item]:
    """`value` validated by `adapter`, for a field that is a string or a list of typed
    items: validated in its own validator, a bad item's error names the item (and an
    unknown type), not the string branch of the union. Raises ValueError."""
    try:
        return adapter.validate_python(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "union_tag_invalid":
            tag = (first.get("ctx") or {}).get("tag")
            raise ValueError(f"{noun} {where}: type {tag!r} is not supported") from None
        raise ValueError(f"{noun} {where}: {first['msg']}") from None


_CODE_BY_SERVING_ERROR: dict[type[ServingError], str] = {
    ContextLengthExceeded: "context_length_exceeded",
    UnsupportedSchema: "unsupported_schema",
}


def from_serving_error(
    error: ServingError, param_by_field: Mapping[str, str] | None = None
) -> APIError:
    """A 400 when the client has to change its request, a 503 (with Retry-After) when the
    node's queue is full, a 500 when the generation failed.

    `param_by_field` gives the request-body names of the serving request's fields where
    this API's body names them differently.
    """
    field = error.field
    param = (param_by_field or {}).get(field, field) if field is not None else None
    if isinstance(error, ServerBusy):
        return APIError(503, error.message, code="server_busy", retry_after_s=error.retry_after_s)
    if isinstance(error, InvalidChatRequest):
        code = _CODE_BY_SERVING_ERROR.get(type(error))
        return APIError(400, error.message, param=param, code=code)
    return APIError(500, error.message, param=param, error_type="server_error")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as error:
        return error.response(request)
    except web.HTTPRequestEntityTooLarge as error:
        return APIError(
            413, f"request body is too large ({error.text})", code="request_too_large"
        ).response(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return APIError(error.status, error.reason or "HTTP error").response(request)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return APIError(500, "internal server error", error_type="server_error").response(request)
