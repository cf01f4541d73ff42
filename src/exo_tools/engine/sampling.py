"""Token sampling with a per-request random key.

mlx-lm's samplers draw from MLX's global random state; with several requests interleaved
on one thread that would make a request's output depend on its neighbours, so each
request carries its own key (seeded when the client gives `seed`).

A request with a `constraint` masks the logits with its grammar before sampling and
feeds the sampled token back (exo_tools.constraints); once the grammar is complete only
end-of-sequence is allowed, so the runner stops. Without one, sampling does no extra work.

The repetition penalties (vLLM's `repetition_penalty`, llama.cpp's DRY) read the tokens this
request generated; mlx-lm has the first, not DRY, which is written here. So does the wrap-up
(`SamplingParams.wrap_up_after`), which neither mlx-lm nor the other servers have: past its
point, an answer ends at its next sentence or line end.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING, cast

import mlx.core as mx

from ..types import SamplingParams, TokenLogprobs

if TYPE_CHECKING:
    from ..constraints import GrammarTokenizer, TokenConstraint

# The generated tokens a repetition penalty looks back on (llama.cpp's repeat_last_n).
REPETITION_WINDOW = 64
# ... and DRY does (llama.cpp's dry_penalty_last_n), and the text that ends a repeat there:
# a repeat does not run across a token holding one of llama.cpp's default sequence breakers,
# so line- and field-shaped text (lists, JSON keys, code) keeps its repeated framing.
DRY_WINDOW = 1024
DRY_BREAKERS = ("\n", ":", '"', "*")
DRY_MAX_EXPONENT = 40  # past this the token is out anyway; keeps the penalty finite
# What ends a sentence or a line, where a wrapped-up answer may end.
SENTENCE_ENDS = (".", "!", "?", "\n", "\u3002", "\uff01", "\uff1f")
CODE_FENCE = "```"
TAIL_CHARS = 64  # of the answer, kept to tell where it may end


def token_logprobs(logits: mx.array, token: int, top: int) -> TokenLogprobs:
    """Log-probabilities under `logits` (one row), before any temperature or constraint."""
    row = logits.reshape(-1).astype(mx.float32)
    logprobs = row - mx.logsumexp(row)
    best: list[tuple[int, float]] = []
    if top > 0:
        count = min(top, row.shape[0])
        ids = mx.argpartition(-logprobs, count - 1)[:count]
        id_list = cast(list[int], ids.tolist())
        value_list = cast(list[float], logprobs[ids].tolist())
        best = sorted(zip(id_list, value_list, strict=True), key=lambda pair: -pair[1])
    return TokenLogprobs(cast(float, logprobs[token].item()), tuple(best))


class Sampler:
    def __init__(self, params: SamplingParams, tokenizer: GrammarTokenizer | None = None) -> None:
        """`tokenizer`: the sampling node's, for a request with a grammar constraint."""
        self.params = params
        self._tokenizer = tokenizer
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        self._key = mx.random.key(seed)
        # Built on the first call, on the thread that samples (the node's MLX thread).
        self._constraint: TokenConstraint | None = None
        self._dry = params.dry_multiplier > 0.0
        self._penalizes = params.repetition_penalty != 1.0 or self._dry
        window = DRY_WINDOW if self._dry else REPETITION_WINDOW
        self._recent: deque[int] = deque(maxlen=window)
        self._breaks: deque[bool] = deque(maxlen=window)  # DRY: the token ends a repeat
        # The wrap-up's end-of-turn tokens (None: it is off, or has nothing to end with),
        # and what it reads of the text generated so far.
        self._end_ids: mx.array | None = None
        if (
            params.wrap_up_after > 0
            and params.constraint is None
            and tokenizer is not None
            and tokenizer.eos_token_ids
        ):
            self._end_ids = mx.array(tokenizer.eos_token_ids)
        self._generated = 0
        self._tail = ""  # the end of the text generated so far
        self._fences = 0  # code fences in that text

    @property
    def needs_each_token(self) -> bool:
        """Whether sampling needs the tokens sampled so far (read back between steps)."""
        return self._penalizes or self._wraps_up

    @property
    def _wraps_up(self) -> bool:
        return self._end_ids is not None

    def sampled(self, token: int) -> None:
        """Note a sampled token, for the repetition penalties and the wrap-up."""
        if self._penalizes:
            self._recent.append(token)
        if not (self._dry or self._wraps_up):
            return
        text = self._tokenizer.text.decode([token]) if self._tokenizer is not None else ""
        if self._dry:
            self._breaks.append(any(breaker in text for breaker in DRY_BREAKERS))
        if self._wraps_up:
            self._generated += 1
            # A fence may be split across tokens: count those ending in this token's text.
            self._fences += (self._tail[-(len(CODE_FENCE) - 1) :] + text).count(CODE_FENCE)
            self._tail = (self._tail + text)[-TAIL_CHARS:]

    def _wrapping_up(self) -> bool:
        """Past the wrap-up point, at a sentence or line end outside a code block; from
        half as far again, also at the end of any word (an answer of markup or code may
        have no sentence end left before its limit)."""
        point = self.params.wrap_up_after
        if not self._wraps_up or self._generated < point:
            return False
        if ends_sentence(self._tail) and self._fences % 2 == 0:
            return True
        return self._generated >= point + point // 2 and ends_word(self._tail)

    def _penalized(self, logits: mx.array) -> mx.array:
        """`logits` with the recently generated tokens made less likely: a positive logit
        divided by the penalty, a negative one multiplied (so both move down); then DRY's
        subtraction from each token that would extend a repeat."""
        if not self._recent:
            return logits
        penalty = self.params.repetition_penalty
        if penalty != 1.0:
            recent = islice(self._recent, max(0, len(self._recent) - REPETITION_WINDOW), None)
            ids = mx.array(sorted(set(recent)))
            logits = logits.astype(mx.float32)
            seen = logits[:, ids]
            logits[:, ids] = mx.where(seen < 0, seen * penalty, seen / penalty)
        if self._dry:
            params = self.params
            lengths = dry_repeat_lengths(self._recent, self._breaks, params.dry_allowed_length)
            if lengths:
                ids = mx.array(list(lengths))
                amounts = mx.array(
                    [
                        params.dry_multiplier
                        * params.dry_base
                        ** min(length - params.dry_allowed_length, DRY_MAX_EXPONENT)
                        for length in lengths.values()
                    ],
                    dtype=mx.float32,
                )
                logits = logits.astype(mx.float32)
                logits[:, ids] = logits[:, ids] - amounts
        return logits

    def __call__(self, logits: mx.array) -> mx.array:
        """One token id per row of `logits` (shape [batch, vocab])."""
        ends = self._end_ids
        if ends is not None and self._wrapping_up():
            # The model's likeliest end-of-turn token, whatever its odds.
            return ends[mx.argmax(logits[:, ends], axis=-1)]
        logits = self._penalized(logits)
        if self.params.constraint is None:
            return self._sample(logits)
        constraint = self._constraint
        if constraint is None:
            constraint = self._constraint = _build_constraint(
                self.params.constraint, self._tokenizer
            )
        if logits.shape[0] != 1:
            raise ValueError("constrained sampling takes one row of logits at a time")
        token = constraint.choose(logits, self._sample)
        constraint.advance(token)
        return mx.array([token])

    @property
    def constraint(self) -> TokenConstraint | None:
        """This request's grammar state, once the first token was sampled."""
        return self._constraint

    def close(self) -> None:
        """Free the request's grammar state now (it is also freed with the sampler)."""
        if self._constraint is not None:
            self._constraint.close()

    def _sample(self, logits: mx.array) -> mx.array:
        if self.params.greedy:
            return mx.argmax(logits, axis=-1)
        self._key, step_key = mx.random.split(self._key)
        scaled = logits.astype(mx.float32) / self.params.temperature
        if 0 < self.params.top_k < scaled.shape[-1]:
            scaled = _top_k_filter(scaled, self.params.top_k)
        if self.params.top_p < 1.0:
            scaled = _top_p_filter(scaled, self.params.top_p)
        return mx.random.categorical(scaled, key=step_key)


def sample_token(sampler: Sampler | None, logits: mx.array) -> tuple[int, TokenLogprobs | None]:
    """The next token from one row of `logits`, with its log-probabilities if asked for."""
    if sampler is None:
        raise RuntimeError("no sampling parameters arrived for this request")
    token = int(sampler(logits).item())  # type: ignore[misc]
    sampler.sampled(token)
    params = sampler.params
    if not params.logprobs:
        return token, None
    return token, token_logprobs(logits, token, params.top_logprobs)


def ends_sentence(text: str) -> bool:
    """Whether `text` ends a line, or a sentence: ., ! or ? (trailing spaces aside), but
    not right after a digit, where it numbers a list item or a decimal goes on."""
    if text.endswith("\n"):
        return True
    stripped = text.rstrip(" \t")
    if not stripped.endswith(SENTENCE_ENDS):
        return False
    return not (len(stripped) > 1 and stripped[-1] == "." and stripped[-2].isdigit())


def ends_word(text: str) -> bool:
    """Whether `text` ends in something other than a letter or a digit (a space, a
    punctuation mark, markup's `>`)."""
    return bool(text) and not text[-1].isalnum()


def dry_repeat_lengths(
    history: Sequence[int], breaks: Sequence[bool], allowed_length: int
) -> dict[int, int]:
    """DRY's view of `history`: each token that, sampled next, would extend a repeat of an
    earlier run (the run the history ends with, seen before and followed by that token),
    with the longest such run's length, for runs of at least `allowed_length`. A run does
    not reach back past a token marked in `breaks` (one flag per token of `history`)."""
    tokens = list(history)
    n = len(tokens)
    tail = 0  # the longest run that can repeat: back to the last breaker
    for broken in reversed(breaks):
        if broken:
            break
        tail += 1
    if tail < allowed_length:
        return {}
    # z[i]: how far `tokens` read backwards from the end and from position n-1-i agree, so
    # the run ending just before position j repeats the history's end for z[n - j] tokens.
    z = _z_array(tokens[::-1])
    lengths: dict[int, int] = {}
    for j in range(1, n):
        length = min(z[n - j], tail)
        if length >= allowed_length and length > lengths.get(tokens[j], 0):
            lengths[tokens[j]] = length
    return lengths


def _z_array(sequence: Sequence[int]) -> list[int]:
    """z[i]: the length of the longest common prefix of `sequence` and `sequence[i:]`."""
    n = len(sequence)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0
    for i in range(1, n):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < n and sequence[z[i]] == sequence[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    return z


def _build_constraint(spec: str, tokenizer: GrammarTokenizer | None) -> TokenConstraint:
    # Imported here so unconstrained serving never loads llguidance.
    from ..constraints import ConstraintError, TokenConstraint

    if tokenizer is None:
        raise ConstraintError("this node has no tokenizer to constrain with")
    return TokenConstraint.from_serialized(spec, tokenizer)


def _top_k_filter(logits: mx.array, top_k: int) -> mx.array:
    """Keep the `top_k` most likely tokens (and any tied with the last of them)."""
    threshold = mx.min(mx.topk(logits, top_k, axis=-1), axis=-1, keepdims=True)
    return mx.where(logits >= threshold, logits, -mx.inf)


def _top_p_filter(logits: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of tokens whose probability reaches top_p."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    probs = mx.softmax(sorted_logits, axis=-1)
    cumulative = mx.cumsum(probs, axis=-1)
    # A token stays if the mass before it is still below top_p (the first always stays).
    keep_sorted = (cumulative - probs) < top_p
    filtered_sorted = mx.where(keep_sorted, sorted_logits, -mx.inf)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(filtered_sorted, inverse, axis=-1)
