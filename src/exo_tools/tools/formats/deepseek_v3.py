"""DeepSeek V3 / R1: calls-begin, then per call ``call-begin function SEP NAME`` and the
arguments in a ```json fence before call-end, then calls-end (the tokens are spelled
with U+FF5C and U+2581, see below). The V3.1 spelling (NAME before the separator,
bare JSON) is read too. R1 templates open ``<think>`` in the prompt, so text before a
first ``</think>`` is reasoning."""

from __future__ import annotations

from typing import Any

from .._engine import FENCE, NOT, NotCall, SectionEngine, Verdict
from .._scan import dumps, is_partial_of, skip_ws
from ..format import JsonCallGrammar, ToolFormat

# DeepSeek tokens use FULLWIDTH VERTICAL LINE (U+FF5C) and LOWER ONE EIGHTH BLOCK (U+2581).
DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"
DS_OUTPUT_BEGIN = "<\uff5ctool\u2581output\u2581begin\uff5c>"
DS_OUTPUT_END = "<\uff5ctool\u2581output\u2581end\uff5c>"
DS_END_OF_SENTENCE = "<\uff5cend\u2581of\u2581sentence\uff5c>"


class DeepSeekEngine(SectionEngine):
    markers = (DS_CALLS_BEGIN, DS_CALL_BEGIN)
    drop_tokens = (DS_END_OF_SENTENCE,)
    section_begin = DS_CALLS_BEGIN
    section_end = DS_CALLS_END
    call_begin = DS_CALL_BEGIN
    implicit_reasoning = True

    def one_call(self, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        k = i + len(DS_CALL_BEGIN)
        sep = self.find(text, DS_SEP, k)
        if sep < 0:
            too_long = len(text) - k > 256 or self.find(text, DS_CALL_END, k) >= 0
            return NOT if eos or too_long else None
        head = text[k:sep].strip()
        p = sep + len(DS_SEP)
        if head in ("function", ""):
            newline = text.find("\n", p)
            if newline < 0:
                return self.need(eos)
            name = text[p:newline].strip()
            q = skip_ws(text, newline)
            if text.startswith(FENCE, q):
                fence_nl = text.find("\n", q)
                if fence_nl < 0:
                    return self.need(eos)
                q = skip_ws(text, fence_nl)
            elif is_partial_of(text, q, (FENCE,)):
                return self.need(eos)
        else:
            name, q = head, skip_ws(text, p)
        if q >= len(text):
            return self.need(eos)
        if not name or text[q] != "{":
            return NOT
        result = self.json_calls(text, q, eos, start=i, name=name)
        if result is None or isinstance(result, NotCall):
            return result
        calls, end = result
        e = skip_ws(text, end)
        if text.startswith(FENCE, e):
            end = e + len(FENCE)
        elif is_partial_of(text, e, (FENCE,)) and not eos:
            return None
        return self.closed((calls, end), text, i, (DS_CALL_END,), eos)


def deepseek_grammar(head: str, tail: str) -> JsonCallGrammar:
    """Calls between call-begin/call-end inside the calls section; ``head`` is the
    text between call-begin and the arguments, with ``{name}`` for the name."""
    return JsonCallGrammar(
        head=lambda name: (DS_CALL_BEGIN + head.format(name=name),),
        tail=tail + DS_CALL_END,
        separator="",
        group_open=DS_CALLS_BEGIN,
        group_close=DS_CALLS_END,
    )


class DeepSeekV3(ToolFormat):
    name = "deepseek_v3"
    models = "DeepSeek V3, V3-0324, R1, R1-0528"
    engine = DeepSeekEngine
    keeps_special_tokens = True
    template_markers = (DS_CALLS_BEGIN,)
    template_priority = 55
    string_arguments_in_history = True
    grammar = deepseek_grammar("function" + DS_SEP + "{name}\n```json\n", "\n```")

    def matches_template(self, template: str) -> bool:
        return super().matches_template(template) or "tool_calls_begin" in template

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        body = "".join(
            f"{DS_CALL_BEGIN}function{DS_SEP}{n}\n```json\n{dumps(a)}\n```{DS_CALL_END}"
            for n, a in calls
        )
        return f"{DS_CALLS_BEGIN}{body}{DS_CALLS_END}"

    def render_result(self, text: str, name: str | None) -> str:
        return f"{DS_OUTPUT_BEGIN}{text}{DS_OUTPUT_END}"


FORMAT = DeepSeekV3()
