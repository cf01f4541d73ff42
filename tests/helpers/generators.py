"""A stand-in token generator for tests that only prepare chat requests."""

from __future__ import annotations

import asyncio

from exo_tools.types import GenerationHandle, Overloaded, SamplingParams


class PrepareOnly:
    """The `TokenGenerator` of a service whose requests are prepared, never run: never
    busy, and submitting fails the test."""

    def overloaded(self) -> Overloaded | None:
        return None

    def submit(
        self,
        request_id: str,
        prompt: list[int],
        *,
        sampling: SamplingParams,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> GenerationHandle:
        raise AssertionError("this test only prepares requests")
