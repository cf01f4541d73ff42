"""The tokenizer a grammar constraint is matched against, on the node that samples.

The spec travels without tokenizer data, naming its tokenizer by model id; the sampling
stage holds the one it loaded and hands it to each request's sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import llguidance

from ..models.tokenizer import TextTokenizer
from .errors import ConstraintError


@dataclass(frozen=True)
class GrammarTokenizer:
    key: str
    text: TextTokenizer
    ll: llguidance.LLTokenizer
    # Token ids that end generation; the runner stops on the same set.
    eos_token_ids: tuple[int, ...]
    # The one-token spelling of each ASCII character that has one: what closing a
    # document within the token budget is built from (see TokenConstraint).
    character_tokens: dict[str, int]


def build_ll_tokenizer(tokenizer: TextTokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer from the `tokenizers` backend (the HF JSON form, as
    llguidance.hf does for fast tokenizers, without going through transformers)."""
    eos = sorted(tokenizer.eos_token_ids)
    if not eos:
        raise ConstraintError("the tokenizer has no end-of-sequence token; cannot constrain")
    try:
        return llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=eos)
    except Exception as error:  # llguidance raises plain exceptions for odd tokenizers
        raise ConstraintError(f"cannot build llguidance tokenizer: {error}") from error


def _character_tokens(ll: llguidance.LLTokenizer) -> dict[str, int]:
    """Printable ASCII and newline, each mapped to its token when it is a single one."""
    found: dict[str, int] = {}
    for character in [chr(code) for code in range(32, 127)] + ["\n"]:
        ids = ll.tokenize_str(character)
        if len(ids) == 1:
            found[character] = ids[0]
    return found


def grammar_tokenizer(key: str, tokenizer: TextTokenizer) -> GrammarTokenizer:
    """The grammar tokenizer of `tokenizer`, named `key` (the model id). llguidance's token
    trie takes about a second to build: build it once per loaded model, off the request
    path, and hand it to the samplers that need it."""
    ll = build_ll_tokenizer(tokenizer)
    return GrammarTokenizer(
        key=key,
        text=tokenizer,
        ll=ll,
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        character_tokens=_character_tokens(ll),
    )
