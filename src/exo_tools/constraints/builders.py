"""Spec builders: pure functions from request fields to a serialized, validated spec.

Everything is compiled to one llguidance Lark grammar up front, so unsupported schema
features are reported to the client (HTTP 400) before any node sees the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Literal, cast

from llguidance import LLMatcher

from ..tools.format import GrammarRegex, JsonCallGrammar, XmlCallGrammar
from ..tools.registry import REGISTRY
from .errors import ConstraintError
from .spec import ConstraintKind, ConstraintSpec

ToolChoiceArg = Literal["required"] | Mapping[str, Any]

# Compact, single-line JSON in the separators json.dumps uses (and the tools prompt
# shows): flexible whitespace lets small models pad with newlines until max_tokens.
_JSON_STYLE: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

# The parameters of a tool that declares none: OpenAI reads that as "no arguments".
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

_SCHEMA_ERROR = re.compile(r"failed to compile JSON schema: (?P<message>[^\n]*)")

# Bounds on a client's schema, checked before llguidance compiles it: real tool and output
# schemas are a few KB with a handful of $ref levels. A ref that leads back to itself is
# recursion (a tree type, fine); a chain is refs leading to refs leading to refs.
MAX_SCHEMA_BYTES = 256 * 1024
MAX_REF_CHAIN = 32


def _refs_in(node: Any) -> list[str]:
    found: list[str] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            item = cast(Mapping[str, Any], item)
            ref = item.get("$ref")
            if isinstance(ref, str):
                found.append(ref)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(cast(list[Any], item))
    return found


def _resolve(root: Any, ref: str) -> Any:
    """The schema a local `$ref` ("#", "#/$defs/x") points to; None when it is not local
    or points nowhere (llguidance reports those)."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping):
            node = cast(Mapping[str, Any], node).get(key)
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = cast(list[Any], node)[int(key)]
        else:
            return None
    return node


def _check_ref_chains(schema: Any, where: str) -> None:
    """ConstraintError when following `$ref`s from `schema` leads more than MAX_REF_CHAIN
    refs deep (cycles, i.e. recursive types, count once)."""
    depths: dict[str, int] = {}
    too_deep = ConstraintError(
        f"{where} nests $ref more than {MAX_REF_CHAIN} deep (a $ref to a schema with a $ref "
        "to ...); flatten its definitions"
    )

    def depth(ref: str, path: frozenset[str]) -> int:
        if ref in depths:
            return depths[ref]
        if ref in path:
            return 0
        if len(path) >= MAX_REF_CHAIN:  # also bounds this recursion
            raise too_deep
        inner = _refs_in(_resolve(schema, ref))
        found = 1 + max((depth(other, path | {ref}) for other in inner), default=0)
        if found > MAX_REF_CHAIN:
            raise too_deep
        depths[ref] = found
        return found

    for ref in _refs_in(schema):
        depth(ref, frozenset())


def _lit(text: str) -> str:
    """A Lark string literal (llguidance reads JSON string escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _schema_grammar(schema: Mapping[str, Any] | bool) -> str:
    """`%json {...}` for a schema, with our output style (kept if the caller set one)."""
    if isinstance(schema, bool):
        return f"%json {json.dumps(schema)}"
    styled = dict(schema)
    guidance = styled.get("x-guidance")
    styled["x-guidance"] = {**_JSON_STYLE, **(guidance if isinstance(guidance, Mapping) else {})}
    return f"%json {json.dumps(styled, ensure_ascii=False)}"


def _check_schema(schema: Any, where: str) -> None:
    """ConstraintError naming the unsupported feature if llguidance cannot compile it."""
    if not isinstance(schema, Mapping | bool):
        raise ConstraintError(f"{where} must be a JSON schema object, got {type(schema).__name__}")
    # Normalize to a JSON round trip so non-JSON values (sets, objects) are caught here.
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as error:
        raise ConstraintError(f"{where} is not JSON-serializable: {error}") from error
    if size > MAX_SCHEMA_BYTES:
        raise ConstraintError(
            f"{where} is {size} bytes of JSON; a schema may have at most {MAX_SCHEMA_BYTES}"
        )
    _check_ref_chains(schema, where)
    grammar = LLMatcher.grammar_from_lark(
        f"start: {_schema_grammar(cast(Mapping[str, Any] | bool, schema))}"
    )
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        found = _SCHEMA_ERROR.search(error)
        detail = found.group("message") if found else error.strip().splitlines()[0]
        raise ConstraintError(f"unsupported JSON schema in {where}: {detail}")


def _finish(
    kind: ConstraintKind,
    lark: str,
    tokenizer: str | None,
    budget: int | None,
    closers: tuple[str, ...] = (),
) -> str:
    grammar = LLMatcher.grammar_from_lark(lark)
    error = LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        # Schemas were checked one by one, so this is a bug in the builder, not the input.
        raise ConstraintError(f"internal grammar error: {error.strip().splitlines()[0]}")
    spec = ConstraintSpec(
        kind=kind, grammar=grammar, tokenizer=tokenizer, budget=budget, closers=closers
    )
    return spec.serialize()


# Schema keywords whose values are data, not subschemas.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples", "required", "description"})
# Keywords whose values map names to subschemas.
_NAMED_SUBSCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties"})


def _closed(node: Any) -> Any:
    """The schema with every object that lists `properties` closed to other keys.

    JSON Schema leaves objects open by default; under a grammar a small model then invents
    keys that the tool's own code rejects. An explicit `additionalProperties` is kept.
    """
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _NAMED_SUBSCHEMAS and isinstance(value, Mapping):
            out[key] = {name: _closed(schema) for name, schema in value.items()}
        else:
            out[key] = _closed(value)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _tool_entries(tools: list[dict[str, Any]]) -> list[tuple[str, Mapping[str, Any] | bool]]:
    entries: list[tuple[str, Mapping[str, Any] | bool]] = []
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ConstraintError(f"tools[{index}] must be an object")
        function = tool.get("function")
        spec = cast(Mapping[str, Any], function if isinstance(function, Mapping) else tool)
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ConstraintError(f"tools[{index}] has no function name")
        if name in seen:
            raise ConstraintError(f"tool {name!r} is declared twice")
        seen.add(name)
        parameters = spec.get("parameters")
        schema = _NO_PARAMETERS if parameters is None else _closed(parameters)
        _check_schema(schema, f"tool {name!r} parameters")
        entries.append((name, cast(Mapping[str, Any] | bool, schema)))
    if not entries:
        raise ConstraintError("a tool-call constraint needs at least one tool")
    return entries


def _chosen(
    entries: list[tuple[str, Mapping[str, Any] | bool]], choice: ToolChoiceArg
) -> tuple[list[tuple[str, Mapping[str, Any] | bool]], bool]:
    """The tools the call may use, and whether one was named."""
    if choice == "required":
        return entries, False
    if isinstance(choice, Mapping):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
        if not isinstance(name, str):
            raise ConstraintError("a named tool choice must give the function name")
        named = [entry for entry in entries if entry[0] == name]
        if not named:
            raise ConstraintError(f"tool choice names unknown function {name!r}")
        return named, True
    raise ConstraintError(f"unsupported tool choice {choice!r} for a tool-call constraint")


# Formats whose calls a grammar can spell (each format's own `grammar` pieces), and
# those whose calls open with a fixed text, the trigger of the lazy grammar.
TOOL_CALL_FORMATS = frozenset(name for name, f in REGISTRY.items() if f.grammar is not None)
LAZY_TOOL_CALL_FORMATS = frozenset(
    name for name, f in REGISTRY.items() if f.grammar is not None and f.grammar.trigger
)


def _grammar_of(
    fmt: str, supported: frozenset[str] = TOOL_CALL_FORMATS
) -> JsonCallGrammar | XmlCallGrammar:
    grammar = REGISTRY[fmt].grammar if fmt in supported else None
    if grammar is None:
        raise ConstraintError(f"constrained tool calls are not supported for format {fmt!r} yet")
    return grammar


def _pieces(parts: tuple[str, ...]) -> str:
    """Grammar text for literal and `GrammarRegex` pieces, in order."""
    return " ".join(f"/{p}/" if isinstance(p, GrammarRegex) else _lit(p) for p in parts if p)


def _json_call_rules(
    entries: list[tuple[str, Mapping[str, Any] | bool]], grammar: JsonCallGrammar
) -> list[str]:
    """`call_body` alternatives `head(name) <schema> tail`, one per tool, with the name
    as fixed text so it picks the schema; `call` adds the trigger in front."""
    trigger = grammar.trigger or ""
    alternatives: list[str] = []
    rules: list[str] = []
    for index, (name, schema) in enumerate(entries):
        head = grammar.head(name)
        first = head[0].removeprefix(trigger) if head and trigger else (head[0] if head else "")
        rules.append(f"args_{index}: {_schema_grammar(schema)}")
        alternatives.append(
            f"{_pieces((first, *head[1:]))} args_{index} {_pieces((grammar.tail,))}"
        )
    return [
        f"call: {_pieces((trigger,))} call_body" if trigger else "call: call_body",
        f"call_body: {' | '.join(f'({a})' for a in alternatives)}",
        *rules,
    ]


def _xml_value(
    name: str, key: str, schema: Any, defs: dict[str, Any], rule: str, grammar: XmlCallGrammar
) -> list[str]:
    """Rules for one parameter block named `rule` (the value and its tags).

    Strings are raw text without the format's own tags, then the closing tag (one
    lazy lexeme: it ends at the first closing tag; without the tag exclusion a small
    model writes the call's own closing tag inside the value and never closes it),
    string enums their literal values; anything else is JSON under its schema, which
    the parser types back through the tool's schema. String keywords other than
    `enum` (pattern, format, lengths) cannot be enforced on raw text.
    """
    head = _lit(grammar.param_open(key))
    close = _lit(grammar.param_close)
    sep = _lit(grammar.param_sep) if grammar.param_sep else ""
    if not isinstance(schema, Mapping):
        raise ConstraintError(f"tool {name!r} parameter {key!r} has no schema object")
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        choices = " | ".join(_lit(v) for v in values)
        return [f"{rule}: {head} ({choices}) {close} {sep}"]
    if _is_raw_string(schema):
        return [f"{rule}_raw[lazy]: {head} RAW {close}", f"{rule}: {rule}_raw {sep}"]
    # `$ref`s point into the tool's root schema: carry its definitions along.
    return [
        f"{rule}: {head} {rule}_json {close} {sep}",
        f"{rule}_json: {_schema_grammar({**schema, **defs})}",
    ]


def _is_raw_string(schema: Mapping[str, Any]) -> bool:
    """A value XML-style formats write as raw text: declared `"type": "string"` only."""
    return schema.get("type") == "string"


def _xml_call_rules(
    entries: list[tuple[str, Mapping[str, Any] | bool]], grammar: XmlCallGrammar
) -> list[str]:
    """The call head, one parameter block per property in declared order (required
    ones mandatory), then the tail: Qwen3-Coder, GLM, MiniMax and Seed-OSS calls."""
    trigger = grammar.trigger or ""
    alternatives: list[str] = []
    reserved = grammar.reserved.replace("/", "\\/")
    rules = [f"RAW: /(.|\\n)*/ & ~/(.|\\n)*{reserved}(.|\\n)*/"]
    for index, (name, schema) in enumerate(entries):
        if not isinstance(schema, Mapping) or schema.get("type", "object") != "object":
            raise ConstraintError(f"tool {name!r} parameters must be an object schema")
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        missing = [key for key in required if key not in properties]
        if missing:
            raise ConstraintError(f"tool {name!r} requires undeclared parameters {missing}")
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        parts: list[str] = []
        for position, (key, sub) in enumerate(properties.items()):
            rule = f"p_{index}_{position}"
            rules += _xml_value(name, key, sub, defs, rule, grammar)
            parts.append(rule if key in required else f"{rule}?")
        head = grammar.head(name).removeprefix(trigger)
        alternatives.append(f"({' '.join([_lit(head), *parts])})")
    return [
        f"call: {_lit(trigger)} call_body" if trigger else "call: call_body",
        f"call_body: ({' | '.join(alternatives)}) {_lit(grammar.tail)}",
        *rules,
    ]


def _call_rules(
    entries: list[tuple[str, Mapping[str, Any] | bool]], grammar: JsonCallGrammar | XmlCallGrammar
) -> list[str]:
    """`call` (one whole call) and `call_body` (the call after its trigger, which the
    lazy grammar reaches through the trigger)."""
    if isinstance(grammar, XmlCallGrammar):
        return _xml_call_rules(entries, grammar)
    return _json_call_rules(entries, grammar)


def tool_call_constraint(
    tools: list[dict[str, Any]],
    fmt: str,
    *,
    choice: ToolChoiceArg = "required",
    parallel: bool = True,
    max_calls: int = 4,
    tokenizer: str | None = None,
    budget: int | None = None,
) -> str:
    """Output = one or more tool calls in `fmt` (`tool_choice` "required" or a named
    function); exactly one when `parallel` is False or a function is named, at most
    `max_calls` otherwise."""
    grammar = _grammar_of(fmt)
    entries, named = _chosen(_tool_entries(tools), choice)
    repeat = parallel and not named
    # Bounded: small models otherwise repeat calls until max_tokens, cutting the last.
    more = max(max_calls - 1, 0)
    separator = _pieces((grammar.separator,))
    calls = f"call ({separator} call){{0,{more}}}" if repeat and more else "call"
    start = f"start: {_pieces((grammar.group_open,))} {calls} {_pieces((grammar.group_close,))}"
    lark = "\n".join(["%llguidance {}", start, *_call_rules(entries, grammar)])
    return _finish("tool_calls", lark, tokenizer, budget, _closers(grammar))


def _closers(grammar: JsonCallGrammar | XmlCallGrammar) -> tuple[str, ...]:
    # Endings that close a value no JSON character can: raw string values accept
    # every character up to the closing tag.
    return grammar.closers if isinstance(grammar, XmlCallGrammar) else ()


def lazy_tool_call_constraint(
    tools: list[dict[str, Any]],
    fmt: str,
    *,
    parallel: bool = True,
    tokenizer: str | None = None,
    budget: int | None = None,
) -> str:
    """`tool_choice` "auto": free text until the format's start tag, then the rest of the
    call constrained (a lazy lexeme in llguidance: it ends at the first `<tool_call>`).

    With `parallel` the model may go on with text and further calls; without, the
    first call ends the output.
    """
    grammar = _grammar_of(fmt, LAZY_TOOL_CALL_FORMATS)
    entries = _tool_entries(tools)
    rules = _call_rules(entries, grammar)
    tag = grammar.trigger or ""
    lark_lines = [
        "%llguidance {}",
        # Text that never contains the trigger, so the tag always enters `call`.
        f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(tag)}(.|\\n)*/",
        "ANY: /(.|\\n)*/",
        # A lazy lexeme ends at its first match: the text up to and including the tag.
        f"trigger[lazy]: ANY {_lit(tag)}",
        "lazy_call: trigger call_body",
    ]
    if parallel:
        lark_lines.insert(1, "start: lazy_call* TEXT")
    else:
        lark_lines.insert(1, "start: TEXT | lazy_call")
    lark = "\n".join([*lark_lines, *rules[1:]])
    return _finish("lazy_tool_calls", lark, tokenizer, budget, _closers(grammar))


def json_object_constraint(*, tokenizer: str | None = None, budget: int | None = None) -> str:
    """`response_format: {"type": "json_object"}`: any JSON object."""
    grammar = f"start: {_schema_grammar({'type': 'object'})}"
    return _finish("json_object", grammar, tokenizer, budget)


def json_schema_constraint(
    schema: Mapping[str, Any], *, tokenizer: str | None = None, budget: int | None = None
) -> str:
    """`response_format: {"type": "json_schema", ...}`: a document valid against `schema`."""
    _check_schema(schema, "response_format schema")
    return _finish("json_schema", f"start: {_schema_grammar(schema)}", tokenizer, budget)
