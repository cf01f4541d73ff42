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
from .parsers import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_BEGIN,
    DS_CALLS_END,
    DS_OUTPUT_BEGIN,
    DS_OUTPUT_END,
    DS_SEP,
    FUNCTION_CLOSE,
    FUNCTION_OPEN,
    MISTRAL_CALLS,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    check_format,
)
from .schema import tool_name, tool_spec

_DESCRIPTION_LIMIT = 160  # the default model has 8k context; keep each tool to a line


def _name_and_arguments(call: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    fn = call.get("function")
    spec: Mapping[str, Any] = fn if isinstance(fn, Mapping) else call
    name = spec.get("name")
    args = decode_arguments(spec.get("arguments"))
    return (name if isinstance(name, str) else ""), (args if args is not None else {})


def _py_literal(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_py_literal(k)}: {_py_literal(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_py_literal(v) for v in value) + "]"
    return repr(value)


def render_assistant_tool_calls(tool_calls: list[dict[str, Any]], fmt: str) -> str:
    """OpenAI ``tool_calls`` as the text the model would generate in ``fmt``.

    ``parse_tool_calls`` reads the result back to the same names and arguments.
    """
    check_format(fmt)
    calls = [_name_and_arguments(c) for c in tool_calls]
    if fmt == "hermes":
        return "\n".join(
            f"{TOOL_CALL_OPEN}\n{dumps({'name': n, 'arguments': a})}\n{TOOL_CALL_CLOSE}"
            for n, a in calls
        )
    if fmt == "qwen3_coder":
        blocks = []
        for name, args in calls:
            params = "".join(
                f"{PARAMETER_OPEN}{k}>\n{v if isinstance(v, str) else dumps(v)}\n{PARAMETER_CLOSE}\n"
                for k, v in args.items()
            )
            blocks.append(
                f"{TOOL_CALL_OPEN}\n{FUNCTION_OPEN}{name}>\n{params}{FUNCTION_CLOSE}\n{TOOL_CALL_CLOSE}"
            )
        return "\n".join(blocks)
    if fmt == "llama3_json":
        return "; ".join(dumps({"name": n, "parameters": a}) for n, a in calls)
    if fmt == "pythonic":
        inner = ", ".join(
            f"{n}({', '.join(f'{k}={_py_literal(v)}' for k, v in a.items())})" for n, a in calls
        )
        return f"[{inner}]"
    if fmt == "mistral":
        return MISTRAL_CALLS + dumps([{"name": n, "arguments": a} for n, a in calls])
    if fmt == "gpt_oss":
        return "".join(
            f"<|start|>assistant<|channel|>commentary to=functions.{n} <|constrain|>json"
            f"<|message|>{dumps(a)}<|call|>"
            for n, a in calls
        )
    body = "".join(
        f"{DS_CALL_BEGIN}function{DS_SEP}{n}\n```json\n{dumps(a)}\n```{DS_CALL_END}"
        for n, a in calls
    )
    return f"{DS_CALLS_BEGIN}{body}{DS_CALLS_END}"


def render_tool_result(content: Any, fmt: str, *, name: str | None = None) -> str:
    """One tool result as text in ``fmt``'s own result markup (for a user turn)."""
    check_format(fmt)
    text = flatten_content(content)
    text = "" if text is None else text if isinstance(text, str) else dumps(text)
    if fmt in ("hermes", "qwen3_coder"):
        return f"<tool_response>\n{text}\n</tool_response>"
    if fmt == "pythonic":
        return f"<|tool_response_start|>{text}<|tool_response_end|>"
    if fmt == "mistral":
        return f"[TOOL_RESULTS]{text}[/TOOL_RESULTS]"
    if fmt == "gpt_oss":
        return f"<|start|>functions.{name or 'tool'} to=assistant<|channel|>commentary<|message|>{text}<|end|>"
    if fmt == "deepseek_v3":
        return f"{DS_OUTPUT_BEGIN}{text}{DS_OUTPUT_END}"
    return text  # llama3_json: the ipython turn body is the bare output


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


def infer_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches, or ``None`` if it shows none.

    More specific markers are checked first: Qwen3-Coder templates also contain
    ``<tool_call>``, and harmony templates mention many tokens.
    """
    if not chat_template:
        return None
    t = chat_template
    if "<|channel|>" in t:
        return "gpt_oss"
    if DS_CALLS_BEGIN in t or "tool_calls_begin" in t:
        return "deepseek_v3"
    if "<function=" in t and "<parameter=" in t:
        return "qwen3_coder"
    if TOOL_CALL_OPEN in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|tool_call_start|>" in t or "<|python_start|>" in t:
        return "pythonic"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3_json"
    return None
