"""Rendering tools and tool history as text, for chat templates that ignore them.

SmolLM2's ChatML template prints only ``role`` and ``content``: it drops ``tools``,
``tool_calls`` and has no notion of tool results. For such models the server
describes the tools in the system prompt (``add_tools_system_prompt``) and folds
tool history into plain messages (``fold_tool_history``), both written in the
same syntax the parser reads back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._scan import decode_arguments, dumps
from .history import flatten_content
from .registry import check_format, get_format, infer_format
from .schema import tool_name, tool_spec

__all__ = [
    "add_tools_system_prompt",
    "fold_tool_history",
    "infer_format",
    "render_assistant_tool_calls",
    "render_tool_result",
    "render_tools_system_prompt",
]

_DESCRIPTION_LIMIT = 160  # the default model has 8k context; keep each tool to a line


def _name_and_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = call.get("function")
    spec: Mapping[str, Any] = fn if isinstance(fn, Mapping) else call
    name = spec.get("name")
    args = decode_arguments(spec.get("arguments"))
    return (name if isinstance(name, str) else ""), (args if args is not None else {})


def render_assistant_tool_calls(tool_calls: list[dict[str, Any]], fmt: str) -> str:
    """OpenAI ``tool_calls`` as the text the model would generate in ``fmt``.

    ``parse_tool_calls`` reads the result back to the same names and arguments.
    """
    return get_format(fmt).render_calls([_name_and_arguments(c) for c in tool_calls])


def render_tool_result(content: Any, fmt: str, *, name: str | None = None) -> str:
    """One tool result as text in ``fmt``'s own result markup (for a user turn)."""
    spec = get_format(fmt)
    text = flatten_content(content)
    text = "" if text is None else text if isinstance(text, str) else dumps(text)
    return spec.render_result(text, name)


def fold_tool_history(messages: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    """Plain ``{role, content}`` messages for a template without tool support.

    Assistant calls become assistant text in ``fmt``; each run of ``tool``
    messages becomes one ``user`` message of rendered results.
    """
    check_format(fmt)
    names_by_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        content = flatten_content(m.get("content"))
        text = content if isinstance(content, str) else ""
        if role == "assistant" and m.get("tool_calls"):
            calls = [c for c in m["tool_calls"] if isinstance(c, dict)]
            for c in calls:
                name, _ = _name_and_arguments(c)
                if isinstance(c.get("id"), str):
                    names_by_id[c["id"]] = name
            rendered = render_assistant_tool_calls(calls, fmt)
            out.append(
                {
                    "role": "assistant",
                    "content": f"{text}\n{rendered}" if text.strip() else rendered,
                }
            )
        elif role in ("tool", "ipython", "function"):
            name = m.get("name") or names_by_id.get(m.get("tool_call_id") or "")
            result = render_tool_result(content, fmt, name=name)
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append({"role": role, "content": text})
    for m in out:
        m.pop("_tool_results", None)
    return out


def _type_label(schema: Any) -> str:
    if not isinstance(schema, Mapping):
        return "any"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return "|".join(dumps(e) for e in enum)
    t = schema.get("type")
    if isinstance(t, list):
        return "|".join(str(x) for x in t)
    if isinstance(t, str):
        if t == "array" and isinstance(schema.get("items"), Mapping):
            return f"{_type_label(schema['items'])}[]"
        return t
    union = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(union, list):
        return "|".join(_type_label(s) for s in union)
    return "any"


def _example_value(key: str, schema: Any) -> Any:
    label = _type_label(schema)
    if isinstance(schema, Mapping) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if label.startswith("integer") or label.startswith("number"):
        return 1
    if label.startswith("boolean"):
        return True
    if label.endswith("[]") or label.startswith("array"):
        return []
    if label.startswith("object"):
        return {}
    return f"<{key}>"


def _signature(tool: Mapping[str, Any]) -> str:
    spec = tool_spec(tool)
    params = spec.get("parameters")
    props = params.get("properties") if isinstance(params, Mapping) else None
    required = params.get("required") if isinstance(params, Mapping) else None
    required = required if isinstance(required, list) else []
    args = []
    for key, schema in (props or {}).items():
        args.append(f"{key}{'' if key in required else '?'}: {_type_label(schema)}")
    line = f"- {tool_name(tool)}({', '.join(args)})"
    description = spec.get("description")
    if isinstance(description, str) and description.strip():
        first = description.strip().splitlines()[0]
        if len(first) > _DESCRIPTION_LIMIT:
            first = first[: _DESCRIPTION_LIMIT - 3].rstrip() + "..."
        line += f": {first}"
    return line


def render_tools_system_prompt(tools: list[dict[str, Any]], fmt: str = "hermes") -> str:
    """A compact system-prompt text describing ``tools`` and the exact call syntax.

    For models whose chat template ignores ``tools``. The example call uses the
    first tool with placeholder values, rendered by ``render_assistant_tool_calls``
    so the instructions match what the parser accepts.
    """
    check_format(fmt)
    declared = [t for t in tools if isinstance(t, Mapping) and tool_name(t)]
    if not declared:
        return ""
    first = tool_spec(declared[0])
    params = first.get("parameters")
    props = params.get("properties") if isinstance(params, Mapping) else None
    required = params.get("required") if isinstance(params, Mapping) else None
    keys = [k for k in (props or {}) if not isinstance(required, list) or k in required]
    example_args = {k: _example_value(k, (props or {})[k]) for k in keys}
    example = render_assistant_tool_calls(
        [{"function": {"name": tool_name(declared[0]), "arguments": example_args}}], fmt
    )
    lines = [
        "You can call these tools:",
        *(_signature(t) for t in declared),
        "To call a tool, reply with only this, filling in real values:",
        example,
        "For several calls, write one after another. "
        "After you get the results, answer the user in plain text.",
    ]
    return "\n".join(lines)


def add_tools_system_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], fmt: str = "hermes"
) -> list[dict[str, Any]]:
    """``messages`` with the tools prompt appended to the system message (or prepended as one)."""
    prompt = render_tools_system_prompt(tools, fmt)
    out = [dict(m) for m in messages]
    if not prompt:
        return out
    if out and out[0].get("role") == "system":
        existing = flatten_content(out[0].get("content"))
        existing = existing if isinstance(existing, str) else ""
        out[0]["content"] = f"{existing}\n\n{prompt}" if existing.strip() else prompt
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
