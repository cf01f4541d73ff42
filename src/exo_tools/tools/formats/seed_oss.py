"""Seed-OSS: ``<seed:tool_call><function=f><parameter=k>v</parameter></function>
</seed:tool_call>``; reasoning in ``<seed:think>…</seed:think>``."""

from __future__ import annotations

import dataclasses
from typing import Any

from .._engine import NOT, Verdict
from .._scan import is_partial_of, skip_ws
from ..format import ToolFormat, XmlCallGrammar
from .hermes import FUNCTION_OPEN, FUNCTION_XML, PARAMETER_CLOSE, PARAMETER_OPEN, HermesEngine
from .qwen3_coder import render_function

SEED_CALL_OPEN = "<seed:tool_call>"
SEED_CALL_CLOSE = "</seed:tool_call>"


class SeedOssEngine(HermesEngine):
    markers = (SEED_CALL_OPEN,)
    think_tags = (("<seed:think>", "</seed:think>"),)
    function_xml = dataclasses.replace(FUNCTION_XML, outer_close=SEED_CALL_CLOSE)

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        j = skip_ws(text, i + len(SEED_CALL_OPEN))
        if j >= len(text) or is_partial_of(text, j, (FUNCTION_OPEN,)):
            return self.need(eos)
        if not text.startswith(FUNCTION_OPEN, j):
            return NOT
        result = self.function_call(text, j, eos, truncated, start=i)
        return self.closed(result, text, i, (SEED_CALL_CLOSE,), eos)


class SeedOss(ToolFormat):
    name = "seed_oss"
    models = "Seed-OSS-36B"
    engine = SeedOssEngine
    keeps_special_tokens = True
    template_markers = (SEED_CALL_OPEN,)
    template_priority = 50
    grammar = XmlCallGrammar(
        head=lambda name: f"{SEED_CALL_OPEN}\n{FUNCTION_OPEN}{name}>\n",
        param_open=lambda key: f"{PARAMETER_OPEN}{key}>\n",
        param_close="\n" + PARAMETER_CLOSE,
        param_sep="\n",
        tail=f"</function>\n{SEED_CALL_CLOSE}",
        separator="\n",
        reserved="</?(function|parameter|seed:tool_call)",
        closers=("\n" + PARAMETER_CLOSE, "</function>"),
        trigger=SEED_CALL_OPEN,
    )

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "\n".join(
            f"{SEED_CALL_OPEN}\n{render_function(n, a)}\n{SEED_CALL_CLOSE}" for n, a in calls
        )


FORMAT = SeedOss()
