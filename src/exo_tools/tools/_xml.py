"""XML-style calls (Qwen3-Coder, GLM-4.5, MiniMax-M2, Seed-OSS): parameters as
tagged raw text, scanned resumably so a long value costs linear time to stream."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._scan import is_partial_of, partial_suffix, skip_ws


@dataclass(frozen=True, slots=True)
class XmlSyntax:
    """How one format tags a call's parameters.

    ``param_open`` matches a whole parameter opening (group 1: the key) and ends
    where the value starts; ``param_prefix`` is its literal beginning. A value ends at
    the first ``param_close`` followed by another tag (so the closing tag may appear
    inside a value), or, when the model forgot ``param_close``, before a line
    that opens another declared, not yet given parameter.
    """

    param_open: re.Pattern[str]
    param_prefix: str
    param_close: str
    call_close: str
    outer_close: str | None = None

    @property
    def followers(self) -> tuple[str, ...]:
        tags = (self.param_prefix, self.call_close)
        return (*tags, self.outer_close) if self.outer_close else tags


def trimmed(a: int, b: int, text: str) -> tuple[int, int]:
    """The value span without the one newline after the opening and before the closing tag."""
    if a < b and text[a] == "\n":
        a += 1
    if a < b and text[b - 1] == "\n":
        b -= 1
    return a, b


class XmlScan:
    """Resumable scan of the parameters after a call header ending at ``start``.

    ``advance`` returns the index past the call (its ``call_close``, or where other
    text starts), ``None`` while more text may change it, or ``-1`` when a cut-off
    call must not count. ``params`` are complete ``(key, start, end)`` value spans;
    ``open`` is the value being written, as ``(key, start, safe_end)``.
    """

    __slots__ = ("close_from", "current", "k", "keys", "open", "params", "recover_from", "syntax")

    def __init__(self, syntax: XmlSyntax, start: int, keys: frozenset[str]) -> None:
        self.syntax = syntax
        self.k = start
        self.keys = keys  # declared parameters: a line opening one ends a value
        self.params: list[tuple[str, int, int]] = []
        self.current: tuple[str, int] | None = None
        self.close_from = 0
        self.recover_from = 0
        self.open: tuple[str, int, int] | None = None

    def advance(self, text: str, eos: bool, truncated: bool) -> int | None:
        syntax, n = self.syntax, len(text)
        self.open = None
        while True:
            if self.current is None:
                k2 = skip_ws(text, self.k)
                m = syntax.param_open.match(text, k2)
                if m:
                    self.current = (m.group(1).strip(), m.end())
                    self.close_from = self.recover_from = m.end()
                    continue
                if text.startswith(syntax.call_close, k2):
                    return k2 + len(syntax.call_close)
                if text.startswith(syntax.param_prefix, k2):
                    # A parameter opening still being written (or never finished).
                    return -1 if eos or n - k2 > 256 else None
                if k2 >= n or is_partial_of(text, k2, (syntax.param_prefix, syntax.call_close)):
                    if not eos:
                        return None
                    if truncated:
                        return -1  # cut off before the call closed: more parameters may follow
                    return n
                return self.k  # other text: the block ends here without its closing tag
            key, value_start = self.current
            end = self._value_end(text, value_start, eos)
            if end is None:
                return None
            if isinstance(end, int):
                return -1  # no closing tag ever came
            close_at, resume = end
            self.params.append((key, *trimmed(value_start, close_at, text)))
            self.current = None
            self.k = resume

    def _value_end(self, text: str, value_start: int, eos: bool) -> tuple[int, int] | int | None:
        """(value end, resume index), -1 when no end exists, None to wait."""
        syntax, n = self.syntax, len(text)
        close = syntax.param_close
        recovered = self._recovered_end(text, eos)
        while True:
            at = text.find(close, self.close_from)
            if recovered is not None and (at < 0 or recovered[0] < at):
                if recovered[1]:
                    return recovered[0], recovered[0]
                self._show(text, value_start, recovered[0])
                return None
            if at < 0:
                if eos:
                    self._show(text, value_start, n)
                    return -1
                self.close_from = max(value_start, n - len(close) + 1)
                stop = n - partial_suffix(text, value_start, (close, "\n" + syntax.param_prefix))
                self._show(text, value_start, stop)
                return None
            after = skip_ws(text, at + len(close))
            if after >= n or is_partial_of(text, after, syntax.followers):
                if eos:
                    return at, at + len(close)
                self.close_from = at
                self._show(text, value_start, at)
                return None
            if text.startswith(syntax.followers, after):
                return at, at + len(close)
            self.close_from = at + 1

    def _recovered_end(self, text: str, eos: bool) -> tuple[int, bool] | None:
        """Start of a line opening another declared parameter, if one follows, and
        whether that is certain (False: the opening is still being written)."""
        prefix = "\n" + self.syntax.param_prefix
        given = {key for key, _, _ in self.params}
        while True:
            at = text.find(prefix, self.recover_from)
            if at < 0:
                self.recover_from = max(self.recover_from, len(text) - len(prefix) + 1)
                return None
            m = self.syntax.param_open.match(text, at + 1)
            if m is None:
                if not eos and len(text) - at < 200 and "\n" not in text[at + 1 :]:
                    return at, False
                self.recover_from = at + 1
                continue
            key = m.group(1).strip()
            current = self.current[0] if self.current else ""
            if key in self.keys and key not in given and key != current:
                return at, True
            self.recover_from = at + 1

    def _show(self, text: str, value_start: int, stop: int) -> None:
        if self.current is None:
            return
        a, b = value_start, stop
        if a < b and text[a] == "\n":
            a += 1
        if b > a and text[b - 1] == "\n":
            b -= 1  # may be the newline before the closing tag
        self.open = (self.current[0], a, max(a, b))
