"""GLM-4.5 / 4.6 / 4.7: ``<tool_call>NAME\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>
</tool_call>`` (4.7 leaves out the newlines). String values are raw text."""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, Engine, Verdict
from .._xml import XmlSyntax
from ..format import ToolFormat, XmlCallGrammar, xml_value

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ARG_KEY = "<arg_key>"
_NAME_RE = re.compile(r"\s*([^\s<>{}\[\]]+)\s*")
GLM_XML = XmlSyntax(
    param_open=re.compile(r"<arg_key>\s*([^<\n]*?)\s*</arg_key>\s*<arg_value>"),
    param_prefix=ARG_KEY,
    param_close="</arg_value>",
    call_close=TOOL_CALL_CLOSE,
)


class Glm45Engine(Engine):
    markers = (TOOL_CALL_OPEN,)

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        k = i + len(TOOL_CALL_OPEN)
        name = _NAME_RE.match(text, k)
        if name is None or name.end() >= len(text):
            # The name runs to a newline or the first tag.
            return NOT if eos or len(text) - k > 256 else None
        end = name.end()
        if not (text.startswith((ARG_KEY, TOOL_CALL_CLOSE), end) or "\n" in text[k:end]):
            return NOT if text[end] != "<" or eos or len(text) - end > 16 else None
        result = self.xml_params(
            text, end, eos, truncated, start=i, name=name.group(1), syntax=GLM_XML
        )
        return self.as_step(result, i)


class Glm45(ToolFormat):
    name = "glm45"
    models = "GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7"
    engine = Glm45Engine
    keeps_special_tokens = True
    template_markers = (ARG_KEY,)
    template_priority = 20
    grammar = XmlCallGrammar(
        head=lambda name: f"{TOOL_CALL_OPEN}{name}\n",
        param_open=lambda key: f"{ARG_KEY}{key}</arg_key>\n<arg_value>",
        param_close="</arg_value>",
        param_sep="\n",
        tail=TOOL_CALL_CLOSE,
        separator="\n",
        reserved="</?(arg_key|arg_value|tool_call)",
        closers=("</arg_value>", TOOL_CALL_CLOSE),
        trigger=TOOL_CALL_OPEN,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "\n".join(
            f"{TOOL_CALL_OPEN}{n}\n"
            + "".join(
                f"{ARG_KEY}{k}</arg_key>\n<arg_value>{xml_value(v)}</arg_value>\n"
                for k, v in a.items()
            )
            + TOOL_CALL_CLOSE
            for n, a in calls
        )

    def render_result(self, text: str, name: str | None) -> str:
        return f"<tool_response>\n{text}\n</tool_response>"


FORMAT = Glm45()
