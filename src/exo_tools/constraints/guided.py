"""Guided generation beyond JSON: output held to a regex, to one of a list of strings, or
to a grammar, as vLLM's `structured_outputs` and llama.cpp's `grammar` ask for.

The client writes these grammars, so each is compiled here before any token is
generated: against the model's vocabulary when the caller hands it over, and under
`client_grammar_limits()`, the bound the sampling node compiles them under too. A regex
that does not parse, a grammar that does not compile, an empty choice list, or a grammar
too large for the limits is a ConstraintError naming the problem (HTTP 400).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import llguidance
from llguidance import LLMatcher, LLParserLimits, LLTokenizer
from llguidance.gbnf_to_lark import is_lark_syntax

from ..models.tokenizer import TextTokenizer
from .errors import ConstraintError
from .grammar_tokenizer import build_ll_tokenizer
from .spec import ConstraintKind, ConstraintSpec

# The kinds whose grammar the client wrote (JSON kinds are built here from schemas).
CLIENT_GRAMMAR_KINDS: frozenset[ConstraintKind] = frozenset({"regex", "choice", "grammar"})

# llguidance's default lexer fuel (1M) lets `a{1000}{1000}` take ~3.5 s to build its
# lexer on this CPU, on the MLX thread of the sampling node; a fifth of it keeps that
# under ~0.5 s, and the grammars people write (a date, GBNF's JSON) take a few ms.
_INITIAL_LEXER_FUEL = 200_000


def client_grammar_limits() -> LLParserLimits:
    """The limits a client-written grammar is compiled and matched under: lexer
    construction, each mask step and the grammar's size are bounded (llguidance's fuel),
    so a pathological regex ends in an error, not a stalled node."""
    return LLParserLimits(initial_lexer_fuel=_INITIAL_LEXER_FUEL, verbose_errors=False)


def regex_constraint(
    pattern: str,
    *,
    tokenizer: str | None = None,
    budget: int | None = None,
    vocabulary: LLTokenizer | None = None,
) -> str:
    """The whole output matches `pattern` (Rust `regex` syntax, as llguidance reads it:
    no look-around or backreferences)."""
    grammar = LLMatcher.grammar_from_regex(pattern)
    _check(grammar, "regex", vocabulary)
    return _serialized("regex", grammar, tokenizer, budget)


def choice_constraint(
    choices: Sequence[str],
    *,
    tokenizer: str | None = None,
    budget: int | None = None,
    vocabulary: LLTokenizer | None = None,
) -> str:
    """The output is exactly one of `choices`."""
    if not choices:
        raise ConstraintError("the choice list is empty; give at least one string")
    if not all(isinstance(choice, str) for choice in choices):
        raise ConstraintError("every choice must be a string")
    grammar = llguidance.grammar_from("choice", json.dumps(list(choices)))
    _check(grammar, "choice list", vocabulary)
    return _serialized("choice", grammar, tokenizer, budget)


def grammar_constraint(
    text: str,
    *,
    tokenizer: str | None = None,
    budget: int | None = None,
    vocabulary: LLTokenizer | None = None,
) -> str:
    """The output is a sentence of `text`: a Lark grammar (llguidance's syntax: it has a
    `start:` rule or a `%llguidance` line) or else llama.cpp's GBNF, which llguidance
    converts to Lark."""
    if not text.strip():
        raise ConstraintError("the grammar is empty")
    # llguidance's own test for which syntax a grammar is in.
    syntax = "Lark" if is_lark_syntax(text) else "GBNF"
    try:
        grammar = llguidance.grammar_from("grammar", text)
    except ValueError as error:  # GBNF that llguidance cannot convert
        reason = _first_line(str(error)).removeprefix(_GBNF_FAILURE)
        raise ConstraintError(f"invalid GBNF grammar: {reason}") from error
    _check(grammar, f"{syntax} grammar", vocabulary)
    return _serialized("grammar", grammar, tokenizer, budget)


def vocabulary_of(tokenizer: TextTokenizer) -> LLTokenizer:
    """llguidance's view of `tokenizer` (built once per vocabulary): what the API node
    compiles client grammars against, as the sampling node will."""
    return build_ll_tokenizer(tokenizer)


def _check(grammar: str, what: str, vocabulary: LLTokenizer | None) -> None:
    """ConstraintError unless `grammar` compiles under the client limits; with a
    vocabulary, also build its matcher and first mask, where a regex too large for the
    limits fails (validation alone does not build the lexer)."""
    error = LLMatcher.validate_grammar(grammar, vocabulary, limits=client_grammar_limits())
    if error and not error.startswith("WARNING"):
        raise ConstraintError(f"invalid {what}: {_reason(error)}")
    if vocabulary is None:
        return
    matcher = LLMatcher(vocabulary, grammar, log_level=0, limits=client_grammar_limits())
    if not matcher.is_error():
        matcher.compute_bitmask()
    if matcher.is_error():
        reason = _reason(matcher.get_error())
        raise ConstraintError(f"{what} cannot be compiled under the grammar limits: {reason}")


def _reason(error: str) -> str:
    """The part of an llguidance error that says what is wrong, on one line: the regex
    parser's own `error:` line, else the first line without llguidance's wrapper."""
    lines = error.strip().splitlines()
    detail = next((line.strip() for line in lines if line.startswith("error: ")), None)
    if detail is not None:
        return detail.removeprefix("error: ")
    first = lines[0] if lines else error
    return first.split("(in regex): ", 1)[-1].strip()


# How llguidance.grammar_from words a GBNF conversion failure, before the reason.
_GBNF_FAILURE = "Failed to convert the grammar from GBNF to Lark: "


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _serialized(
    kind: ConstraintKind, grammar: str, tokenizer: str | None, budget: int | None
) -> str:
    spec = ConstraintSpec(kind=kind, grammar=grammar, tokenizer=tokenizer, budget=budget)
    return spec.serialize()
