"""The parsing engine every format's parser is built on.

The engine walks the text left to right and, at each point, either commits a
segment (content, reasoning or a complete call) or answers "need more text". It
only commits when no later text could change the decision, so feeding a text in any
chunking yields the same segments as parsing it whole. Formats subclass ``Engine``
and add their triggers (``markers``) and handlers (``handle_marker``).

A call still being written is described by ``Engine.partial`` (its name and the
members of its arguments seen so far), which the streaming parser turns into
argument fragments. Once a call has streamed (its arguments text reached
``STREAM_AFTER`` characters with its name known) it can no longer turn back into
content, so a later error or the end of the text ends it as a call with the
arguments seen so far, in one-shot parsing exactly as in streaming.

Long constructs are scanned by resumable scanners kept in ``memo`` (keyed by their
start), so streaming costs time linear in the text length.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from ._json import JsonScan, ObjectTrack, decode_span
from ._scan import (
    MALFORMED,
    PythonScan,
    at_line_start,
    decode_arguments,
    is_partial_of,
    loads,
    partial_suffix,
    skip_ws,
)
from ._xml import XmlScan, XmlSyntax
from .results import ToolCall
from .schema import ToolIndex, normalize_arguments

THINK_TAGS = (("<think>", "</think>"),)
FENCE = "```"
# A call's arguments stream once this much of their text exists: shorter calls
# arrive whole (and a short call cut off by max_tokens is still content).
STREAM_AFTER = 64

_FENCE_LANGS = frozenset({"", "json", "tool_call", "tool_calls", "function_call"})
_CALL_START_RE = re.compile(r"[A-Za-z_][\w.\-]*\s*\(")
_CALL_START_PREFIX_RE = re.compile(r"(?:[A-Za-z_][\w.\-]*\s*)?")
# Bare JSON literals small models write inside Python-style calls.
_PY_NAME_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None, "none": None}

SegKind = Literal["content", "reasoning", "call"]
_T = TypeVar("_T")


@dataclass(slots=True)
class Seg:
    kind: SegKind
    text: str = ""
    call: ToolCall | None = None
    origin: int = -1  # where the call's construct began


class NotCall:
    """Handler verdict: the trigger is ordinary text."""


NOT = NotCall()
Step = tuple[list[Seg], int]
Calls = tuple[list[ToolCall], int]
Verdict = Step | NotCall | None


@dataclass(slots=True)
class PartialCall:
    """A call still being written: its name and the arguments members seen so far.

    ``pairs`` are complete members as ``(key, start, end)`` spans: JSON values, or
    literal text when ``raw`` (XML-style formats). ``open_key`` is a string value
    still being written, whose text so far is ``text[open_start:open_end]`` (a JSON
    string body unless ``raw``). ``broken``: members after ``pairs`` are not plain.
    """

    start: int
    name: str
    name_at: int
    args_start: int
    pairs: list[tuple[str, int, int]] = field(default_factory=list[tuple[str, int, int]])
    broken: bool = False
    open_key: str | None = None
    open_start: int = 0
    open_end: int = 0
    raw: bool = False

    def streams_at(self, length: int) -> bool:
        """Whether the call had started streaming when the text was ``length`` long."""
        return max(self.args_start + STREAM_AFTER, self.name_at) <= length

    def value(self, text: str, start: int, end: int) -> Any:
        return text[start:end] if self.raw else decode_span(text, start, end)

    def open_text(self, text: str, end: int | None = None) -> str:
        """The open string value's characters up to ``end`` (default: all there are)."""
        stop = self.open_end if end is None else end
        if self.raw:
            return text[self.open_start : stop]
        return loads('"' + text[self.open_start : safe_json_end(text, self.open_start, stop)] + '"')

    def arguments(self, text: str) -> dict[str, Any]:
        """The arguments as far as they were written (a cut-off call's final arguments)."""
        out: dict[str, Any] = {}
        for key, a, b in self.pairs:
            try:
                out.setdefault(key, self.value(text, a, b))
            except ValueError:
                return out
        if self.open_key is not None and not self.broken:
            out.setdefault(self.open_key, self.open_text(text))
        return out


def safe_json_end(text: str, start: int, end: int) -> int:
    """``end`` moved back so ``text[start:end]`` does not stop inside an escape, nor
    after the first half of a surrogate pair (decoded alone it is not a character)."""
    end = min(end, len(text))
    k = text.rfind("\\", max(start, end - 12), end)
    while k > start and text[k - 1] == "\\":
        # Find the backslash that starts an escape: count the run before it.
        run = k - 1
        while run > start and text[run - 1] == "\\":
            run -= 1
        if (k - run) % 2:
            k = text.rfind("\\", max(start, end - 12), run) if run > start else -1
            if k < 0:
                return end
            continue
        break
    if k < start:
        return end
    tail = text[k:end]
    if len(tail) < 2 or (tail[1] == "u" and len(tail) < 6):
        return k
    if tail[1] == "u" and len(tail) == 6 and 0xD800 <= int(tail[2:6], 16) <= 0xDBFF:
        return k
    return end


class Engine:
    """Content-mode scanner shared by all formats; subclasses add triggers."""

    markers: tuple[str, ...] = ()  # format-specific literal triggers
    drop_tokens: tuple[str, ...] = ()  # end-of-turn tokens removed from content
    bare_json = True  # a `{` at a line start may be a call to a declared tool
    bare_list = False  # a `[` at a line start may be a pythonic call list
    lenient_start = False  # bare calls at the very start may name undeclared tools
    chain_sep: str | None = None  # separator between consecutive bare calls
    think_tags: tuple[tuple[str, str], ...] = THINK_TAGS
    # The prompt usually opens the think block (DeepSeek R1/V3.1, MiniMax-M2): text
    # before a first close tag is reasoning.
    implicit_reasoning = False

    def __init__(
        self, tools: ToolIndex, new_id: Callable[[], str], *, in_reasoning: bool | None
    ) -> None:
        self.tools = tools
        self.new_id = new_id
        self.think_close = self.think_tags[0][1] if self.think_tags else ""
        if in_reasoning is None:
            self.mode = "maybe_reasoning" if self.implicit_reasoning else "content"
        else:
            self.mode = "reasoning" if in_reasoning else "content"
        self.at_start = True  # no visible content committed yet
        self.chain_from = -1  # just after a chain separator: the next bare call is chained
        self.partial: PartialCall | None = None
        self.memo: dict[Any, Any] = {}
        literals = [*self.markers, *self.drop_tokens, FENCE, *(o for o, _ in self.think_tags)]
        self.literals = tuple(literals)
        alternatives = [re.escape(m) for m in literals]
        if self.bare_json:
            alternatives.append(r"\{")
        if self.bare_list:
            alternatives.append(r"\[")
        self._trigger_re = re.compile("|".join(alternatives))
        self._marker_re = re.compile(
            "|".join(re.escape(m) for m in (*self.markers, *(o for o, _ in self.think_tags)))
        )

    # ---- driver -----------------------------------------------------------------

    def scan(self, text: str, pos: int, *, eos: bool, truncated: bool) -> tuple[list[Seg], int]:
        out: list[Seg] = []
        while pos < len(text) or (eos and self.mode == "maybe_reasoning"):
            mode = self.mode
            self.partial = None
            step = self._step(text, pos, eos, truncated)
            if step is None:
                break
            segs, new_pos = step
            if new_pos == pos and mode == self.mode and not segs:
                raise AssertionError("parser made no progress")  # pragma: no cover
            if new_pos > pos:
                self.memo.clear()  # the pending construct was resolved
            for seg in segs:
                if seg.kind == "content" and not seg.text.isspace() and seg.text:
                    self.at_start = False
            out.extend(segs)
            pos = new_pos
        return out, pos

    def cached(self, key: Any, make: Callable[[], _T]) -> _T:
        """A resumable scanner for the construct at ``key``, kept until it resolves."""
        found = self.memo.get(key)
        if found is None:
            found = self.memo[key] = make()
        return found

    def find(self, text: str, tag: str, start: int) -> int:
        """``text.find(tag, start)``, resuming where the last unsuccessful search ended."""
        key = ("find", tag, start)
        searched = self.memo.get(key, start)
        at = text.find(tag, searched)
        if at < 0:
            self.memo[key] = max(start, len(text) - len(tag) + 1)
        return at

    def need(self, eos: bool) -> NotCall | None:
        # At end of stream nothing more will come: an incomplete construct is text.
        return NOT if eos else None

    def _step(self, text: str, pos: int, eos: bool, truncated: bool) -> Step | None:
        if self.mode == "reasoning":
            return self._step_reasoning(text, pos, eos)
        if self.mode == "code":
            return self._step_code(text, pos, eos)
        if self.mode == "maybe_reasoning":
            return self._step_maybe_reasoning(text, pos, eos)
        return self.step_content(text, pos, eos, truncated)

    def _step_reasoning(self, text: str, pos: int, eos: bool) -> Step | None:
        close = self.think_close
        end = text.find(close, pos)
        if end >= 0:
            self.mode = "content"
            segs = [Seg("reasoning", text[pos:end])] if end > pos else []
            return segs, end + len(close)
        stop = len(text) if eos else len(text) - partial_suffix(text, pos, (close,))
        return ([Seg("reasoning", text[pos:stop])], stop) if stop > pos else None

    def _step_maybe_reasoning(self, text: str, pos: int, eos: bool) -> Step | None:
        close = self.find(text, self.think_close, pos)
        key = ("marker", pos)
        marker = self._marker_re.search(text, self.memo.get(key, pos))
        if close >= 0 and (marker is None or marker.start() > close):
            self.mode = "content"
            segs = [Seg("reasoning", text[pos:close])] if close > pos else []
            return segs, close + len(self.think_close)
        if marker is not None or eos:
            self.mode = "content"  # the text opened no reasoning: it is content
            return [], pos
        self.memo[key] = max(pos, len(text) - max(len(m) for m in self.literals))
        return None

    def _step_code(self, text: str, pos: int, eos: bool) -> Step | None:
        """Inside a fenced code block: prose, even if it shows call syntax."""
        end = text.find(FENCE, pos)
        if end >= 0:
            self.mode = "content"
            return [Seg("content", text[pos : end + len(FENCE)])], end + len(FENCE)
        stop = len(text) if eos else len(text) - partial_suffix(text, pos, (FENCE,))
        return ([Seg("content", text[pos:stop])], stop) if stop > pos else None

    def step_content(self, text: str, pos: int, eos: bool, truncated: bool) -> Step | None:
        found = self._find_trigger(text, pos)
        if found is None:
            stop = len(text) if eos else len(text) - partial_suffix(text, pos, self.literals)
            return ([Seg("content", text[pos:stop])], stop) if stop > pos else None
        start, token = found
        if start > pos:
            return [Seg("content", text[pos:start])], start
        result = self._handle(token, text, start, eos, truncated)
        if result is None:
            return None
        if isinstance(result, NotCall):
            return [Seg("content", token)], start + len(token)
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

    def _handle(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        for open_tag, close_tag in self.think_tags:
            if token == open_tag:
                self.mode, self.think_close = "reasoning", close_tag
                return [], i + len(token)
        if token in self.drop_tokens:
            return [], i + len(token)
        if token == FENCE:
            return self._fence(text, i, eos)
        if token == "{":
            return self._bare_json(text, i, eos)
        if token == "[":
            return self._bare_list(text, i, eos)
        return self.handle_marker(token, text, i, eos, truncated)

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        return NOT

    # ---- shared constructs --------------------------------------------------------

    def _lenient(self, text: str, i: int) -> bool:
        return self.lenient_start and (self.at_start or self._chained(text, i))

    def _bare_json(self, text: str, i: int, eos: bool) -> Verdict:
        result = self.json_calls(
            text, i, eos, start=i, declared_only=not self._lenient(text, i), explicit=False
        )
        if result is None or isinstance(result, NotCall):
            return result
        calls, end = result
        end2 = self.after_chain(text, end, eos)
        return None if end2 is None else (call_segs(calls, i), end2)

    def _bare_list(self, text: str, i: int, eos: bool) -> Verdict:
        result = self.list_calls(text, i, eos, declared_only=not self._lenient(text, i))
        if result is None or isinstance(result, NotCall):
            return result
        return call_segs(result[0], i), result[1]

    def after_chain(self, text: str, end: int, eos: bool) -> int | None:
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

    def _fence(self, text: str, i: int, eos: bool) -> Verdict:
        """A fenced JSON call (```json ... ```) for a declared tool; any other fenced
        block is prose, call syntax shown in it included."""
        newline = text.find("\n", i + len(FENCE))
        if newline < 0:
            return self.need(eos)
        verdict = self._fenced_call(text, i, newline, eos)
        if isinstance(verdict, NotCall):
            self.mode = "code"
            return [Seg("content", text[i : newline + 1])], newline + 1
        return verdict

    def _fenced_call(self, text: str, i: int, newline: int, eos: bool) -> Verdict:
        if text[i + len(FENCE) : newline].strip().lower() not in _FENCE_LANGS:
            return NOT
        j = skip_ws(text, newline)
        if j >= len(text):
            return self.need(eos)
        if text[j] not in "{[":
            return NOT
        result = self.json_calls(text, j, eos, start=i, declared_only=True, explicit=True)
        if result is None or isinstance(result, NotCall):
            return result
        calls, end = result
        close = self.close(text, end, (FENCE,), eos)
        return None if close is None else (call_segs(calls, i), close)

    def close(self, text: str, end: int, tags: tuple[str, ...], eos: bool) -> int | None:
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

    def closed(
        self,
        result: Calls | NotCall | None,
        text: str,
        start: int,
        tags: tuple[str, ...],
        eos: bool,
    ) -> Verdict:
        """A handler's calls followed by an optional closing tag, as a step."""
        if result is None or isinstance(result, NotCall):
            return result
        end = self.close(text, result[1], tags, eos)
        return None if end is None else (call_segs(result[0], start), end)

    @staticmethod
    def as_step(result: Calls | NotCall | None, start: int) -> Verdict:
        if result is None or isinstance(result, NotCall):
            return result
        return call_segs(result[0], start), result[1]

    # ---- JSON payloads ----------------------------------------------------------------

    def json_calls(
        self,
        text: str,
        j: int,
        eos: bool,
        *,
        start: int,
        name: str | None = None,
        declared_only: bool = False,
        explicit: bool = True,
    ) -> Calls | NotCall | None:
        """Calls from the JSON value at ``text[j]``.

        With ``name`` the value is the arguments object of a call to ``name``;
        without, a call envelope ``{"name", "arguments"}`` or a list of them. A call
        whose arguments are an object streams them while they are written.
        """
        scan = self.cached(("json", j), lambda: JsonScan(j, track=1 if name else 2))
        scan.advance(text)
        partial = self._json_partial(text, scan, start, name, declared_only)
        if scan.pending:
            if not eos:
                self.partial = partial
                return None
            return self.cut_off(text, partial, len(text), len(text))
        if scan.failed or scan.end is None:
            return self.cut_off(text, partial, scan.fail_at, scan.fail_at + 1)
        try:
            payload = scan.decode(text)
        except ValueError:
            return self.cut_off(text, partial, scan.end - 1, scan.end)
        if name is not None:
            args = decode_arguments(payload)
            calls = None if args is None else [self.make_call(name, args)]
        else:
            calls = self.calls_from_payload(payload, declared_only=declared_only, explicit=explicit)
        if calls is None:
            return self.cut_off(text, partial, scan.end - 1, scan.end)
        return calls, scan.end

    def arguments_after(
        self, text: str, k: int, eos: bool, *, start: int, name: str
    ) -> Calls | NotCall | None:
        """The arguments object of a call to ``name``, after optional space at ``k``."""
        j = skip_ws(text, k)
        if j >= len(text):
            return self.need(eos)
        if text[j] != "{":
            return NOT
        return self.json_calls(text, j, eos, start=start, name=name)

    def _json_partial(
        self, text: str, scan: JsonScan, start: int, name: str | None, declared_only: bool
    ) -> PartialCall | None:
        root = scan.root
        if root is None:
            return None
        if name is not None:
            return self._track_partial(text, scan, root, start, name, len(text), scan.start)
        # An envelope: its name member first, then the arguments object being written.
        span = next(((a, b) for key, a, b in root.pairs if key == "name"), None)
        if span is None:
            return None
        name_at = span[1]
        try:
            # Decoded once: the envelope is revisited on every feed.
            found = self.cached(("name", span[0]), lambda: decode_span(text, *span))
        except ValueError:
            return None
        if not isinstance(found, str) or not found.strip():
            return None
        if declared_only and self.tools.resolve(found.strip()) is None:
            return None
        args = root.children.get("arguments") or root.children.get("parameters")
        if args is None or args is not root.children.get(root.key):
            return None
        return self._track_partial(text, scan, args, start, found, name_at, root.value_start)

    @staticmethod
    def _track_partial(
        text: str,
        scan: JsonScan,
        track: ObjectTrack,
        start: int,
        name: str,
        name_at: int,
        args_start: int,
    ) -> PartialCall:
        partial = PartialCall(start, name, name_at, args_start, list(track.pairs), track.broken)
        opened = track.open_string
        if opened is not None and not track.broken and scan.pending:
            partial.open_key, partial.open_start = opened
            partial.open_end = min(scan.i, len(text))
        return partial

    def cut_off(
        self, text: str, partial: PartialCall | None, length: int, end: int
    ) -> Calls | NotCall:
        """A construct that failed (or ended) when the text was ``length`` long: text,
        unless its call had already streamed, which then ends with what it had."""
        if partial is None or not partial.streams_at(length):
            return NOT
        return [self.make_call(partial.name, partial.arguments(text))], end

    def calls_from_payload(
        self, payload: Any, *, declared_only: bool, explicit: bool
    ) -> list[ToolCall] | None:
        items = payload if isinstance(payload, list) else [payload]
        calls: list[ToolCall] = []
        for obj in items:
            call = self.call_from_obj(obj, declared_only=declared_only, explicit=explicit)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def call_from_obj(self, obj: Any, *, declared_only: bool, explicit: bool) -> ToolCall | None:
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

    # ---- Python-style calls ---------------------------------------------------------

    def list_calls(
        self, text: str, i: int, eos: bool, *, declared_only: bool
    ) -> Calls | NotCall | None:
        """``[f(a=1), g(b="x")]`` at ``text[i] == "["``; a JSON list of calls also works."""
        j = skip_ws(text, i + 1)
        if j < len(text) and text[j] == "{":
            return self.json_calls(text, i, eos, start=i, declared_only=declared_only)
        if not _CALL_START_RE.match(text, j):
            # Decide early that prose like "[1] see" is not a call, so it streams.
            if not eos and _CALL_START_PREFIX_RE.fullmatch(text, j):
                return None
            return NOT
        end = self.python_end(text, i)
        if end is None:
            return self.need(eos)
        if end == MALFORMED:
            return NOT
        calls = self.pythonic(text[i:end], declared_only=declared_only)
        return NOT if calls is None else (calls, end)

    def python_end(self, text: str, i: int) -> int | None:
        """Where the bracketed Python expression at ``text[i]`` ends (``PythonScan``)."""
        return self.cached(("python", i), lambda: PythonScan(i)).advance(text)

    def pythonic(self, source: str, *, declared_only: bool) -> list[ToolCall] | None:
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

    def xml_params(
        self,
        text: str,
        k: int,
        eos: bool,
        truncated: bool,
        *,
        start: int,
        name: str,
        syntax: XmlSyntax,
    ) -> Calls | NotCall | None:
        """The parameters after a call header that ends at ``k`` (XML-style formats)."""
        scan = self.cached(("xml", k), lambda: XmlScan(syntax, k, self.declared_keys(name)))
        end = scan.advance(text, eos, truncated)
        partial = PartialCall(start, name, k, k, list(scan.params), raw=True)
        if scan.open is not None:
            partial.open_key, partial.open_start, partial.open_end = scan.open
        if end is None:
            self.partial = partial
            return None
        if end < 0:
            return self.cut_off(text, partial, len(text), len(text))
        params: dict[str, Any] = {}
        for key, a, b in scan.params:
            params.setdefault(key, text[a:b])
        return [self.make_call(name, params)], end

    def declared_keys(self, name: str) -> frozenset[str]:
        declared = self.tools.resolve(name.strip())
        schema = self.tools.parameters(declared) if declared else None
        props = (schema or {}).get("properties")
        return frozenset(props) if isinstance(props, dict) else frozenset()


def call_segs(calls: list[ToolCall], origin: int) -> list[Seg]:
    return [Seg("call", call=c, origin=origin) for c in calls]


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


class SectionEngine(Engine):
    """Calls inside a section: ``section_begin`` (call_begin … call end)+ ``section_end``
    (DeepSeek, Kimi K2, MiniMax-M2). Subclasses parse one call in ``one_call``."""

    section_begin = ""
    section_end = ""
    call_begin = ""

    def one_call(self, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        raise NotImplementedError

    def _step(self, text: str, pos: int, eos: bool, truncated: bool) -> Step | None:
        if self.mode != "calls":
            return super()._step(text, pos, eos, truncated)
        j = skip_ws(text, pos)
        if text.startswith(self.section_end, j):
            self.mode = "content"
            return [], j + len(self.section_end)
        if text.startswith(self.call_begin, j):
            result = self.one_call(text, j, eos, truncated)
            if result is None:
                return None
            if isinstance(result, NotCall):
                self.mode = "content"
                return [Seg("content", self.call_begin)], j + len(self.call_begin)
            return result
        if j >= len(text) or is_partial_of(text, j, (self.section_end, self.call_begin)):
            return ([], len(text)) if eos else None
        self.mode = "content"
        return [], pos

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        if token == self.section_begin:
            self.mode = "calls"
            return [], i + len(token)
        if token == self.call_begin:
            return self.one_call(text, i, eos, truncated)
        return NOT


class MarkedJsonEngine(Engine):
    """A marker, then a call envelope or a JSON list of them, then an optional
    ``call_close`` (Granite, Phi-4-mini, Hunyuan)."""

    call_close: tuple[str, ...] = ()

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        j = skip_ws(text, i + len(token))
        if j >= len(text):
            return self.need(eos)
        if text[j] not in "{[":
            return NOT
        return self.closed(self.json_calls(text, j, eos, start=i), text, i, self.call_close, eos)
