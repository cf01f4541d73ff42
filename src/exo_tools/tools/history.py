"""Rewriting OpenAI chat history so model chat templates accept it."""

from __future__ import annotations

import copy
from typing import Any

from ._scan import decode_arguments, dumps
from .registry import get_format


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
    spec = get_format(fmt)
    string_arguments = spec.string_arguments_in_history
    return spec.fix_history([_clean(m, string_arguments) for m in messages])


def _clean(message: dict[str, Any], string_arguments: bool) -> dict[str, Any]:
    m = copy.deepcopy(message)
    if "content" in m:
        m["content"] = flatten_content(m["content"])
    if "tool_calls" in m:
        calls = m["tool_calls"]
        if not calls:
            del m["tool_calls"]
        else:
            m["tool_calls"] = [_clean_call(c, string_arguments) for c in calls]
    if m.get("role") == "assistant" and m.get("content") is None:
        m["content"] = ""  # templates concatenate content; None would raise
    return m


def _clean_call(call: Any, string_arguments: bool) -> Any:
    if not isinstance(call, dict):
        return call
    fn = call.get("function")
    if not isinstance(fn, dict):
        return call
    call.setdefault("type", "function")
    args = fn.get("arguments")
    if string_arguments:
        if not isinstance(args, str):
            fn["arguments"] = dumps(args if args is not None else {})
    else:
        decoded = decode_arguments(args)
        # An undecodable string is kept as written rather than silently replaced.
        if decoded is not None:
            fn["arguments"] = decoded
    return call
