"""The one error type of the constraints package."""

from __future__ import annotations


class ConstraintError(ValueError):
    """A constraint cannot be built: an unsupported schema feature, a malformed spec, an
    unknown tokenizer. The API maps it to HTTP 400; the message names the problem."""
