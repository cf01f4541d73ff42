"""Process-wide tokenizers for constraints, by key (a node registers its model id).

The spec travels without tokenizer data; whichever node samples looks the tokenizer up
here. llguidance's token trie takes about a second to build, so it is built once at
registration, off the request path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import llguidance

from ..models.tokenizer import TextTokenizer
from .errors import ConstraintError


@dataclass(frozen=True)
class RegisteredTokenizer:
    key: str
    text: TextTokenizer
    ll: llguidance.LLTokenizer
    # Token ids that end generation; the runner stops on the same set.
    eos_token_ids: tuple[int, ...]
    # The one-token spelling of each ASCII character that has one: what closing a
    # document within the token budget is built from (see TokenConstraint).
    character_tokens: dict[str, int]


_lock = threading.Lock()
_registry: dict[str, RegisteredTokenizer] = {}


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


def register_tokenizer(key: str, tokenizer: TextTokenizer) -> RegisteredTokenizer:
    """Make `tokenizer` available to constraints naming `key` (idempotent per object)."""
    with _lock:
        existing = _registry.get(key)
        if existing is not None and existing.text is tokenizer:
            return existing
    # Built outside the lock: it takes ~1 s and other keys must stay readable.
    ll = build_ll_tokenizer(tokenizer)
    entry = RegisteredTokenizer(
        key=key,
        text=tokenizer,
        ll=ll,
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        character_tokens=_character_tokens(ll),
    )
    with _lock:
        _registry[key] = entry
    return entry


def unregister_tokenizer(key: str) -> None:
    with _lock:
        _registry.pop(key, None)


def get_tokenizer(key: str | None) -> RegisteredTokenizer:
    """The tokenizer for `key`; None means the only one registered (a node serves one model)."""
    with _lock:
        if key is not None:
            entry = _registry.get(key)
            if entry is None:
                known = ", ".join(sorted(_registry)) or "none"
                raise ConstraintError(f"no tokenizer registered for {key!r} (registered: {known})")
            return entry
        if len(_registry) != 1:
            raise ConstraintError(
                f"the constraint names no tokenizer and {len(_registry)} are registered; name one"
            )
        return next(iter(_registry.values()))
