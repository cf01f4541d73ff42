"""gpt-oss (harmony): the analysis channel is reasoning, final (and commentary
without a recipient) is content, ``to=functions.NAME`` messages are calls."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .._engine import NOT, Engine, Seg, SegKind, Step, Verdict
from .._scan import dumps, partial_suffix, skip_ws
from ..format import ToolFormat
from ..schema import ToolIndex

HARMONY_START = "<|start|>"
HARMONY_CHANNEL = "<|channel|>"
HARMONY_MESSAGE = "<|message|>"
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")
_CHANNEL_RE = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT_RE = re.compile(r"\bto=([^\s<]+)")


class GptOssEngine(Engine):
    markers = (HARMONY_START, HARMONY_CHANNEL, *HARMONY_ENDS)
    bare_json = False
    think_tags = ()

    def __init__(
        self, tools: ToolIndex, new_id: Callable[[], str], *, in_reasoning: bool | None
    ) -> None:
        super().__init__(tools, new_id, in_reasoning=False)
        self.mode = "analysis" if in_reasoning else "content"

    def _step(self, text: str, pos: int, eos: bool, truncated: bool) -> Step | None:
        if self.mode not in ("analysis", "final"):
            return super()._step(text, pos, eos, truncated)
        kind: SegKind = "reasoning" if self.mode == "analysis" else "content"
        stops = (*HARMONY_ENDS, HARMONY_START, HARMONY_CHANNEL)
        hits = [(text.find(s, pos), s) for s in stops]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            at, token = min(hits)
            self.mode = "content"
            segs = [Seg(kind, text[pos:at])] if at > pos else []
            return segs, (at + len(token) if token in HARMONY_ENDS else at)
        stop = len(text) if eos else len(text) - partial_suffix(text, pos, stops)
        return ([Seg(kind, text[pos:stop])], stop) if stop > pos else None

    def handle_marker(self, token: str, text: str, i: int, eos: bool, truncated: bool) -> Verdict:
        if token in HARMONY_ENDS:
            return [], i + len(token)  # stray end-of-message token
        body_at = self.find(text, HARMONY_MESSAGE, i)
        if body_at < 0:
            return self.need(eos)
        header = text[i:body_at]
        body = body_at + len(HARMONY_MESSAGE)
        channel = _CHANNEL_RE.search(header)
        recipient = _RECIPIENT_RE.search(header)
        if recipient is None:
            self.mode = "analysis" if channel and channel.group(1) == "analysis" else "final"
            return [], body
        name = recipient.group(1).removeprefix("functions.")
        j = skip_ws(text, body)
        if j >= len(text):
            return self.need(eos)
        if text[j] != "{" or not name:
            return NOT
        return self.closed(
            self.json_calls(text, j, eos, start=i, name=name), text, i, HARMONY_ENDS, eos
        )


class GptOss(ToolFormat):
    name = "gpt_oss"
    models = "gpt-oss-20b, gpt-oss-120b (harmony)"
    engine = GptOssEngine
    keeps_special_tokens = True
    template_markers = (HARMONY_CHANNEL,)
    template_priority = 100

    def render_calls(self, calls: list[tuple[str, dict[str, Any]]]) -> str:
        return "".join(
            f"{HARMONY_START}assistant{HARMONY_CHANNEL}commentary to=functions.{n} <|constrain|>json"
            f"{HARMONY_MESSAGE}{dumps(a)}<|call|>"
            for n, a in calls
        )

    def render_result(self, text: str, name: str | None) -> str:
        return (
            f"{HARMONY_START}functions.{name or 'tool'} to=assistant{HARMONY_CHANNEL}commentary"
            f"{HARMONY_MESSAGE}{text}<|end|>"
        )


FORMAT = GptOss()
