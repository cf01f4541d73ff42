"""Incremental JSON scanning: where a value ends, and which members of an object are
complete, resumable as the text grows.

Streaming feeds a call one token at a time; rescanning its JSON from the start on
every token costs time quadratic in its length. A ``JsonScan`` keeps its place, so
feeding a text in any chunking costs time linear in its length. Values are decoded
with the (lenient) standard decoder once they are complete; the scanner itself only
matches brackets and records where object members start and end.
"""

from __future__ import annotations

import re
from typing import Any

from ._scan import loads

_PLAIN = re.compile(r'[^"{}\[\]]+')
_MEMBER_PLAIN = re.compile(r'[^"{}\[\],:]+')
_STRING_PLAIN = re.compile(r'[^"\\]+')
_CLOSERS = {"{": "}", "[": "]"}


class ObjectTrack:
    """The members of one JSON object as the scan passes them.

    ``pairs`` holds ``(key, value_start, value_end)`` of complete members, in order.
    Anything that is not plain ``"key": value`` syntax sets ``broken``: nothing after
    it is reported (the whole value may still decode, leniently, once complete).
    """

    __slots__ = ("broken", "children", "key", "key_start", "pairs", "state", "value_start")

    def __init__(self) -> None:
        self.state = "key"  # key | in_key | colon | value | string | nested | scalar | after
        self.key = ""
        self.key_start = -1
        self.value_start = -1
        self.pairs: list[tuple[str, int, int]] = []
        self.children: dict[str, ObjectTrack] = {}
        self.broken = False

    @property
    def open_string(self) -> tuple[str, int] | None:
        """Key and body start of a string value still being written."""
        return (self.key, self.value_start + 1) if self.state == "string" else None

    def _pair(self, end: int) -> None:
        self.pairs.append((self.key, self.value_start, end))
        self.state = "after"

    def string_open(self, i: int) -> None:
        if self.state == "key":
            self.state, self.key_start = "in_key", i
        elif self.state == "value":
            self.state, self.value_start = "string", i
        else:
            self.broken = True

    def string_close(self, text: str, end: int) -> None:
        if self.state == "in_key":
            try:
                key = loads(text[self.key_start : end])
            except ValueError:
                key = None
            if not isinstance(key, str):
                self.broken = True
                return
            self.key, self.state = key, "colon"
        elif self.state == "string":
            self._pair(end)

    def nested_open(self, i: int) -> bool:
        """A ``{``/``[`` value starts; True when it is this object's member value."""
        if self.state != "value":
            self.broken = True
            return False
        self.state, self.value_start = "nested", i
        return True

    def nested_close(self, end: int) -> None:
        if self.state == "nested":
            self._pair(end)

    def plain(self, text: str, a: int, b: int) -> None:
        stripped = len(text[a:b].lstrip())
        if not stripped:
            return
        if self.state == "value":
            self.state, self.value_start = "scalar", b - stripped
        elif self.state != "scalar":
            self.broken = True

    def punct(self, c: str, i: int) -> None:
        if c == ":" and self.state == "colon":
            self.state = "value"
        elif c == "," and self.state == "after":
            self.state = "key"
        elif c == "," and self.state == "scalar":
            self._pair(i)
            self.state = "key"
        else:
            self.broken = True

    def close(self, i: int) -> None:
        if self.state == "scalar":
            self._pair(i)
        self.state = "closed"


class JsonScan:
    """Resumable scan of the JSON object or array opening at ``text[start]``.

    ``end`` is the index just past it once it closed, ``failed`` is set (with
    ``fail_at``) when brackets mismatch. With ``track`` > 0 the members of the root
    object are recorded (``root``), with ``track`` = 2 also those of object values of
    the root (``root.children``): a call envelope and its arguments. With ``track`` =
    2 a root array's first item, when it is an object, counts as the root: the first
    call of a list of envelopes.
    """

    __slots__ = (
        "end",
        "fail_at",
        "failed",
        "first_item",
        "i",
        "in_string",
        "root",
        "root_depth",
        "stack",
        "start",
        "track",
        "tracks",
    )

    def __init__(self, start: int, track: int = 0) -> None:
        self.start = start
        self.i = start
        self.track = track
        self.stack: list[str] = []
        self.in_string = False
        self.end: int | None = None
        self.failed = False
        self.fail_at = -1
        self.root: ObjectTrack | None = None
        self.root_depth = 1  # nesting depth inside the root object (2: a root array's item)
        self.first_item = True  # no item of a root array has started yet
        self.tracks: dict[int, ObjectTrack] = {}

    @property
    def pending(self) -> bool:
        return self.end is None and not self.failed

    def advance(self, text: str) -> None:
        if not self.pending:
            return
        i, n, stack, tracks = self.i, len(text), self.stack, self.tracks
        while i < n:
            if self.in_string:
                m = _STRING_PLAIN.match(text, i)
                if m:
                    i = m.end()
                if i >= n:
                    break
                if text[i] == "\\":
                    i += 2
                    continue
                i += 1
                self.in_string = False
                track = tracks.get(len(stack))
                if track is not None and not track.broken:
                    track.string_close(text, i)
                continue
            c = text[i]
            track = tracks.get(len(stack))
            live = track is not None and not track.broken
            if c == '"':
                self.in_string = True
                if live:
                    track.string_open(i)  # pyright: ignore[reportOptionalMemberAccess]
                i += 1
            elif c in "{[":
                self._open(text, c, i, track if live else None)
                i += 1
            elif c in "}]":
                if not stack or stack.pop() != c:
                    self.failed, self.fail_at = True, i
                    break
                closed = tracks.pop(len(stack) + 1, None)
                if closed is not None and not closed.broken:
                    closed.close(i)
                parent = tracks.get(len(stack))
                if parent is not None and not parent.broken:
                    parent.nested_close(i + 1)
                i += 1
                if not stack:
                    self.end = i
                    break
            elif not live:
                m = _PLAIN.match(text, i)
                i = m.end() if m else i + 1
            else:
                m = _MEMBER_PLAIN.match(text, i)
                if m:
                    track.plain(text, i, m.end())  # pyright: ignore[reportOptionalMemberAccess]
                    i = m.end()
                else:
                    track.punct(c, i)  # pyright: ignore[reportOptionalMemberAccess]
                    i += 1
        self.i = i

    def _open(self, text: str, c: str, i: int, parent: ObjectTrack | None) -> None:
        depth = len(self.stack)
        self.stack.append(_CLOSERS[c])
        if depth == 0:
            if c == "{" and self.track:
                self.root = self.tracks[1] = ObjectTrack()
            return
        if depth == 1 and self.first_item and self.stack[0] == "]":
            self.first_item = False
            if c == "{" and self.track == 2 and text[self.start + 1 : i].strip() == "":
                self.root_depth = 2
                self.root = self.tracks[2] = ObjectTrack()
            return
        nested = depth - self.root_depth + 1  # the new object's level below the root
        if parent is not None and parent.nested_open(i) and c == "{" and nested < self.track:
            child = self.tracks[depth + 1] = ObjectTrack()
            parent.children.setdefault(parent.key, child)

    def decode(self, text: str) -> Any:
        """The complete value (leniently decoded); raises ``ValueError``."""
        assert self.end is not None
        return loads(text[self.start : self.end])


def decode_span(text: str, start: int, end: int) -> Any:
    """A member value recorded by an ``ObjectTrack``; raises ``ValueError``."""
    return loads(text[start:end].strip())
