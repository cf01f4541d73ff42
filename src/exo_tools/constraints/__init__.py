"""Grammar-constrained sampling with llguidance: tool calls, JSON, regexes, choices and
client grammars valid by construction.

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
from .guided import (
    CLIENT_GRAMMAR_KINDS,
    choice_constraint,
    client_grammar_limits,
    grammar_constraint,
    regex_constraint,
    vocabulary_of,
)
from .matcher import TokenConstraint
from .spec import ConstraintKind, ConstraintSpec

__all__ = [
    "CLIENT_GRAMMAR_KINDS",
    "LAZY_TOOL_CALL_FORMATS",
    "TOOL_CALL_FORMATS",
    "ConstraintError",
    "ConstraintKind",
    "ConstraintSpec",
    "GrammarTokenizer",
    "TokenConstraint",
    "choice_constraint",
    "client_grammar_limits",
    "grammar_constraint",
    "grammar_tokenizer",
    "json_object_constraint",
    "json_schema_constraint",
    "lazy_tool_call_constraint",
    "regex_constraint",
    "tool_call_constraint",
    "vocabulary_of",
]
