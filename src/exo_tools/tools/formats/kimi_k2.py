"""Kimi K2 / K2 Thinking: ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX
<|tool_call_argument_begin|>{...}<|tool_call_end|><|tool_calls_section_end|>``."""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, SectionEngine, Verdict
from .._history import rename_call_ids
from .._scan import dumps
from ..format import GrammarRegex, JsonCallGrammar, ToolFormat

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
_HEADER_RE = re.compile(r"\s*(?:functions\.)?([\w.\-]+?)(?::\d+)?\s*<\|tool_call_argument_begin\|>")


class KimiEngine(SectionEngine):
    markers = (SECTION_BEGIN, CALL_BEGIN)
    drop_tokens = ("<|im_end|>",)
    section_begin = SECTION_BEGIN
    section_end = SECTION_END
    call_begin = CALL_BEGIN

    def one_call(self, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        k = i + len(CALL_BEGIN)
        header = _HEADER_RE.match(text, k)
        if header is None:
            if self.find(text, ARGUMENT_BEGIN, k) < 0 and len(text) - k < 256 and not eos:
                return None
            return NOT
        result = self.arguments_after(text, header.end(), eos, start=i, name=header.group(1))
        return self.closed(result, text, i, (CALL_END,), eos)


class KimiK2(ToolFormat):
    name = "kimi_k2"
    models = "Kimi K2 Instruct, K2-0905, K2 Thinking"
    engine = KimiEngine
    keeps_special_tokens = True
    template_markers = (SECTION_BEGIN,)
    template_priority = 50
    grammar = JsonCallGrammar(
        head=lambda name: (
            f"{CALL_BEGIN}functions.{name}:",
            GrammarRegex("[0-9]+"),
            ARGUMENT_BEGIN,
        ),
        tail=CALL_END,
        separator="",
        group_open=SECTION_BEGIN,
        group_close=SECTION_END,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        body = "".join(
            f"{CALL_BEGIN}functions.{n}:{index}{ARGUMENT_BEGIN}{dumps(a)}{CALL_END}"
            for index, (n, a) in enumerate(calls)
        )
        return f"{SECTION_BEGIN}{body}{SECTION_END}"

    def fix_history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The template prints call ids verbatim as the call header: functions.NAME:IDX.
        return rename_call_ids(messages, lambda name, index: f"functions.{name}:{index}")


FORMAT = KimiK2()
