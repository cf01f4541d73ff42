"""The serialized constraint spec: what travels in SamplingParams.constraint.

A spec is a small JSON object carrying a compiled llguidance grammar (Lark-like text),
so the sampling node needs no knowledge of tools or schemas, only the tokenizer:

    {"v": 1, "kind": "tool_calls", "grammar": "...", "tokenizer": "smollm2-135m",
     "budget": 256, "closers": ["\n</parameter>"]}

`tokenizer` names the model whose tokenizer the grammar is for; the sampling node refuses
a spec for another (null: whichever the sampling node holds).
`budget` is the request's max_tokens: the sampler steers the output to a complete
document before it runs out (null: no budget). `closers` are the format's own multi-token
endings, tried first when steering (JSON's are built in).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from .errors import ConstraintError

SPEC_VERSION = 1

# regex, choice and grammar: grammars the client wrote (constraints.guided), compiled and
# matched under llguidance limits.
ConstraintKind = Literal[
    "tool_calls", "lazy_tool_calls", "json_object", "json_schema", "grammar", "regex", "choice"
]
_KINDS: frozenset[str] = frozenset(get_args(ConstraintKind))


@dataclass(frozen=True)
class ConstraintSpec:
    kind: ConstraintKind
    grammar: str
    tokenizer: str | None = None
    budget: int | None = None
    closers: tuple[str, ...] = ()

    def serialize(self) -> str:
        return json.dumps(
            {
                "v": SPEC_VERSION,
                "kind": self.kind,
                "grammar": self.grammar,
                "tokenizer": self.tokenizer,
                "budget": self.budget,
                "closers": list(self.closers),
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )

    @classmethod
    def parse(cls, text: str) -> ConstraintSpec:
        try:
            raw: Any = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConstraintError(f"constraint spec is not JSON: {error}") from error
        if not isinstance(raw, dict):
            raise ConstraintError("constraint spec must be a JSON object")
        data = cast(dict[str, Any], raw)
        if data.get("v") != SPEC_VERSION:
            raise ConstraintError(f"unsupported constraint spec version {data.get('v')!r}")
        kind, grammar, tokenizer = data.get("kind"), data.get("grammar"), data.get("tokenizer")
        if kind not in _KINDS:
            raise ConstraintError(f"unknown constraint kind {kind!r}")
        if not isinstance(grammar, str) or not grammar:
            raise ConstraintError("constraint spec has no grammar")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise ConstraintError("constraint spec 'tokenizer' must be a string or null")
        budget, closers = data.get("budget"), data.get("closers", [])
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise ConstraintError("constraint spec 'budget' must be a positive integer or null")
        if not isinstance(closers, list) or not all(
            isinstance(closer, str) and closer for closer in cast(list[Any], closers)
        ):
            raise ConstraintError("constraint spec 'closers' must be a list of strings")
        return cls(
            kind=cast(ConstraintKind, kind),
            grammar=grammar,
            tokenizer=tokenizer,
            budget=budget,
            closers=tuple(cast(list[str], closers)),
        )
