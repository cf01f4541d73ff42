"""Why serving could not answer a request, in no API's terms.

Each API maps these onto its own error bodies and statuses.
`field` names the part of the `ChatRequest` at fault, as a dotted path, so an API can name
the same part of its own request body.
"""

from __future__ import annotations


class ServingError(Exception):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidChatRequest(ServingError):
    """The request cannot be served as asked; the client has to change it."""


class ContextLengthExceeded(InvalidChatRequest):
    """The prompt, or the prompt plus the token limit, does not fit the model's context."""


class UnsupportedSchema(InvalidChatRequest):
    """A tool's parameters or the response schema use JSON Schema the grammar cannot express."""


class GenerationError(ServingError):
    """The generation failed inside the cluster after it started."""


class ServerBusy(ServingError):
    """The node's queue is full; the client may retry after `retry_after_s` seconds."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
