"""Continuous batching in process: concurrent requests on one stage and on a 2-stage ring.

Real StageEngines hold the real default model (whole, or its two halves handing each other
their messages directly; the gRPC streams between processes are tested in the cluster
tests). Requests of different lengths and sampling parameters run at once; each must
return exactly what it returns alone, while the engines count batched decode passes (so
the requests did share passes). A request cancelled mid-stream frees its place without
disturbing the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from exo_tools.engine.core import InstalledStage, StageEngine
from exo_tools.engine.shard import ShardModel
from exo_tools.models.catalog import CATALOG, DEFAULT_MODEL_ID
from exo_tools.models.loader import load_model, model_layout
from exo_tools.models.tokenizer import TextTokenizer
from exo_tools.types import (
    ErrorEvent,
    FinishEvent,
    GenerationHandle,
    PromptEvent,
    SamplingParams,
    Shard,
    TokenEvent,
)

EPOCH = 5
EOS = frozenset({2})


@dataclass(frozen=True)
class Case:
    text: str
    max_tokens: int
    sampling: SamplingParams


CASES = [
    Case("Tell me about the sea.", 12, SamplingParams(temperature=0.0)),
    Case("What is 2+2?", 5, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2)),
    Case("Write a poem about a cat.", 16, SamplingParams(temperature=0.8, seed=11)),
    Case("List three colors.", 9, SamplingParams(temperature=0.7, top_k=20, seed=3)),
    Case("Why is the sky blue? Answer in one long sentence.", 14, SamplingParams(0.0)),
    Case("Name a fruit.", 3, SamplingParams(temperature=1.0, top_p=0.9, seed=5)),
]


@pytest.fixture(scope="module")
def whole(model_path: Path) -> ShardModel:
    card = CATALOG[DEFAULT_MODEL_ID]
    n_layers = model_layout(card, model_path).n_layers
    shard = Shard(DEFAULT_MODEL_ID, 0, n_layers, n_layers)
    loaded = load_model(card, model_path, shard=shard, dtype="float32", progress=False)
    return ShardModel(loaded.model, loaded.shard)


@contextmanager
def engines(models: list[ShardModel]) -> Iterator[list[StageEngine]]:
    """Started engines forming a ring of these stages (prefix cache off)."""
    ring = [StageEngine(prefix_cache_bytes=0) for _ in models]
    for engine in ring:
        engine.start()
    try:
        for index, (engine, model) in enumerate(zip(ring, models, strict=True)):
            send = ring[(index + 1) % len(ring)].deliver if len(ring) > 1 else None
            engine.install(InstalledStage(EPOCH, model, EOS, len(ring), send=send), "test")
        yield ring
    finally:
        for engine in ring:
            engine.stop()


async def collect(handle: GenerationHandle, cancel_after: int | None = None) -> list[object]:
    """The request's tokens (with their log-probabilities) and its finish reason."""
    out: list[object] = []
    while True:
        event = await asyncio.wait_for(handle.events.get(), 300)
        match event:
            case PromptEvent():
                pass
            case TokenEvent(token_id=token_id, logprobs=logprobs):
                out.append((token_id, logprobs))
                if cancel_after is not None and len(out) == cancel_after:
                    handle.cancel()
            case FinishEvent(reason=reason):
                out.append(reason)
                return out
            case ErrorEvent(message=message):
                raise AssertionError(message)


def run(
    engine: StageEngine,
    prompts: list[list[int]],
    cases: list[Case],
    *,
    together: bool,
    cancel: dict[int, int] | None = None,
) -> list[list[object]]:
    cancel = cancel or {}

    async def main() -> list[list[object]]:
        loop = asyncio.get_running_loop()

        def submit(index: int) -> GenerationHandle:
            case = cases[index]
            return engine.submit(
                f"{'together' if together else 'alone'}-{index}",
                prompts[index],
                sampling=case.sampling,
                max_tokens=case.max_tokens,
                loop=loop,
            )

        if together:
            handles = [submit(index) for index in range(len(cases))]
            return list(
                await asyncio.gather(
                    *(collect(handle, cancel.get(i)) for i, handle in enumerate(handles))
                )
            )
        return [await collect(submit(index), cancel.get(index)) for index in range(len(cases))]

    return asyncio.run(main())


def assert_same(together: list[list[object]], alone: list[list[object]]) -> None:
    """The same tokens and ends; log-probabilities to float32 rounding (a batched pass's
    matmuls may add in another order than one row's)."""
    for many, one in zip(together, alone, strict=True):
        assert [item[0] if isinstance(item, tuple) else item for item in many] == [
            item[0] if isinstance(item, tuple) else item for item in one
        ]
        for a, b in zip(many, one, strict=True):
            if isinstance(a, tuple) and a[1] is not None:
                assert isinstance(b, tuple) and b[1] is not None
                assert abs(a[1].logprob - b[1].logprob) < 1e-4
                assert [t for t, _ in a[1].top] == [t for t, _ in b[1].top]


def prompts_of(tokenizer: TextTokenizer) -> list[list[int]]:
    return [
        tokenizer.encode(f"<|im_start|>user\n{case.text}<|im_end|>\n<|im_start|>assistant\n")
        for case in CASES
    ]


def test_concurrent_requests_on_one_stage_return_what_each_returns_alone(
    whole: ShardModel, tokenizer: TextTokenizer
) -> None:
    prompts = prompts_of(tokenizer)
    with engines([whole]) as (engine,):
        alone = run(engine, prompts, CASES, together=False)
        assert engine.stats()["decode_batches"] == 0
        together = run(engine, prompts, CASES, together=True)
        stats = engine.stats()
    assert_same(together, alone)
    assert stats["decode_batches"] > 0
    assert stats["decode_rows_batched"] > 2 * stats["decode_batches"]


def test_concurrent_requests_on_two_stages_return_what_each_returns_alone(
    halves: tuple[ShardModel, ShardModel], tokenizer: TextTokenizer
) -> None:
    prompts = prompts_of(tokenizer)
    with engines(list(halves)) as (head, _):
        alone = run(head, prompts, CASES, together=False)
        together = run(head, prompts, CASES, together=True)
        stats = head.stats()
    assert_same(together, alone)
    assert stats["decode_batches"] > 0


def test_a_cancelled_request_leaves_the_others_undisturbed(
    whole: ShardModel, tokenizer: TextTokenizer
) -> None:
    prompts = prompts_of(tokenizer)[:4]
    cases = CASES[:4]
    with engines([whole]) as (engine,):
        alone = run(engine, prompts, cases, together=False)
        together = run(engine, prompts, cases, together=True, cancel={2: 3})
        assert engine.cached_requests == 0  # every request's state was freed
    assert_same([together[2][:3]], [alone[2][:3]])
    assert together[2][-1] == "cancelled"
    assert_same(
        [r for i, r in enumerate(together) if i != 2], [r for i, r in enumerate(alone) if i != 2]
    )
