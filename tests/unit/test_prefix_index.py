"""Stage 0's prefix cache index: which entry a prompt starts from, and what it replaces."""

from __future__ import annotations

from exo_tools.engine.prefix_cache import PrefixHit, PrefixIndex

BASE = list(range(100, 140))  # 40 tokens


def test_a_prompt_reuses_the_longest_shared_prefix_cut_from_a_longer_entry() -> None:
    index = PrefixIndex(min_reuse=4)
    entry = index.new_id()
    index.add(entry, [*BASE, 1, 2, 3], trimmable=True)
    # Shares BASE and then diverges: a copy of the entry cut to 40 tokens.
    assert index.lookup([*BASE, 9, 9]) == PrefixHit(entry, 40)
    # The whole entry and more: all of it.
    assert index.lookup([*BASE, 1, 2, 3, 4]) == PrefixHit(entry, 43)


def test_the_last_prompt_token_is_always_computed() -> None:
    index = PrefixIndex(min_reuse=4)
    entry = index.new_id()
    index.add(entry, BASE, trimmable=True)
    assert index.lookup(BASE) == PrefixHit(entry, 39)


def test_an_untrimmable_entry_serves_only_prompts_it_is_a_prefix_of() -> None:
    index = PrefixIndex(min_reuse=4)
    entry = index.new_id()
    index.add(entry, [*BASE, 1, 2], trimmable=False)
    assert index.lookup([*BASE, 9]) is None  # would need cutting
    assert index.lookup([*BASE, 1, 2]) is None  # the last token would need cutting
    assert index.lookup([*BASE, 1, 2, 3]) == PrefixHit(entry, 42)
    other = index.new_id()
    index.add(other, BASE[:10], trimmable=True)
    index.mark_untrimmable(other)
    assert index.lookup([*BASE[:10], 5, 5]) == PrefixHit(other, 10)


def test_short_shared_prefixes_are_not_worth_a_copy() -> None:
    index = PrefixIndex(min_reuse=16)
    index.add(index.new_id(), BASE, trimmable=True)
    assert index.lookup([*BASE[:15], 7, 7]) is None
    assert index.lookup([*BASE[:16], 7]) is not None


def test_a_trimmable_entry_replaces_the_entries_it_extends() -> None:
    index = PrefixIndex(min_reuse=4)
    turn_1, turn_2 = index.new_id(), index.new_id()
    assert index.add(turn_1, BASE, trimmable=True) == []
    assert index.add(turn_2, [*BASE, 5, 6], trimmable=True) == [turn_1]
    assert set(index.entry_ids()) == {turn_2}
    # Another conversation branching off stays apart.
    branch = index.new_id()
    assert index.add(branch, [*BASE[:20], 8, 8], trimmable=True) == []
    assert index.lookup([*BASE[:20], 8, 8, 1]) == PrefixHit(branch, 22)
    assert index.lookup([*BASE, 5, 6, 7]) == PrefixHit(turn_2, 42)


def test_forgotten_entries_are_never_returned() -> None:
    index = PrefixIndex(min_reuse=4)
    entry = index.new_id()
    index.add(entry, BASE, trimmable=True)
    index.forget([entry])
    assert index.lookup([*BASE, 1]) is None
    assert len(index) == 0
    index.forget([entry])  # twice is harmless


def test_hit_rate_counts_prompt_tokens() -> None:
    index = PrefixIndex()
    assert index.stats()["hit_rate"] is None
    index.record(100, 0)
    index.record(100, 90)
    assert index.stats()["hit_rate"] == 0.45
