"""Per-request grammar state: mask the logits, advance with the sampled token.

llguidance computes the allowed-token bitmask on the CPU (one bit per tokenizer id) and
we apply it to the MLX logits ourselves: llguidance.mlx needs Metal, and unpacking
6 KiB of bits with numpy costs microseconds anywhere.

With a token budget (the request's max_tokens) the output is steered to a complete
document before the budget runs out: when the sampled token would leave too few tokens
to close what is open, the sampler follows the shortest closing path it finds instead
(closers, empty values, forced keys). A small model looping inside a string then still
returns a valid, shorter document rather than one cut in the middle.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, cast

import llguidance
import llguidance.numpy as llnp
import mlx.core as mx
import numpy as np
import numpy.typing as npt

from .errors import ConstraintError
from .grammar_tokenizer import GrammarTokenizer
from .guided import CLIENT_GRAMMAR_KINDS, client_grammar_limits
from .spec import ConstraintSpec

log = logging.getLogger(__name__)

# Characters a closing path is built from, in the order tried. Inside a string the quote
# ends it; elsewhere container closers come first. Then the shortest values (0, "", true,
# false, null) and separators; letters last, for keys and enum values the grammar does
# not force outright.
_STRING_ORDER = '"}]'
_STRUCTURE_ORDER = '}]"'
_OTHER_CHARACTERS = (
    "0,: 123456789tfn-.e{[\n" + "abcdghijklmopqrsuvwxyz" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "_/\\"
)
# For a regex or grammar the client wrote (no strings to tell apart): closing brackets
# and quotes, then what ends a sentence or a list item, digits, letters, the rest; an
# arithmetic grammar looping on `((` closes as `((0))`, a `[a-z]+\.` as `a.`.
_GRAMMAR_ORDER = (
    ")]}>\"'.,;:!? 0123456789\n"
    + "abcdefghijklmnopqrstuvwxyz"
    + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    + "-+*/=_&|#$%@^~`\\<([{"
)
# In a client grammar many letters allowed at once are a character class (`[A-Z]`), each
# closing alike: only a few (keywords' first letters) are worth a search each.
_MAX_GRAMMAR_BRANCHES = 6
# A character that JSON allows only inside a string: whether it may come next tells
# the two orders apart.
_STRING_PROBE = "x"
# The longest closing path searched for; a grammar that needs more is left alone.
_MAX_CLOSING_TOKENS = 256
# Far from the budget's end the closing cost is re-measured only every few tokens: it
# grows by a few tokens at most per token sampled, and a search costs 0.3-1 ms here.
_CHECK_EVERY = 8
_CHECK_SLACK = 16


class TokenConstraint:
    """One request's matcher. Not thread-safe; lives on the thread that samples."""

    def __init__(self, spec: ConstraintSpec, tokenizer: GrammarTokenizer) -> None:
        self.spec = spec
        self._tokenizer = tokenizer
        # A grammar the client wrote is matched under the limits it was checked under, and
        # closed in its own character order.
        self._client_grammar = spec.kind in CLIENT_GRAMMAR_KINDS
        limits = client_grammar_limits() if self._client_grammar else None
        self._matcher: llguidance.LLMatcher | None = llguidance.LLMatcher(
            tokenizer.ll, spec.grammar, log_level=0, limits=limits
        )
        if self._matcher.is_error():
            raise ConstraintError(f"invalid grammar: {self._matcher.get_error()}")
        self._vocab = tokenizer.ll.vocab_size
        self._bitmask = llnp.allocate_token_bitmask(1, self._vocab)
        # The bool mask handed to MLX, sized to the logits (which may exceed the
        # tokenizer's vocabulary: those extra ids stay False forever).
        self._allowed: npt.NDArray[np.bool_] | None = None
        self._eos_only: mx.array | None = None
        self.tokens_consumed = 0
        # Tokens of a closing path still to emit (the budget's end is near).
        self._closing: deque[int] = deque()
        self._closing_cost = 0
        self._closer_tokens = [tokenizer.ll.tokenize_str(closer) for closer in spec.closers]
        self.steered = False
        # CPU time spent computing masks (for the benchmark and logs), and how many.
        self.mask_seconds = 0.0
        self.masks_computed = 0

    @classmethod
    def from_serialized(cls, text: str, tokenizer: GrammarTokenizer) -> TokenConstraint:
        """The constraint of a serialized spec, matched against the sampling node's
        `tokenizer`; a spec naming another tokenizer is refused."""
        spec = ConstraintSpec.parse(text)
        if spec.tokenizer is not None and spec.tokenizer != tokenizer.key:
            raise ConstraintError(
                f"the constraint is for tokenizer {spec.tokenizer!r}; this node samples "
                f"with {tokenizer.key!r}"
            )
        return cls(spec, tokenizer)

    @property
    def done(self) -> bool:
        """The grammar is complete (or broken): only end-of-sequence may follow."""
        matcher = self._matcher
        return matcher is None or matcher.is_stopped() or matcher.is_error()

    @property
    def error(self) -> str | None:
        matcher = self._matcher
        if matcher is None or not matcher.is_error():
            return None
        return matcher.get_error()

    def allowed_mask(self, logits_vocab: int) -> npt.NDArray[np.bool_]:
        """The allowed ids for the next token as a bool vector of `logits_vocab` entries."""
        if self._allowed is None or self._allowed.shape[0] != logits_vocab:
            self._allowed = np.zeros(logits_vocab, dtype=np.bool_)
        matcher = self._matcher
        if matcher is None:
            raise ConstraintError("constraint already closed")
        started = time.perf_counter()
        llnp.fill_next_token_bitmask(matcher, self._bitmask)
        # Bit i of the little-endian int32 words is token i.
        words = self._bitmask[0].astype("<i4", copy=False).view(np.uint8)
        bits = np.unpackbits(words, bitorder="little", count=min(self._vocab, logits_vocab))
        self._allowed[: bits.shape[0]] = bits.view(np.bool_)
        self.mask_seconds += time.perf_counter() - started
        self.masks_computed += 1
        return self._allowed

    def mask_logits(self, logits: mx.array) -> mx.array:
        """`logits` ([1, vocab]) with every id the grammar forbids set to -inf."""
        logits_vocab = logits.shape[-1]
        if self.done:
            if self.error is not None:
                log.warning("constraint failed, ending the output: %s", self.error)
            return self._only_eos(logits)
        # Start the forward pass now so the CPU mask overlaps with it.
        mx.async_eval(logits)
        allowed = self.allowed_mask(logits_vocab)
        if not allowed.any():  # cannot happen with a sound grammar; never emit garbage
            return self._only_eos(logits)
        return mx.where(_to_mlx(allowed), logits, -mx.inf)

    def choose(self, logits: mx.array, sample: Callable[[mx.array], mx.array]) -> int:
        """The next token: `sample` of the masked logits, unless the budget needs the
        output closed now (then the next token of the closing path)."""
        if self._closing:
            return self._closing.popleft()
        token = cast(int, sample(self.mask_logits(logits)).item())
        return self._within_budget(token)

    def _within_budget(self, token: int) -> int:
        matcher = self._matcher
        budget = self.spec.budget
        if budget is None or matcher is None or self.done:
            return token
        # Tokens the output may still take after this one.
        left = budget - self.tokens_consumed - 1
        near = left <= self._closing_cost + _CHECK_SLACK
        if not near and self.tokens_consumed % _CHECK_EVERY:
            return token
        after = matcher.deep_copy()
        if after.consume_token(token):
            path = self._closing_path(after)
            if path is not None and len(path) <= left:
                self._closing_cost = len(path)
                return token
        plan = self._closing_path(matcher)
        if plan is None or len(plan) > left + 1:
            return token  # cannot close in time from here either: leave it to the model
        self.steered = True
        if not plan:  # complete already: end here
            return self._tokenizer.eos_token_ids[0]
        self._closing.extend(plan[1:])
        return plan[0]

    def _closing_path(self, start: llguidance.LLMatcher) -> list[int] | None:
        """A short token path from `start`'s state to one where the output may end (None
        if none is found within the search limit); `start` itself is left as it was.

        The path is searched character by character, then re-tokenized: the same bytes
        in the tokenizer's own merges are usually a third fewer tokens."""
        path = self._search(start.deep_copy(), _MAX_CLOSING_TOKENS, branch=True)
        if path is None:
            return None
        ll = self._tokenizer.ll
        compact = ll.tokenize_bytes(ll.decode_bytes(path))
        if len(compact) < len(path):
            check = start.deep_copy()
            if check.try_consume_tokens(compact) == len(compact) and check.is_accepting():
                return compact
        return path

    def _search(
        self, matcher: llguidance.LLMatcher, limit: int, *, branch: bool
    ) -> list[int] | None:
        """The closing path from `matcher` (consumed), greedy in the character order. With
        `branch`, where several letters may come outside a string (a key or an enum value:
        optional keys sort before required ones as often as not) each is followed greedily
        and the shortest taken."""
        characters = self._tokenizer.character_tokens
        probe = characters.get(_STRING_PROBE)

        def allowed(candidates: str) -> Iterator[tuple[str, int]]:
            for character in candidates:
                token = characters.get(character)
                if token is not None and matcher.validate_tokens([token]) == 1:
                    yield character, token

        path: list[int] = []
        while not matcher.is_accepting():
            if len(path) > limit or matcher.is_error():
                return None
            forced = matcher.compute_ff_tokens()
            taken = matcher.try_consume_tokens(forced) if forced else 0
            if taken:
                path += forced[:taken]
                continue
            step = next(
                (ids for ids in self._closer_tokens if matcher.validate_tokens(ids) == len(ids)),
                None,
            )
            if step is None:
                if self._client_grammar:
                    in_string, order = False, _GRAMMAR_ORDER
                else:
                    in_string = probe is not None and matcher.validate_tokens([probe]) == 1
                    order = (_STRING_ORDER if in_string else _STRUCTURE_ORDER) + _OTHER_CHARACTERS
                first = next(allowed(order), None)
                if first is None:
                    return None
                character, token = first
                if branch and not in_string and character.isalpha():
                    # The first allowed is a letter: the others allowed come after it.
                    rest = order[order.index(character) :]
                    letters = [t for c, t in allowed(rest) if c.isalpha()]
                    wide = self._client_grammar and len(letters) > _MAX_GRAMMAR_BRANCHES
                    if len(letters) > 1 and not wide:
                        token = self._shortest_start(matcher, letters, limit - len(path))
                step = [token]
            matcher.consume_tokens(step)
            path += step
        return path

    def _shortest_start(self, matcher: llguidance.LLMatcher, tokens: list[int], limit: int) -> int:
        """Of `tokens`, the one whose greedy closing path is shortest."""
        best, best_length = tokens[0], limit + 1
        for token in tokens:
            branch = matcher.deep_copy()
            branch.consume_token(token)
            rest = self._search(branch, min(limit, best_length), branch=False)
            if rest is not None and len(rest) < best_length:
                best, best_length = token, len(rest)
        return best

    def _only_eos(self, logits: mx.array) -> mx.array:
        if self._eos_only is None or self._eos_only.shape[0] != logits.shape[-1]:
            mask = np.zeros(logits.shape[-1], dtype=np.bool_)
            for token in self._tokenizer.eos_token_ids:
                if token < mask.shape[0]:
                    mask[token] = True
            self._eos_only = _to_mlx(mask)
        return mx.where(self._eos_only, logits, -mx.inf)

    def advance(self, token: int) -> None:
        """Feed the sampled token; a refused token puts the matcher in its error state."""
        matcher = self._matcher
        if matcher is None or matcher.is_stopped() or matcher.is_error():
            return
        if not matcher.consume_token(token):
            log.warning("constraint refused token %d: %s", token, matcher.get_error())
        self.tokens_consumed += 1

    def close(self) -> None:
        """Free the matcher now rather than at garbage collection."""
        self._matcher = None


def _to_mlx(mask: npt.NDArray[np.bool_]) -> mx.array:
    # MLX takes numpy arrays (via the buffer protocol); its stubs do not say so.
    return mx.array(cast(Any, mask))
