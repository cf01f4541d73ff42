"""Pythonic calls ``[f(a=1), g(b="x")]`` (Llama 3.2 pythonic, LFM2, which wraps
them in ``<|tool_call_start|>…<|tool_call_end|>``). Parsed with ``ast``; only
literals are accepted, nothing is evaluated."""

from __future__ import annotations

from typing import Any

from .._engine import NOT, Calls, Engine, NotCall, Verdict
from .._scan import skip_ws
from ..format import ToolFormat

LFM_CALL_OPEN = "<|tool_call_start|>"
LFM_CALL_CLOSE = "<|tool_call_end|>"


class PythonicEngine(Engine):
    markers: tuple[str, ...] = (LFM_CALL_OPEN,)
    call_close = LFM_CALL_CLOSE
    bare_list = True
    lenient_start = True

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        if token != self.markers[0]:
            return NOT
        j = skip_ws(text, i + len(token))
        if j >= len(text):
            return self.need(eos)
        result: Calls | NotCall | None
        if text[j] == "[":
            result = self.list_calls(text, j, eos, declared_only=False)
        elif text[j] == "{":
            result = self.json_calls(text, j, eos, start=i)
        else:
            return NOT
        return self.closed(result, text, i, (self.call_close,), eos)


def py_literal(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    return repr(value)


def render_pythonic(calls: list[tuple[str, dict[str, Any]]]) -> str:
    inner = ", ".join(
        f"{n}({', '.join(f'{k}={py_literal(v)}' for k, v in a.items())})" for n, a in calls
    )
    return f"[{inner}]"


class Pythonic(ToolFormat):
    name = "pythonic"
    models = "Llama 3.2 (pythonic), LFM2"
    engine = PythonicEngine
    keeps_special_tokens = True
    template_markers = (LFM_CALL_OPEN,)
    template_priority = 2

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return render_pythonic(calls)

    def render_result(self, text: str, name: str | None) -> str:
        return f"<|tool_response_start|>{text}<|tool_response_end|>"


FORMAT = Pythonic()
