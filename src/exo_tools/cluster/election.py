"""Deterministic master election and per-peer liveness bookkeeping (pure, no I/O)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    node_id: str
    start_time: float


def elect(candidates: Iterable[Candidate]) -> str:
    """The longest-running node (earliest start time) wins; ties go to the smallest id.

    Every node applies this to its own healthy view plus itself, so nodes with the same view
    agree without any extra messages.
    """
    best = min(
        candidates, key=lambda candidate: (candidate.start_time, candidate.node_id), default=None
    )
    if best is None:
        raise ValueError("no candidates")
    return best.node_id


@dataclass
class Liveness:
    """Strike counting for one peer.

    A peer is dead after `max_strikes` consecutive failed heartbeats, or when nothing succeeded
    for `dead_after_s` (whichever first), so a slow-failing link (deadline exceeded) and a fast
    failing one (connection refused) are both caught within the bound.
    """

    max_strikes: int = 3
    dead_after_s: float = 2.5
    strikes: int = 0
    last_ok: float | None = None

    def success(self, now: float) -> None:
        self.strikes = 0
        self.last_ok = now

    def failure(self, now: float) -> bool:
        """Record a failure; True when the peer should now be considered dead."""
        self.strikes += 1
        return self.is_dead(now)

    def is_dead(self, now: float) -> bool:
        if self.last_ok is None:
            return True
        return self.strikes >= self.max_strikes or now - self.last_ok > self.dead_after_s

    def reset(self) -> None:
        self.strikes = 0
        self.last_ok = None
