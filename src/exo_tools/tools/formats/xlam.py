"""Salesforce xLAM-2: a bare JSON list ``[{"name": f, "arguments": {...}}]`` (also
fenced as ```json, or inside ``<tool_call>`` / ``[TOOL_CALLS]``), after optional
``<think>`` reasoning."""

from __future__ import annotations

from typing import Any

from .._engine import MarkedJsonEngine
from ..format import ToolFormat
from .granite import list_grammar, render_list


class XlamEngine(MarkedJsonEngine):
    markers = ("<tool_call>", "[TOOL_CALLS]")
    call_close = ("</tool_call>",)
    bare_list = True
    lenient_start = True


class Xlam(ToolFormat):
    name = "xlam"
    models = "xLAM-2 (Llama-xLAM-2, xLAM-2-fc-r)"
    engine = XlamEngine
    # xLAM-2 templates spell out the list-of-calls answer format.
    template_markers = ('"name": "func_name1"',)
    template_priority = 5
    grammar = list_grammar("", "")

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return render_list(calls)


FORMAT = Xlam()
