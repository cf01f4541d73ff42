"""Grammar-constrained sampling with llguidance: tool calls and JSON valid by construction.

Builders (serving side) turn request fields into a serialized spec; the sampler (on the
node that samples) parses it, matches it against that node's `GrammarTokenizer` and masks
the logits.
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
from .grammar_tokenizer import GrammarTokenizer, grammar_tokenizer
from .matcher import TokenConstraint
from .spec import ConstraintKind, ConstraintSpec

__all__ = [
    "LAZY_TOOL_CALL_FORMATS",
    "TOOL_CALL_FORMATS",
    "ConstraintError",
    "ConstraintKind",
    "ConstraintSpec",
    "GrammarTokenizer",
    "TokenConstraint",
    "grammar_tokenizer",
    "json_object_constraint",
    "json_schema_constraint",
    "lazy_tool_call_constraint",
    "tool_call_constraint",
]
