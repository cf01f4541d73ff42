"""Which nodes the master leaves out of placements (placement.quarantine)."""

from __future__ import annotations

from exo_tools.placement.quarantine import FIRST_S, LONGEST_S, WINDOW_S, Quarantine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _out(quarantine: Quarantine) -> dict[str, float]:
    return {left.node_id: left.seconds_left for left in quarantine.left_out()}


def test_two_broken_placements_leave_a_node_out_and_one_does_not() -> None:
    clock = Clock()
    quarantine = Quarantine("master", clock)
    assert quarantine.broke(1, ("master", "a"), "cut") == []
    assert _out(quarantine) == {}
    clock.now += 5
    # Another placement breaks at a stream between a and b: a's second strike, b's first.
    assert quarantine.broke(2, ("a", "b"), "lossy") == ["a"]
    assert _out(quarantine) == {"a": FIRST_S}
    assert quarantine.left_out()[0].reason == "lossy"
    clock.now += FIRST_S
    assert _out(quarantine) == {}


def test_the_master_and_unknown_ends_never_count_and_a_placement_counts_once() -> None:
    quarantine = Quarantine("master", Clock())
    for _ in range(5):
        assert quarantine.broke(1, ("master", ""), "x") == []
    # Both ends of one stream report the same break of placement 3: one strike each.
    assert quarantine.broke(3, ("a", "b"), "x") == []
    assert quarantine.broke(3, ("b", "a"), "x") == []
    assert _out(quarantine) == {}


def test_strikes_older_than_the_window_are_forgotten() -> None:
    clock = Clock()
    quarantine = Quarantine("master", clock)
    quarantine.broke(1, ("master", "a"), "x")
    clock.now += WINDOW_S + 1
    assert quarantine.broke(2, ("master", "a"), "x") == []


def test_breaking_again_soon_after_coming_back_doubles_the_time_out() -> None:
    clock = Clock()
    quarantine = Quarantine("master", clock)
    quarantine.broke(1, ("master", "a"), "x")
    quarantine.broke(2, ("master", "a"), "x")
    seconds = FIRST_S
    for epoch in range(3, 10):
        clock.now += seconds + 1  # back, and the first placement with it breaks
        assert quarantine.broke(epoch, ("master", "a"), "x") == ["a"]
        seconds = min(seconds * 2, LONGEST_S)
        assert _out(quarantine) == {"a": seconds}
    # Whole for longer than the window after coming back: one break no longer counts.
    clock.now += seconds + WINDOW_S + 1
    assert quarantine.broke(20, ("master", "a"), "x") == []
    assert quarantine.broke(21, ("master", "a"), "x") == ["a"]
    assert _out(quarantine) == {"a": FIRST_S}


def test_a_break_while_left_out_changes_nothing() -> None:
    clock = Clock()
    quarantine = Quarantine("master", clock)
    quarantine.broke(1, ("master", "a"), "x")
    quarantine.broke(2, ("master", "a"), "x")
    clock.now += 1
    assert quarantine.broke(3, ("master", "a"), "late") == []
    assert _out(quarantine) == {"a": FIRST_S - 1}
