"""History rewrites that formats apply to a cleaned copy of the messages."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
TOOL_ROLES = ("tool", "ipython")


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


def mistral_ids(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for m in messages:
        for call in m.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                call["id"] = mistral_id(call["id"])
        if isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = mistral_id(m["tool_call_id"])
    return messages


def rename_call_ids(
    messages: list[dict[str, Any]], new_id: Callable[[str, int], str]
) -> list[dict[str, Any]]:
    """Call ids replaced by ``new_id(name, running index)``, tool results following."""
    renamed: dict[str, str] = {}
    index = 0
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict):
                continue
            fresh = new_id(str(fn.get("name") or ""), index)
            index += 1
            if isinstance(call.get("id"), str):
                renamed[call["id"]] = fresh
            call["id"] = fresh
        if isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = renamed.get(m["tool_call_id"], m["tool_call_id"])
    return messages


def split_parallel_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message with N calls as N (call, result) pairs in call order."""
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
        while j < len(messages) and messages[j].get("role") in TOOL_ROLES:
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
