"""What a tool-call format is: one ``ToolFormat`` per file in ``formats/``.

A format owns everything about its syntax: the parser (an ``Engine`` subclass), how
calls and results render as text, its history fixups, the chat-template markers
``infer_format`` looks for, the grammar pieces constrained decoding spells calls
with, and whether its markers are special tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._engine import Engine
from ._scan import dumps, openai_call_id


class GrammarRegex(str):
    """A piece of a call head matched by this regular expression, not literally."""


GrammarText = tuple[str, ...]  # literal text and GrammarRegex pieces, in order


@dataclass(frozen=True)
class JsonCallGrammar:
    """Calls spelled ``head(name) <arguments JSON> tail``, joined by ``separator``,
    the whole group between ``group_open`` and ``group_close``. ``trigger`` is the
    fixed text every call starts with (the lazy grammar's trigger), part of head."""

    head: Callable[[str], GrammarText]
    tail: str
    separator: str
    group_open: str = ""
    group_close: str = ""
    trigger: str | None = None


@dataclass(frozen=True)
class XmlCallGrammar:
    """Calls spelled ``head(name)``, one ``param_open(key) value param_close`` per
    parameter, then ``tail``. String values are raw text without the format's own
    tags (``reserved``, a regex alternation); other values are JSON. ``closers``
    are the multi-token endings the sampler tries first when steering to an end."""

    head: Callable[[str], str]
    param_open: Callable[[str], str]
    param_close: str  # ends a raw value (the lazy lexeme's end)
    param_sep: str  # after each parameter
    tail: str
    separator: str
    reserved: str
    closers: tuple[str, ...] = ()
    trigger: str | None = None
    group_open: str = ""
    group_close: str = ""


CallGrammar = JsonCallGrammar | XmlCallGrammar


class ToolFormat:
    """One tool-call format. Subclasses set the attributes and override the renderers."""

    name: str = ""
    models: str = ""  # the models that write it (documentation)
    engine: type[Engine] = Engine
    # Markers are special tokens: the server must detokenize with them kept.
    keeps_special_tokens: bool = False
    # ``infer_format`` picks this format when a chat template contains all of these;
    # formats with a higher ``template_priority`` are tried first.
    template_markers: tuple[str, ...] = ()
    template_absent: tuple[str, ...] = ()
    template_priority: int = 0
    # The template splices ``function.arguments`` into the prompt as a string.
    string_arguments_in_history: bool = False
    grammar: CallGrammar | None = None

    def matches_template(self, template: str) -> bool:
        return (
            bool(self.template_markers)
            and all(m in template for m in self.template_markers)
            and not any(m in template for m in self.template_absent)
        )

    def new_call_id(self) -> str:
        return openai_call_id()

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        """The text the model writes for these calls; the parser reads it back."""
        raise NotImplementedError

    def render_result(self, text: str, name: str | None) -> str:
        """One tool result in the format's own markup, for a user turn."""
        return text

    def fix_history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Format-specific history rewrites, on an already cleaned copy."""
        return messages


def envelope(name: str, args: Mapping[str, Any], key: str = "arguments") -> str:
    return dumps({"name": name, key: args})


def xml_value(value: Any) -> str:
    """A parameter value as XML-style formats write it: strings raw, the rest JSON."""
    return value if isinstance(value, str) else dumps(value)
