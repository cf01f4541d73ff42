"""Hunyuan-A13B: ``<tool_calls>[{"name": f, "arguments": {...}}]</tool_calls>``;
reasoning in ``<think>``, the answer wrapped in ``<answer>…</answer>``."""

from __future__ import annotations

from typing import Any

from .._engine import MarkedJsonEngine
from ..format import ToolFormat
from .granite import list_grammar, render_list

CALLS_OPEN = "<tool_calls>"
CALLS_CLOSE = "</tool_calls>"


class HunyuanEngine(MarkedJsonEngine):
    markers = (CALLS_OPEN,)
    call_close = (CALLS_CLOSE,)
    drop_tokens = ("<answer>", "</answer>")


class HunyuanA13b(ToolFormat):
    name = "hunyuan_a13b"
    models = "Hunyuan-A13B-Instruct"
    engine = HunyuanEngine
    keeps_special_tokens = True
    template_markers = (CALLS_OPEN,)
    template_priority = 5
    grammar = list_grammar(CALLS_OPEN, CALLS_CLOSE)

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return f"{CALLS_OPEN}{render_list(calls)}{CALLS_CLOSE}"


FORMAT = HunyuanA13b()
