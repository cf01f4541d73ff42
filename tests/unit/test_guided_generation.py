"""Guided generation beyond JSON (regex, choice, Lark and GBNF grammars): the builders,
their errors and limits, the budget, and the request fields vLLM and llama.cpp clients
send, with the real SmolLM2 tokenizer and real llguidance (no model weights run here)."""

from __future__ import annotations

import time
from typing import Any

import llguidance
import pytest
from pydantic import ValidationError

from exo_tools import constraints as C
from exo_tools.api.errors import APIError, from_serving_error, from_validation_error
from exo_tools.api.openai_chat import to_chat_request
from exo_tools.api.schemas import ChatCompletionRequest
from exo_tools.engine.sampling import Sampler
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.serving.errors import InvalidChatRequest, UnsupportedSchema
from exo_tools.types import SamplingParams
from tests.helpers.guided_outputs import (
    ARITHMETIC_LARK,
    CASES,
    DATE,
    PHONE,
    RECORD_GBNF,
    SENTIMENTS,
    is_arithmetic,
    is_phone,
    is_record,
)
from tests.unit import test_constraints
from tests.unit.test_constraints import KEY, _chat_service, _grammar, _looping

# The SmolLM2 tokenizer fixture, shared with the other constraint tests.
tokenizer = test_constraints.tokenizer

# (a case's constraint, a text it allows, a text it refuses), one per case in CASES.
EXAMPLES = {
    "regex (date)": ("1969-07-20", "July 20, 1969"),
    "regex (phone)": ("(555) 123-4567", "555-123-4567"),
    "choice": ("neutral", "Neutral"),
    "Lark grammar": ("(12 + 3) * 4", "12 + 3 = 15"),
    "GBNF grammar": ("Name: Maria Lopez\nAge: 34", "Name: maria lopez"),
}


def _spec(fields: dict[str, Any], tokenizer: TextTokenizer, budget: int | None = None) -> str:
    """The constraint the chat service builds for a request body carrying `fields`."""
    service = _chat_service(tokenizer, "hermes", lazy=False)
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
        | ({"max_tokens": budget} if budget else {})
    )
    constraint = service.prepare(to_chat_request(body)).sampling.constraint
    assert constraint is not None
    return constraint


def _matches(spec: str, tokenizer: TextTokenizer, text: str) -> bool:
    """Whether llguidance, under `spec`, takes the tokens of `text` and may end there."""
    matcher = llguidance.LLMatcher(_grammar(tokenizer).ll, C.ConstraintSpec.parse(spec).grammar)
    return matcher.consume_tokens(tokenizer.encode(text)) and matcher.is_accepting()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_constraint_takes_its_language_only(tokenizer: TextTokenizer, case: Any) -> None:
    allowed, refused = EXAMPLES[case.name]
    # The test's own checks agree with the examples, so they can tell outputs apart.
    assert case.check(allowed) and not case.check(refused)
    spec = _spec(case.fields, tokenizer)
    assert _matches(spec, tokenizer, allowed)
    assert not _matches(spec, tokenizer, refused)


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"structured_outputs": {"regex": DATE}}, "regex"),
        ({"structured_outputs": {"choice": SENTIMENTS}}, "choice"),
        ({"structured_outputs": {"grammar": ARITHMETIC_LARK}}, "grammar"),
        ({"structured_outputs": {"grammar": RECORD_GBNF}}, "grammar"),
        ({"structured_outputs": {"json": {"type": "object"}}}, "json_schema"),
        ({"structured_outputs": {"json_object": True}}, "json_object"),
        ({"guided_regex": PHONE}, "regex"),
        ({"guided_choice": ["yes", "no"]}, "choice"),
        ({"guided_grammar": RECORD_GBNF}, "grammar"),
        ({"guided_json": {"type": "array"}}, "json_schema"),
        ({"guided_json": '{"type": "array"}'}, "json_schema"),  # vLLM takes the JSON text
        ({"grammar": RECORD_GBNF}, "grammar"),
        ({"json_schema": {"type": "integer"}}, "json_schema"),
        # A regex beside tools the model may call: the regex is the only constraint.
        (
            {"guided_regex": DATE, "tools": [{"type": "function", "function": {"name": "f"}}]},
            "regex",
        ),
    ],
)
def test_each_field_builds_its_constraint(
    tokenizer: TextTokenizer, fields: dict[str, Any], kind: str
) -> None:
    spec = C.ConstraintSpec.parse(_spec(fields, tokenizer, budget=32))
    assert (spec.kind, spec.budget, spec.tokenizer) == (kind, 32, "smollm2-135m")


def test_empty_llama_cpp_grammar_means_none(tokenizer: TextTokenizer) -> None:
    service = _chat_service(tokenizer, "hermes", lazy=False)
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "grammar": ""}
    )
    assert service.prepare(to_chat_request(body)).sampling.constraint is None


def _refusal(fields: dict[str, Any], tokenizer: TextTokenizer) -> APIError:
    """The API error a request with `fields` gets, as the server maps it."""
    try:
        _spec(fields, tokenizer)
    except APIError as error:
        return error
    except ValidationError as error:
        return from_validation_error(error)
    except InvalidChatRequest as error:
        return from_serving_error(error)
    raise AssertionError(f"{fields} was accepted")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"guided_regex": "(\\d+"}, "guided_regex", "invalid regex: unclosed group"),
        ({"guided_regex": "(a)\\1"}, "guided_regex", "backreferences are not supported"),
        ({"guided_regex": "(?=a)b"}, "guided_regex", "look-around"),
        (
            {"structured_outputs": {"regex": "[a-"}},
            "structured_outputs.regex",
            "unclosed character class",
        ),
        ({"guided_choice": []}, "guided_choice", "choice list is empty"),
        ({"guided_choice": ["a", 3]}, "guided_choice.1", "valid string"),
        (
            {"structured_outputs": {"grammar": "start: expr\nexpr: NUMBER"}},
            "structured_outputs.grammar",
            'invalid Lark grammar: at 2(7): unknown name: "NUMBER"',
        ),
        ({"guided_grammar": "start: ("}, "guided_grammar", "invalid Lark grammar"),
        (
            {"grammar": 'root ::= "a" rest'},
            "grammar",
            "invalid GBNF grammar: Rule 'rest' not found",
        ),
        ({"grammar": "root ::= ("}, "grammar", "invalid GBNF grammar: Expected ')'"),
        ({"guided_grammar": "  "}, "guided_grammar", "the grammar is empty"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"json_schema": {"type": "object", "not": {}}}, "json_schema", "unsupported JSON schema"),
        # Too large for the limits llguidance compiles client grammars under.
        ({"guided_regex": "(.{0,50}){0,50}x"}, "guided_regex", "grammar limits"),
        # One constraint per request, whichever fields carry them.
        (
            {"guided_regex": DATE, "guided_choice": ["a"]},
            "guided_choice",
            "guided_regex and guided_choice each constrain the output",
        ),
        (
            {"structured_outputs": {"regex": DATE, "choice": ["a"]}},
            "structured_outputs.choice",
            "structured_outputs.regex and structured_outputs.choice",
        ),
        (
            {"grammar": RECORD_GBNF, "json_schema": {"type": "object"}},
            "json_schema",
            "grammar and json_schema",
        ),
        (
            {"guided_regex": DATE, "response_format": {"type": "json_object"}},
            "guided_regex",
            "guided_regex and response_format both constrain the output",
        ),
        (
            {
                "guided_choice": ["a"],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
            },
            "guided_choice",
            "guided_choice and tool_choice 'required' both constrain the output",
        ),
        (
            {"structured_outputs": {"structural_tag": {"type": "x"}}},
            "structured_outputs.structural_tag",
            "not supported",
        ),
    ],
)
def test_bad_constraints_are_400s_naming_the_field(
    tokenizer: TextTokenizer, fields: dict[str, Any], param: str, message: str
) -> None:
    error = _refusal(fields, tokenizer)
    assert (error.status, error.param) == (400, param), error.message
    assert message in error.message


def test_unsupported_json_schema_keeps_its_code(tokenizer: TextTokenizer) -> None:
    with pytest.raises(UnsupportedSchema):
        _spec({"guided_json": {"type": "object", "if": {}}}, tokenizer)


def test_limits_are_checked_against_the_vocabulary(tokenizer: TextTokenizer) -> None:
    """Validation alone does not build the lexer: only with the model's vocabulary does a
    regex too large for the limits fail before generation."""
    pathological = "(.{0,50}){0,50}x"
    C.regex_constraint(pathological)  # syntax only
    with pytest.raises(C.ConstraintError, match="grammar limits"):
        C.regex_constraint(pathological, vocabulary=_grammar(tokenizer).ll)


def test_a_huge_repetition_compiles_in_bounded_time(tokenizer: TextTokenizer) -> None:
    """A million-character regex builds its lexer within the reduced fuel; under
    llguidance's default fuel it takes ~3.5 s here, on the sampling node's MLX thread."""
    vocabulary = _grammar(tokenizer).ll
    started = time.perf_counter()
    spec = C.regex_constraint("a{1000}{1000}", vocabulary=vocabulary)
    assert time.perf_counter() - started < 2.0
    assert C.ConstraintSpec.parse(spec).kind == "regex"


# the budget: outputs close within max_tokens where the grammar can be closed


def _run(spec: str, tokenizer: TextTokenizer, favourite: str, budget: int) -> tuple[str, bool]:
    """The text a model that always prefers `favourite` writes, and whether the budget
    steered it."""
    sampler = Sampler(SamplingParams(temperature=0.0, constraint=spec), _grammar(tokenizer))
    text = _looping(sampler, tokenizer, favourite, budget)
    assert sampler.constraint is not None
    return text, sampler.constraint.steered


@pytest.mark.parametrize("budget", [12, 24, 48])
def test_budget_closes_a_looping_lark_grammar(tokenizer: TextTokenizer, budget: int) -> None:
    # Opening parentheses forever: the closing path needs a number and every ")".
    spec = C.grammar_constraint(ARITHMETIC_LARK, tokenizer=KEY, budget=budget)
    text, steered = _run(spec, tokenizer, "((", budget)
    assert is_arithmetic(text) and steered, text
    assert text.startswith("((((")


def test_without_budget_the_lark_loop_is_cut(tokenizer: TextTokenizer) -> None:
    spec = C.grammar_constraint(ARITHMETIC_LARK, tokenizer=KEY)
    text, steered = _run(spec, tokenizer, "((", 24)
    assert not is_arithmetic(text) and not steered, text


def test_budget_closes_an_unbounded_gbnf_repetition(tokenizer: TextTokenizer) -> None:
    spec = C.grammar_constraint('root ::= [a-z]+ "."', tokenizer=KEY, budget=16)
    text, steered = _run(spec, tokenizer, "a", 16)
    assert steered and text.endswith(".") and text[:-1].isalpha(), text


def test_budget_fills_the_gbnf_record(tokenizer: TextTokenizer) -> None:
    # The model only wants lowercase letters; the record's capitals and digits come from
    # the grammar (forced, or the closing path).
    spec = C.grammar_constraint(RECORD_GBNF, tokenizer=KEY, budget=12)
    text, steered = _run(spec, tokenizer, "a", 12)
    assert is_record(text) and steered, text


def test_budget_too_small_for_the_regex_is_left_to_the_model(tokenizer: TextTokenizer) -> None:
    """A phone number takes 14 tokens here: a 10-token budget cannot hold one, so the
    output is cut at max_tokens (finish_reason "length"), as documented."""
    spec = C.regex_constraint(PHONE, tokenizer=KEY, budget=10)
    text, steered = _run(spec, tokenizer, "5", 10)
    assert not steered and text.startswith("(555)") and not is_phone(text), text


def test_choice_output_is_one_of_the_choices(tokenizer: TextTokenizer) -> None:
    spec = C.choice_constraint(SENTIMENTS, tokenizer=KEY, budget=4)
    text, _ = _run(spec, tokenizer, "neg", 4)
    assert text in SENTIMENTS, text
