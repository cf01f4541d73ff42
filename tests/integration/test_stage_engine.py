"""A last pipeline stage's engine: batched sampling, its busy-time count, idle caches.

In process, with the real default model split in two: stage 0's blocks run here to make
each request's hidden state, and a StageEngine holding the second half (blocks, norm,
head) receives them as the previous stage's stream would deliver them. The last stage
samples queued requests with one output-head pass: messages queued while the engine's
thread works on a long prefill chunk are taken as one batch, and the tokens and
log-probabilities must equal those the engine samples one request at a time. The same
engine counts only its working time as busy, and drops a cache nobody released after
the idle timeout.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import mlx.core as mx

from exo_tools.engine.core import InstalledStage, StageEngine
from exo_tools.engine.shard import ShardModel
from exo_tools.engine.tensors import to_wire
from exo_tools.types import Forward, SampledToken, SamplingParams, StageMessage
from tests.helpers.cluster_checks import wait_for

PROMPTS = [[1, 9690, 314, 260], [1, 504, 3458, 314, 260, 2777], [1, 2683, 28, 1834]]
EPOCH = 7


def _first_position(first: ShardModel, prompt: list[int], request_id: str) -> Forward:
    """Stage 0's message for the request's first sampled position (its whole prompt)."""
    hidden = first.forward(mx.array(prompt)[None], first.make_cache())
    return Forward(
        request_id,
        EPOCH,
        0,
        to_wire(hidden[:, -1:, :]),
        sample=True,
        sampling=SamplingParams(temperature=0.0, logprobs=True),
    )


def _last_stage_engine(
    last: ShardModel, replies: queue.SimpleQueue[StageMessage], idle_timeout_s: float = 300.0
) -> StageEngine:
    """A started engine holding `last` as the last of 2 stages; it sends to `replies`."""
    engine = StageEngine(idle_timeout_s=idle_timeout_s)
    engine.start()
    stage = InstalledStage(
        epoch=EPOCH, model=last, eos_token_ids=frozenset(), n_stages=2, send=replies.put
    )
    engine.install(stage, "test")
    return engine


def _run_last_stage(
    first: ShardModel,
    last: ShardModel,
    messages: list[Forward],
    together: bool,
    idle_first_s: float = 0.0,
) -> tuple[dict[str, StageMessage], dict[str, Any]]:
    """Replies of a last-stage engine to `messages` (queued at once, or one at a time,
    after the engine idled `idle_first_s`), and the engine's stats."""
    replies: queue.SimpleQueue[StageMessage] = queue.SimpleQueue()
    engine = _last_stage_engine(last, replies)
    try:
        time.sleep(idle_first_s)
        got: dict[str, StageMessage] = {}
        if together:
            # A 128-token prefill chunk keeps the MLX thread busy while the rest queue.
            long = first.forward(mx.array([list(range(1, 129))]), first.make_cache())
            busy = Forward("busy", EPOCH, 0, to_wire(long), sampling=SamplingParams())
            engine.deliver(busy)
        for message in messages:
            engine.deliver(message)
            if not together:
                reply = replies.get(timeout=60)
                got[reply.request_id] = reply
        while len(got) < len(messages):
            reply = replies.get(timeout=60)
            got[reply.request_id] = reply
        return got, engine.stats()
    finally:
        engine.stop()


def test_queued_requests_share_one_head_pass_and_sample_the_same_tokens(
    halves: tuple[ShardModel, ShardModel],
) -> None:
    first, last = halves
    messages = [_first_position(first, p, f"r{i}") for i, p in enumerate(PROMPTS)]
    alone, alone_stats = _run_last_stage(first, last, messages, together=False)
    batched, batched_stats = _run_last_stage(first, last, messages, together=True)
    assert alone_stats["samples_batched"] == 0
    assert batched_stats["samples_batched"] == len(messages)
    for request_id, reply in alone.items():
        together = batched[request_id]
        assert isinstance(reply, SampledToken), reply
        assert isinstance(together, SampledToken), together
        assert together.token_id == reply.token_id
        assert together.logprobs is not None and reply.logprobs is not None
        assert together.logprobs.logprob == reply.logprobs.logprob
        assert [i for i, _ in together.logprobs.top] == [i for i, _ in reply.logprobs.top]


def test_busy_time_counts_work_not_waiting(halves: tuple[ShardModel, ShardModel]) -> None:
    first, last = halves
    started = time.perf_counter()
    replies, stats = _run_last_stage(
        first, last, [_first_position(first, PROMPTS[0], "r0")], together=False, idle_first_s=1.5
    )
    elapsed = time.perf_counter() - started
    assert list(replies) == ["r0"]
    # The blocks, head and sampling took time; the 1.5 s idle (with its sweeps) did not.
    assert 0.0 < stats["busy_s"] < elapsed - 1.5


def test_idle_cache_is_dropped_after_the_timeout(halves: tuple[ShardModel, ShardModel]) -> None:
    """A request whose release never comes (its stage 0 vanished) does not keep its KV
    cache: the sweep drops it once nothing touched it for the idle timeout."""
    first, last = halves
    engine = _last_stage_engine(last, queue.SimpleQueue(), idle_timeout_s=1.0)
    try:
        prefill = first.forward(mx.array([[1, 2, 3, 4]]), first.make_cache())
        delivered = time.monotonic()
        engine.deliver(Forward("r", EPOCH, 0, to_wire(prefill), sampling=SamplingParams()))
        wait_for(lambda: engine.cached_requests == 1, 5.0, "the prefill's cache", 0.02)
        wait_for(lambda: engine.cached_requests == 0, 5.0, "the idle cache to be dropped", 0.02)
        # Kept for the timeout, then dropped by a sweep (one runs at least every second).
        assert 1.0 <= time.monotonic() - delivered <= 3.5
    finally:
        engine.stop()
