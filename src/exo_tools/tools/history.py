"""Rewriting OpenAI chat history so model chat templates accept it."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

from ._scan import decode_arguments, dumps
from .parsers import check_format

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_TOOL_ROLES = ("tool", "ipython")

# Formats whose templates splice ``function.arguments`` into the prompt as a string
# (``'```json\n' + arguments``); every other template wants a dict it can ``tojson``.
_STRING_ARGUMENT_FORMATS = frozenset({"deepseek_v3"})


def flatten_content(content: Any) -> Any:
    """Text of OpenAI content parts (``[{"type": "text", "text": ...}]``) joined by newlines.

    Non-text parts are dropped: these templates can only print text. A dict (some
    clients send structured tool results) becomes its JSON text.
    """
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
        return "\n".join(texts)
    if isinstance(content, dict):
        return dumps(content)
    return content


def rewrite_history(messages: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """A copy of ``messages`` that ``fmt``'s chat template renders correctly.

    All formats: content-part lists are flattened to strings, empty ``tool_calls``
    are removed, ``None`` assistant content becomes ``""``, and call arguments are
    decoded to dicts (JSON strings for ``deepseek_v3``, whose template concatenates
    them). ``llama3_json``: an assistant message with N calls becomes N (call,
    result) pairs in call order, results matched by ``tool_call_id`` then by
    position; its text stays as a separate assistant message. ``mistral``: call
    ids are mapped deterministically to the 9-alphanumeric form its template
    requires. The input is never mutated.
    """
    check_format(fmt)
    out = [_clean(m, fmt) for m in messages]
    if fmt == "mistral":
        out = _mistral_ids(out)
    if fmt == "llama3_json":
        out = _split_parallel_calls(out)
    return out


def _clean(message: dict[str, Any], fmt: str) -> dict[str, Any]:
    m = copy.deepcopy(message)
    if "content" in m:
        m["content"] = flatten_content(m["content"])
    if "tool_calls" in m:
        calls = m["tool_calls"]
        if not calls:
            del m["tool_calls"]
        else:
            m["tool_calls"] = [_clean_call(c, fmt) for c in calls]
    if m.get("role") == "assistant" and m.get("content") is None:
        m["content"] = ""  # templates concatenate content; None would raise
    return m


def _clean_call(call: Any, fmt: str) -> Any:
    if not isinstance(call, dict):
        return call
    fn = call.get("function")
    if not isinstance(fn, dict):
        return call
    call.setdefault("type", "function")
    args = fn.get("arguments")
    if fmt in _STRING_ARGUMENT_FORMATS:
        if not isinstance(args, str):
            fn["arguments"] = dumps(args if args is not None else {})
    else:
        decoded = decode_arguments(args)
        # An undecodable string is kept as written rather than silently replaced.
        if decoded is not None:
            fn["arguments"] = decoded
    return call


def mistral_id(call_id: str) -> str:
    """A 9-alphanumeric id derived from ``call_id`` (unchanged if already valid)."""
    if len(call_id) == 9 and call_id.isascii() and call_id.isalnum():
        return call_id
    digest = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    chars = []
    for _ in range(9):
        digest, r = divmod(digest, len(_ALNUM))
        chars.append(_ALNUM[r])
    return "".join(chars)


def _mistral_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for m in messages:
        for call in m.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                call["id"] = mistral_id(call["id"])
        if isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = mistral_id(m["tool_call_id"])
    return messages


def _split_parallel_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        m = messages[i]
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if not calls:
            out.append(m)
            i += 1
            continue
        j = i + 1
        while j < len(messages) and messages[j].get("role") in _TOOL_ROLES:
            j += 1
        results = messages[i + 1 : j]
        base = {k: v for k, v in m.items() if k not in ("tool_calls", "content")}
        text = m.get("content")
        if isinstance(text, str) and text.strip():
            out.append({**base, "content": text})
        matched = _match_results(calls, results)
        used = {id(r) for r in matched if r is not None}
        for call, result in zip(calls, matched, strict=True):
            out.append({**base, "content": "", "tool_calls": [call]})
            if result is not None:
                out.append(result)
        out.extend(r for r in results if id(r) not in used)
        i = j
    return out


def _match_results(calls: list[Any], results: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Result for each call: same ``tool_call_id`` first, then leftovers in order."""
    free = list(range(len(results)))
    picked: list[int | None] = []
    for call in calls:
        call_id = call.get("id") if isinstance(call, dict) else None
        hit = next((k for k in free if call_id and results[k].get("tool_call_id") == call_id), None)
        if hit is not None:
            free.remove(hit)
        picked.append(hit)
    for idx, hit in enumerate(picked):
        if hit is None and free:
            picked[idx] = free.pop(0)
    return [None if k is None else results[k] for k in picked]
