"""Tool-call parsers for every supported output format, one-shot and streaming.

Both entry points drive the same engine. The engine walks the text left to right
and, at each point, either commits a segment (content, reasoning or a complete
call) or answers "need more text". It only commits when no later text could change
the decision, so feeding a text in any chunking yields the same segments as
parsing it whole; ``finish`` then resolves whatever is still pending.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._scan import (
    MALFORMED,
    at_line_start,
    decode_arguments,
    is_partial_of,
    json_end,
    loads,
    mistral_call_id,
    openai_call_id,
    partial_suffix,
    python_end,
    skip_ws,
)
from .results import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta
from .schema import ToolIndex, normalize_arguments

FORMATS: tuple[str, ...] = (
    "hermes",
    "qwen3_coder",
    "llama3_json",
    "pythonic",
    "mistral",
    "gpt_oss",
    "deepseek_v3",
)

# Format tokens. Models emit them as special tokens, so the server must detokenize
# with special tokens kept for these formats.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
FENCE = "```"
PYTHON_TAG = "<|python_tag|>"
LLAMA_END_TOKENS = ("<|eom_id|>", "<|eot_id|>")
LFM_CALL_OPEN = "<|tool_call_start|>"
LFM_CALL_CLOSE = "<|tool_call_end|>"
MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
MISTRAL_CALL_ID = "[CALL_ID]"
HARMONY_START = "<|start|>"
HARMONY_CHANNEL = "<|channel|>"
HARMONY_MESSAGE = "<|message|>"
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
# DeepSeek tokens use FULLWIDTH VERTICAL LINE (U+FF5C) and LOWER ONE EIGHTH BLOCK (U+2581).
DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"
DS_OUTPUT_BEGIN = "<\uff5ctool\u2581output\u2581begin\uff5c>"
DS_OUTPUT_END = "<\uff5ctool\u2581output\u2581end\uff5c>"

_FENCE_LANGS = frozenset({"", "json", "tool_call", "tool_calls", "function_call"})
_PARAM_FOLLOWERS = (PARAMETER_OPEN, FUNCTION_CLOSE, TOOL_CALL_CLOSE)
_CALL_START_RE = re.compile(r"[A-Za-z_][\w.\-]*\s*\(")
_CALL_START_PREFIX_RE = re.compile(r"(?:[A-Za-z_][\w.\-]*\s*)?")
_MISTRAL_NAME_RE = re.compile(r"[A-Za-z_][\w.\-]*")
_BUILTIN_CALL_RE = re.compile(r"([A-Za-z_]\w*)\.call\(")
_BUILTIN_PREFIX_RE = re.compile(r"[A-Za-z_]\w*(?:\.(?:c(?:a(?:l(?:l)?)?)?)?)?")
_HARMONY_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_HARMONY_RECIPIENT_RE = re.compile(r"\bto=([^\s<]+)")
# Bare JSON literals small models write inside Python-style calls.
_PY_NAME_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None, "none": None}

SegKind = Literal["content", "reasoning", "call"]


@dataclass(slots=True)
class _Seg:
    kind: SegKind
    text: str = ""
    call: ToolCall | None = None


class _NotCall:
    """Handler verdict: the trigger is ordinary text."""


NOT = _NotCall()
_Step = tuple[list[_Seg], int]
_Calls = tuple[list[ToolCall], int]


def _content(text: str) -> _Seg:
    return _Seg("content", text)


def _call_segs(calls: list[ToolCall]) -> list[_Seg]:
    return [_Seg("call", call=c) for c in calls]


class _Engine:
    """Content-mode scanner shared by the text-tag formats; subclasses add triggers."""

    markers: tuple[str, ...] = ()  # format-specific literal triggers
    drop_tokens: tuple[str, ...] = ()  # end-of-turn tokens removed from content
    bare_json = True  # a `{` at a line start may be a call to a declared tool
    bare_list = False  # a `[` at a line start may be a pythonic call list
    lenient_start = False  # bare calls at the very start may name undeclared tools
    chain_sep: str | None = None  # separator between consecutive bare calls
    think = True

    def __init__(self, tools: ToolIndex, new_id: Callable[[], str], *, in_reasoning: bool) -> None:
        self.tools = tools
        self.new_id = new_id
        self.mode = "reasoning" if in_reasoning else "content"
        self.at_start = True  # no visible content committed yet
        self.chain_from = -1  # just after a chain separator: the next bare call is chained
        literals = [*self.markers, *self.drop_tokens, FENCE]
        if self.think:
            literals.append(THINK_OPEN)
        self.literals = tuple(literals)
        alternatives = [re.escape(m) for m in literals]
        if self.bare_json:
            alternatives.append(r"\{")
        if self.bare_list:
            alternatives.append(r"\[")
        self._trigger_re = re.compile("|".join(alternatives))

    # ---- driver -----------------------------------------------------------------

    def scan(self, text: str, pos: int, *, eos: bool, truncated: bool) -> tuple[list[_Seg], int]:
        out: list[_Seg] = []
        while pos < len(text):
            mode = self.mode
            step = self._step(text, pos, eos, truncated)
            if step is None:
                break
            segs, new_pos = step
            if new_pos == pos and mode == self.mode and not segs:
                raise AssertionError("parser made no progress")  # pragma: no cover
            for seg in segs:
                if seg.kind == "content" and not seg.text.isspace() and seg.text:
                    self.at_start = False
            out.extend(segs)
            pos = new_pos
        return out, pos

    def _need(self, eos: bool) -> _NotCall | None:
        # At end of stream nothing more will come: an incomplete construct is text.
        return NOT if eos else None

    def _step(self, text: str, pos: int, eos: bool, truncated: bool) -> _Step | None:
        if self.mode == "reasoning":
            return self._step_reasoning(text, pos, eos)
        return self._step_content(text, pos, eos, truncated)

    def _step_reasoning(self, text: str, pos: int, eos: bool) -> _Step | None:
        end = text.find(THINK_CLOSE, pos)
        if end >= 0:
            self.mode = "content"
            segs = [_Seg("reasoning", text[pos:end])] if end > pos else []
            return segs, end + len(THINK_CLOSE)
        stop = len(text) if eos else len(text) - partial_suffix(text, pos, (THINK_CLOSE,))
        return ([_Seg("reasoning", text[pos:stop])], stop) if stop > pos else None

    def _step_content(self, text: str, pos: int, eos: bool, truncated: bool) -> _Step | None:
        found = self._find_trigger(text, pos)
        if found is None:
            stop = len(text) if eos else len(text) - partial_suffix(text, pos, self.literals)
            return ([_content(text[pos:stop])], stop) if stop > pos else None
        start, token = found
        if start > pos:
            return [_content(text[pos:start])], start
        result = self._handle(token, text, start, eos, truncated)
        if result is None:
            return None
        if isinstance(result, _NotCall):
            return [_content(token)], start + len(token)
        return result

    def _find_trigger(self, text: str, pos: int) -> tuple[int, str] | None:
        for m in self._trigger_re.finditer(text, pos):
            token = m.group()
            if token in ("{", "[") and not (
                at_line_start(text, m.start()) or self._chained(text, m.start())
            ):
                continue
            return m.start(), token
        return None

    def _chained(self, text: str, i: int) -> bool:
        return self.chain_from >= 0 and not text[self.chain_from : i].strip()

    def _handle(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token == THINK_OPEN:
            self.mode = "reasoning"
            return [], i + len(token)
        if token in self.drop_tokens:
            return [], i + len(token)
        if token == FENCE:
            return self._fence(text, i, eos)
        if token == "{":
            return self._bare_json(text, i, eos)
        if token == "[":
            return self._bare_list(text, i, eos)
        return self._handle_marker(token, text, i, eos, truncated)

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        return NOT

    # ---- shared constructs --------------------------------------------------------

    def _lenient(self, text: str, i: int) -> bool:
        return self.lenient_start and (self.at_start or self._chained(text, i))

    def _bare_json(self, text: str, i: int, eos: bool) -> _Step | _NotCall | None:
        result = self._json_calls(
            text, i, eos, declared_only=not self._lenient(text, i), explicit=False
        )
        if result is None or isinstance(result, _NotCall):
            return result
        calls, end = result
        end2 = self._after_chain(text, end, eos)
        return None if end2 is None else (_call_segs(calls), end2)

    def _bare_list(self, text: str, i: int, eos: bool) -> _Step | _NotCall | None:
        result = self._list_calls(text, i, eos, declared_only=not self._lenient(text, i))
        if result is None or isinstance(result, _NotCall):
            return result
        return _call_segs(result[0]), result[1]

    def _after_chain(self, text: str, end: int, eos: bool) -> int | None:
        """Consume a chain separator after a bare call (Llama's ``{..}; {..}``)."""
        if self.chain_sep is None:
            return end
        j = skip_ws(text, end)
        if j >= len(text):
            return end if eos else None
        if text.startswith(self.chain_sep, j):
            self.chain_from = j + len(self.chain_sep)
            return self.chain_from
        return end

    def _fence(self, text: str, i: int, eos: bool) -> _Step | _NotCall | None:
        """A fenced JSON call (```json ... ```), accepted only for declared tools."""
        newline = text.find("\n", i + len(FENCE))
        if newline < 0:
            return self._need(eos)
        if text[i + len(FENCE) : newline].strip().lower() not in _FENCE_LANGS:
            return NOT
        j = skip_ws(text, newline)
        if j >= len(text):
            return self._need(eos)
        if text[j] not in "{[":
            return NOT
        result = self._json_calls(text, j, eos, declared_only=True, explicit=True)
        if result is None or isinstance(result, _NotCall):
            return result
        calls, end = result
        close = self._close(text, end, (FENCE,), eos)
        return None if close is None else (_call_segs(calls), close)

    def _close(self, text: str, end: int, tags: tuple[str, ...], eos: bool) -> int | None:
        """Position after an optional closing tag following a complete call.

        A missing tag is tolerated (models often stop right after the payload); the
        decision waits until the next non-space text shows whether the tag follows.
        """
        j = skip_ws(text, end)
        for tag in tags:
            if text.startswith(tag, j):
                return j + len(tag)
        if j >= len(text):
            return end if eos else None
        if is_partial_of(text, j, tags):
            return len(text) if eos else None
        return end

    def _json_calls(
        self, text: str, i: int, eos: bool, *, declared_only: bool, explicit: bool
    ) -> _Calls | _NotCall | None:
        end = json_end(text, i)
        if end is None:
            return self._need(eos)
        if end == MALFORMED:
            return NOT
        try:
            payload = loads(text[i:end])
        except ValueError:
            return NOT
        calls = self._calls_from_payload(payload, declared_only=declared_only, explicit=explicit)
        return NOT if calls is None else (calls, end)

    def _calls_from_payload(
        self, payload: Any, *, declared_only: bool, explicit: bool
    ) -> list[ToolCall] | None:
        items = payload if isinstance(payload, list) else [payload]
        calls: list[ToolCall] = []
        for obj in items:
            call = self._call_from_obj(obj, declared_only=declared_only, explicit=explicit)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def _call_from_obj(self, obj: Any, *, declared_only: bool, explicit: bool) -> ToolCall | None:
        """A call from ``{"name", "arguments"|"parameters"}`` (or OpenAI's nested shape).

        Inside explicit call markup the arguments key may be missing: the remaining
        keys are then the arguments (small models flatten them).
        """
        if not isinstance(obj, dict):
            return None
        fn = obj.get("function")
        if isinstance(fn, dict) and "name" in fn:
            obj = fn
        name = obj.get("name")
        if not isinstance(name, str) or not name.strip():
            return None
        if declared_only and self.tools.resolve(name.strip()) is None:
            return None
        for key in ("arguments", "parameters"):
            if key in obj:
                args = decode_arguments(obj[key])
                return None if args is None else self.make_call(name, args)
        if not explicit:
            return None
        return self.make_call(
            name, {k: v for k, v in obj.items() if k not in ("name", "id", "type")}
        )

    def make_call(self, name: str, args: dict[str, Any]) -> ToolCall:
        name = name.strip()
        declared = self.tools.resolve(name)
        if declared is not None:
            schema = self.tools.parameters(declared)
            if schema:
                args = normalize_arguments(args, schema)
            name = declared
        return ToolCall(name=name, arguments=args, id=self.new_id())

    def _list_calls(
        self, text: str, i: int, eos: bool, *, declared_only: bool
    ) -> _Calls | _NotCall | None:
        """``[f(a=1), g(b="x")]`` at ``text[i] == "["``; a JSON list of calls also works."""
        j = skip_ws(text, i + 1)
        if j < len(text) and text[j] == "{":
            return self._json_calls(text, i, eos, declared_only=declared_only, explicit=True)
        if not _CALL_START_RE.match(text, j):
            # Decide early that prose like "[1] see" is not a call, so it streams.
            if not eos and _CALL_START_PREFIX_RE.fullmatch(text, j):
                return None
            return NOT
        end = python_end(text, i)
        if end is None:
            return self._need(eos)
        if end == MALFORMED:
            return NOT
        calls = self._pythonic(text[i:end], declared_only=declared_only)
        return NOT if calls is None else (calls, end)

    def _pythonic(self, source: str, *, declared_only: bool) -> list[ToolCall] | None:
        parsed = parse_python_calls(source)
        if parsed is None:
            return None
        calls: list[ToolCall] = []
        for name, kwargs, positional in parsed:
            declared = self.tools.resolve(name)
            if declared_only and declared is None:
                return None
            if positional:
                # Positional values only make sense against a declared parameter order.
                schema = self.tools.parameters(declared) if declared else None
                props = list((schema or {}).get("properties") or {})
                if len(positional) > len(props):
                    return None
                kwargs = {**dict(zip(props, positional, strict=False)), **kwargs}
            calls.append(self.make_call(name, kwargs))
        return calls or None


def parse_python_calls(source: str) -> list[tuple[str, dict[str, Any], list[Any]]] | None:
    """Calls in a Python expression ``[f(a=1), g("x")]`` or ``f(a=1)``; literals only.

    Uses ``ast`` and never evaluates code: any non-literal argument rejects the text.
    """
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    elements = node.elts if isinstance(node, ast.List) else [node]
    out: list[tuple[str, dict[str, Any], list[Any]]] = []
    try:
        for element in elements:
            if not isinstance(element, ast.Call):
                return None
            name = _dotted_name(element.func)
            if name is None:
                return None
            kwargs: dict[str, Any] = {}
            for kw in element.keywords:
                if kw.arg is None:
                    return None
                kwargs[kw.arg] = _literal(kw.value)
            out.append((name, kwargs, [_literal(a) for a in element.args]))
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None
    return out or None


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id.lower() in _PY_NAME_LITERALS:
        return _PY_NAME_LITERALS[node.id.lower()]
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[Any, Any] = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                raise ValueError("dict unpacking is not a literal")
            out[_literal(key)] = _literal(value)
        return out
    return ast.literal_eval(node)


class _Hermes(_Engine):
    """``<tool_call>{json}</tool_call>``; also accepts Qwen3-Coder XML inside the tag."""

    markers = (TOOL_CALL_OPEN,)

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token == TOOL_CALL_OPEN:
            return self._tool_call_tag(text, i, eos, truncated)
        if token == FUNCTION_OPEN:
            result = self._xml_call(text, i, eos, truncated)
            if result is None or isinstance(result, _NotCall):
                return result
            close = self._close(text, result[1], (TOOL_CALL_CLOSE,), eos)
            return None if close is None else (_call_segs(result[0]), close)
        return NOT

    def _tool_call_tag(
        self, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        j = skip_ws(text, i + len(TOOL_CALL_OPEN))
        if j >= len(text) or is_partial_of(text, j, (FUNCTION_OPEN,)):
            return self._need(eos)
        result: _Calls | _NotCall | None
        if text.startswith(FUNCTION_OPEN, j):
            result = self._xml_call(text, j, eos, truncated)
        elif text[j] in "{[":
            result = self._json_calls(text, j, eos, declared_only=False, explicit=True)
        else:
            return NOT
        if result is None or isinstance(result, _NotCall):
            return result
        calls, end = result
        close = self._close(text, end, (TOOL_CALL_CLOSE,), eos)
        return None if close is None else (_call_segs(calls), close)

    def _xml_call(self, text: str, j: int, eos: bool, truncated: bool) -> _Calls | _NotCall | None:
        """``<function=NAME><parameter=KEY>value</parameter>...</function>``.

        Values are raw text; the schema types them during normalization. A value ends
        at the first ``</parameter>`` followed by another tag, so the closing tag
        may appear inside a value.
        """
        header_end = text.find(">", j)
        if header_end < 0:
            return NOT if eos or "\n" in text[j:] else None
        name = text[j + len(FUNCTION_OPEN) : header_end].strip()
        if not name or "<" in name or "\n" in name:
            return NOT
        params: dict[str, Any] = {}
        k = header_end + 1
        while True:
            k2 = skip_ws(text, k)
            if text.startswith(PARAMETER_OPEN, k2):
                key_end = text.find(">", k2)
                if key_end < 0:
                    return self._need(eos)
                key = text[k2 + len(PARAMETER_OPEN) : key_end].strip()
                if not key or "\n" in key:
                    return NOT
                value_end = self._parameter_end(text, key_end + 1, eos)
                if value_end is None or isinstance(value_end, _NotCall):
                    return value_end
                value = text[key_end + 1 : value_end]
                value = value.removeprefix("\n").removesuffix("\n")
                params[key] = value
                k = value_end + len(PARAMETER_CLOSE)
                continue
            if text.startswith(FUNCTION_CLOSE, k2):
                k = k2 + len(FUNCTION_CLOSE)
                break
            if k2 >= len(text) or is_partial_of(text, k2, (PARAMETER_OPEN, FUNCTION_CLOSE)):
                if not eos:
                    return None
                if truncated:
                    return NOT  # cut off before </function>: more parameters may have followed
                k = len(text)
            break  # other text: the block ends here without </function>
        return [self.make_call(name, params)], k

    @staticmethod
    def _parameter_end(text: str, start: int, eos: bool) -> int | _NotCall | None:
        search = start
        while True:
            end = text.find(PARAMETER_CLOSE, search)
            if end < 0:
                return NOT if eos else None
            after = skip_ws(text, end + len(PARAMETER_CLOSE))
            if after >= len(text) or is_partial_of(text, after, _PARAM_FOLLOWERS):
                return end if eos else None
            if text.startswith(_PARAM_FOLLOWERS, after):
                return end
            search = end + 1


class _Qwen3Coder(_Hermes):
    markers = (TOOL_CALL_OPEN, FUNCTION_OPEN)


class _Llama3(_Engine):
    """Bare ``{"name", "parameters"}`` JSON, ``<|python_tag|>``, ``;``-chained calls."""

    markers = (PYTHON_TAG,)
    drop_tokens = LLAMA_END_TOKENS
    lenient_start = True
    chain_sep = ";"

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token != PYTHON_TAG:
            return NOT
        j = skip_ws(text, i + len(PYTHON_TAG))
        if j >= len(text):
            return self._need(eos)
        if text[j] in "{[":
            result = self._json_calls(text, j, eos, declared_only=False, explicit=True)
            if result is None or isinstance(result, _NotCall):
                return result
            end = self._after_chain(text, result[1], eos)
            return None if end is None else (_call_segs(result[0]), end)
        builtin = _BUILTIN_CALL_RE.match(text, j)
        if builtin and self.tools.resolve(builtin.group(1)) is not None:
            end = python_end(text, builtin.end() - 1)
            if end is None:
                return self._need(eos)
            if end == MALFORMED:
                return NOT
            calls = self._pythonic(
                text[builtin.start(1) : end].replace(".call(", "(", 1), declared_only=True
            )
            return NOT if calls is None else (_call_segs(calls), end)
        if not eos and builtin is None and _BUILTIN_PREFIX_RE.fullmatch(text, j):
            return None  # may still become `name.call(`
        return self._code_interpreter(text, j, eos, truncated)

    def _code_interpreter(
        self, text: str, j: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        """Raw code after the python tag is a call to the built-in code interpreter."""
        name = self.tools.resolve("code_interpreter")
        if name is None:
            return NOT
        ends = [e for e in (text.find(t, j) for t in LLAMA_END_TOKENS) if e >= 0]
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
        return [_Seg("call", call=self.make_call(name, {"code": code}))], stop


class _Pythonic(_Engine):
    """``[f(a=1)]`` (Llama 3.2/4); LFM2 wraps it in ``<|tool_call_start|>``/``<|tool_call_end|>``."""

    markers = (LFM_CALL_OPEN,)
    bare_list = True
    lenient_start = True

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token != LFM_CALL_OPEN:
            return NOT
        j = skip_ws(text, i + len(LFM_CALL_OPEN))
        if j >= len(text):
            return self._need(eos)
        result: _Calls | _NotCall | None
        if text[j] == "[":
            result = self._list_calls(text, j, eos, declared_only=False)
        elif text[j] == "{":
            result = self._json_calls(text, j, eos, declared_only=False, explicit=True)
        else:
            return NOT
        if result is None or isinstance(result, _NotCall):
            return result
        close = self._close(text, result[1], (LFM_CALL_CLOSE,), eos)
        return None if close is None else (_call_segs(result[0]), close)


class _Mistral(_Engine):
    """``[TOOL_CALLS] [{json}, ...]`` (pre-v11) and ``[TOOL_CALLS]name[ARGS]{json}`` (v11+)."""

    markers = (MISTRAL_CALLS,)

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token != MISTRAL_CALLS:
            return NOT
        j = skip_ws(text, i + len(MISTRAL_CALLS))
        if j >= len(text):
            return self._need(eos)
        if text[j] in "{[":
            result = self._json_calls(text, j, eos, declared_only=False, explicit=True)
            if result is None or isinstance(result, _NotCall):
                return result
            return _call_segs(result[0]), result[1]
        name_match = _MISTRAL_NAME_RE.match(text, j)
        if name_match is None:
            return NOT
        k = name_match.end()
        if k >= len(text):
            return self._need(eos)
        if text.startswith(MISTRAL_CALL_ID, k):
            args_at = text.find(MISTRAL_ARGS, k)
            if args_at < 0:
                return self._need(eos)
            k = args_at
        elif is_partial_of(text, k, (MISTRAL_ARGS, MISTRAL_CALL_ID)):
            return self._need(eos)
        if not text.startswith(MISTRAL_ARGS, k):
            return NOT
        a = skip_ws(text, k + len(MISTRAL_ARGS))
        if a >= len(text):
            return self._need(eos)
        if text[a] != "{":
            return NOT
        end = json_end(text, a)
        if end is None:
            return self._need(eos)
        if end == MALFORMED:
            return NOT
        try:
            args = decode_arguments(loads(text[a:end]))
        except ValueError:
            return NOT
        if args is None:
            return NOT
        return [_Seg("call", call=self.make_call(name_match.group(), args))], end


class _DeepSeek(_Engine):
    """DeepSeek V3/R1 (``function`` SEP ``NAME`` + fenced JSON) and V3.1 (``NAME`` SEP ``{json}``)
    between call-begin/call-end tokens, inside a calls-begin/calls-end block."""

    markers = (DS_CALLS_BEGIN, DS_CALL_BEGIN)

    def _step(self, text: str, pos: int, eos: bool, truncated: bool) -> _Step | None:
        if self.mode != "calls":
            return super()._step(text, pos, eos, truncated)
        j = skip_ws(text, pos)
        if text.startswith(DS_CALLS_END, j):
            self.mode = "content"
            return [], j + len(DS_CALLS_END)
        if text.startswith(DS_CALL_BEGIN, j):
            result = self._one_call(text, j, eos, truncated)
            if result is None:
                return None
            if isinstance(result, _NotCall):
                self.mode = "content"
                return [_content(DS_CALL_BEGIN)], j + len(DS_CALL_BEGIN)
            return result
        if j >= len(text) or is_partial_of(text, j, (DS_CALLS_END, DS_CALL_BEGIN)):
            return ([], len(text)) if eos else None
        self.mode = "content"
        return [], pos

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token == DS_CALLS_BEGIN:
            self.mode = "calls"
            return [], i + len(DS_CALLS_BEGIN)
        if token == DS_CALL_BEGIN:
            return self._one_call(text, i, eos, truncated)
        return NOT

    def _one_call(self, text: str, i: int, eos: bool, truncated: bool) -> _Step | _NotCall | None:
        k = i + len(DS_CALL_BEGIN)
        sep = text.find(DS_SEP, k)
        if sep < 0:
            too_long = len(text) - k > 256 or DS_CALL_END in text[k:]
            return NOT if eos or too_long else None
        head = text[k:sep].strip()
        p = sep + len(DS_SEP)
        if head in ("function", ""):
            newline = text.find("\n", p)
            if newline < 0:
                return self._need(eos)
            name = text[p:newline].strip()
            q = skip_ws(text, newline)
            if text.startswith(FENCE, q):
                fence_nl = text.find("\n", q)
                if fence_nl < 0:
                    return self._need(eos)
                q = skip_ws(text, fence_nl)
            elif is_partial_of(text, q, (FENCE,)):
                return self._need(eos)
        else:
            name, q = head, skip_ws(text, p)
        if q >= len(text):
            return self._need(eos)
        if not name or text[q] != "{":
            return NOT
        end = json_end(text, q)
        if end is None:
            return self._need(eos)
        if end == MALFORMED:
            return NOT
        try:
            args = decode_arguments(loads(text[q:end]))
        except ValueError:
            return NOT
        if args is None:
            return NOT
        e = skip_ws(text, end)
        if text.startswith(FENCE, e):
            end = e + len(FENCE)
        elif is_partial_of(text, e, (FENCE,)) and not eos:
            return None
        close = self._close(text, end, (DS_CALL_END,), eos)
        if close is None:
            return None
        return [_Seg("call", call=self.make_call(name, args))], close


class _GptOss(_Engine):
    """Harmony: analysis channel is reasoning, final/commentary is content,
    ``to=functions.NAME`` messages are calls."""

    markers = (HARMONY_START, HARMONY_CHANNEL, *HARMONY_ENDS)
    bare_json = False
    think = False

    def __init__(self, tools: ToolIndex, new_id: Callable[[], str], *, in_reasoning: bool) -> None:
        super().__init__(tools, new_id, in_reasoning=False)
        self.mode = "analysis" if in_reasoning else "content"

    def _step(self, text: str, pos: int, eos: bool, truncated: bool) -> _Step | None:
        if self.mode == "content":
            return self._step_content(text, pos, eos, truncated)
        kind: SegKind = "reasoning" if self.mode == "analysis" else "content"
        stops = (*HARMONY_ENDS, HARMONY_START, HARMONY_CHANNEL)
        hits = [(text.find(s, pos), s) for s in stops]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            at, token = min(hits)
            self.mode = "content"
            segs = [_Seg(kind, text[pos:at])] if at > pos else []
            return segs, (at + len(token) if token in HARMONY_ENDS else at)
        stop = len(text) if eos else len(text) - partial_suffix(text, pos, stops)
        return ([_Seg(kind, text[pos:stop])], stop) if stop > pos else None

    def _handle_marker(
        self, token: str, text: str, i: int, eos: bool, truncated: bool
    ) -> _Step | _NotCall | None:
        if token in HARMONY_ENDS:
            return [], i + len(token)  # stray end-of-message token
        body_at = text.find(HARMONY_MESSAGE, i)
        if body_at < 0:
            return self._need(eos)
        header = text[i:body_at]
        body = body_at + len(HARMONY_MESSAGE)
        channel = _HARMONY_CHANNEL_RE.search(header)
        recipient = _HARMONY_RECIPIENT_RE.search(header)
        if recipient is None:
            self.mode = "analysis" if channel and channel.group(1) == "analysis" else "final"
            return [], body
        name = recipient.group(1).removeprefix("functions.")
        j = skip_ws(text, body)
        if j >= len(text):
            return self._need(eos)
        if text[j] not in "{":
            return NOT
        end = json_end(text, j)
        if end is None:
            return self._need(eos)
        if end == MALFORMED:
            return NOT
        try:
            args = decode_arguments(loads(text[j:end]))
        except ValueError:
            return NOT
        if args is None or not name:
            return NOT
        close = self._close(text, end, HARMONY_ENDS, eos)
        if close is None:
            return None
        return [_Seg("call", call=self.make_call(name, args))], close


_ENGINES: dict[str, type[_Engine]] = {
    "hermes": _Hermes,
    "qwen3_coder": _Qwen3Coder,
    "llama3_json": _Llama3,
    "pythonic": _Pythonic,
    "mistral": _Mistral,
    "gpt_oss": _GptOss,
    "deepseek_v3": _DeepSeek,
}


def check_format(fmt: str) -> str:
    if fmt not in _ENGINES:
        raise ValueError(f"unknown tool-call format {fmt!r}; supported: {', '.join(FORMATS)}")
    return fmt


def new_call_id(fmt: str) -> str:
    """A fresh tool call id in the form ``fmt``'s chat template accepts."""
    return mistral_call_id() if fmt == "mistral" else openai_call_id()


def _engine(tools: list[dict[str, Any]] | None, fmt: str, in_reasoning: bool) -> _Engine:
    engine_cls = _ENGINES[check_format(fmt)]
    return engine_cls(ToolIndex(tools), lambda: new_call_id(fmt), in_reasoning=in_reasoning)


def parse_tool_calls(
    text: str,
    tools: list[dict[str, Any]],
    fmt: str,
    *,
    truncated: bool = False,
    in_reasoning: bool = False,
) -> ParsedOutput:
    """Split a complete generation into content, reasoning and tool calls.

    ``truncated=True`` (generation hit max_tokens) turns an unfinished call into
    content. ``in_reasoning=True`` when the prompt already opened a ``<think>``
    block (or, for gpt_oss, the analysis channel).
    """
    engine = _engine(tools, fmt, in_reasoning)
    segs, _ = engine.scan(text, 0, eos=True, truncated=truncated)
    content = "".join(s.text for s in segs if s.kind == "content").strip()
    reasoning = "".join(s.text for s in segs if s.kind == "reasoning").strip()
    return ParsedOutput(
        content=content or None,
        tool_calls=[s.call for s in segs if s.call is not None],
        reasoning=reasoning or None,
    )


class _TrimmedStream:
    """Re-chunks text so the concatenation equals ``"".join(all).strip()``: leading
    whitespace is dropped and trailing whitespace is held until more text follows."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body) :]
        return body


class StreamingToolParser:
    """Incremental counterpart of :func:`parse_tool_calls`.

    ``feed`` returns OpenAI-shaped deltas as soon as they are final. A call is
    emitted once complete and normalized, as two deltas: a header
    ``{index, id, type: "function", function: {name, arguments: ""}}`` and then
    ``{index, function: {arguments: <full JSON>}}``. Concatenated deltas always
    equal ``parse_tool_calls`` on the full text.
    """

    def __init__(
        self, tools: list[dict[str, Any]], fmt: str, *, in_reasoning: bool = False
    ) -> None:
        self._engine = _engine(tools, fmt, in_reasoning)
        self._text = ""
        self._pos = 0
        self._content = _TrimmedStream()
        self._reasoning = _TrimmedStream()
        self._calls: list[ToolCall] = []
        self._finished = False

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Calls emitted so far (for finish_reason and the non-streamed message)."""
        return list(self._calls)

    def feed(self, delta: str) -> list[StreamDelta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._text += delta
        return self._advance(eos=False, truncated=False)

    def finish(self, truncated: bool = False) -> list[StreamDelta]:
        """Flush at end of generation; ``truncated`` means it stopped at max_tokens."""
        if self._finished:
            return []
        out = self._advance(eos=True, truncated=truncated)
        self._finished = True
        return out

    def _advance(self, *, eos: bool, truncated: bool) -> list[StreamDelta]:
        segs, self._pos = self._engine.scan(self._text, self._pos, eos=eos, truncated=truncated)
        out: list[StreamDelta] = []
        for seg in segs:
            if seg.call is not None:
                index = len(self._calls)
                self._calls.append(seg.call)
                header: ToolCallDelta = {
                    "index": index,
                    "id": seg.call.id,
                    "type": "function",
                    "function": {"name": seg.call.name, "arguments": ""},
                }
                body: ToolCallDelta = {
                    "index": index,
                    "function": {"arguments": seg.call.arguments_json},
                }
                out += [StreamDelta(tool_call=header), StreamDelta(tool_call=body)]
            elif seg.kind == "reasoning":
                text = self._reasoning.push(seg.text)
                if text:
                    out.append(StreamDelta(reasoning=text))
            else:
                text = self._content.push(seg.text)
                if text:
                    out.append(StreamDelta(content=text))
        return out
