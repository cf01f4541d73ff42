"""Phi-4-mini: ``functools[{"name": f, "arguments": {...}}]``."""

from __future__ import annotations

from typing import Any

from .._engine import MarkedJsonEngine
from ..format import ToolFormat
from .granite import list_grammar, render_list

FUNCTOOLS = "functools"


class Phi4MiniEngine(MarkedJsonEngine):
    markers = (FUNCTOOLS,)


class Phi4MiniJson(ToolFormat):
    name = "phi4_mini_json"
    models = "Phi-4-mini-instruct"
    engine = Phi4MiniEngine
    template_markers = ("<|tool|>",)
    template_priority = 5
    grammar = list_grammar(FUNCTOOLS, "")

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return FUNCTOOLS + render_list(calls)


FORMAT = Phi4MiniJson()
