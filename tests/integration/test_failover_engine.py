"""Failover in process: a request that loses its placement mid-generation resumes on the
next one from its prompt and the tokens it already emitted, and its greedy tokens are the
ones an uninterrupted run gives.

Two real StageEngines hold the default model's halves as a 2-stage ring (as in
test_prefix_cache_engine); the ring "breaks" (`fail_all`, what a broken stream does) after
a few tokens, then both stages install the next epoch and stage 0 resumes, as a
re-placement does once every stage is loaded.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from exo_tools.engine.core import InstalledStage, StageEngine
from exo_tools.engine.shard import ShardModel
from exo_tools.types import ErrorEvent, FinishEvent, SamplingParams, TokenEvent
from tests.integration.test_prefix_cache_engine import EOS, EPOCH, pipeline

PROMPT = [1, 9690, 314, 260, 2777, 28, 1834, 504, 3458]
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0)


def _run(
    head: StageEngine, request_id: str, break_ring: Callable[[], None] | None = None
) -> tuple[list[int], FinishEvent | ErrorEvent]:
    """The tokens and the last event of one greedy request; `break_ring` runs after its
    fifth token."""

    async def run() -> tuple[list[int], FinishEvent | ErrorEvent]:
        handle = head.submit(
            request_id,
            PROMPT,
            sampling=GREEDY,
            max_tokens=MAX_TOKENS,
            loop=asyncio.get_running_loop(),
        )
        tokens: list[int] = []
        while True:
            event = await asyncio.wait_for(handle.events.get(), 120)
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                if break_ring is not None and len(tokens) == 5:
                    await asyncio.to_thread(break_ring)
            elif isinstance(event, FinishEvent | ErrorEvent):
                return tokens, event

    return asyncio.run(run())


def _break_and_re_place(
    engines: tuple[StageEngine, StageEngine], halves: tuple[ShardModel, ShardModel], epoch: int
) -> None:
    """What a lost stage and the re-placement after it do to the engines."""
    (head, tail), (first, last) = engines, halves
    head.fail_all("the pipeline stream to node b broke")
    tail.install(InstalledStage(epoch, last, EOS, 2, send=head.deliver), "re-placed")
    head.install(InstalledStage(epoch, first, EOS, 2, send=tail.deliver), "re-placed")
    head.resume_parked()  # what the coordinator does once every stage is loaded


def test_a_request_resumes_on_the_next_placement_with_the_same_tokens(
    halves: tuple[ShardModel, ShardModel],
) -> None:
    with pipeline(halves, (0, 0)) as (head, tail):
        expected, finished = _run(head, "whole")
        assert isinstance(finished, FinishEvent) and finished.failovers == 0
        lose = functools.partial(_break_and_re_place, (head, tail), halves, EPOCH + 1)
        tokens, finished = _run(head, "broken", lose)
        assert isinstance(finished, FinishEvent), finished
        assert tokens == expected
        assert finished.failovers == 1
        assert finished.prompt_tokens == len(PROMPT)
        assert finished.completion_tokens == len(expected)
        assert head.stats()["failovers"] == 1
        assert head.active_requests == 0
