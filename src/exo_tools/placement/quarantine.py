"""Which nodes the master leaves out of placements for a while: those whose placements
keep breaking.

A node behind a lossy link stays a member (enough heartbeats get through), yet each
placement it is in breaks within seconds and every resume prefills again, so a stream
could fail over until its client gives up. The master counts, for each node, the
placements that broke at a stream to or from it, or that it left (missed heartbeats),
never itself (it serves the API and cannot be left out). STRIKES of them within WINDOW_S
leave the node out for FIRST_S; one more break soon after it is back leaves it out twice
as long, up to LONGEST_S. A single break (a node that restarted, a link cut once) leaves
nobody out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

STRIKES = 2
WINDOW_S = 60.0
FIRST_S = 15.0
LONGEST_S = 120.0
_COUNTED_KEEP = 256  # (epoch, node) pairs remembered, so a break reported twice counts once


@dataclass
class _Record:
    strikes: deque[float] = field(default_factory=deque)
    times_left_out: int = 0  # in a row: reset once the node stays whole for WINDOW_S
    until: float = 0.0  # left out until then
    reason: str = ""


@dataclass(frozen=True)
class LeftOut:
    node_id: str
    seconds_left: float
    reason: str  # the last break that counted against it


class Quarantine:
    def __init__(self, master_id: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._master_id = master_id
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._counted: deque[tuple[int, str]] = deque(maxlen=_COUNTED_KEEP)

    def broke(self, epoch: int, ends: Iterable[str], reason: str) -> list[str]:
        """Placement `epoch` broke at a stream between `ends` (either may be unknown, ""):
        a strike against each end but the master, once per placement; the nodes this
        leaves out now."""
        now = self._clock()
        newly: list[str] = []
        for node_id in dict.fromkeys(ends):
            if not node_id or node_id == self._master_id or (epoch, node_id) in self._counted:
                continue
            self._counted.append((epoch, node_id))
            record = self._records.setdefault(node_id, _Record())
            if now < record.until:
                continue  # already out (a break of a placement made before)
            if record.times_left_out and now - record.until > WINDOW_S:
                record.times_left_out = 0  # it stayed whole long enough: start over
            record.strikes.append(now)
            while record.strikes and now - record.strikes[0] > WINDOW_S:
                record.strikes.popleft()
            record.reason = reason
            # Back from being left out and breaking again at once: out again, for longer.
            if len(record.strikes) >= STRIKES or record.times_left_out:
                record.until = now + min(FIRST_S * 2**record.times_left_out, LONGEST_S)
                record.times_left_out += 1
                record.strikes.clear()
                newly.append(node_id)
        return newly

    def left_out(self) -> list[LeftOut]:
        """The nodes left out of placements now."""
        now = self._clock()
        return [
            LeftOut(node_id, record.until - now, record.reason)
            for node_id, record in self._records.items()
            if now < record.until
        ]
