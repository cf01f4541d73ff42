"""History rewriting for chat templates, checked against a Llama 3.1-style template."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from exo_tools.tools import (
    FORMATS,
    flatten_content,
    fold_tool_history,
    get_format,
    parse_tool_calls,
    rewrite_history,
)

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            },
        },
    },
]
FIXTURE = Path(__file__).parent / "fixtures" / "llama31_tool_template.jinja"


class TemplateError(Exception):
    pass


def _raise(message: str) -> None:
    raise TemplateError(message)


def render_llama(messages: list[dict[str, Any]]) -> str:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined
    )
    env.globals["raise_exception"] = _raise
    template = env.from_string(FIXTURE.read_text())
    return template.render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True
    )


def _call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def parallel_history() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather in Paris,"},
                {"type": "text", "text": "Rome and 1+2?"},
            ],
        },
        {
            "role": "assistant",
            "content": "Let me look these up.",
            "tool_calls": [
                _call("call_a", "get_weather", '{"city": "Paris"}'),
                _call("call_b", "get_weather", '{"city": "Rome"}'),
                _call("call_c", "add", {"a": 1, "b": 2}),
            ],
        },
        # Results arrive out of order; they are matched by tool_call_id.
        {"role": "tool", "tool_call_id": "call_c", "content": "3"},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "rainy"}]},
        {"role": "assistant", "content": "Sunny, rainy, 3.", "tool_calls": []},
    ]


def test_llama_template_rejects_parallel_calls_raw() -> None:
    with pytest.raises(TemplateError, match="single tool-calls"):
        render_llama(parallel_history())


def test_llama_template_renders_after_rewrite() -> None:
    original = parallel_history()
    snapshot = copy.deepcopy(original)
    rewritten = rewrite_history(original, "llama3_json")
    assert original == snapshot, "input must not be mutated"
    prompt = render_llama(rewritten)
    calls = re.findall(r'\{"name": "(\w+)", "parameters": (\{[^}]*\})\}', prompt)
    assert [(n, json.loads(a)) for n, a in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
        ("add", {"a": 1, "b": 2}),
    ]
    results = re.findall(
        r"<\|start_header_id\|>ipython<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", prompt
    )
    assert results == ["sunny", "rainy", "3"]
    assert "Let me look these up." in prompt
    assert "Weather in Paris,\nRome and 1+2?" in prompt
    assert rewrite_history(original, "llama3_json") == rewritten, "deterministic"


def test_llama_split_structure() -> None:
    out = rewrite_history(parallel_history(), "llama3_json")
    roles = [(m["role"], len(m.get("tool_calls", []))) for m in out]
    assert roles == [
        ("system", 0),
        ("user", 0),
        ("assistant", 0),
        ("assistant", 1),
        ("tool", 0),
        ("assistant", 1),
        ("tool", 0),
        ("assistant", 1),
        ("tool", 0),
        ("assistant", 0),
    ]
    assert out[2]["content"] == "Let me look these up."
    assert [m["tool_call_id"] for m in out if m["role"] == "tool"] == ["call_a", "call_b", "call_c"]
    assert "tool_calls" not in out[-1]


def test_results_matched_by_position_when_ids_missing() -> None:
    history = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [_call("x1", "f", "{}"), _call("x2", "g", "{}")],
        },
        {"role": "tool", "content": "first"},
        {"role": "tool", "tool_call_id": "x1", "content": "by id"},
    ]
    out = rewrite_history(history, "llama3_json")
    assert [(m["role"], m.get("content")) for m in out] == [
        ("assistant", ""),
        ("tool", "by id"),
        ("assistant", ""),
        ("tool", "first"),
    ]


def test_empty_tool_calls_raise_raw_but_not_after_rewrite() -> None:
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": []},
    ]
    with pytest.raises(TemplateError):
        render_llama(history)
    assert "hello<|eot_id|>" in render_llama(rewrite_history(history, "llama3_json"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_neutral_cleanups(fmt: str) -> None:
    history = parallel_history()
    out = rewrite_history(history, fmt)
    assert history == parallel_history()
    assert all(isinstance(m["content"], str) for m in out)
    assert "tool_calls" not in out[-1]
    args = [c["function"]["arguments"] for m in out for c in m.get("tool_calls", [])]
    if get_format(fmt).string_arguments_in_history:  # DeepSeek templates concatenate them
        assert [json.loads(a) for a in args] == [
            {"city": "Paris"},
            {"city": "Rome"},
            {"a": 1, "b": 2},
        ]
    else:
        assert args == [{"city": "Paris"}, {"city": "Rome"}, {"a": 1, "b": 2}]


def test_mistral_ids_are_nine_alnum_and_consistent() -> None:
    out = rewrite_history(parallel_history(), "mistral")
    call_ids = [c["id"] for m in out for c in m.get("tool_calls", [])]
    result_ids = [m["tool_call_id"] for m in out if m["role"] == "tool"]
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in call_ids)
    assert len(set(call_ids)) == 3
    assert sorted(call_ids) == sorted(result_ids)
    assert rewrite_history(parallel_history(), "mistral") == out


def test_undecodable_arguments_kept() -> None:
    out = rewrite_history(
        [{"role": "assistant", "tool_calls": [_call("a", "f", "{bad")]}], "hermes"
    )
    assert out[0]["tool_calls"][0]["function"]["arguments"] == "{bad"


def test_flatten_content() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}, "b"]
    assert flatten_content(parts) == "a\nb"
    assert flatten_content({"ok": True}) == '{"ok": true}'
    assert flatten_content(None) is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_fold_tool_history_round_trips_through_parser(fmt: str) -> None:
    folded = fold_tool_history(parallel_history(), fmt)
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in folded)
    assert [m["role"] for m in folded] == ["system", "user", "assistant", "user", "assistant"]
    parsed = parse_tool_calls(folded[2]["content"], TOOLS, fmt)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert parsed.content == "Let me look these up."
    results = folded[3]["content"]
    assert results.index("3") < results.index("sunny") < results.index("rainy")


def test_fold_hermes_results_markup() -> None:
    folded = fold_tool_history(parallel_history(), "hermes")
    assert folded[3]["content"].startswith(
        "<tool_response>\n3\n</tool_response>\n<tool_response>\nsunny"
    )
