"""Parsing of every tool-call format, one-shot and streaming.

Every case is also run through ``StreamingToolParser`` in many chunkings, and the
concatenated deltas must equal the one-shot result (``assert_stream_matches``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

import pytest

from exo_tools.tools import (
    FORMATS,
    ParsedOutput,
    StreamDelta,
    StreamingToolParser,
    parse_tool_calls,
)


def _fn(
    name: str, properties: dict[str, Any], required: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} tool",
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required or [],
                **extra,
            },
        },
    }


TOOLS = [
    _fn("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}, ["city"]),
    _fn("add", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"]),
    _fn(
        "write",
        {"filePath": {"type": "string"}, "content": {"type": "string"}},
        ["filePath", "content"],
    ),
    _fn("get_time", {}),
]
LLAMA_BUILTINS = [
    *TOOLS,
    _fn("brave_search", {"query": {"type": "string"}}),
    _fn("code_interpreter", {"code": {"type": "string"}}),
]

DS_CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
DS_CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
DS_CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
DS_CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
DS_SEP = "<\uff5ctool\u2581sep\uff5c>"


# ---- streaming harness -------------------------------------------------------------


@dataclass
class Assembled:
    content: str = ""
    reasoning: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)


def assemble(deltas: list[StreamDelta]) -> Assembled:
    """Concatenate deltas the way an OpenAI client does, checking the wire rules."""
    out = Assembled()
    for d in deltas:
        set_fields = [x for x in (d.content, d.reasoning, d.tool_call) if x is not None]
        assert len(set_fields) == 1, d
        if d.content is not None:
            assert d.content, "empty content delta"
            out.content += d.content
        elif d.reasoning is not None:
            out.reasoning += d.reasoning
        else:
            tc = d.tool_call
            assert tc is not None
            index = tc["index"]
            if index not in out.calls:
                assert index == len(out.calls), "indices must be dense and in order"
                assert tc.get("type") == "function"
                assert tc.get("id")
                assert tc["function"].get("name"), "first delta carries a non-empty name"
                assert tc["function"]["arguments"] == ""
                out.calls[index] = {"id": tc["id"], "name": tc["function"]["name"], "arguments": ""}
            else:
                assert "id" not in tc and "name" not in tc["function"], "name/id are sent once"
                out.calls[index]["arguments"] += tc["function"]["arguments"]
            assert d.content is None and d.reasoning is None
    return out


def chunkings(text: str) -> list[list[str]]:
    out = [[text], list(text)]
    for seed in range(4):
        rng = random.Random(seed)
        chunks, i = [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            chunks.append(text[i : i + n])
            i += n
        out.append(chunks)
    # Every two-way split: catches a tag or JSON token cut at any position.
    out += [[text[:i], text[i:]] for i in range(1, len(text))]
    return out


def assert_stream_matches(
    text: str, tools: list[dict[str, Any]], fmt: str, *, truncated: bool = False, **kw: Any
) -> ParsedOutput:
    expected = parse_tool_calls(text, tools, fmt, truncated=truncated, **kw)
    for chunks in chunkings(text):
        parser = StreamingToolParser(tools, fmt, **kw)
        deltas: list[StreamDelta] = []
        for chunk in chunks:
            deltas += parser.feed(chunk)
        deltas += parser.finish(truncated=truncated)
        got = assemble(deltas)
        where = f"chunks={chunks[:3]}..."
        assert got.content == (expected.content or ""), where
        assert got.reasoning == (expected.reasoning or ""), where
        assert [c["name"] for c in got.calls.values()] == [c.name for c in expected.tool_calls], (
            where
        )
        assert [c["arguments"] for c in got.calls.values()] == [
            c.arguments_json for c in expected.tool_calls
        ], where
        for c in got.calls.values():
            assert isinstance(json.loads(c["arguments"]), dict)
        assert [c.name for c in parser.tool_calls] == [c.name for c in expected.tool_calls]
    return expected


def check(
    fmt: str,
    text: str,
    calls: list[tuple[str, dict[str, Any]]],
    content: str | None,
    *,
    tools: list[dict[str, Any]] = TOOLS,
    truncated: bool = False,
    reasoning: str | None = None,
    **kw: Any,
) -> ParsedOutput:
    parsed = parse_tool_calls(text, tools, fmt, truncated=truncated, **kw)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert parsed.content == content
    assert parsed.reasoning == reasoning
    assert_stream_matches(text, tools, fmt, truncated=truncated, **kw)
    return parsed


W = ("get_weather", {"city": "Paris"})
W3 = ("get_weather", {"city": "Paris", "days": 3})

# ---- hermes ---------------------------------------------------------------------------


def test_hermes_call_with_prose_and_normalization() -> None:
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": "3"}}\n</tool_call>\nOne moment.'
    parsed = check("hermes", text, [W3], "Let me check.\n\nOne moment.")
    call = parsed.tool_calls[0].to_openai()
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}


def test_hermes_parallel_calls() -> None:
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "add", "arguments": {"a": 1, "b": "2.5"}}</tool_call>'
    )
    check("hermes", text, [W, ("add", {"a": 1, "b": 2.5})], None)


def test_hermes_double_encoded_arguments() -> None:
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>'
    check("hermes", text, [("add", {"a": 1, "b": 2})], None)


def test_hermes_parameters_key() -> None:
    check(
        "hermes",
        '<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>',
        [W],
        None,
    )


def test_hermes_end_tag_inside_string_argument() -> None:
    text = '<tool_call>{"name": "write", "arguments": {"filePath": "a.md", "content": "x </tool_call> y"}}</tool_call> done'
    check("hermes", text, [("write", {"filePath": "a.md", "content": "x </tool_call> y"})], "done")


def test_hermes_raw_newline_inside_json_string() -> None:
    text = '<tool_call>{"name": "write", "arguments": {"filePath": "a.py", "content": "line1\nline2"}}</tool_call>'
    check("hermes", text, [("write", {"filePath": "a.py", "content": "line1\nline2"})], None)


def test_hermes_missing_close_tag_at_eos() -> None:
    check(
        "hermes",
        'Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
        [W],
        "Sure",
    )
    # Also when generation was cut at max_tokens: the payload itself is complete.
    check(
        "hermes",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool',
        [W],
        None,
        truncated=True,
    )


@pytest.mark.parametrize("truncated", [True, False])
def test_hermes_truncated_json_is_content(truncated: bool) -> None:
    text = 'Ok <tool_call>{"name": "get_weather", "arguments": {"city": "Par'
    check("hermes", text, [], text, truncated=truncated)


def test_fenced_json_call_only_for_declared_tools() -> None:
    declared = 'Here:\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\nbye'
    check("hermes", declared, [W], "Here:\n\nbye")
    unknown = 'Example:\n```json\n{"name": "launch", "arguments": {"x": 1}}\n```'
    check("hermes", unknown, [], unknown)
    code = "```python\nprint({'a': 1})\n```"
    check("hermes", code, [], code)


def test_json_that_is_not_a_call_stays_content() -> None:
    text = 'The data:\n{"city": "Paris", "days": 3}\nand {"name": "get_weather"} inline.'
    check("hermes", text, [], text)
    check("llama3_json", '{"name": "Bob", "age": 3}', [], '{"name": "Bob", "age": 3}')


def test_unknown_tool_passes_through_unnormalized() -> None:
    text = '<tool_call>{"name": "lookup", "arguments": {"days": "3", "file": "x"}}</tool_call>'
    check("hermes", text, [("lookup", {"days": "3", "file": "x"})], None)


def test_tool_name_case_mapped_to_unique_declared_tool() -> None:
    text = '<tool_call>{"name": "Get_Weather", "arguments": {"city": "Paris", "days": "3"}}</tool_call>'
    check("hermes", text, [W3], None)
    ambiguous = [_fn("Run", {}), _fn("run", {})]
    parsed = check(
        "hermes",
        '<tool_call>{"name": "RUN", "arguments": {}}</tool_call>',
        [("RUN", {})],
        None,
        tools=ambiguous,
    )
    assert parsed.tool_calls[0].arguments_json == "{}"


def test_hermes_think_block_is_reasoning_and_not_parsed() -> None:
    text = '<think>maybe <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>?</think>\nNo tool needed.'
    check(
        "hermes",
        text,
        [],
        "No tool needed.",
        reasoning='maybe <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>?',
    )
    # Template already opened <think>: output starts inside reasoning.
    check("hermes", "plan</think>answer", [], "answer", reasoning="plan", in_reasoning=True)


def test_hermes_tag_followed_by_prose_is_content() -> None:
    text = "Use <tool_call> tags to call tools."
    check("hermes", text, [], text)
    check("hermes", "a < b and <tool", [], "a < b and <tool")


def test_hermes_list_payload_and_flattened_arguments() -> None:
    text = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time"}]</tool_call>'
    check("hermes", text, [W, ("get_time", {})], None)
    check("hermes", '<tool_call>{"name": "get_weather", "city": "Paris"}</tool_call>', [W], None)


def test_hermes_bare_json_call_for_declared_tool() -> None:
    check("hermes", '{"name": "get_weather", "arguments": {"city": "Paris"}}', [W], None)
    text = '{"name": "nope", "arguments": {"city": "Paris"}}'
    check("hermes", text, [], text)


def test_openai_nested_function_shape() -> None:
    text = '<tool_call>{"type": "function", "function": {"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}}</tool_call>'
    check("hermes", text, [W], None)


# ---- qwen3_coder -----------------------------------------------------------------------


def test_qwen3_coder_xml_values_typed_by_schema() -> None:
    text = (
        "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
    )
    check("qwen3_coder", text, [W3], "I'll check.")


def test_qwen3_coder_close_tag_inside_value_and_parallel() -> None:
    content = "a </parameter> b\n</function> c"
    text = (
        f"<tool_call>\n<function=write>\n<parameter=filePath>\nx.txt\n</parameter>\n"
        f"<parameter=content>\n{content}\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
    )
    check(
        "qwen3_coder",
        text,
        [("write", {"filePath": "x.txt", "content": content}), ("get_time", {})],
        None,
    )


def test_qwen3_coder_missing_close_tags() -> None:
    text = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    check("qwen3_coder", text, [W], None)
    # At max_tokens more parameters may have been coming: not a call.
    check("qwen3_coder", text, [], text.strip(), truncated=True)
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    check("qwen3_coder", cut, [], cut, truncated=True)


def test_qwen3_coder_accepts_json_and_bare_function() -> None:
    check(
        "qwen3_coder",
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
        [W],
        None,
    )
    check(
        "qwen3_coder",
        "<function=get_weather><parameter=city>Paris</parameter></function>",
        [W],
        None,
    )


def test_qwen3_coder_unknown_tool_values_stay_strings() -> None:
    text = "<tool_call><function=other><parameter=n>\n5\n</parameter></function></tool_call>"
    check("qwen3_coder", text, [("other", {"n": "5"})], None)


# ---- llama3_json -----------------------------------------------------------------------


def test_llama3_bare_json_and_python_tag() -> None:
    check("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', [W], None)
    check(
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "arguments": {"city": "Paris"}}<|eom_id|>',
        [W],
        None,
    )
    # Undeclared names are accepted at the start of the output (Llama's own format).
    check(
        "llama3_json",
        '{"name": "lookup", "parameters": {"q": "x"}}',
        [("lookup", {"q": "x"})],
        None,
    )


def test_llama3_semicolon_separated_calls() -> None:
    text = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "add", "parameters": {"a": "1", "b": 2}}<|eot_id|>'
    check("llama3_json", text, [W, ("add", {"a": 1, "b": 2})], None)


def test_llama3_json_after_prose_needs_declared_tool() -> None:
    text = 'Checking.\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
    check("llama3_json", text, [W], "Checking.")
    other = 'Checking.\n{"name": "lookup", "parameters": {"q": "x"}}'
    check("llama3_json", other, [], other)


def test_llama3_builtin_calls_only_when_declared() -> None:
    text = '<|python_tag|>brave_search.call(query="weather in Paris")<|eom_id|>'
    check(
        "llama3_json",
        text,
        [("brave_search", {"query": "weather in Paris"})],
        None,
        tools=LLAMA_BUILTINS,
    )
    check("llama3_json", text, [], '<|python_tag|>brave_search.call(query="weather in Paris")')
    # Without code_interpreter the name prefix must still be held while streaming.
    only_search = [*TOOLS, LLAMA_BUILTINS[-2]]
    check(
        "llama3_json",
        text,
        [("brave_search", {"query": "weather in Paris"})],
        None,
        tools=only_search,
    )


def test_llama3_code_interpreter_raw_code() -> None:
    text = "<|python_tag|>print(2 + 2)\nx = 1<|eom_id|>"
    check(
        "llama3_json",
        text,
        [("code_interpreter", {"code": "print(2 + 2)\nx = 1"})],
        None,
        tools=LLAMA_BUILTINS,
    )
    cut = "<|python_tag|>print(2 +"
    check("llama3_json", cut, [], cut, tools=LLAMA_BUILTINS, truncated=True)


# ---- pythonic ----------------------------------------------------------------------------


def test_pythonic_list_with_literals() -> None:
    text = '[get_weather(city="Paris", days="3"), add(a=1, b=2.5), lookup(flags=[true, None], opts={"k": \'v\'})]'
    check(
        "pythonic",
        text,
        [W3, ("add", {"a": 1, "b": 2.5}), ("lookup", {"flags": [True, None], "opts": {"k": "v"}})],
        None,
    )


def test_pythonic_lfm2_markers() -> None:
    text = 'Sure.<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|>Checking now.'
    check("pythonic", text, [W], "Sure.Checking now.")
    json_inside = '<|tool_call_start|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|tool_call_end|>'
    check("pythonic", json_inside, [W], None)


def test_pythonic_rejects_non_literals_and_prose() -> None:
    evil = '[get_weather(city=__import__("os").system("echo hi"))]'
    check("pythonic", evil, [], evil)
    link = "[docs](https://example.com) and [1] more"
    check("pythonic", link, [], link)


def test_pythonic_positional_and_after_prose() -> None:
    check("pythonic", '[add(1, "2")]', [("add", {"a": 1, "b": 2})], None)
    text = 'Let me look.\n[get_weather(city="Paris")]'
    check("pythonic", text, [W], "Let me look.")
    other = 'Let me look.\n[lookup(q="x")]'
    check("pythonic", other, [], other)


def test_pythonic_triple_quoted_and_bracket_in_string() -> None:
    text = '[write(filePath="a.py", content="""x = [1,\n  ")"]""")]'
    check("pythonic", text, [("write", {"filePath": "a.py", "content": 'x = [1,\n  ")"]'})], None)


# ---- mistral -----------------------------------------------------------------------------


def test_mistral_pre_v11_list() -> None:
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'
    parsed = check("mistral", text, [W, ("get_time", {})], None)
    for call in parsed.tool_calls:
        assert re.fullmatch(r"[A-Za-z0-9]{9}", call.id)


def test_mistral_v11_and_call_id() -> None:
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]add[ARGS]{"a": 1, "b": 2}'
    check("mistral", text, [W, ("add", {"a": 1, "b": 2})], None)
    check("mistral", '[TOOL_CALLS]get_weather[CALL_ID]abc123XYZ[ARGS]{"city": "Paris"}', [W], None)


def test_mistral_truncated_and_not_a_call() -> None:
    cut = '[TOOL_CALLS]get_weather[ARGS]{"city": "Par'
    check("mistral", cut, [], cut, truncated=True)
    prose = "[TOOL_CALLS] is the token"
    check("mistral", prose, [], prose)


# ---- gpt_oss -----------------------------------------------------------------------------


def test_gpt_oss_reasoning_then_call() -> None:
    text = (
        "<|channel|>analysis<|message|>Need weather.<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris", "days": "3"}<|call|>'
    )
    check("gpt_oss", text, [W3], None, reasoning="Need weather.")


def test_gpt_oss_final_channel_and_preamble() -> None:
    text = (
        "<|channel|>analysis<|message|>Easy.<|end|>"
        "<|start|>assistant<|channel|>commentary<|message|>Checking.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is sunny.<|return|>"
    )
    check("gpt_oss", text, [], "Checking.It is sunny.", reasoning="Easy.")


def test_gpt_oss_recipient_before_channel_and_missing_call_token() -> None:
    text = '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}'
    check("gpt_oss", text, [W], None)
    cut = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Pa'
    check("gpt_oss", cut, [], cut, truncated=True)


def test_gpt_oss_in_reasoning_start() -> None:
    check(
        "gpt_oss",
        "thinking<|end|><|start|>assistant<|channel|>final<|message|>hi",
        [],
        "hi",
        reasoning="thinking",
        in_reasoning=True,
    )


# ---- deepseek_v3 -------------------------------------------------------------------------


def test_deepseek_v3_fenced_calls() -> None:
    text = (
        f"Let me check.{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n"
        f'{{"city": "Paris", "days": "3"}}\n```{DS_CALL_END}\n{DS_CALL_BEGIN}function{DS_SEP}get_time\n'
        f"```json\n{{}}\n```{DS_CALL_END}{DS_CALLS_END}"
    )
    check("deepseek_v3", text, [W3, ("get_time", {})], "Let me check.")


def test_deepseek_v31_and_reasoning() -> None:
    text = (
        f"<think>need data</think>{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}"
        f'{{"city": "Paris"}}{DS_CALL_END}{DS_CALLS_END}'
    )
    check("deepseek_v3", text, [W], None, reasoning="need data")


def test_deepseek_truncated_is_content() -> None:
    cut = f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{"city": "Pa'
    check("deepseek_v3", cut, [], cut[len(DS_CALLS_BEGIN) :], truncated=True)


# ---- general -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_text_and_empty_output(fmt: str) -> None:
    check(
        fmt, "  Hello there! 2 < 3 and {braces} [x].\n", [], "Hello there! 2 < 3 and {braces} [x]."
    )
    check(fmt, "", [], None)


def test_unknown_format_rejected() -> None:
    with pytest.raises(ValueError, match="unknown tool-call format"):
        parse_tool_calls("x", TOOLS, "nope")


def test_feed_after_finish_rejected() -> None:
    parser = StreamingToolParser(TOOLS, "hermes")
    parser.finish()
    with pytest.raises(RuntimeError):
        parser.feed("x")


def test_stream_emits_prose_before_call_completes() -> None:
    parser = StreamingToolParser(TOOLS, "hermes")
    first = parser.feed("Checking the weather <tool_")
    assert [d.content for d in first] == ["Checking the weather"]
    assert parser.feed('call>{"name": "get_weather", "arguments": {"city": "Par') == []
    done = parser.feed('is"}}</tool_call>')
    assert [d.tool_call["function"] for d in done if d.tool_call] == [
        {"name": "get_weather", "arguments": ""},
        {"arguments": '{"city": "Paris"}'},
    ]


def test_stream_delta_fields() -> None:
    assert StreamDelta(content="hi") == StreamDelta("hi", None, None)
    assert (StreamDelta(reasoning="hmm").content, StreamDelta(reasoning="hmm").reasoning) == (
        None,
        "hmm",
    )


def test_long_argument_streams_in_reasonable_time() -> None:
    body = "x" * 20000
    text = (
        '<tool_call>{"name": "write", "arguments": {"filePath": "a", "content": "'
        + body
        + '"}}</tool_call>'
    )
    parser = StreamingToolParser(TOOLS, "hermes")
    deltas = []
    for i in range(0, len(text), 4):
        deltas += parser.feed(text[i : i + 4])
    deltas += parser.finish()
    assert assemble(deltas).calls[0]["arguments"] == json.dumps({"filePath": "a", "content": body})


# ---- randomized invariant ------------------------------------------------------------------

_PROSE = [
    "Hello ",
    "a < b ",
    "x {y} ",
    "\n{",
    "\n[",
    "[1] ",
    "```",
    "\n```json\n",
    "<",
    "\n",
    "  ",
    "done.",
    '"}',
    "}",
]
_SNIPPETS: dict[str, list[str]] = {
    "hermes": [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "P"}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": \\"1\\"}"}',
        "<tool_call>",
        "</tool_call>",
        "<think>r</think>",
        '\n{"name": "get_time", "arguments": {}}\n',
    ],
    "qwen3_coder": [
        "<tool_call><function=get_weather><parameter=city>P</parameter></function></tool_call>",
        "<function=add>\n<parameter=a>\n1\n</parameter>",
        "</parameter>",
        "<tool_call>",
    ],
    "llama3_json": [
        '{"name": "get_weather", "parameters": {"city": "P"}}',
        '; {"name": "x", "parameters": {}}',
        "<|python_tag|>",
        "<|eot_id|>",
        '\n{"name": "add", "parameters": {"a": 1, "b": 2}}',
    ],
    "pythonic": [
        '[get_weather(city="P")]',
        "<|tool_call_start|>[add(a=1, b=2)]<|tool_call_end|>",
        "\n[get_time()]",
        "[x](y)",
        "<|tool_call_start|>",
    ],
    "mistral": [
        '[TOOL_CALLS]get_weather[ARGS]{"city": "P"}',
        '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}]',
        "[TOOL_CALLS]",
        "[ARGS]",
    ],
    "gpt_oss": [
        "<|channel|>analysis<|message|>think<|end|>",
        '<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "P"}<|call|>',
        "<|start|>assistant<|channel|>final<|message|>ok",
        "<|end|>",
        "<|channel|>",
    ],
    "deepseek_v3": [
        f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}function{DS_SEP}get_weather\n```json\n{{"city": "P"}}\n```{DS_CALL_END}{DS_CALLS_END}',
        f"{DS_CALL_BEGIN}get_time{DS_SEP}{{}}{DS_CALL_END}",
        DS_CALLS_BEGIN,
        "<think>hm",
    ],
    "kimi_k2": [
        '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>{"city": "P"}<|tool_call_end|><|tool_calls_section_end|>',
        "<|tool_call_begin|>get_time:1<|tool_call_argument_begin|>{}<|tool_call_end|>",
        "<|tool_calls_section_begin|>",
        "<think>r</think>",
    ],
    "glm45": [
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>P</arg_value>\n</tool_call>",
        "<tool_call>get_time</tool_call>",
        "<arg_value>",
        "<tool_call>",
        "<think>r</think>",
    ],
    "minimax_m2": [
        '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">P</parameter>\n</invoke>\n</minimax:tool_call>',
        "<minimax:tool_call>",
        "</think>",
    ],
    "deepseek_v31": [
        f'{DS_CALLS_BEGIN}{DS_CALL_BEGIN}get_weather{DS_SEP}{{"city": "P"}}{DS_CALL_END}{DS_CALLS_END}',
        "</think>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",
    ],
    "llama4_pythonic": [
        '<|python_start|>[get_weather(city="P")]<|python_end|>',
        "[get_time()]",
        "<|python_start|>",
        "<|eot|>",
    ],
    "functionary_v3_2": [
        '>>>get_weather\n{"city": "P"}',
        ">>>all\nok",
        ">>>",
        "get_time\n{}",
    ],
    "granite": [
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "P"}}]',
        "<|tool_call|>",
    ],
    "phi4_mini_json": [
        'functools[{"name": "get_weather", "arguments": {"city": "P"}}]',
        "functools",
    ],
    "xlam": [
        '[{"name": "get_weather", "arguments": {"city": "P"}}]',
        '<tool_call>[{"name": "get_time", "arguments": {}}]</tool_call>',
        "<think>r</think>",
    ],
    "seed_oss": [
        "<seed:tool_call>\n<function=get_weather>\n<parameter=city>P</parameter>\n</function>\n</seed:tool_call>",
        "<seed:think>r</seed:think>",
        "<seed:tool_call>",
    ],
    "hunyuan_a13b": [
        '<tool_calls>[{"name": "get_weather", "arguments": {"city": "P"}}]</tool_calls>',
        "<answer>",
        "<think>r</think>",
    ],
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_texts_stream_like_one_shot(fmt: str) -> None:
    rng = random.Random(fmt)
    pool = _PROSE + _SNIPPETS[fmt]
    for _ in range(60):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(1, 8)))
        for truncated in (False, True):
            expected = parse_tool_calls(text, TOOLS, fmt, truncated=truncated)
            for chunks in chunkings(text)[:6] + [
                [text[:k], text[k:]]
                for k in rng.sample(range(len(text) + 1), min(len(text) + 1, 6))
            ]:
                parser = StreamingToolParser(TOOLS, fmt)
                deltas = [d for c in chunks for d in parser.feed(c)] + parser.finish(
                    truncated=truncated
                )
                got = assemble(deltas)
                assert got.content == (expected.content or ""), (text, chunks)
                assert got.reasoning == (expected.reasoning or ""), (text, chunks)
                assert [(c["name"], c["arguments"]) for c in got.calls.values()] == [
                    (c.name, c.arguments_json) for c in expected.tool_calls
                ], (text, chunks)
