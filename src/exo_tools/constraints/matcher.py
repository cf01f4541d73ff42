"""Per-request grammar state: mask the logits, advance with the sampled token.

llguidance computes the allowed-token bitmask on the CPU (one bit per tokenizer id) and
we apply it to the MLX logits ourselves: llguidance.mlx needs Metal, and unpacking
6 KiB of bits with numpy costs microseconds anywhere.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import llguidance
import llguidance.numpy as llnp
import mlx.core as mx
import numpy as np
import numpy.typing as npt

from .errors import ConstraintError
from .registry import RegisteredTokenizer, get_tokenizer
from .spec import ConstraintSpec

log = logging.getLogger(__name__)


class TokenConstraint:
    """One request's matcher. Not thread-safe; lives on the thread that samples."""

    def __init__(self, spec: ConstraintSpec, tokenizer: RegisteredTokenizer) -> None:
        self.spec = spec
        self._tokenizer = tokenizer
        self._matcher: llguidance.LLMatcher | None = llguidance.LLMatcher(
            tokenizer.ll, spec.grammar, log_level=0
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
        # CPU time spent computing masks (for the benchmark and logs), and how many.
        self.mask_seconds = 0.0
        self.masks_computed = 0

    @classmethod
    def from_serialized(cls, text: str) -> TokenConstraint:
        spec = ConstraintSpec.parse(text)
        return cls(spec, get_tokenizer(spec.tokenizer))

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
