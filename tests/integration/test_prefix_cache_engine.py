"""The prefix cache's protocol between two pipeline stages, in process.

Two real StageEngines hold the real default model's two halves and hand each other their
messages directly (the gRPC streams between processes are tested elsewhere; here the
point is what the stages do with the messages). Greedy conversations must come out
token-identical to the same engines with the cache off, while the stages keep, evict and
lose entries: a later stage that lost an entry turns a hit into a recompute, a later stage
with a smaller budget evicts and stage 0's index follows, and every stage ends up holding
the same entries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from exo_tools.engine.core import InstalledStage, StageEngine
from exo_tools.engine.shard import ShardModel
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.types import (
    ErrorEvent,
    FinishEvent,
    PromptEvent,
    SamplingParams,
    TokenEvent,
)
from tests.helpers.cluster_checks import wait_for

EPOCH = 3
EOS = frozenset({2})
MAX_TOKENS = 4
LARGE = 1 << 30
SYSTEM = "You are a careful assistant for a shop that sells bicycles, lamps and maps."


@contextmanager
def pipeline(
    halves: tuple[ShardModel, ShardModel], budgets: tuple[int, int]
) -> Iterator[tuple[StageEngine, StageEngine]]:
    """Two started engines forming a 2-stage ring, with these prefix cache budgets."""
    first, last = halves
    engines = (
        StageEngine(prefix_cache_bytes=budgets[0]),
        StageEngine(prefix_cache_bytes=budgets[1]),
    )
    for engine in engines:
        engine.start()
    try:
        head, tail = engines
        head.install(InstalledStage(EPOCH, first, EOS, 2, send=tail.deliver), "test")
        tail.install(InstalledStage(EPOCH, last, EOS, 2, send=head.deliver), "test")
        yield engines
    finally:
        for engine in engines:
            engine.stop()


def generate(engine: StageEngine, request_id: str, prompt: list[int]) -> tuple[list[int], int]:
    """Greedy tokens of `prompt`, and the prompt tokens the prefix cache served."""

    async def run() -> tuple[list[int], int]:
        handle = engine.submit(
            request_id,
            prompt,
            sampling=SamplingParams(temperature=0.0),
            max_tokens=MAX_TOKENS,
            loop=asyncio.get_running_loop(),
        )
        tokens: list[int] = []
        while True:
            event = await asyncio.wait_for(handle.events.get(), 120)
            match event:
                case PromptEvent():
                    pass
                case TokenEvent(token_id=token_id):
                    tokens.append(token_id)
                case FinishEvent(cached_tokens=cached):
                    return tokens, cached
                case ErrorEvent(message=message):
                    raise AssertionError(message)

    return asyncio.run(run())


class Conversation:
    """A growing token conversation: each turn appends the user text and the reply."""

    def __init__(self, tokenizer: TextTokenizer, name: str) -> None:
        self.tokenizer = tokenizer
        self.name = name
        self.tokens = tokenizer.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")
        self.turn = 0

    def next_prompt(self) -> list[int]:
        text = f"<|im_start|>user\n{self.name}, question {self.turn}: what do I buy?<|im_end|>\n"
        self.turn += 1
        self.tokens = self.tokens + self.tokenizer.encode(text + "<|im_start|>assistant\n")
        return list(self.tokens)

    def answered(self, reply: list[int]) -> None:
        self.tokens = [*self.tokens, *reply, *self.tokenizer.encode("<|im_end|>\n")]


def cold(halves: tuple[ShardModel, ShardModel], prompts: list[list[int]]) -> list[list[int]]:
    """The same prompts through the same stages with the prefix cache off."""
    with pipeline(halves, (0, 0)) as (head, _):
        return [generate(head, f"cold-{i}", prompt)[0] for i, prompt in enumerate(prompts)]


def entries(engine: StageEngine) -> set[int]:
    return set(engine.prefix_store.entry_ids())


def settled(head: StageEngine, tail: StageEngine) -> None:
    """Wait until the ended request was kept, its release came back around and both
    stores agree (the finish event reaches the test before the engine keeps the cache)."""
    index = head.prefix_index
    assert index is not None
    wait_for(
        lambda: bool(entries(head)) and entries(head) == entries(tail) == set(index.entry_ids()),
        10.0,
        "the stages' prefix cache entries to agree",
        0.02,
    )


def test_turns_reuse_each_stage_cache_and_match_cold_runs(
    halves: tuple[ShardModel, ShardModel], tokenizer: TextTokenizer
) -> None:
    # Two conversations, interleaved turn by turn.
    talks = [Conversation(tokenizer, "Ann"), Conversation(tokenizer, "Bob")]
    prompts: list[list[int]] = []
    warm: list[list[int]] = []
    cached: list[int] = []
    with pipeline(halves, (LARGE, LARGE)) as (head, tail):
        for turn in range(3):
            for talk in talks:
                prompt = talk.next_prompt()
                tokens, served = generate(head, f"{talk.name}-{turn}", prompt)
                talk.answered(tokens)
                prompts.append(prompt)
                warm.append(tokens)
                cached.append(served)
                settled(head, tail)
    assert warm == cold(halves, prompts)
    # Ann's first turn is cold; Bob's shares the system prompt; later turns reuse the
    # previous turn of the same conversation: nearly the whole prompt.
    assert cached[0] == 0
    assert cached[1] > 0
    for index in range(2, len(prompts)):
        assert cached[index] >= len(prompts[index - 2]), (index, cached)


def test_a_stage_that_lost_the_entry_turns_the_hit_into_a_recompute(
    halves: tuple[ShardModel, ShardModel], tokenizer: TextTokenizer
) -> None:
    talk = Conversation(tokenizer, "Cy")
    prompts: list[list[int]] = []
    warm: list[list[int]] = []
    with pipeline(halves, (LARGE, LARGE)) as (head, tail):
        prompts.append(talk.next_prompt())
        first, _ = generate(head, "cy-0", prompts[0])
        talk.answered(first)
        settled(head, tail)
        tail.prefix_store.clear()  # as after a restart that kept the placement
        prompts.append(talk.next_prompt())
        second, served = generate(head, "cy-1", prompts[1])
        warm = [first, second]
        assert served == 0  # recomputed from the first token, not an error
        assert tail.prefix_store.misses == 1
        settled(head, tail)  # the recomputed turn was kept everywhere
        talk.answered(second)
        prompts.append(talk.next_prompt())
        third, served = generate(head, "cy-2", prompts[2])
        warm.append(third)
        assert served >= len(prompts[1])
    assert warm == cold(halves, prompts)


def test_a_later_stage_with_a_smaller_budget_evicts_and_stage_0_follows(
    halves: tuple[ShardModel, ShardModel], tokenizer: TextTokenizer
) -> None:
    talks = [Conversation(tokenizer, "Dee"), Conversation(tokenizer, "Eve")]
    prompts: list[list[int]] = []
    warm: list[list[int]] = []
    # Room on stage 1 for one conversation's entry (a KV cache grows 256 positions at a
    # time: 15 layers of 2 x 3 x 64 float32 values per position, 5.9 MB), not two.
    with pipeline(halves, (LARGE, 8 << 20)) as (head, tail):
        for turn in range(2):
            for talk in talks:
                prompt = talk.next_prompt()
                tokens, _ = generate(head, f"{talk.name}-{turn}", prompt)
                talk.answered(tokens)
                prompts.append(prompt)
                warm.append(tokens)
                settled(head, tail)
                assert len(entries(tail)) == 1
        assert tail.prefix_store.nbytes <= tail.prefix_store.budget_bytes
    assert warm == cold(halves, prompts)
