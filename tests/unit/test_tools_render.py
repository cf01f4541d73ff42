"""Prompt/history rendering, format inference and tool_choice validation."""

from __future__ import annotations

from typing import Any

import pytest

from exo_tools.tools import (
    FORMATS,
    ToolChoiceError,
    add_tools_system_prompt,
    forced_function,
    infer_format,
    normalize_tool_choice,
    parse_tool_calls,
    render_assistant_tool_calls,
    render_tool_result,
    render_tools_system_prompt,
    tools_for_choice,
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather for a city.\nMore details nobody needs.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer"},
                },
                "required": ["city", "days"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
    },
]

CALLS = [
    {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'},
    },
    {
        "id": "call_2",
        "type": "function",
        "function": {"name": "add", "arguments": {"a": 1.5, "b": -2}},
    },
    {
        "id": "call_3",
        "type": "function",
        "function": {
            "name": "get_weather",
            "arguments": {"city": 'quote " and \\ and </tool_call>', "days": 1},
        },
    },
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rendered_calls_parse_back(fmt: str) -> None:
    text = render_assistant_tool_calls(CALLS, fmt)
    parsed = parse_tool_calls(text, TOOLS, fmt)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2}),
        ("add", {"a": 1.5, "b": -2}),
        ("get_weather", {"city": 'quote " and \\ and </tool_call>', "days": 1}),
    ]
    assert parsed.content is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_system_prompt_example_parses_as_a_call(fmt: str) -> None:
    prompt = render_tools_system_prompt(TOOLS, fmt)
    assert (
        '- get_weather(city: string, unit?: "c"|"f", days: integer): Current weather for a city.'
        in prompt
    )
    assert "More details" not in prompt
    assert "- add(a?: number, b?: number): Add two numbers." in prompt
    example = prompt.split("filling in real values:\n", 1)[1].rsplit("\nFor several calls", 1)[0]
    parsed = parse_tool_calls(example, TOOLS, fmt)
    assert [c.name for c in parsed.tool_calls] == ["get_weather"]
    assert parsed.tool_calls[0].arguments == {"city": "<city>", "days": 1}


def test_hermes_prompt_is_compact_and_uses_tool_call_tags() -> None:
    prompt = render_tools_system_prompt(TOOLS, "hermes")
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "<city>", "days": 1}}\n</tool_call>'
        in prompt
    )
    assert len(prompt) < 600
    assert render_tools_system_prompt([], "hermes") == ""


def test_add_tools_system_prompt() -> None:
    merged = add_tools_system_prompt(
        [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}], TOOLS
    )
    assert merged[0]["content"].startswith("Be nice.\n\nYou can call these tools:")
    prepended = add_tools_system_prompt([{"role": "user", "content": "hi"}], TOOLS)
    assert [m["role"] for m in prepended] == ["system", "user"]
    assert add_tools_system_prompt([{"role": "user", "content": "hi"}], []) == [
        {"role": "user", "content": "hi"}
    ]


def test_render_tool_result() -> None:
    assert render_tool_result("17C", "hermes") == "<tool_response>\n17C\n</tool_response>"
    assert render_tool_result([{"type": "text", "text": "ok"}], "llama3_json") == "ok"
    assert render_tool_result({"t": 1}, "mistral") == '[TOOL_RESULTS]{"t": 1}[/TOOL_RESULTS]'
    assert "functions.get_weather to=assistant" in render_tool_result(
        "x", "gpt_oss", name="get_weather"
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (None, None),
        ("{{ messages }}", None),
        ("{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}", None),
        ("{{- '<tool_call>\\n' }}{{ tool_call | tojson }}", "hermes"),
        ("<tool_call>\n<function={{ name }}>\n<parameter={{ k }}>", "qwen3_coder"),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3_json"),
        ("<|start_header_id|>ipython<|end_header_id|>", "llama3_json"),
        ("{{ '[TOOL_CALLS]' + tool_calls | tojson }}", "mistral"),
        ("<|start|>assistant<|channel|>final<|message|>", "gpt_oss"),
        ("{{'<\uff5ctool\u2581calls\u2581begin\uff5c>'}}", "deepseek_v3"),
        ("<|tool_call_start|>[{{ call }}]<|tool_call_end|>", "pythonic"),
    ],
)
def test_infer_format(template: str | None, expected: str | None) -> None:
    assert infer_format(template) == expected


def test_tool_choice_values() -> None:
    assert normalize_tool_choice(None, TOOLS) == "auto"
    assert normalize_tool_choice(None, []) == "none"
    assert normalize_tool_choice("auto", []) == "none"
    assert normalize_tool_choice("NONE", TOOLS) == "none"
    assert normalize_tool_choice("required", TOOLS) == "required"
    named = normalize_tool_choice({"type": "function", "function": {"name": "ADD"}}, TOOLS)
    assert named == {"type": "function", "function": {"name": "add"}}
    assert forced_function(named) == "add"
    assert normalize_tool_choice({"type": "function", "name": "add"}, TOOLS) == named
    assert [t["function"]["name"] for t in tools_for_choice(TOOLS, named)] == ["add"]
    assert tools_for_choice(TOOLS, "none") == []
    assert tools_for_choice(TOOLS, "required") == TOOLS


@pytest.mark.parametrize(
    ("choice", "tools", "message"),
    [
        (
            {"type": "function", "function": {"name": "delete_all"}},
            TOOLS,
            "unknown function 'delete_all'",
        ),
        ("required", [], "at least one tool"),
        ("sometimes", TOOLS, "invalid tool_choice 'sometimes'"),
        ({"type": "function", "function": {}}, TOOLS, "must name a function"),
        ({"type": "retrieval"}, TOOLS, "unsupported tool_choice type"),
        (3, TOOLS, "invalid tool_choice"),
    ],
)
def test_tool_choice_errors(choice: Any, tools: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ToolChoiceError, match=message):
        normalize_tool_choice(choice, tools)
    assert issubclass(ToolChoiceError, ValueError)
