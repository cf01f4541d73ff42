"""Llama 3.1/3.2/3.3 JSON tool calling: bare ``{"name": f, "parameters": {...}}``,
optional ``<|python_tag|>``, ``;`` between calls, ``brave_search.call(query="x")`` for
declared built-ins and raw code for ``code_interpreter``."""

from __future__ import annotations

import re
from typing import Any

from .._engine import NOT, Engine, NotCall, Seg, Verdict, call_segs
from .._history import split_parallel_calls
from .._scan import MALFORMED, dumps, skip_ws
from ..format import JsonCallGrammar, ToolFormat, envelope

PYTHON_TAG = "<|python_tag|>"
LLAMA_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")
_BUILTIN_CALL_RE = re.compile(r"([A-Za-z_]\w*)\.call\(")
_BUILTIN_PREFIX_RE = re.compile(r"[A-Za-z_]\w*(?:\.(?:c(?:a(?:l(?:l)?)?)?)?)?")


class Llama3Engine(Engine):
    markers = (PYTHON_TAG,)
    drop_tokens = LLAMA_END_TOKENS
    lenient_start = True
    chain_sep = ";"

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        if token != PYTHON_TAG:
            return NOT
        j = skip_ws(text, i + len(PYTHON_TAG))
        if j >= len(text):
            return self.need(eos)
        if text[j] in "{[":
            result = self.json_calls(text, j, eos, start=i)
            if result is None or isinstance(result, NotCall):
                return result
            end = self.after_chain(text, result[1], eos)
            return None if end is None else (call_segs(result[0], i), end)
        builtin = _BUILTIN_CALL_RE.match(text, j)
        if builtin and self.tools.resolve(builtin.group(1)) is not None:
            end = self.python_end(text, builtin.end() - 1)
            if end is None:
                return self.need(eos)
            if end == MALFORMED:
                return NOT
            calls = self.pythonic(
                text[builtin.start(1) : end].replace(".call(", "(", 1), declared_only=True
            )
            return NOT if calls is None else (call_segs(calls, i), end)
        if not eos and builtin is None and _BUILTIN_PREFIX_RE.fullmatch(text, j):
            return None  # may still become `name.call(`
        return self._code_interpreter(text, j, eos, truncated)

    def _code_interpreter(self, text: str, j: int, eos: bool, truncated: bool) -> Verdict:
        """Raw code after the python tag is a call to the built-in code interpreter."""
        name = self.tools.resolve("code_interpreter")
        if name is None:
            return NOT
        ends = [e for e in (self.find(text, t, j) for t in LLAMA_END_TOKENS) if e >= 0]
        if ends:
            stop = min(ends)
        elif not eos:
            return None
        elif truncated:
            return NOT
        else:
            stop = len(text)
        code = text[j:stop].rstrip()
        if not code:
            return NOT
        return [Seg("call", call=self.make_call(name, {"code": code}), origin=j)], stop


class Llama3Json(ToolFormat):
    name = "llama3_json"
    models = "Llama 3.1, 3.2, 3.3 (JSON tool calling)"
    engine = Llama3Engine
    keeps_special_tokens = True
    template_priority = 1
    grammar = JsonCallGrammar(
        head=lambda name: ('{"name": ' + dumps(name) + ', "parameters": ',),
        tail="}",
        separator="; ",
    )

    def matches_template(self, template: str) -> bool:
        return PYTHON_TAG in template or "ipython" in template

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "; ".join(envelope(n, a, "parameters") for n, a in calls)

    def fix_history(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The Llama 3.1 template raises on more than one call per assistant message.
        return split_parallel_calls(messages)


FORMAT = Llama3Json()
