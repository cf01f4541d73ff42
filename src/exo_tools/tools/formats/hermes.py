"""Hermes / Qwen2.5 / Qwen3: ``<tool_call>{"name": f, "arguments": {...}}</tool_call>``.

Qwen3-Coder's XML calls are also accepted inside the tag (models mix them up).
"""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, Calls, Engine, NotCall, Verdict
from .._scan import dumps, is_partial_of, skip_ws
from .._xml import XmlSyntax
from ..format import JsonCallGrammar, ToolFormat, envelope

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
_FUNCTION_HEADER = re.compile(r"<function=([^>\n<]+)>")

# ``<function=NAME><parameter=KEY>value</parameter>...</function>``.
FUNCTION_XML = XmlSyntax(
    param_open=re.compile(r"<parameter=([^>\n]+)>"),
    param_prefix=PARAMETER_OPEN,
    param_close=PARAMETER_CLOSE,
    call_close=FUNCTION_CLOSE,
    outer_close=TOOL_CALL_CLOSE,
)


class HermesEngine(Engine):
    markers = (TOOL_CALL_OPEN,)
    function_xml = FUNCTION_XML

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        if token == TOOL_CALL_OPEN:
            j = skip_ws(text, i + len(TOOL_CALL_OPEN))
            if j >= len(text) or is_partial_of(text, j, (FUNCTION_OPEN,)):
                return self.need(eos)
            if text.startswith(FUNCTION_OPEN, j):
                result = self.function_call(text, j, eos, truncated, start=i)
            elif text[j] in "{[":
                result = self.json_calls(text, j, eos, start=i)
            else:
                return NOT
            return self.closed(result, text, i, (TOOL_CALL_CLOSE,), eos)
        if token == FUNCTION_OPEN:
            result = self.function_call(text, i, eos, truncated, start=i)
            return self.closed(result, text, i, (TOOL_CALL_CLOSE,), eos)
        return NOT

    def function_call(
        self, text: str, j: int, eos: bool, truncated: bool, *, start: int
    ) -> Calls | NotCall | None:
        """``<function=NAME>`` then its parameters; values are raw text that the schema
        types during normalization."""
        header = _FUNCTION_HEADER.match(text, j)
        if header is None:
            header_end = text.find(">", j)
            if header_end < 0 and not eos and "\n" not in text[j:] and len(text) - j < 256:
                return None
            return NOT
        name = header.group(1).strip()
        return self.xml_params(
            text, header.end(), eos, truncated, start=start, name=name, syntax=self.function_xml
        )


class Hermes(ToolFormat):
    name = "hermes"
    models = "Qwen2.5, Qwen3, Hermes 2/3, default for template-less models"
    engine = HermesEngine
    template_markers = (TOOL_CALL_OPEN,)
    template_priority = 4
    grammar = JsonCallGrammar(
        head=lambda name: (f"{TOOL_CALL_OPEN}\n" + '{"name": ' + dumps(name) + ', "arguments": ',),
        tail="}\n" + TOOL_CALL_CLOSE,
        separator="\n",
        trigger=TOOL_CALL_OPEN,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "\n".join(f"{TOOL_CALL_OPEN}\n{envelope(n, a)}\n{TOOL_CALL_CLOSE}" for n, a in calls)

    def render_result(self, text: str, name: str | None) -> str:
        return f"<tool_response>\n{text}\n</tool_response>"


FORMAT = Hermes()
