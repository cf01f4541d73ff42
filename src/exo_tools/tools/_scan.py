"""Low-level text scanning shared by every format: JSON/Python bracket matching,
lenient JSON decoding, partial-marker hold-back and call ids.

Scanners report three outcomes so that streaming and one-shot parsing make the
same decision: an end index, ``None`` (the text so far is a valid prefix, more is
needed) or ``-1`` (this can never become a balanced value).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable
from typing import Any

INCOMPLETE = None
MALFORMED = -1

_ALNUM = string.ascii_letters + string.digits

# Runs of characters that cannot change the Python scanner's state (outside and
# inside each kind of string); skipping them with a regex keeps the pure-Python
# loop off the hot path.
_PY_PLAIN = re.compile(r"[^\"'(){}\[\]#]+")
_PY_STRING_PLAIN = {
    quote: re.compile(rf"[^{quote[0]}\\\n]+" if len(quote) == 1 else rf"[^{quote[0]}\\]+")
    for quote in ("'", '"', "'''", '"""')
}
_CLOSERS = {"{": "}", "[": "]", "(": ")"}


def random_alnum(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def openai_call_id() -> str:
    return "call_" + random_alnum(24)


def mistral_call_id() -> str:
    # Mistral chat templates reject tool call ids that are not exactly 9 alphanumerics.
    return random_alnum(9)


class PythonScan:
    """Resumable bracket match of the Python expression opening at ``text[start]``.

    ``advance`` returns the index just past it, ``INCOMPLETE`` or ``MALFORMED``,
    scanning only the text added since the last call (a call list grows one token at
    a time; rescanning it from the start would cost quadratic time). Understands
    single/double/triple-quoted strings and backslash escapes.
    """

    __slots__ = ("i", "quote", "result", "stack")

    def __init__(self, start: int) -> None:
        self.i = start
        self.stack: list[str] = []
        self.quote = ""  # the open string's quote, "" outside strings
        self.result: int | None = INCOMPLETE

    def advance(self, text: str) -> int | None:
        if self.result is not INCOMPLETE:
            return self.result
        i, n, stack = self.i, len(text), self.stack
        while i < n:
            if self.quote:
                i = self._in_string(text, i)
                if self.quote or self.result is not INCOMPLETE:
                    break
                continue
            c = text[i]
            if c in "\"'":
                if n - i < 3 and text[i:] == c * (n - i):
                    break  # cannot tell "" (empty string) from the start of """
                self.quote = c * 3 if text.startswith(c * 3, i) else c
                i += len(self.quote)
                continue
            if c == "#":
                self.result = MALFORMED  # comments never appear in a call list: prose
                break
            if c in "([{":
                stack.append(_CLOSERS[c])
            elif c in ")]}":
                if not stack or stack.pop() != c:
                    self.result = MALFORMED
                    break
                if not stack:
                    self.result = i + 1
                    break
            else:
                m = _PY_PLAIN.match(text, i)
                i = m.end() if m else i + 1
                continue
            i += 1
        self.i = i
        return self.result

    def _in_string(self, text: str, i: int) -> int:
        """Scan the open string from ``i``; clears ``quote`` once it closes."""
        quote, n = self.quote, len(text)
        plain = _PY_STRING_PLAIN[quote]
        while i < n:
            m = plain.match(text, i)
            if m:
                i = m.end()
                if i >= n:
                    break
            ch = text[i]
            if ch == "\\":
                i += 2
            elif ch == "\n":
                self.result = MALFORMED  # only triple-quoted strings span lines
                self.quote = ""
                return i
            elif text.startswith(quote, i):
                self.quote = ""
                return i + len(quote)
            elif len(quote) == 3 and n - i < 3 and quote.startswith(text[i:]):
                break  # a closing quote still being written
            else:
                i += 1
        return i


# A JSON string (skipped whole) or a bare Python literal outside strings.
_PY_LITERAL_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\b(True|False|None)\b')
_PY_TO_JSON = {"True": "true", "False": "false", "None": "null"}


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key keeps its first value, so a value already streamed never changes.
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


# One decoder for every call: ``json.loads`` with options builds a new one each time,
# which costs more than decoding the short spans streaming decodes per feed.
_DECODER = json.JSONDecoder(strict=False, object_pairs_hook=_first_wins)


def loads(text: str) -> Any:
    """Lenient ``json.loads``: raw control characters (newlines) inside strings, bare
    Python literals (``True``/``False``/``None``, written by Qwen-Coder models) outside
    them, and a repeated key keeps its first value."""
    try:
        return _DECODER.decode(text)
    except ValueError:
        if not any(word in text for word in _PY_TO_JSON):
            raise
    fixed = _PY_LITERAL_RE.sub(lambda m: _PY_TO_JSON[m.group(1)] if m.group(1) else m.group(), text)
    return _DECODER.decode(fixed)


def decode_arguments(value: Any) -> dict[str, Any] | None:
    """Arguments as a dict, undoing (possibly repeated) JSON string encoding.

    ``None``/empty string mean "no arguments"; anything that is not an object is
    rejected with ``None`` so the caller can decide the text is not a call.
    """
    for _ in range(3):
        if isinstance(value, dict):
            return value
        if value is None:
            return {}
        if not isinstance(value, str):
            return None
        stripped = value.strip()
        if not stripped:
            return {}
        try:
            value = loads(stripped)
        except ValueError:
            return None
    return None


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    return i


def partial_suffix(text: str, start: int, markers: Iterable[str]) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of a marker.

    Streaming holds that many characters back, so a tag split across deltas never
    leaks into content.
    """
    best, n = 0, len(text)
    for marker in markers:
        longest = min(len(marker) - 1, n - start)
        if longest <= best:
            continue
        # Only tails that start with the marker's first character can match; the
        # leftmost one is the longest.
        at = text.find(marker[0], n - longest)
        while at >= 0 and n - at > best:
            if marker.startswith(text[at:]):
                best = n - at
                break
            at = text.find(marker[0], at + 1)
    return best


def is_partial_of(text: str, i: int, markers: Iterable[str]) -> bool:
    """True when ``text[i:]`` is non-empty and a proper prefix of one of ``markers``."""
    n = len(text) - i
    # Compare only marker-length slices: the text after ``i`` may be long.
    return n > 0 and any(n < len(m) and m.startswith(text[i : i + n]) for m in markers)


def at_line_start(text: str, i: int) -> bool:
    """True when only spaces/tabs separate ``text[i]`` from a newline or the text start."""
    j = i - 1
    while j >= 0 and text[j] in " \t":
        j -= 1
    return j < 0 or text[j] in "\r\n"
