"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from pydantic import ValidationError

from ..serving.errors import (
    ContextLengthExceeded,
    InvalidChatRequest,
    ServingError,
    UnsupportedSchema,
)
from .schemas import ErrorBody, ErrorResponse

log = logging.getLogger(__name__)

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


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
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

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


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


_CODE_BY_SERVING_ERROR: dict[type[ServingError], str] = {
    ContextLengthExceeded: "context_length_exceeded",
    UnsupportedSchema: "unsupported_schema",
}


def from_serving_error(
    error: ServingError, param_by_field: Mapping[str, str] | None = None
) -> APIError:
    """A 400 when the client has to change its request, a 500 when the generation failed.

    `param_by_field` gives the request-body names of the serving request's fields where
    this API's body names them differently.
    """
    field = error.field
    param = (param_by_field or {}).get(field, field) if field is not None else None
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
        return error.response()
    except web.HTTPRequestEntityTooLarge as error:
        return APIError(
            413, f"request body is too large ({error.text})", code="request_too_large"
        ).response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return APIError(error.status, error.reason or "HTTP error").response()
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return APIError(500, "internal server error", error_type="server_error").response()
