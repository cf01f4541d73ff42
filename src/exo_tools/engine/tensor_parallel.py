"""Tensor parallelism: each member holds every layer but only a slice of it (the slicing of
the weights themselves is exo_tools.models.tensor_slicing).

A member keeps the query heads of a contiguous range of KV heads (with those KV heads) and
a contiguous range of MLP columns. Its attention output projection and MLP down projection
then produce partial sums of the full hidden state; `TensorCollective.all_reduce` adds the
members' partials (in rank order, so every member holds bit-identical sums) and the next
layer goes on from there. Rank 0 (the master) embeds the input, sends the embedding to the
others with the step's command, and alone holds the final norm and output head.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..types import Partial, Shard, TensorSlice, WireTensor
from .shard import ShardModel
from .tensors import from_wire, to_wire

ALL_REDUCE_TIMEOUT_S = 30.0
LATENCY_WINDOW = 2048

PHASE_ATTENTION = 0
PHASE_MLP = 1


class CollectiveError(RuntimeError):
    """The all-reduce cannot complete: a member failed, left, or the placement changed."""


class _AllReduced(nn.Module):
    """Runs an mlx-lm submodule on this member's slice, then sums the members' partials."""

    def __init__(self, inner: nn.Module, reduce: Callable[[mx.array], mx.array]) -> None:
        super().__init__()
        self.inner = inner
        self._reduce = reduce

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self._reduce(self.inner(*args, **kwargs))


class TensorCollective:
    """The all-reduce among a placement's members, called on the MLX thread.

    Partials go to every other member over persistent streams (`send(peer_rank, message)`)
    and arrive through `deliver` (any thread). Each is tagged with request, forward pass,
    layer and phase, so concurrent requests never mix; members run passes in the order
    rank 0 sends them, so they always wait on the same tag.
    """

    def __init__(
        self,
        *,
        rank: int,
        size: int,
        epoch: int,
        send: Callable[[int, Partial], None],
        timeout_s: float = ALL_REDUCE_TIMEOUT_S,
    ) -> None:
        self.rank = rank
        self.size = size
        self.epoch = epoch
        self._send = send
        self._timeout_s = timeout_s
        self._condition = threading.Condition()
        self._parts: dict[tuple[str, int, int, int], dict[int, WireTensor]] = {}
        self._error: str | None = None
        self._request_id = ""
        self._step = 0
        # Whole all-reduce calls, and the part of each spent waiting for the other members
        # (the rest is this member's own serialization, sending and summing).
        self.latencies_us: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self.waits_us: deque[float] = deque(maxlen=LATENCY_WINDOW)

    # -- any thread

    def deliver(self, message: Partial) -> None:
        with self._condition:
            if message.error:
                self._error = self._error or message.error
            elif message.tensor is not None:
                key = (message.request_id, message.step, message.layer, message.phase)
                self._parts.setdefault(key, {})[message.rank] = message.tensor
            self._condition.notify_all()

    def abort(self, reason: str) -> None:
        """Wake every wait with `reason`; the collective stays failed (a re-placement makes
        a new one)."""
        with self._condition:
            if self._error is None:
                self._error = reason
            self._parts.clear()
            self._condition.notify_all()

    @property
    def error(self) -> str | None:
        return self._error

    # -- the MLX thread

    def begin(self, request_id: str, step: int) -> None:
        """Tag the all-reduces of the next forward pass."""
        self._request_id, self._step = request_id, step

    def fail_peers(self, reason: str) -> None:
        """Tell every other member to give up (this member cannot contribute)."""
        message = Partial(self._request_id, self.epoch, self._step, 0, 0, self.rank, error=reason)
        for peer in range(self.size):
            if peer != self.rank:
                self._send(peer, message)
        self.abort(reason)

    def all_reduce(self, partial: mx.array, layer: int, phase: int) -> mx.array:
        mx.eval(partial)  # this member's compute, kept out of the all-reduce's time
        started = time.perf_counter()
        message = Partial(
            self._request_id, self.epoch, self._step, layer, phase, self.rank, to_wire(partial)
        )
        for peer in range(self.size):
            if peer != self.rank:
                self._send(peer, message)
        key = (self._request_id, self._step, layer, phase)
        sent = time.perf_counter()
        deadline = started + self._timeout_s
        with self._condition:
            while True:
                if self._error is not None:
                    raise CollectiveError(self._error)
                parts = self._parts.get(key)
                if parts is not None and len(parts) == self.size - 1:
                    del self._parts[key]
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise CollectiveError(
                        f"all-reduce of layer {layer} timed out after {self._timeout_s:.0f} s "
                        "waiting for the other members"
                    )
                self._condition.wait(left)
        self.waits_us.append((time.perf_counter() - sent) * 1e6)
        total: mx.array | None = None
        for rank in range(self.size):
            piece = partial if rank == self.rank else from_wire(parts[rank])
            total = piece if total is None else total + piece
        self.latencies_us.append((time.perf_counter() - started) * 1e6)
        assert total is not None
        return total


class TensorShardModel(ShardModel):
    """An mlx-lm model sliced for one member; its blocks sum partials through `collective`.

    Rank 0 embeds and runs the head, and hands each pass's embedded input on (the
    driver's input tap); every member runs its blocks on that input, in the same order of
    passes.
    """

    def __init__(
        self, model: nn.Module, shard: Shard, part: TensorSlice, collective: TensorCollective
    ) -> None:
        super().__init__(model, replace(shard, tensor=part))
        self.part = part
        self.collective = collective
        for index, block in enumerate(self.own_blocks):
            block.self_attn = _AllReduced(
                block.self_attn, _reducer(collective, index, PHASE_ATTENTION)
            )
            block.mlp = _AllReduced(block.mlp, _reducer(collective, index, PHASE_MLP))


def _reducer(
    collective: TensorCollective, layer: int, phase: int
) -> Callable[[mx.array], mx.array]:
    return lambda partial: collective.all_reduce(partial, layer, phase)
