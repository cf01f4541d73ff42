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

# Runs of characters that cannot change the JSON scanner's state; skipping them
# with a regex keeps the pure-Python loop off the hot path.
_JSON_PLAIN = re.compile(r'[^"{}\[\]]+')
_JSON_STR_PLAIN = re.compile(r'[^"\\]+')
_PY_PLAIN = re.compile(r"[^\"'(){}\[\]#]+")
_CLOSERS = {"{": "}", "[": "]", "(": ")"}


def random_alnum(length: int) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def openai_call_id() -> str:
    return "call_" + random_alnum(24)


def mistral_call_id() -> str:
    # Mistral chat templates reject tool call ids that are not exactly 9 alphanumerics.
    return random_alnum(9)


def json_end(text: str, start: int) -> int | None:
    """Index just past the JSON object/array opening at ``text[start]``.

    Braces inside strings are ignored, so an end tag inside a string value cannot
    close a call. Raw newlines inside strings are tolerated (decoded leniently later).
    """
    stack: list[str] = []
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while True:
                m = _JSON_STR_PLAIN.match(text, i)
                if m:
                    i = m.end()
                if i >= n:
                    return INCOMPLETE
                if text[i] == "\\":
                    i += 2
                    continue
                i += 1  # closing quote
                break
            continue
        if c in "{[":
            stack.append(_CLOSERS[c])
        elif c in "}]":
            if not stack or stack.pop() != c:
                return MALFORMED
            if not stack:
                return i + 1
        else:
            m = _JSON_PLAIN.match(text, i)
            i = m.end() if m else i + 1
            continue
        i += 1
    return INCOMPLETE


def python_end(text: str, start: int) -> int | None:
    """Index just past the bracketed Python expression opening at ``text[start]``.

    Understands single/double/triple-quoted strings and backslash escapes.
    """
    stack: list[str] = []
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            if n - i < 3 and text[i:] == c * (n - i):
                return INCOMPLETE  # cannot tell "" (empty string) from the start of """
            quote = c * 3 if text.startswith(c * 3, i) else c
            j = i + len(quote)
            while True:
                if j >= n:
                    return INCOMPLETE
                ch = text[j]
                if ch == "\\":
                    j += 2
                elif text.startswith(quote, j):
                    j += len(quote)
                    break
                elif ch == "\n" and len(quote) == 1:
                    return MALFORMED
                else:
                    j += 1
            i = j
            continue
        if c == "#":
            return MALFORMED  # comments never appear in a call list; treat as prose
        if c in "([{":
            stack.append(_CLOSERS[c])
        elif c in ")]}":
            if not stack or stack.pop() != c:
                return MALFORMED
            if not stack:
                return i + 1
        else:
            m = _PY_PLAIN.match(text, i)
            i = m.end() if m else i + 1
            continue
        i += 1
    return INCOMPLETE


# A JSON string (skipped whole) or a bare Python literal outside strings.
_PY_LITERAL_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\b(True|False|None)\b')
_PY_TO_JSON = {"True": "true", "False": "false", "None": "null"}


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key keeps its first value, so a value already streamed never changes.
    out: dict[str, Any] = {}
    for key, value in pairs:
        out.setdefault(key, value)
    return out


def loads(text: str) -> Any:
    """Lenient ``json.loads``: raw control characters (newlines) inside strings, bare
    Python literals (``True``/``False``/``None``, written by Qwen-Coder models) outside
    them, and a repeated key keeps its first value."""
    try:
        return json.loads(text, strict=False, object_pairs_hook=_first_wins)
    except ValueError:
        if not any(word in text for word in _PY_TO_JSON):
            raise
    fixed = _PY_LITERAL_RE.sub(lambda m: _PY_TO_JSON[m.group(1)] if m.group(1) else m.group(), text)
    return json.loads(fixed, strict=False, object_pairs_hook=_first_wins)


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
    best = 0
    avail = len(text) - start
    for marker in markers:
        for k in range(min(len(marker) - 1, avail), best, -1):
            if text.startswith(marker[:k], len(text) - k):
                best = k
                break
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
