"""Tool-call parsing for every registered format, one-shot and streaming.

Both entry points drive the format's engine (see ``_engine``), so feeding a text in
any chunking yields what parsing it whole does. Streaming sends a call's name (and
id) once its arguments start to stream and then argument fragments as the model
writes them, each a true prefix of the final (normalized) arguments JSON: only what
normalization cannot change is sent early, the rest when the call is complete.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from ._engine import Engine, PartialCall, Seg, safe_json_end
from ._scan import dumps, loads
from .registry import FORMATS, check_format, get_format
from .results import ParsedOutput, StreamDelta, ToolCall, ToolCallDelta
from .schema import ToolIndex, is_verbatim_string, normalize_property, object_properties

__all__ = ["FORMATS", "StreamingToolParser", "check_format", "new_call_id", "parse_tool_calls"]

_log = logging.getLogger(__name__)
# What a JSON string body escapes (``dumps`` with ``ensure_ascii=False``); text
# without these reads and writes the same as JSON and as raw text.
_NEEDS_ESCAPE = re.compile(r'[\x00-\x1f\\"]')


def new_call_id(fmt: str) -> str:
    """A fresh tool call id in the form ``fmt``'s chat template accepts."""
    return get_format(fmt).new_call_id()


def _engine(tools: list[dict[str, Any]] | None, fmt: str, in_reasoning: bool | None) -> Engine:
    spec = get_format(fmt)
    return spec.engine(ToolIndex(tools), spec.new_call_id, in_reasoning=in_reasoning)


def parse_tool_calls(
    text: str,
    tools: list[dict[str, Any]],
    fmt: str,
    *,
    truncated: bool = False,
    in_reasoning: bool | None = None,
) -> ParsedOutput:
    """Split a complete generation into content, reasoning and tool calls.

    ``truncated=True`` (generation hit max_tokens) turns an unfinished call into
    content, unless it had started streaming (then it ends with the arguments
    written so far). ``in_reasoning=True`` when the prompt already opened a think
    block (or, for gpt_oss, the analysis channel); ``None`` lets the format decide
    (DeepSeek and MiniMax templates open it, so text before a first ``</think>`` is
    reasoning there).
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


class _ArgumentStream:
    """Argument fragments of one call still being written.

    Members are sent in order while each is settled: its key is a declared property
    (or the tool declares no schema) and its value is complete, normalized on its
    own. A string value whose normalization keeps any string streams character by
    character. The first unsettled member stops the stream until the call is done.
    """

    def __init__(self, tools: ToolIndex, name: str) -> None:
        declared = tools.resolve(name.strip())
        self.schema = tools.parameters(declared) if declared is not None else None
        self.props = object_properties(self.schema) if self.schema else None
        # Fragments sent so far, and those of the open string value: kept as lists,
        # since growing one string per feed would copy it whole each time.
        self.emitted: list[str] = []
        self.done = 0
        self.stopped = False
        self.open_key: str | None = None
        self.open_upto = 0
        self.open_text: list[str] = []

    def _normalized(self, key: str, value: Any) -> tuple[bool, Any]:
        if not self.schema:
            return True, value  # no schema: arguments pass through as written
        if self.props is None or key not in self.props:
            return False, None
        return True, normalize_property(self.schema, key, value)

    def _verbatim(self, key: str) -> bool:
        return not self.schema or is_verbatim_string(self.schema, key)

    def _separator(self) -> str:
        return ", " if self.emitted else "{"

    def update(self, text: str, partial: PartialCall) -> str:
        if self.stopped:
            return ""
        pieces: list[str] = []
        seen = {key for key, _, _ in partial.pairs[: self.done]}
        for key, a, b in partial.pairs[self.done :]:
            try:
                ok, value = self._normalized(key, partial.value(text, a, b))
            except ValueError:
                ok, value = False, None
            if not ok or key in seen:
                self.stopped = True
                break
            if self.open_key == key:
                rest, sent = dumps(value)[1:], "".join(self.open_text)
                if not isinstance(value, str) or not rest.startswith(sent):
                    self.stopped = True
                    break
                pieces.append(rest[len(sent) :])
                self.open_key, self.open_text = None, []
            else:
                pieces.append(self._separator() + dumps(key) + ": " + dumps(value))
            self.emitted.append(pieces[-1])
            self.done += 1
            seen.add(key)
        key = partial.open_key
        if (
            not self.stopped
            and key is not None
            and not partial.broken
            and self.done == len(partial.pairs)
        ):
            starts = self.open_key is None and key not in seen and self._verbatim(key)
            if starts and partial.open_end > partial.open_start:
                pieces.append(self._separator() + dumps(key) + ': "')
                self.emitted.append(pieces[-1])
                self.open_key, self.open_upto = key, partial.open_start
            if self.open_key == key:
                pieces.append(self._open_chunk(text, partial))
                self.emitted.append(pieces[-1])
        return "".join(pieces)

    def _open_chunk(self, text: str, partial: PartialCall) -> str:
        if partial.raw:
            end = max(self.open_upto, partial.open_end)
        else:
            end = max(self.open_upto, safe_json_end(text, self.open_upto, partial.open_end))
        written = text[self.open_upto : end]
        self.open_upto = end
        if _NEEDS_ESCAPE.search(written) is None:
            escaped = written  # decodes and re-encodes to itself
        else:
            chunk = written if partial.raw else loads('"' + written + '"')
            escaped = dumps(chunk)[1:-1]
        self.open_text.append(escaped)
        return escaped

    def rest(self, final: str) -> str:
        emitted = "".join(self.emitted)
        if final.startswith(emitted):
            return final[len(emitted) :]
        _log.warning("streamed arguments %r are not a prefix of %r", emitted, final)
        return ""


@dataclass(slots=True)
class _OpenCall:
    start: int
    index: int
    id: str
    arguments: _ArgumentStream = field(repr=False)


class StreamingToolParser:
    """Incremental counterpart of :func:`parse_tool_calls`.

    ``feed`` returns OpenAI-shaped deltas as soon as they are final. Per call, the
    first delta is ``{index, id, type: "function", function: {name, arguments: ""}}``,
    the next ones ``{index, function: {arguments: <fragment>}}``: a short call's
    whole arguments once it is complete, a long one's as they are written (see
    ``_ArgumentStream``). Concatenated deltas always equal ``parse_tool_calls`` on
    the full text.
    """

    def __init__(
        self, tools: list[dict[str, Any]], fmt: str, *, in_reasoning: bool | None = None
    ) -> None:
        self._engine = _engine(tools, fmt, in_reasoning)
        self._tools = self._engine.tools
        self._text = ""
        self._pos = 0
        self._content = _TrimmedStream()
        self._reasoning = _TrimmedStream()
        self._calls: list[ToolCall] = []
        self._open: _OpenCall | None = None
        self._finished = False

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Calls emitted so far (for finish_reason and the non-streamed message)."""
        return list(self._calls)

    def feed(self, delta: str) -> list[StreamDelta]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        # Local concatenation lets CPython grow the buffer in place (linear time).
        text = self._text
        self._text = ""
        text += delta
        self._text = text
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
            out += self._segment(seg)
        partial = self._engine.partial
        if partial is not None and not eos and partial.streams_at(len(self._text)):
            out += self._stream(partial)
        return out

    def _segment(self, seg: Seg) -> list[StreamDelta]:
        if seg.call is not None:
            return self._complete(seg.call, seg.origin)
        stream = self._reasoning if seg.kind == "reasoning" else self._content
        text = stream.push(seg.text)
        if not text:
            return []
        return [
            StreamDelta(reasoning=text) if seg.kind == "reasoning" else StreamDelta(content=text)
        ]

    def _header(self, index: int, call_id: str, name: str) -> StreamDelta:
        header: ToolCallDelta = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        return StreamDelta(tool_call=header)

    @staticmethod
    def _fragment(index: int, arguments: str) -> StreamDelta:
        body: ToolCallDelta = {"index": index, "function": {"arguments": arguments}}
        return StreamDelta(tool_call=body)

    def _stream(self, partial: PartialCall) -> list[StreamDelta]:
        out: list[StreamDelta] = []
        if self._open is None or self._open.start != partial.start:
            name = partial.name.strip()
            name = self._tools.resolve(name) or name
            self._open = _OpenCall(
                partial.start,
                len(self._calls),
                self._engine.new_id(),
                _ArgumentStream(self._tools, name),
            )
            out.append(self._header(self._open.index, self._open.id, name))
        fragment = self._open.arguments.update(self._text, partial)
        if fragment:
            out.append(self._fragment(self._open.index, fragment))
        return out

    def _complete(self, call: ToolCall, origin: int) -> list[StreamDelta]:
        opened, index = self._open, len(self._calls)
        self._calls.append(call)
        if opened is not None and opened.start == origin and opened.index == index:
            self._open = None
            call.id = opened.id
            rest = opened.arguments.rest(call.arguments_json)
            return [self._fragment(index, rest)] if rest else []
        return [
            self._header(index, call.id, call.name),
            self._fragment(index, call.arguments_json),
        ]
