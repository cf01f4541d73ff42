"""The tokenizer a grammar constraint is matched against, on the node that samples.

The spec travels without tokenizer data, naming its tokenizer by model id; the sampling
stage holds the one it loaded and hands it to each request's sampler.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
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


# Built tokenizers by vocabulary fingerprint. Building one holds the GIL throughout (for
# Gemma 3's 262k tokens: 3.1 s, plus 0.6 s to serialize; every other thread of the node,
# heartbeats included, waits), so a node builds each vocabulary once: re-placements and
# the API node's own grammar checks reuse it.
_BUILT: OrderedDict[tuple[object, ...], llguidance.LLTokenizer] = OrderedDict()
_BUILT_KEEP = 4
_BUILD_LOCK = threading.Lock()


def _fingerprint(tokenizer: TextTokenizer) -> tuple[object, ...]:
    """Tells vocabularies apart without serializing them: size, end tokens, and a sample of
    the tokens (every 256th, and the last 64, where added and special tokens sit)."""
    size = tokenizer.vocab_size
    sampled = list(range(0, size, max(1, size // 256))) + list(range(max(0, size - 64), size))
    return (
        size,
        tuple(sorted(tokenizer.eos_token_ids)),
        tuple(tokenizer.id_to_token(index) for index in sampled),
    )


def build_ll_tokenizer(tokenizer: TextTokenizer) -> llguidance.LLTokenizer:
    """llguidance's tokenizer from the `tokenizers` backend (the HF JSON form, as
    llguidance.hf does for fast tokenizers, without going through transformers), built
    once per vocabulary in this process."""
    eos = sorted(tokenizer.eos_token_ids)
    if not eos:
        raise ConstraintError("the tokenizer has no end-of-sequence token; cannot constrain")
    key = _fingerprint(tokenizer)
    with _BUILD_LOCK:
        found = _BUILT.get(key)
        if found is None:
            try:
                found = llguidance.LLTokenizer(tokenizer.backend.to_str(), eos_token=eos)
            except Exception as error:  # llguidance raises plain exceptions for odd tokenizers
                raise ConstraintError(f"cannot build llguidance tokenizer: {error}") from error
            _BUILT[key] = found
            while len(_BUILT) > _BUILT_KEEP:
                _BUILT.popitem(last=False)
        _BUILT.move_to_end(key)
        return found


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
