"""Mistral / Mixtral / Magistral: ``[TOOL_CALLS] [{"name", "arguments"}, ...]`` (before
tokenizer v11), ``[TOOL_CALLS]f[ARGS]{...}`` (v11+), optional ``[CALL_ID]``;
Magistral reasons in ``[THINK]…[/THINK]``."""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, THINK_TAGS, Engine, Verdict
from .._history import mistral_ids
from .._scan import dumps, is_partial_of, mistral_call_id, skip_ws
from ..format import ToolFormat

MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MISTRAL_CALL_ID = "[CALL_ID]"
_NAME_RE = re.compile(r"[A-Za-z_][\w.\-]*")


class MistralEngine(Engine):
    markers = (MISTRAL_CALLS,)
    think_tags = (("[THINK]", "[/THINK]"), *THINK_TAGS)

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        if token != MISTRAL_CALLS:
            return NOT
        j = skip_ws(text, i + len(MISTRAL_CALLS))
        if j >= len(text):
            return self.need(eos)
        if text[j] in "{[":
            return self.as_step(self.json_calls(text, j, eos, start=i), i)
        name = _NAME_RE.match(text, j)
        if name is None:
            return NOT
        k = name.end()
        if k >= len(text):
            return self.need(eos)
        if text.startswith(MISTRAL_CALL_ID, k):
            args_at = self.find(text, MISTRAL_ARGS, k)
            if args_at < 0:
                return self.need(eos)
            k = args_at
        elif is_partial_of(text, k, (MISTRAL_ARGS, MISTRAL_CALL_ID)):
            return self.need(eos)
        if not text.startswith(MISTRAL_ARGS, k):
            return NOT
        a = skip_ws(text, k + len(MISTRAL_ARGS))
        if a >= len(text):
            return self.need(eos)
        if text[a] != "{":
            return NOT
        return self.as_step(self.json_calls(text, a, eos, start=i, name=name.group()), i)


class Mistral(ToolFormat):
    name = "mistral"
    models = "Mistral, Mixtral, Mistral Small/Large, Devstral, Magistral"
    engine = MistralEngine
    keeps_special_tokens = True
    template_markers = (MISTRAL_CALLS,)
    template_priority = 3

    def new_call_id(self) -> str:
        return mistral_call_id()

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return MISTRAL_CALLS + dumps([{"name": n, "arguments": a} for n, a in calls])

    def render_result(self, text: str, name: str | None) -> str:
        return f"[TOOL_RESULTS]{text}[/TOOL_RESULTS]"

    def fix_history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Mistral templates require 9-alphanumeric call ids.
        return mistral_ids(messages)


FORMAT = Mistral()
