"""IBM Granite 3.x / 4: ``<|tool_call|>[{"name": f, "arguments": {...}}]`` (3.1+ may
write ``<tool_call>``)."""

from __future__ import annotations

from typing import Any

from .._engine import MarkedJsonEngine
from .._scan import dumps
from ..format import JsonCallGrammar, ToolFormat

GRANITE_CALL = "<|tool_call|>"


class GraniteEngine(MarkedJsonEngine):
    markers = (GRANITE_CALL, "<tool_call>")
    call_close = ("</tool_call>",)


def list_grammar(group_open: str, group_close: str) -> JsonCallGrammar:
    """A JSON list of ``{"name", "arguments"}`` envelopes between two fixed texts."""
    return JsonCallGrammar(
        head=lambda name: ('{"name": ' + dumps(name) + ', "arguments": ',),
        tail="}",
        separator=", ",
        group_open=group_open + "[",
        group_close="]" + group_close,
    )


def render_list(calls: list[tuple[str, dict[str, Any]]]) -> str:
    return dumps([{"name": n, "arguments": a} for n, a in calls])


class Granite(ToolFormat):
    name = "granite"
    models = "Granite 3.0-3.3, Granite 4"
    engine = GraniteEngine
    keeps_special_tokens = True
    template_markers = (GRANITE_CALL,)
    template_priority = 5
    grammar = list_grammar(GRANITE_CALL, "")

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return GRANITE_CALL + render_list(calls)


FORMAT = Granite()
