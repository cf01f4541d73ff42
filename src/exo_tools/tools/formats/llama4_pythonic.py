"""Llama 4: pythonic calls, ``<|python_start|>[f(a=1)]<|python_end|>`` (the tags may be
left out)."""

from __future__ import annotations

from typing import Any

from ..format import ToolFormat
from .pythonic import PythonicEngine, render_pythonic

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"


class Llama4Engine(PythonicEngine):
    markers = (PYTHON_START,)
    call_close = PYTHON_END
    drop_tokens = ("<|eom|>", "<|eot|>", PYTHON_END)


class Llama4Pythonic(ToolFormat):
    name = "llama4_pythonic"
    models = "Llama 4 Scout / Maverick"
    engine = Llama4Engine
    keeps_special_tokens = True
    template_markers = (PYTHON_START,)
    template_priority = 3

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return f"{PYTHON_START}{render_pythonic(calls)}{PYTHON_END}"


FORMAT = Llama4Pythonic()
