"""Constraint builders, specs, the grammar tokenizer and mask application with the real SmolLM2
tokenizer and real llguidance (no model weights run here)."""

from __future__ import annotations

import functools
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from pydantic import ValidationError

from exo_tools import constraints as C
from exo_tools.engine.sampling import Sampler
from exo_tools.models.gguf import gguf_tokenizer, read_gguf
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.tools import parse_tool_calls, render_assistant_tool_calls
from exo_tools.types import SamplingParams
from tests.helpers.agent_tools import SCHEMA_2020, tool
from tests.helpers.generators import PrepareOnly

KEY = "test-smollm2"


STR = {"type": "string", "description": "a string"}
TOOLS = [
    tool(
        "read",
        "The read tool",
        {"filePath": STR, "offset": {"type": "number"}, "limit": {"type": "number"}},
        ["filePath"],
    ),
    tool(
        "bash",
        "The bash tool",
        {"command": STR, "description": STR, "timeout": {"type": "number"}},
        ["command", "description"],
    ),
    tool("glob", "The glob tool", {"pattern": STR, "path": STR}, ["pattern"]),
]


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> Iterator[TextTokenizer]:
    _, metadata = read_gguf(model_path)
    backend, _ = gguf_tokenizer(metadata)
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    text = TextTokenizer(
        backend, bos_token_id=None, eos_token_ids=[int(eos)] if eos is not None else []
    )
    yield text


@functools.cache
def _grammar(tokenizer: TextTokenizer) -> C.GrammarTokenizer:
    """The sampling node's grammar tokenizer (built once: it takes about a second)."""
    return C.grammar_tokenizer(KEY, tokenizer)


def _matcher(spec: str, tokenizer: TextTokenizer) -> C.TokenConstraint:
    return C.TokenConstraint.from_serialized(spec, _grammar(tokenizer))


def _accepts(spec: str, tokenizer: TextTokenizer, text: str) -> tuple[bool, bool]:
    """(every token consumed, grammar complete) for `text`."""
    constraint = _matcher(spec, tokenizer)
    for token in tokenizer.encode(text):
        if constraint.done:  # text left after the grammar ended
            return False, False
        constraint.advance(token)
        if constraint.error is not None:
            return False, False
    return True, constraint.done


def _call(name: str, arguments: dict[str, Any]) -> str:
    return render_assistant_tool_calls(
        [{"function": {"name": name, "arguments": arguments}}], "hermes"
    )


# spec builders


def test_spec_round_trip_names_kind_and_tokenizer() -> None:
    spec = C.ConstraintSpec.parse(C.tool_call_constraint(TOOLS, "hermes", tokenizer=KEY))
    assert spec.kind == "tool_calls"
    assert spec.tokenizer == KEY
    assert "<tool_call>" in spec.grammar
    assert C.ConstraintSpec.parse(spec.serialize()) == spec
    budgeted = C.ConstraintSpec.parse(
        C.tool_call_constraint(TOOLS, "qwen3_coder", tokenizer=KEY, budget=64)
    )
    assert (budgeted.budget, budgeted.closers) == (64, ("\n</parameter>", "</function>"))
    assert C.ConstraintSpec.parse(budgeted.serialize()) == budgeted


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        ('{"v": 9, "kind": "json_object", "grammar": "x"}', "version"),
        ('{"v": 1, "kind": "regexp", "grammar": "x"}', "unknown constraint kind"),
        ('{"v": 1, "kind": "json_object", "grammar": ""}', "no grammar"),
        ('{"v": 1, "kind": "json_object", "grammar": "x", "budget": 0}', "budget"),
        ('{"v": 1, "kind": "json_object", "grammar": "x", "closers": [""]}', "closers"),
    ],
)
def test_malformed_specs_are_rejected(text: str, message: str) -> None:
    with pytest.raises(C.ConstraintError, match=message):
        C.ConstraintSpec.parse(text)


def test_rendered_calls_are_accepted_and_bad_ones_refused(tokenizer: TextTokenizer) -> None:
    spec = C.tool_call_constraint(TOOLS, "hermes", parallel=False, tokenizer=KEY)
    assert _accepts(spec, tokenizer, _call("read", {"filePath": "/a.py", "offset": 3})) == (
        True,
        True,
    )
    assert _accepts(spec, tokenizer, _call("bash", {"command": "ls", "description": "list"}))[0]
    # Missing required key, undeclared key, wrong type, unknown tool, leading text.
    assert not _accepts(spec, tokenizer, _call("bash", {"command": "ls"}))[0]
    assert not _accepts(spec, tokenizer, _call("read", {"filePath": "a", "mode": "r"}))[0]
    assert not _accepts(spec, tokenizer, _call("read", {"filePath": 3}))[0]
    assert not _accepts(spec, tokenizer, _call("write", {"filePath": "a"}))[0]
    assert not _accepts(spec, tokenizer, "Sure! " + _call("glob", {"pattern": "*"}))[0]


def test_parallel_allows_several_calls_single_allows_one(tokenizer: TextTokenizer) -> None:
    two = _call("read", {"filePath": "a"}) + "\n" + _call("glob", {"pattern": "*.py"})
    parallel = C.tool_call_constraint(TOOLS, "hermes", parallel=True, tokenizer=KEY)
    single = C.tool_call_constraint(TOOLS, "hermes", parallel=False, tokenizer=KEY)
    ok, done = _accepts(parallel, tokenizer, two)
    assert ok and not done  # a third call may still follow
    assert not _accepts(single, tokenizer, two)[0]


def test_named_function_allows_only_that_tool(tokenizer: TextTokenizer) -> None:
    for choice in ({"name": "glob"}, {"type": "function", "function": {"name": "glob"}}):
        spec = C.tool_call_constraint(TOOLS, "hermes", choice=choice, parallel=True, tokenizer=KEY)
        assert _accepts(spec, tokenizer, _call("glob", {"pattern": "*"})) == (True, True)
        assert not _accepts(spec, tokenizer, _call("read", {"filePath": "a"}))[0]
    with pytest.raises(C.ConstraintError, match="unknown function 'write'"):
        C.tool_call_constraint(TOOLS, "hermes", choice={"name": "write"})


def test_other_formats_and_bad_tools_are_errors() -> None:
    with pytest.raises(C.ConstraintError, match="not supported for format 'mistral'"):
        C.tool_call_constraint(TOOLS, "mistral")
    with pytest.raises(C.ConstraintError, match="not supported for format 'pythonic'"):
        C.lazy_tool_call_constraint(TOOLS, "pythonic")
    # Llama 3.1 calls have no opening tag for a lazy trigger.
    with pytest.raises(C.ConstraintError, match="not supported for format 'llama3_json'"):
        C.lazy_tool_call_constraint(TOOLS, "llama3_json")
    with pytest.raises(C.ConstraintError, match="at least one tool"):
        C.tool_call_constraint([], "hermes")
    with pytest.raises(C.ConstraintError, match="declared twice"):
        C.tool_call_constraint([TOOLS[0], TOOLS[0]], "hermes")


def _llama3(*calls: tuple[str, dict[str, Any]]) -> str:
    return render_assistant_tool_calls(
        [{"function": {"name": n, "arguments": a}} for n, a in calls], "llama3_json"
    )


def test_llama3_json_calls_are_constrained(tokenizer: TextTokenizer) -> None:
    single = C.tool_call_constraint(TOOLS, "llama3_json", parallel=False, tokenizer=KEY)
    call = _llama3(("read", {"filePath": "/a.py", "limit": 5}))
    assert call.startswith('{"name": "read", "parameters": {')
    assert _accepts(single, tokenizer, call) == (True, True)
    parsed = parse_tool_calls(call, TOOLS, "llama3_json").tool_calls
    assert [(c.name, c.arguments) for c in parsed] == [("read", {"filePath": "/a.py", "limit": 5})]
    # The Hermes shape, Llama's "arguments" key, a wrong schema, text first: all refused.
    assert not _accepts(single, tokenizer, _call("read", {"filePath": "/a.py"}))[0]
    assert not _accepts(single, tokenizer, '{"name": "read", "arguments": {"filePath": "a"}}')[0]
    assert not _accepts(single, tokenizer, _llama3(("read", {"path": "/a.py"})))[0]
    assert not _accepts(single, tokenizer, "Sure: " + call)[0]
    two = _llama3(("read", {"filePath": "a"}), ("glob", {"pattern": "*.md"}))
    assert "; " in two
    assert not _accepts(single, tokenizer, two)[0]
    parallel = C.tool_call_constraint(TOOLS, "llama3_json", parallel=True, tokenizer=KEY)
    assert _accepts(parallel, tokenizer, two) == (True, False)
    assert [c.name for c in parse_tool_calls(two, TOOLS, "llama3_json").tool_calls] == [
        "read",
        "glob",
    ]
    named = C.tool_call_constraint(TOOLS, "llama3_json", choice={"name": "glob"}, tokenizer=KEY)
    assert _accepts(named, tokenizer, _llama3(("glob", {"pattern": "*"}))) == (True, True)
    assert not _accepts(named, tokenizer, call)[0]


def _qwen3(*calls: tuple[str, dict[str, Any]]) -> str:
    return render_assistant_tool_calls(
        [{"function": {"name": n, "arguments": a}} for n, a in calls], "qwen3_coder"
    )


QWEN_TOOLS = [
    *TOOLS,
    tool(
        "edit",
        "The edit tool",
        {
            "filePath": STR,
            "mode": {"enum": ["replace", "append"]},
            "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}},
            "replaceAll": {"type": "boolean"},
        },
        ["filePath", "mode"],
    ),
]
QWEN_TOOLS[-1]["function"]["parameters"]["$defs"] = {"line": {"type": "integer", "minimum": 1}}


def test_qwen3_coder_calls_are_constrained(tokenizer: TextTokenizer) -> None:
    single = C.tool_call_constraint(QWEN_TOOLS, "qwen3_coder", parallel=False, tokenizer=KEY)
    # Raw string values may hold newlines, quotes and markup other than the format's tags.
    code = 'ls -la && echo "<b>done</b>"\nwc -l *.py'
    call = _qwen3(("bash", {"command": code, "description": "list files"}))
    assert call.startswith("<tool_call>\n<function=bash>\n<parameter=command>\n")
    assert _accepts(single, tokenizer, call) == (True, True)
    edit = {"filePath": "/a.py", "mode": "append", "lines": [3, 4], "replaceAll": True}
    assert _accepts(single, tokenizer, _qwen3(("edit", edit))) == (True, True)
    parsed = parse_tool_calls(_qwen3(("edit", edit)), QWEN_TOOLS, "qwen3_coder").tool_calls
    assert [(c.name, c.arguments) for c in parsed] == [("edit", edit)]
    # Missing required parameter, a value outside the enum, a bad JSON value, an
    # undeclared parameter, the Hermes JSON shape: all refused.
    assert not _accepts(single, tokenizer, _qwen3(("bash", {"description": "x"})))[0]
    assert not _accepts(single, tokenizer, _qwen3(("edit", {**edit, "mode": "delete"})))[0]
    assert not _accepts(single, tokenizer, _qwen3(("edit", {**edit, "lines": [0]})))[0]
    assert not _accepts(single, tokenizer, _qwen3(("glob", {"pattern": "*", "deep": "1"})))[0]
    assert not _accepts(single, tokenizer, _call("glob", {"pattern": "*"}))[0]
    # A value running into the next tag instead of closing (what SmolLM2 tries) is refused.
    unclosed = "<tool_call>\n<function=read>\n<parameter=filePath>\na.py\n</function>"
    assert not _accepts(single, tokenizer, unclosed)[0]
    two = _qwen3(("read", {"filePath": "a"}), ("glob", {"pattern": "*.md"}))
    assert not _accepts(single, tokenizer, two)[0]
    parallel = C.tool_call_constraint(QWEN_TOOLS, "qwen3_coder", parallel=True, tokenizer=KEY)
    assert _accepts(parallel, tokenizer, two) == (True, False)
    lazy = C.lazy_tool_call_constraint(QWEN_TOOLS, "qwen3_coder", parallel=False, tokenizer=KEY)
    assert _accepts(lazy, tokenizer, "Let me look.\n" + two.split("\n<tool_call>")[0]) == (
        True,
        True,
    )
    assert not _accepts(lazy, tokenizer, "Let me look.\n<tool_call>\n<function=nope>")[0]
    # An open object may require a key it does not declare: no <parameter=> block for it.
    bad = tool("odd", "The odd tool", {"a": STR}, ["a", "b"])
    bad["function"]["parameters"]["additionalProperties"] = True
    C.tool_call_constraint([bad], "hermes")
    with pytest.raises(C.ConstraintError, match="requires undeclared parameters"):
        C.tool_call_constraint([bad], "qwen3_coder")


def _chat_service(
    tokenizer: TextTokenizer, fmt: str, *, lazy: bool = False, sampling_defaults: Any = None
) -> Any:
    from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
    from exo_tools.models.tokenizer import TextTokenizer as Tokenizer
    from exo_tools.serving.chat import ChatService

    # A template that ignores tools: the tools prompt goes into the system message.
    templated = Tokenizer(
        tokenizer.backend,
        bos_token_id=None,
        eos_token_ids=tokenizer.eos_token_ids,
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    )
    card = CATALOG[DEFAULT_MODEL_ID].with_tool_format(fmt)
    return ChatService(
        card,
        templated,
        8192,
        PrepareOnly(),
        lazy_tool_grammar=lazy,
        sampling_defaults=sampling_defaults,
    )


@pytest.mark.parametrize(
    ("fmt", "lazy", "choice", "kind"),
    [
        ("hermes", True, "auto", "lazy_tool_calls"),
        ("hermes", False, "auto", None),
        ("llama3_json", True, "auto", None),  # no lazy trigger: unconstrained, not a 400
        ("qwen3_coder", True, "auto", "lazy_tool_calls"),
        ("llama3_json", False, "required", "tool_calls"),
        ("llama3_json", True, {"type": "function", "function": {"name": "glob"}}, "tool_calls"),
    ],
)
def test_chat_service_picks_the_constraint_for_the_format(
    tokenizer: TextTokenizer, fmt: str, lazy: bool, choice: Any, kind: str | None
) -> None:
    from exo_tools.api.openai_chat import to_chat_request
    from exo_tools.api.schemas import ChatCompletionRequest

    service = _chat_service(tokenizer, fmt, lazy=lazy)
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "list markdown files"}],
            "tools": TOOLS,
            "tool_choice": choice,
        }
    )
    constraint = service.prepare(to_chat_request(request)).sampling.constraint
    if kind is None:
        assert constraint is None
        return
    spec = C.ConstraintSpec.parse(constraint)
    assert spec.kind == kind
    # The grammar holds the call head as an escaped Lark string literal.
    assert (r"\"parameters\": " in spec.grammar) == (fmt == "llama3_json")


def test_tool_without_parameters_takes_empty_arguments(tokenizer: TextTokenizer) -> None:
    spec = C.tool_call_constraint(
        [{"type": "function", "function": {"name": "now"}}], "hermes", tokenizer=KEY
    )
    assert _accepts(spec, tokenizer, _call("now", {}))[0]
    assert not _accepts(spec, tokenizer, _call("now", {"x": 1}))[0]


@pytest.mark.parametrize(
    ("schema", "feature"),
    [
        (
            {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
            '"if", "then"',
        ),
        ({"not": {"type": "string"}}, '"not"'),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
        ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
        ({"$ref": "https://example.com/schema.json"}, "https://example.com/schema.json"),
        ({"type": "string", "format": "my-format"}, "Unknown format: my-format"),
        ({"type": "strnig"}, "Invalid type: strnig"),
    ],
)
def test_unsupported_schema_features_name_the_feature(schema: dict[str, Any], feature: str) -> None:
    with pytest.raises(C.ConstraintError) as caught:
        C.json_schema_constraint(schema)
    assert feature in str(caught.value)
    assert "response_format schema" in str(caught.value)
    odd = {"type": "function", "function": {"name": "odd", "parameters": schema}}
    with pytest.raises(C.ConstraintError, match="tool 'odd' parameters") as caught:
        C.tool_call_constraint([odd], "hermes")
    assert feature in str(caught.value)


def test_json_schema_constrains_documents(tokenizer: TextTokenizer) -> None:
    schema = {
        "$schema": SCHEMA_2020,
        "type": "object",
        "properties": {
            "name": {"type": "string", "description": "who"},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}},
            "kind": {"enum": ["a", "b"]},
            "ref": {"$ref": "#/$defs/point"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    spec = C.json_schema_constraint(schema, tokenizer=KEY)
    good = {"name": "Ann", "age": 3, "tags": ["x"], "kind": "b", "ref": {"x": 1.5}}
    assert _accepts(spec, tokenizer, json.dumps(good)) == (True, True)
    assert not _accepts(spec, tokenizer, json.dumps({"name": "Ann", "age": -1}))[0]
    assert not _accepts(spec, tokenizer, json.dumps({"name": "Ann"}) + " ")[0]
    assert not _accepts(spec, tokenizer, json.dumps({"name": "Ann", "age": 1, "extra": 1}))[0]
    assert not _accepts(spec, tokenizer, json.dumps({"name": "Ann", "age": 1, "kind": "c"}))[0]


def test_json_object_accepts_objects_only(tokenizer: TextTokenizer) -> None:
    spec = C.json_object_constraint(tokenizer=KEY)
    assert _accepts(spec, tokenizer, '{"a": [1, {"b": null}]}') == (True, True)
    assert not _accepts(spec, tokenizer, "[1, 2]")[0]
    assert not _accepts(spec, tokenizer, "Here is JSON")[0]


def test_lazy_constraint_frees_text_until_the_tag(tokenizer: TextTokenizer) -> None:
    spec = C.lazy_tool_call_constraint(TOOLS, "hermes", parallel=False, tokenizer=KEY)
    assert C.ConstraintSpec.parse(spec).kind == "lazy_tool_calls"
    assert _accepts(spec, tokenizer, "Just a plain answer, no < tools > here.\n") == (True, False)
    call = _call("glob", {"pattern": "**/*.md"})
    assert _accepts(spec, tokenizer, "Let me look.\n" + call) == (True, True)
    assert not _accepts(spec, tokenizer, "Let me look. <tool_call> oops")[0]
    assert not _accepts(spec, tokenizer, "Let me look.\n" + _call("glob", {"path": "x"}))[0]
    parallel = C.lazy_tool_call_constraint(TOOLS, "hermes", parallel=True, tokenizer=KEY)
    assert _accepts(parallel, tokenizer, "A\n" + call + "\nthen\n" + call + "\ndone") == (
        True,
        False,
    )


# the spec names its tokenizer; the sampling node holds one


def test_spec_is_matched_against_the_named_tokenizer(tokenizer: TextTokenizer) -> None:
    grammar = _grammar(tokenizer)
    with pytest.raises(C.ConstraintError, match="for tokenizer 'nope'"):
        C.TokenConstraint.from_serialized(C.json_object_constraint(tokenizer="nope"), grammar)
    named = C.TokenConstraint.from_serialized(C.json_object_constraint(tokenizer=KEY), grammar)
    assert named.spec.tokenizer == KEY
    # A spec naming none takes the sampling node's.
    assert C.TokenConstraint.from_serialized(C.json_object_constraint(), grammar).error is None


# mask application through the Sampler


def _id(tokenizer: TextTokenizer, text: str) -> int:
    ids = tokenizer.encode(text)
    assert len(ids) == 1, ids
    return ids[0]


def test_mask_overrides_the_model_preference(tokenizer: TextTokenizer) -> None:
    vocab = tokenizer.vocab_size + 64  # logits wider than the tokenizer
    logits = np.zeros((1, vocab), dtype=np.float32)
    logits[0, _id(tokenizer, "Hello")] = 50.0
    logits[0, vocab - 1] = 100.0  # beyond the tokenizer: must never be sampled
    logits[0, _id(tokenizer, "{")] = 1.0
    spec = C.json_object_constraint(tokenizer=KEY)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    token = sampler(mx.array(logits)).item()
    assert token == _id(tokenizer, "{")
    plain = Sampler(SamplingParams(temperature=0.0))
    assert plain(mx.array(logits)).item() == vocab - 1
    assert plain.constraint is None  # no grammar work without a constraint


def _drive(sampler: Sampler, tokenizer: TextTokenizer, eos: frozenset[int], seed: int) -> str:
    """Generate from random logits (a model with no idea of the grammar) until EOS.

    Tokens that close strings and values get a boost, or random text inside a JSON string
    would go on for ever (the grammar allows any length).
    """
    rng = np.random.default_rng(seed)
    closing = np.array(
        [any(c in tokenizer.decode([i]) for c in '"}],') for i in range(tokenizer.vocab_size)]
    )
    ids: list[int] = []
    for _ in range(400):
        logits = rng.normal(0.0, 4.0, size=(1, tokenizer.vocab_size)).astype(np.float32)
        logits[0, closing] += 12.0
        token = int(sampler(mx.array(logits)).item())
        if token in eos:
            return tokenizer.decode(ids, skip_special_tokens=False)
        ids.append(token)
    raise AssertionError("constrained generation did not end")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_logits_still_give_valid_tool_calls(tokenizer: TextTokenizer, seed: int) -> None:
    spec = C.tool_call_constraint(TOOLS, "hermes", parallel=False, tokenizer=KEY)
    sampler = Sampler(
        SamplingParams(temperature=1.0, seed=seed, constraint=spec), _grammar(tokenizer)
    )
    text = _drive(sampler, tokenizer, tokenizer.eos_token_ids, seed)
    calls = parse_tool_calls(text, TOOLS, "hermes").tool_calls
    assert len(calls) == 1, text
    # The raw text, before the parser's normalization, must already be valid.
    raw = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert raw["name"] == calls[0].name
    assert raw["arguments"] == calls[0].arguments
    schema = next(
        t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].name
    )
    jsonschema.validate(calls[0].arguments, schema)
    assert calls[0].arguments, text  # random text still filled the required keys


def test_complete_grammar_allows_only_eos(tokenizer: TextTokenizer) -> None:
    spec = C.json_schema_constraint({"enum": ["yes"]}, tokenizer=KEY)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=3, constraint=spec), _grammar(tokenizer))
    logits = mx.zeros((1, tokenizer.vocab_size))
    produced = [int(sampler(logits).item()) for _ in range(8)]
    eos_at = next(i for i, token in enumerate(produced) if token in tokenizer.eos_token_ids)
    assert tokenizer.decode(produced[:eos_at]) == '"yes"'
    assert all(token in tokenizer.eos_token_ids for token in produced[eos_at:])


def test_matcher_is_freed_with_the_request(tokenizer: TextTokenizer) -> None:
    sampler = Sampler(
        SamplingParams(temperature=0.0, constraint=C.json_object_constraint(tokenizer=KEY)),
        _grammar(tokenizer),
    )
    sampler(mx.zeros((1, tokenizer.vocab_size)))
    constraint = sampler.constraint
    assert constraint is not None and constraint.masks_computed == 1
    ref = weakref.ref(constraint)
    sampler.close()
    assert constraint.done
    del constraint, sampler
    assert ref() is None


def test_unknown_tokenizer_fails_at_first_sample(tokenizer: TextTokenizer) -> None:
    sampler = Sampler(
        SamplingParams(constraint=C.json_object_constraint(tokenizer="missing-model")),
        _grammar(tokenizer),
    )
    with pytest.raises(C.ConstraintError, match="missing-model"):
        sampler(mx.zeros((1, 8)))


def test_parallel_calls_are_bounded(tokenizer: TextTokenizer) -> None:
    call = _call("glob", {"pattern": "*"})
    spec = C.tool_call_constraint(TOOLS, "hermes", parallel=True, max_calls=2, tokenizer=KEY)
    assert _accepts(spec, tokenizer, call + "\n" + call) == (True, True)
    assert not _accepts(spec, tokenizer, call + "\n" + call + "\n" + call)[0]


def test_tool_argument_objects_are_closed_unless_the_schema_says_otherwise() -> None:
    from exo_tools.constraints.builders import _closed

    schema = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {}}}},
        },
        "required": ["where"],
    }
    closed = _closed(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["where"]["additionalProperties"] is False
    assert closed["properties"]["extra"]["additionalProperties"] is True
    assert closed["properties"]["tags"]["items"]["additionalProperties"] is False
    assert closed["required"] == ["where"]
    assert "additionalProperties" not in schema  # the caller's schema is not changed


def test_lazy_tool_grammar_flag_is_off_by_default_and_can_be_set_either_way() -> None:
    from exo_tools.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["node"]).lazy_tool_grammar is False
    assert parser.parse_args(["node", "--lazy-tool-grammar"]).lazy_tool_grammar is True
    assert parser.parse_args(["node", "--no-lazy-tool-grammar"]).lazy_tool_grammar is False


# the token budget: outputs close before max_tokens


NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "tags", "age", "address"],
}


def _looping(sampler: Sampler, tokenizer: TextTokenizer, favourite: str, budget: int) -> str:
    """Generate `budget` tokens at most from a model that always prefers `favourite`'s
    tokens (in order): the small model that repeats itself inside a string."""
    preferred = tokenizer.encode(favourite)
    eos = frozenset(tokenizer.eos_token_ids)
    ids: list[int] = []
    for _ in range(budget):
        logits = np.zeros((1, tokenizer.vocab_size), dtype=np.float32)
        for rank, token in enumerate(preferred):
            logits[0, token] = 10.0 - rank
        token = int(sampler(mx.array(logits)).item())
        if token in eos:
            break
        ids.append(token)
    return tokenizer.decode(ids)


@pytest.mark.parametrize("budget", [32, 48, 80, 200])
def test_budget_closes_a_looping_document_in_time(tokenizer: TextTokenizer, budget: int) -> None:
    spec = C.json_schema_constraint(NESTED_SCHEMA, tokenizer=KEY, budget=budget)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    text = _looping(sampler, tokenizer, "a", budget)
    jsonschema.validate(json.loads(text), NESTED_SCHEMA)
    assert sampler.constraint is not None and sampler.constraint.steered
    # The model's own text is kept up to the point the budget needed the rest.
    assert text.startswith('{"name": "aaa')


def test_without_budget_the_loop_runs_to_the_cut(tokenizer: TextTokenizer) -> None:
    spec = C.json_schema_constraint(NESTED_SCHEMA, tokenizer=KEY)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    text = _looping(sampler, tokenizer, "a", 48)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert sampler.constraint is not None and not sampler.constraint.steered


def test_budget_leaves_a_document_that_fits_alone(tokenizer: TextTokenizer) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    spec = C.json_schema_constraint(schema, tokenizer=KEY, budget=64)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    assert _looping(sampler, tokenizer, '{"ok": true}', 64) == '{"ok": true}'
    assert sampler.constraint is not None and not sampler.constraint.steered


def test_budget_ends_an_ever_growing_array(tokenizer: TextTokenizer) -> None:
    schema = {"type": "array", "items": {"type": "integer"}}
    spec = C.json_schema_constraint(schema, tokenizer=KEY, budget=24)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    values = json.loads(_looping(sampler, tokenizer, "[7, ", 24))
    assert isinstance(values, list) and values and all(isinstance(v, int) for v in values)
    assert sampler.constraint is not None and sampler.constraint.steered


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "qwen3_coder"])
def test_budget_closes_tool_calls_in_every_format(tokenizer: TextTokenizer, fmt: str) -> None:
    budget = 64
    spec = C.tool_call_constraint(TOOLS, fmt, tokenizer=KEY, budget=budget, parallel=False)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    text = _looping(sampler, tokenizer, "a", budget)
    assert sampler.constraint is not None and sampler.constraint.steered
    calls = parse_tool_calls(text, TOOLS, fmt).tool_calls
    assert len(calls) == 1, text
    schema = next(
        t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0].name
    )
    jsonschema.validate(calls[0].arguments, schema)


def test_budget_too_small_for_any_document_is_left_to_the_model(
    tokenizer: TextTokenizer,
) -> None:
    # The shortest valid document takes more tokens than the budget: no steering, no error.
    spec = C.json_schema_constraint(NESTED_SCHEMA, tokenizer=KEY, budget=6)
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    _looping(sampler, tokenizer, "a", 6)
    assert sampler.constraint is not None and not sampler.constraint.steered


def _ref_chain(length: int) -> dict[str, object]:
    defs: dict[str, object] = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(length)}
    defs[f"d{length}"] = {"type": "string"}
    return {"type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def test_schema_bounds_are_checked_before_compiling() -> None:
    from exo_tools.constraints.builders import MAX_REF_CHAIN, MAX_SCHEMA_BYTES

    C.json_schema_constraint(_ref_chain(MAX_REF_CHAIN - 2))  # within the bound: compiles
    with pytest.raises(C.ConstraintError, match=r"\$ref more than"):
        C.json_schema_constraint(_ref_chain(MAX_REF_CHAIN + 5))
    # A recursive type is not a chain: a tree of nodes compiles.
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    C.json_schema_constraint(tree)
    big = {"type": "object", "description": "x" * (MAX_SCHEMA_BYTES + 1)}
    with pytest.raises(C.ConstraintError, match="at most"):
        C.json_schema_constraint(big)


def test_node_sampling_defaults_apply_only_where_a_request_sets_none(
    tokenizer: TextTokenizer,
) -> None:
    """--default-temperature/top-p/top-k fill what a request leaves out, in every API's
    mapping; what a request sets (0 included) wins."""
    from exo_tools.api import anthropic_messages, openai_chat, openai_responses
    from exo_tools.api.schemas import ChatCompletionRequest
    from exo_tools.serving.chat import ChatService
    from exo_tools.serving.request import SamplingDefaults

    defaults = SamplingDefaults(temperature=0.2, top_p=0.9, top_k=40)
    service = _chat_service(tokenizer, "hermes", sampling_defaults=defaults)
    plain = _chat_service(tokenizer, "hermes")
    user = [{"role": "user", "content": "hi"}]

    def sampled(service: ChatService, request: Any) -> tuple[float, float, int]:
        params = service.prepare(request).sampling
        return params.temperature, params.top_p, params.top_k

    unset = [
        openai_chat.to_chat_request(
            ChatCompletionRequest.model_validate({"model": "m", "messages": user})
        ),
        anthropic_messages.to_chat_request(
            anthropic_messages.MessagesRequest.model_validate(
                {"model": "m", "max_tokens": 8, "messages": user}
            )
        ),
        openai_responses.to_chat_request(
            openai_responses.ResponsesRequest.model_validate({"model": "m", "input": "hi"}),
            [],
        ),
    ]
    for request in unset:
        assert sampled(plain, request) == (1.0, 1.0, 0)
    assert sampled(service, unset[0]) == (0.2, 0.9, 40)
    assert sampled(service, unset[1]) == (0.2, 0.9, 40)
    assert sampled(service, unset[2]) == (0.2, 0.9, 40)
    explicit = openai_chat.to_chat_request(
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": user, "temperature": 0, "top_p": 1.0, "top_k": 0}
        )
    )
    assert sampled(service, explicit) == (0.0, 1.0, 0)
    # The repetition penalties: the node's where a request sets none, a chat completion's
    # own fields (llama.cpp's DRY names) where it does.
    penalties = _chat_service(
        tokenizer,
        "hermes",
        sampling_defaults=SamplingDefaults(repetition_penalty=1.3, dry_multiplier=0.8),
    )

    def penalized(request: Any) -> tuple[float, float, float, int]:
        params = penalties.prepare(request).sampling
        return (
            params.repetition_penalty,
            params.dry_multiplier,
            params.dry_base,
            params.dry_allowed_length,
        )

    assert penalized(unset[1]) == (1.3, 0.8, 1.75, 2)
    own = {"repetition_penalty": 1.0, "dry_multiplier": 0, "dry_base": 2.0, "dry_allowed_length": 3}
    assert penalized(
        openai_chat.to_chat_request(
            ChatCompletionRequest.model_validate({"model": "m", "messages": user, **own})
        )
    ) == (1.0, 0.0, 2.0, 3)
    for bad in ({"dry_base": 1.0}, {"dry_multiplier": -1}, {"dry_allowed_length": 0}):
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate({"model": "m", "messages": user, **bad})
