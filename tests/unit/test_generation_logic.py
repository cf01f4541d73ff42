"""Pure logic of the serving and engine layers."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import mlx.core as mx
import pytest
from pydantic import ValidationError

from exo_tools.api.errors import from_validation_error
from exo_tools.api.schemas import ChatCompletionRequest
from exo_tools.engine.driver import Origin
from exo_tools.engine.sampling import (
    Sampler,
    _top_p_filter,
    dry_repeat_lengths,
    ends_sentence,
    sample_token,
)
from exo_tools.models.catalog import (
    GGUFFileSource,
    HFRepoSource,
    UnknownModelError,
    resolve_model,
)
from exo_tools.serving.generation import StopStringMatcher
from exo_tools.types import SamplingParams, Shard


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (["END"], ["hello E", "N", "D world"], ("hello ", True)),
        (["END"], ["hello E", "NO"], ("hello ENO", False)),
        (["ab", "b c"], ["x a", "b c"], ("x ", True)),
        (["\n\n"], ["line\n", "\nmore"], ("line", True)),
        ([], ["a", "b"], ("ab", False)),
        (["stop"], ["sto"], ("sto", False)),
    ],
)
def test_stop_strings(stops: list[str], pieces: list[str], expected: tuple[str, bool]) -> None:
    assert run_matcher(stops, pieces) == expected


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    matcher = StopStringMatcher(["<END>"])
    assert matcher.feed("abc<E") == ("abc", False)
    assert matcher.feed("x") == ("<Ex", False)


def test_stop_matcher_names_the_stop_reached() -> None:
    matcher = StopStringMatcher(["b c", "ab"])
    assert matcher.feed("x ab c") == ("x ", True)
    assert matcher.matched == "ab"  # the one that starts first, not the first listed
    assert StopStringMatcher(["END"]).matched is None


def test_greedy_sampler_is_argmax() -> None:
    logits = mx.array([[0.1, 3.0, 2.9]])
    assert Sampler(SamplingParams(temperature=0.0))(logits).tolist() == [1]


def test_seeded_sampler_is_reproducible_and_top_p_filters() -> None:
    logits = mx.array([[2.0, 1.9, -5.0, -6.0]])
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    filtered = _top_p_filter(logits, 0.5)
    assert filtered.tolist()[0][0] == 2.0
    assert all(value == float("-inf") for value in filtered.tolist()[0][1:])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.9, seed=3))
    assert {sampler(logits).tolist()[0] for _ in range(50)} <= {0, 1}


def test_top_k_draws_only_among_the_k_most_likely() -> None:
    # Nearly flat: without top_k all five tokens come up in 200 draws.
    logits = mx.array([[1.0, 1.1, 0.9, 1.05, 0.95]])
    free = Sampler(SamplingParams(temperature=1.0, seed=11))
    assert {free(logits).tolist()[0] for _ in range(200)} == {0, 1, 2, 3, 4}
    top_two = Sampler(SamplingParams(temperature=1.0, top_k=2, seed=11))
    assert {top_two(logits).tolist()[0] for _ in range(200)} == {1, 3}
    top_one = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=11))
    assert {top_one(logits).tolist()[0] for _ in range(20)} == {1}


def test_repetition_penalty_lowers_recent_tokens_only() -> None:
    """Greedy with a penalty: token 1 led, was sampled, and is then passed over for token
    0 (2.0 / 1.5 < 1.8); a negative logit moves down too; the caller's logits stay."""
    logits = mx.array([[1.8, 2.0, -1.0, -0.5]])
    before = logits.tolist()
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.5))
    assert sample_token(sampler, logits)[0] == 1
    assert sample_token(sampler, logits)[0] == 0
    assert logits.tolist() == before
    negative = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    negative.sampled(3)
    assert negative(mx.array([[-0.9, -5.0, -5.0, -0.5]])).tolist() == [0]  # -0.5 * 2 < -0.9
    unpenalized = Sampler(SamplingParams(temperature=0.0))
    assert [sample_token(unpenalized, logits)[0] for _ in range(2)] == [1, 1]


def _dry_lengths_by_search(history: list[int], breaks: list[bool], allowed: int) -> dict[int, int]:
    """DRY's repeat lengths the slow way: for every earlier position, compare backwards."""
    n = len(history)
    tail = next((k for k in range(n) if breaks[n - 1 - k]), n)
    lengths: dict[int, int] = {}
    for j in range(1, n):
        length = 0
        while length < min(j, tail) and history[j - 1 - length] == history[n - 1 - length]:
            length += 1
        if length >= allowed:
            lengths[history[j]] = max(lengths.get(history[j], 0), length)
    return lengths


def test_dry_repeat_lengths() -> None:
    # The history ends with 1 2 3, seen before and followed by 4: 4 would make it a repeat.
    assert dry_repeat_lengths([1, 2, 3, 4, 1, 2, 3], [False] * 7, 2) == {4: 3}
    assert dry_repeat_lengths([1, 2, 3, 4, 1, 2, 3], [False] * 7, 4) == {}
    # Each token gets its longest run: 9 follows "7 1 2", 8 only "1 2".
    assert dry_repeat_lengths([7, 1, 2, 9, 1, 2, 8, 7, 1, 2], [False] * 10, 2) == {9: 3, 8: 2}
    # A breaker (a newline, say) ends the run the history can repeat.
    assert (
        dry_repeat_lengths([5, 1, 2, 9, 1, 2], [False, False, False, False, True, False], 2) == {}
    )
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randrange(0, 40)
        history = [rng.randrange(3) for _ in range(n)]
        breaks = [rng.random() < 0.05 for _ in range(n)]
        allowed = rng.randrange(1, 4)
        assert dry_repeat_lengths(history, breaks, allowed) == _dry_lengths_by_search(
            history, breaks, allowed
        ), (history, breaks, allowed)


def test_dry_sampler_steps_out_of_a_loop_but_not_across_a_breaker() -> None:
    """Greedy: token 3 leads token 4 by 0.5 and would repeat "1 2 3" a third time; DRY
    takes 0.8 x 1.75 ** (5 - 2) from it (the run "1 2 3 1 2" repeats) and 4 wins. Once a
    breaker token cuts the run, only what follows it counts."""
    logits = mx.array([[0.0, 0.0, 0.0, 2.5, 2.0, 0.0]])
    history = [1, 2, 3, 1, 2, 3, 1, 2]
    plain = Sampler(SamplingParams(temperature=0.0))
    dry = Sampler(SamplingParams(temperature=0.0, dry_multiplier=0.8))
    for token in history:
        plain.sampled(token)
        dry.sampled(token)
    assert plain(logits).tolist() == [3]
    assert dry(logits).tolist() == [4]
    # Token 5 reads as a newline: the run before it no longer counts, and "1 2" after it
    # (allowed length 2) costs 3 only 0.4, less than its 0.5 lead.
    text = SimpleNamespace(decode=lambda ids: "\n" if ids == [5] else "x")
    broken = Sampler(
        SamplingParams(temperature=0.0, dry_multiplier=0.4),
        cast(Any, SimpleNamespace(text=text)),
    )
    for token in [*history, 3, 5, 1, 2]:
        broken.sampled(token)
    assert broken(logits).tolist() == [3]


@pytest.mark.parametrize(
    ("text", "ends"),
    [
        ("It is done.", True),
        ("Really? ", True),
        ("a list:\n", True),
        ("Steps:\n1.", False),  # numbers an item
        ("It costs 3.", False),  # a decimal may go on
        ("no end yet", False),
        ("", False),
    ],
)
def test_ends_sentence(text: str, ends: bool) -> None:
    assert ends_sentence(text) is ends


def test_wrap_up_ends_the_answer_at_the_first_sentence_end_past_its_point() -> None:
    """Token 1 reads "word", 2 ".", 3 "```", 4 "\n", 5 "</a>"; 0 and 9 end the turn.
    Greedy, the model always wants token 1: past 4 tokens, the answer ends at the next
    sentence or line end (with the likelier end token), not before it and not inside a
    code block; past 6, at any word end too."""
    pieces = {1: " word", 2: ".", 3: "```", 4: "\n", 5: "</a>", 6: "``", 7: "`py"}
    tokenizer = SimpleNamespace(
        text=SimpleNamespace(decode=lambda ids: pieces[ids[0]]), eos_token_ids=(0, 9)
    )
    logits = mx.array([[0.0, 5.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5]])

    def after(history: list[int], wrap_up_after: int = 4, **params: Any) -> int:
        sampler = Sampler(
            SamplingParams(temperature=0.0, wrap_up_after=wrap_up_after, **params),
            cast(Any, tokenizer),
        )
        for token in history:
            sampler.sampled(token)
        return cast(int, sampler(logits).item())

    assert after([1, 2, 1]) == 1  # a sentence end, before the wrap-up point
    assert after([1, 2, 1, 1]) == 1  # past it, but mid-sentence
    assert after([1, 2, 1, 2]) == 9  # past it, at a sentence end: the likelier end token
    assert after([1, 1, 1, 4]) == 9  # a line end
    assert after([1, 3, 4, 1, 2]) == 1  # inside a code block
    assert after([3, 4, 3, 4]) == 9  # after it closed
    assert after([1, 6, 7, 4, 1, 2], wrap_up_after=5) == 1  # a fence split across tokens
    assert after([1, 1, 1, 1, 5]) == 1  # a word end, short of half as far again
    assert after([1, 1, 1, 1, 1, 5]) == 9  # there
    assert after([1, 1, 1, 1, 1, 1]) == 1  # mid-word
    assert after([1, 3, 1, 1, 1, 5]) == 9  # even inside a code block
    assert after([1, 2, 1, 2], wrap_up_after=0) == 1  # off
    assert Sampler(SamplingParams(wrap_up_after=3), cast(Any, tokenizer)).needs_each_token
    constrained = SamplingParams(wrap_up_after=3, constraint="{}")
    assert not Sampler(constrained, cast(Any, tokenizer)).needs_each_token  # never wraps up
    assert not Sampler(SamplingParams(wrap_up_after=3)).needs_each_token  # nothing to end with


def test_a_failover_keeps_the_wrap_up_point_where_the_clients_answer_reached_it() -> None:
    """The new placement's sampler counts from its first token: the point moves back by
    the tokens emitted, counted from the client's setting on every failover."""
    origin = Origin(
        "r",
        1,
        [5, 6],
        64,
        SamplingParams(wrap_up_after=32),
        emit=lambda event: None,
        cancelled=threading.Event(),
    )
    origin.emitted = list(range(20))
    origin.resume(2)
    assert origin.sampling.wrap_up_after == 12 and origin.prompt == [5, 6, *range(20)]
    origin.emitted = list(range(40))
    origin.resume(3)
    assert origin.sampling.wrap_up_after == 1  # past it: at the next sentence end


def test_shard_bounds() -> None:
    shard = Shard("m", 0, 10, 30)
    assert shard.is_first and not shard.is_last and shard.n_local_layers == 10
    assert Shard.full("m", 30).is_last
    with pytest.raises(ValueError):
        Shard("m", 10, 10, 30)
    with pytest.raises(ValueError):
        Shard("m", 0, 31, 30)


def test_resolve_model(tmp_path: Path) -> None:
    assert resolve_model("smollm2-135m").tool_format == "hermes"
    gguf = tmp_path / "My Model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    card = resolve_model(str(gguf))
    assert isinstance(card.source, GGUFFileSource) and card.id == "my-model.q8-0"
    assert isinstance(resolve_model("org/some-model").source, HFRepoSource)
    with pytest.raises(UnknownModelError, match="catalog id"):
        resolve_model("no such model")
    with pytest.raises(UnknownModelError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UnknownModelError, match=r"config\.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages.0"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 17},
            "stop",
        ),
    ],
)
def test_request_validation_names_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    error = from_validation_error(caught.value)
    assert error.status == 400
    assert error.param is not None and error.param.startswith(param)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [("--api-port", "99999", "65535"), ("--wrap-up-share", "1.5", "[0, 1]")],
)
def test_cli_names_the_bad_value(flag: str, value: str, expected: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exo_tools", "node", flag, value],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert flag in result.stderr and expected in result.stderr


def test_cli_names_an_unknown_model() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exo_tools", "node", "--model", "no such model"],
        capture_output=True,
        text=True,
        env={"EXO_TOOLS_BLAS": "off", "PATH": ""},
    )
    assert result.returncode == 2
    assert "--model" in result.stderr
