"""MiniMax-M2: ``<minimax:tool_call><invoke name="f"><parameter name="k">v</parameter>
</invoke></minimax:tool_call>``. The prompt opens ``<think>``: text before a first
``</think>`` is reasoning."""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, SectionEngine, Verdict
from .._xml import XmlSyntax
from ..format import ToolFormat, XmlCallGrammar, xml_value

SECTION_BEGIN = "<minimax:tool_call>"
SECTION_END = "</minimax:tool_call>"
INVOKE = "<invoke name="
_INVOKE_RE = re.compile(r"<invoke name=[\"']?([^\"'>\n]+)[\"']?\s*>")
MINIMAX_XML = XmlSyntax(
    param_open=re.compile(r"<parameter name=[\"']?([^\"'>\n]+)[\"']?\s*>"),
    param_prefix="<parameter name=",
    param_close="</parameter>",
    call_close="</invoke>",
    outer_close=SECTION_END,
)


class MiniMaxEngine(SectionEngine):
    markers = (SECTION_BEGIN,)
    section_begin = SECTION_BEGIN
    section_end = SECTION_END
    call_begin = INVOKE
    implicit_reasoning = True

    def one_call(self, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        header = _INVOKE_RE.match(text, i)
        if header is None:
            return NOT if eos or ">" in text[i : i + 256] or len(text) - i > 256 else None
        result = self.xml_params(
            text, header.end(), eos, truncated, start=i, name=header.group(1), syntax=MINIMAX_XML
        )
        return self.as_step(result, i)


class MiniMaxM2(ToolFormat):
    name = "minimax_m2"
    models = "MiniMax-M2, MiniMax-M2.1"
    engine = MiniMaxEngine
    keeps_special_tokens = True
    template_markers = (SECTION_BEGIN,)
    template_priority = 50
    grammar = XmlCallGrammar(
        head=lambda name: f'{INVOKE}"{name}">\n',
        param_open=lambda key: f'<parameter name="{key}">',
        param_close="</parameter>",
        param_sep="\n",
        tail="</invoke>",
        separator="\n",
        reserved="</?(invoke|parameter|minimax:tool_call)",
        closers=("</parameter>", "</invoke>"),
        group_open=SECTION_BEGIN + "\n",
        group_close="\n" + SECTION_END,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        invokes = "".join(
            f'{INVOKE}"{n}">\n'
            + "".join(f'<parameter name="{k}">{xml_value(v)}</parameter>\n' for k, v in a.items())
            + "</invoke>\n"
            for n, a in calls
        )
        return f"{SECTION_BEGIN}\n{invokes}{SECTION_END}"

    def render_result(self, text: str, name: str | None) -> str:
        return f"<response>{text}</response>"


FORMAT = MiniMaxM2()
