"""DeepSeek V3.1 / V3.2: calls-begin, then per call ``call-begin NAME SEP {...}
call-end``, then calls-end (no ``function`` type, no code fence; the tokens are in
``deepseek_v3``). In thinking mode the prompt opens ``<think>``: text before a first
``</think>`` is reasoning."""

from __future__ import annotations

from typing import Any

from .._scan import dumps
from ..format import ToolFormat
from .deepseek_v3 import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_OUTPUT_BEGIN,
    DS_OUTPUT_END,
    DS_SEP,
    DeepSeekEngine,
    deepseek_grammar,
)


class DeepSeekV31(ToolFormat):
    name = "deepseek_v31"
    models = "DeepSeek V3.1, V3.1-Terminus, V3.2"
    engine = DeepSeekEngine
    keeps_special_tokens = True
    # V3.1 templates handle thinking (</think>) and splice arguments without a fence.
    template_markers = (DS_CALLS_BEGIN, "</think>")
    template_absent = ("```json",)
    template_priority = 60
    string_arguments_in_history = True
    grammar = deepseek_grammar("{name}" + DS_SEP, "")

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        body = "".join(f"{DS_CALL_BEGIN}{n}{DS_SEP}{dumps(a)}{DS_CALL_END}" for n, a in calls)
        return f"{DS_CALLS_BEGIN}{body}{DS_CALLS_END}"

    def render_result(self, text: str, name: str | None) -> str:
        return f"{DS_OUTPUT_BEGIN}{text}{DS_OUTPUT_END}"


FORMAT = DeepSeekV31()
