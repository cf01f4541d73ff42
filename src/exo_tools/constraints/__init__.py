"""Grammar-constrained sampling with llguidance: tool calls and JSON valid by construction.

Builders (API side) turn request fields into a serialized spec; the sampler (on the node
that samples) parses it, looks the tokenizer up in the registry and masks the logits.
See docs/CONSTRAINED_DECODING.md.
"""

from .builders import (
    LAZY_TOOL_CALL_FORMATS,
    TOOL_CALL_FORMATS,
    json_object_constraint,
    json_schema_constraint,
    lazy_tool_call_constraint,
    tool_call_constraint,
)
from .errors import ConstraintError
from .matcher import TokenConstraint
from .registry import (
    RegisteredTokenizer,
    get_tokenizer,
    register_tokenizer,
    unregister_tokenizer,
)
from .spec import ConstraintKind, ConstraintSpec

__all__ = [
    "LAZY_TOOL_CALL_FORMATS",
    "TOOL_CALL_FORMATS",
    "ConstraintError",
    "ConstraintKind",
    "ConstraintSpec",
    "RegisteredTokenizer",
    "TokenConstraint",
    "get_tokenizer",
    "json_object_constraint",
    "json_schema_constraint",
    "lazy_tool_call_constraint",
    "register_tokenizer",
    "tool_call_constraint",
    "unregister_tokenizer",
]
