"""True-prefix argument streaming, linear-time streaming, the new formats' published
examples and the known hard cases."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from exo_tools import constraints as C
from exo_tools.tools import (
    FORMATS,
    StreamingToolParser,
    infer_format,
    parse_tool_calls,
    render_assistant_tool_calls,
)
from tests.unit.test_tools_parsers import TOOLS, assemble, check

BODY = "".join(random.Random(7).choice('abcdef \n"\\é<>{}') for _ in range(3000))
WRITE = {"filePath": "notes/a.md", "content": BODY}
# Formats whose arguments stream as they are written (JSON objects, XML parameters).
STREAMING = [
    "hermes",
    "qwen3_coder",
    "llama3_json",
    "mistral",
    "gpt_oss",
    "deepseek_v3",
    "deepseek_v31",
    "kimi_k2",
    "glm45",
    "minimax_m2",
    "functionary_v3_2",
    "seed_oss",
    # JSON lists of envelopes: the first call streams, later ones arrive whole.
    "granite",
    "phi4_mini_json",
    "xlam",
    "hunyuan_a13b",
]


def _random_chunks(text: str, seed: int, longest: int) -> list[str]:
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(1, longest)
        chunks.append(text[i : i + n])
        i += n
    return chunks


def _feed(text: str, fmt: str, chunks: list[str]) -> tuple[list[Any], list[int]]:
    parser = StreamingToolParser(TOOLS, fmt, in_reasoning=False)
    deltas, fed_at = [], []
    fed = 0
    for chunk in chunks:
        fed += len(chunk)
        for d in parser.feed(chunk):
            deltas.append(d)
            fed_at.append(fed)
    for d in parser.finish():
        deltas.append(d)
        fed_at.append(fed)
    return deltas, fed_at


@pytest.mark.parametrize("fmt", STREAMING)
def test_long_string_argument_streams_as_true_prefixes(fmt: str) -> None:
    text = render_assistant_tool_calls([{"function": {"name": "write", "arguments": WRITE}}], fmt)
    if fmt == "mistral":  # the v11 spelling; the pre-v11 list is tested with the lists
        text = "[TOOL_CALLS]write[ARGS]" + json.dumps(WRITE)
    expected = parse_tool_calls(text, TOOLS, fmt, in_reasoning=False).tool_calls[0].arguments_json
    assert json.loads(expected) == WRITE
    deltas, fed_at = _feed(text, fmt, list(text))
    fragments = [
        (d.tool_call["function"]["arguments"], at)
        for d, at in zip(deltas, fed_at, strict=True)
        if d.tool_call is not None and d.tool_call["function"]["arguments"]
    ]
    first_at = fragments[0][1]
    assert first_at < 0.4 * len(text), (first_at, len(text))
    so_far = ""
    for fragment, _ in fragments:
        so_far += fragment
        assert expected.startswith(so_far)
    assert so_far == expected
    assert len(fragments) > 10  # the string grew in many steps
    for seed in range(3):
        got = assemble(_feed(text, fmt, _random_chunks(text, seed, 40))[0])
        assert [c["arguments"] for c in got.calls.values()] == [expected]


def test_normalization_is_kept_while_streaming() -> None:
    # `days` is coerced "3" -> 3; an alias key stops early streaming; both stay exact.
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "'
        + "P" * 200
        + '", "days": "3"}}</tool_call>'
    )
    deltas, _ = _feed(text, "hermes", list(text))
    assert assemble(deltas).calls[0]["arguments"] == json.dumps({"city": "P" * 200, "days": 3})
    alias = (
        '<tool_call>{"name": "write", "arguments": {"file_path": "a", "content": "'
        + "x" * 200
        + '"}}</tool_call>'
    )
    deltas, _ = _feed(alias, "hermes", list(alias))
    assert assemble(deltas).calls[0]["arguments"] == json.dumps(
        {"filePath": "a", "content": "x" * 200}
    )


def test_streamed_call_cut_off_keeps_what_was_written() -> None:
    text = '<tool_call>{"name": "write", "arguments": {"filePath": "a", "content": "' + "y" * 300
    parsed = check(
        "hermes", text, [("write", {"filePath": "a", "content": "y" * 300})], None, truncated=True
    )
    assert parsed.tool_calls


@pytest.mark.parametrize("fmt", ["mistral", "granite", "xlam", "pythonic"])
def test_call_list_streams_its_first_call(fmt: str) -> None:
    marker = {"mistral": "[TOOL_CALLS]", "granite": "<|tool_call|>"}.get(fmt, "")
    calls = [{"name": "write", "arguments": WRITE}, {"name": "get_weather", "arguments": {}}]
    text = marker + json.dumps(calls)
    expected = parse_tool_calls(text, TOOLS, fmt).tool_calls
    assert [c.name for c in expected] == ["write", "get_weather"]
    deltas, fed_at = _feed(text, fmt, list(text))
    first = next(at for d, at in zip(deltas, fed_at, strict=True) if d.tool_call is not None)
    assert first < 0.2 * len(text)
    got = assemble(deltas)
    assert [c["arguments"] for c in got.calls.values()] == [c.arguments_json for c in expected]
    # Cut off in the second call: the streamed first one stands, in one-shot parsing too.
    cut = text[: text.index("get_weather") + 4]
    check(fmt, cut, [("write", WRITE)], None, truncated=True)


@pytest.mark.parametrize(
    ("source", "content"),
    [
        (r'"""say ""hi"" \\ ok"""', r'say ""hi"" \ ok'),  # quotes just before the close
        (r"'''x\''''", "x'"),
        ('""', ""),
        (r"'a\'b'", "a'b"),
    ],
)
def test_pythonic_strings_split_anywhere(source: str, content: str) -> None:
    # The scanner keeps its place between feeds: a closing quote, an escape or an
    # empty string split across feeds must scan as it does whole.
    text = f"[write(filePath='a.py', content={source})] done"
    check("pythonic", text, [("write", {"filePath": "a.py", "content": content})], "done")


def test_pythonic_unterminated_line_string_is_prose() -> None:
    text = "[write(filePath='a.py\n', content='x')]"
    check("pythonic", text, [], text)


# ---- the formats' published examples --------------------------------------------------

W = ("get_weather", {"city": "Paris"})


def test_kimi_k2() -> None:
    text = (
        "Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>'
        "functions.get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|>"
        "<|tool_calls_section_end|>"
    )
    check("kimi_k2", text, [W, ("get_time", {})], "Let me check.")


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
    ],
)
def test_glm45_and_glm47(text: str) -> None:
    check(
        "glm45",
        "<think>plan</think>" + text,
        [("get_weather", {"city": "Paris", "days": 3})],
        None,
        reasoning="plan",
    )


def test_minimax_m2_implicit_think() -> None:
    text = (
        'weighing options</think>\n<minimax:tool_call>\n<invoke name="get_weather">\n'
        '<parameter name="city">Paris</parameter>\n<parameter name="days">2</parameter>\n'
        "</invoke>\n</minimax:tool_call>"
    )
    check(
        "minimax_m2",
        text,
        [("get_weather", {"city": "Paris", "days": 2})],
        None,
        reasoning="weighing options",
    )


def test_deepseek_v31_end_of_sentence_and_implicit_think() -> None:
    ds = "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>get_weather<\uff5ctool\u2581sep\uff5c>"
    text = f'hmm</think>{ds}{{"city": "Paris"}}<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c><\uff5cend\u2581of\u2581sentence\uff5c>'
    check("deepseek_v31", text, [W], None, reasoning="hmm")
    check("deepseek_v3", "Hello!<\uff5cend\u2581of\u2581sentence\uff5c>", [], "Hello!")


def test_llama4_functionary_granite_phi4_xlam_seed_hunyuan() -> None:
    check("llama4_pythonic", '<|python_start|>[get_weather(city="Paris")]<|python_end|>', [W], None)
    check("functionary_v3_2", 'get_weather\n{"city": "Paris"}', [W], None)
    check("functionary_v3_2", 'all\nSure.>>>get_weather\n{"city": "Paris"}', [W], "Sure.")
    check(
        "granite",
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        [W],
        None,
    )
    check(
        "phi4_mini_json",
        'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        [W],
        None,
    )
    check("xlam", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', [W], None)
    check(
        "seed_oss",
        "<seed:think>ok</seed:think><seed:tool_call>\n<function=get_weather>\n"
        "<parameter=city>Paris</parameter>\n</function>\n</seed:tool_call>",
        [W],
        None,
        reasoning="ok",
    )
    check(
        "hunyuan_a13b",
        '<think>x</think><tool_calls>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_calls>',
        [W],
        None,
        reasoning="x",
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("<|tool_calls_section_begin|>{{ calls }}", "kimi_k2"),
        ("<tool_call>{{ name }}<arg_key>{{ k }}</arg_key>", "glm45"),
        ("<minimax:tool_call>\n<invoke name=", "minimax_m2"),
        ("<\uff5ctool\u2581calls\u2581begin\uff5c>{{ name }}</think>", "deepseek_v31"),
        ("<|python_start|>{{ call }}<|python_end|>", "llama4_pythonic"),
        (">>>all\n{{ content }}", "functionary_v3_2"),
        ("<|tool_call|>{{ calls }}", "granite"),
        ("<|tool|>{{ tools }}<|/tool|>", "phi4_mini_json"),
        ("<seed:tool_call>{{ call }}", "seed_oss"),
        ("<tool_calls>{{ calls }}</tool_calls>", "hunyuan_a13b"),
    ],
)
def test_infer_new_formats(template: str, expected: str) -> None:
    assert infer_format(template) == expected


# ---- hard cases ---------------------------------------------------------------------------


def test_fenced_example_is_prose() -> None:
    text = 'Use it like this:\n```xml\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n```\nDone.'
    check("hermes", text, [], text)


def test_python_literals_in_hermes_call() -> None:
    tools = [
        *TOOLS,
        {
            "type": "function",
            "function": {
                "name": "edit",
                "parameters": {
                    "type": "object",
                    "properties": {"replaceAll": {"type": "boolean"}, "old": {"type": "string"}},
                },
            },
        },
    ]
    text = '<tool_call>{"name": "edit", "arguments": {"old": "True or None", "replaceAll": True}}</tool_call>'
    check(
        "hermes", text, [("edit", {"old": "True or None", "replaceAll": True})], None, tools=tools
    )


def test_qwen3_coder_missing_close_tag_recovered() -> None:
    text = (
        "<tool_call>\n<function=write>\n<parameter=filePath>\na.txt\n"
        "<parameter=content>\nhello\n</parameter>\n</function>\n</tool_call>"
    )
    check("qwen3_coder", text, [("write", {"filePath": "a.txt", "content": "hello"})], None)


def test_magistral_think_is_reasoning() -> None:
    check("mistral", "[THINK]plan[/THINK]Answer.", [], "Answer.", reasoning="plan")


def test_r1_without_opening_think() -> None:
    check(
        "deepseek_v3",
        "I reason here</think>The answer.",
        [],
        "The answer.",
        reasoning="I reason here",
    )


@pytest.mark.parametrize("fmt", sorted(C.TOOL_CALL_FORMATS))
def test_grammar_builds_and_renders_parse(fmt: str) -> None:
    spec = C.ConstraintSpec.parse(C.tool_call_constraint(TOOLS, fmt))
    assert spec.kind == "tool_calls"
    text = render_assistant_tool_calls(
        [{"function": {"name": "get_weather", "arguments": {"city": "P"}}}], fmt
    )
    assert [c.name for c in parse_tool_calls(text, TOOLS, fmt).tool_calls] == ["get_weather"]


def test_every_format_has_a_grammar_or_says_why() -> None:
    assert set(C.TOOL_CALL_FORMATS) >= {
        "hermes",
        "qwen3_coder",
        "llama3_json",
        "kimi_k2",
        "glm45",
        "minimax_m2",
    }
    assert set(FORMATS) - set(C.TOOL_CALL_FORMATS) == {
        "mistral",
        "pythonic",
        "gpt_oss",
        "llama4_pythonic",
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_long_round_trip_streams_like_one_shot(fmt: str) -> None:
    text = render_assistant_tool_calls([{"function": {"name": "write", "arguments": WRITE}}], fmt)
    expected = parse_tool_calls(text, TOOLS, fmt)
    assert [c.arguments for c in expected.tool_calls] == [WRITE]
    for seed in range(2):
        got = assemble(_feed(text, fmt, _random_chunks(text, seed, 9))[0])
        assert [c["arguments"] for c in got.calls.values()] == [
            expected.tool_calls[0].arguments_json
        ]
