"""Qwen3-Coder: ``<tool_call><function=f><parameter=k>value</parameter></function></tool_call>``."""

from __future__ import annotations

from typing import Any

from ..format import ToolFormat, XmlCallGrammar, xml_value
from .hermes import (
    FUNCTION_CLOSE,
    FUNCTION_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    HermesEngine,
)


class Qwen3CoderEngine(HermesEngine):
    markers = (TOOL_CALL_OPEN, FUNCTION_OPEN)


class Qwen3Coder(ToolFormat):
    name = "qwen3_coder"
    models = "Qwen3-Coder, Qwen3-Coder-Next"
    engine = Qwen3CoderEngine
    template_markers = (FUNCTION_OPEN, PARAMETER_OPEN)
    template_priority = 10
    grammar = XmlCallGrammar(
        head=lambda name: f"{TOOL_CALL_OPEN}\n{FUNCTION_OPEN}{name}>\n",
        param_open=lambda key: f"{PARAMETER_OPEN}{key}>\n",
        param_close="\n" + PARAMETER_CLOSE,
        param_sep="\n",
        tail=f"{FUNCTION_CLOSE}\n{TOOL_CALL_CLOSE}",
        separator="\n",
        reserved="</?(function|parameter|tool_call)",
        closers=("\n" + PARAMETER_CLOSE, FUNCTION_CLOSE),
        trigger=TOOL_CALL_OPEN,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "\n".join(
            f"{TOOL_CALL_OPEN}\n{render_function(name, args)}\n{TOOL_CALL_CLOSE}"
            for name, args in calls
        )

    def render_result(self, text: str, name: str | None) -> str:
        return f"<tool_response>\n{text}\n</tool_response>"


def render_function(name: str, args: dict[str, Any]) -> str:
    """``<function=NAME>`` with one ``<parameter=KEY>`` block per argument."""
    params = "".join(
        f"{PARAMETER_OPEN}{k}>\n{xml_value(v)}\n{PARAMETER_CLOSE}\n" for k, v in args.items()
    )
    return f"{FUNCTION_OPEN}{name}>\n{params}{FUNCTION_CLOSE}"


FORMAT = Qwen3Coder()
