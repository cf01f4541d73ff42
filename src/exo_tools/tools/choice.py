"""Validation of the OpenAI ``tool_choice`` request field."""

from __future__ import annotations

from typing import Any

from .schema import ToolIndex, tool_name

ToolChoice = str | dict[str, Any]


class ToolChoiceError(ValueError):
    """``tool_choice`` is malformed or names a function not in ``tools`` (HTTP 400)."""


def normalize_tool_choice(tool_choice: Any, tools: list[dict[str, Any]] | None) -> ToolChoice:
    """Return ``"none"``, ``"auto"``, ``"required"`` or ``{"type": "function", "function": {"name": N}}``.

    A missing choice means ``"auto"`` with tools and ``"none"`` without; ``"auto"``
    with no tools is ``"none"``. A named function is matched like parsed calls are
    (exact, then unique case-insensitive) and returned with its declared name.
    """
    index = ToolIndex(tools)
    declared = list(index.specs)
    if tool_choice is None:
        return "auto" if declared else "none"
    if isinstance(tool_choice, str):
        choice = tool_choice.strip().lower()
        if choice == "none":
            return "none"
        if choice == "auto":
            return "auto" if declared else "none"
        if choice == "required":
            if not declared:
                raise ToolChoiceError("tool_choice 'required' needs at least one tool in 'tools'")
            return "required"
        raise ToolChoiceError(
            f"invalid tool_choice {tool_choice!r}: expected 'none', 'auto', 'required' "
            "or {'type': 'function', 'function': {'name': ...}}"
        )
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type", "function")
        if kind != "function":
            raise ToolChoiceError(
                f"unsupported tool_choice type {kind!r}; only 'function' is supported"
            )
        fn = tool_choice.get("function")
        # The Responses API puts the name at the top level; accept both shapes.
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name")
        if not isinstance(name, str) or not name:
            raise ToolChoiceError("tool_choice of type 'function' must name a function")
        resolved = index.resolve(name)
        if resolved is None:
            available = ", ".join(declared) if declared else "none"
            raise ToolChoiceError(
                f"tool_choice names unknown function {name!r}; declared tools: {available}"
            )
        return {"type": "function", "function": {"name": resolved}}
    raise ToolChoiceError(f"invalid tool_choice of type {type(tool_choice).__name__}")


def tools_for_choice(
    tools: list[dict[str, Any]] | None, choice: ToolChoice
) -> list[dict[str, Any]]:
    """The tools to show the model: none for ``"none"``, only the named one when forced."""
    if choice == "none" or not tools:
        return []
    forced = forced_function(choice)
    if forced is None:
        return list(tools)
    return [t for t in tools if isinstance(t, dict) and tool_name(t) == forced]


def forced_function(choice: ToolChoice) -> str | None:
    """The function name a normalized choice forces, else ``None``."""
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
    return None
