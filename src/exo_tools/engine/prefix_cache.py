"""The prefix KV cache: conversations the cluster has seen, kept between requests.

An agent re-sends its whole conversation every turn. When a request ends, every stage keeps
the request's cache (the KV of its own layers, or of its own heads) as a numbered entry in
its `PrefixStore`, and stage 0 records the entry's tokens in its `PrefixIndex`. A later
request whose prompt shares a prefix with an entry starts, on every stage, from a copy of
that entry cut to the shared length, and computes only the rest.

Why not mlx-lm's `LRUPromptCache` as it is: it keeps the caches in the process that
searches them, while here the index lives on stage 0 and the KV on every stage. Its
`PromptTrie` is the index's search and `trim_prompt_cache` cuts copies.

Coordination. Every stage sees the same ordered sequence of stores and uses (they travel
the ring's ordered streams), so the stores' LRU orders agree. Stage 0 evicts for its own
budget and names the evicted entries in the release that stores the next one; each stage
drops those, stores, evicts for its own budget, and adds what it evicted to the release,
which returns to stage 0, so the index forgets entries any stage lost. A stage asked to
reuse an entry it no longer holds (a restart, its own eviction racing a request) answers
a cache miss; stage 0 then recomputes the request from its first token. A new placement
epoch starts with empty stores.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil
from mlx_lm.models.cache import PromptTrie, can_trim_prompt_cache, trim_prompt_cache

log = logging.getLogger(__name__)

# The default budget: this share of the memory free when the node starts, at most the cap.
DEFAULT_BUDGET_SHARE = 0.25
DEFAULT_BUDGET_CAP = 8 << 30
DEFAULT_KV_SHARE = 0.5
# Shorter shared prefixes are not worth copying an entry for.
MIN_REUSE_TOKENS = 16
_TRIE_KEY = "prefix"  # PromptTrie keys its tries by model; one index serves one model


def default_budget_bytes() -> int:
    """The per-node budget when `--prefix-cache-mb` is not given."""
    free = psutil.virtual_memory().available
    return int(min(free * DEFAULT_BUDGET_SHARE, DEFAULT_BUDGET_CAP))


def default_kv_budget_bytes() -> int:
    """The per-node budget for the running requests' KV when `--kv-cache-mb` is not given:
    half of the memory free at start."""
    return int(psutil.virtual_memory().available * DEFAULT_KV_SHARE)


def _unique(caches: Iterable[Any]) -> list[Any]:
    """The distinct cache objects (skipped layer positions alias a stage's own)."""
    seen: dict[int, Any] = {}
    for cache in caches:
        seen.setdefault(id(cache), cache)
    return list(seen.values())


def cache_bytes(caches: Sequence[Any]) -> int:
    return sum(int(getattr(cache, "nbytes", 0)) for cache in _unique(caches))


def cache_length(caches: Sequence[Any]) -> int | None:
    """Tokens a stage's caches hold, where their kind tells (None: it does not)."""
    for cache in caches:
        offset = getattr(cache, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


def cache_trimmable(caches: Sequence[Any]) -> bool:
    """Whether a copy of these caches can be cut back to a shorter prefix."""
    return can_trim_prompt_cache(_unique(caches))


@dataclass
class _Stored:
    cache: list[Any]
    tokens: int
    nbytes: int


class CacheMiss(RuntimeError):
    """This stage cannot start a request from the entry stage 0 chose."""


class PrefixStore:
    """One stage's stored entries: entry id → the caches of the request that made it."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._entries: OrderedDict[int, _Stored] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._entries

    def entry_ids(self) -> list[int]:
        """The entries held, least recently used first."""
        return list(self._entries)

    def put(
        self,
        entry_id: int,
        cache: list[Any],
        tokens: int,
        local: Sequence[Any],
        budgeted: bool = True,
    ) -> list[int]:
        """Keep `cache` (`local`: the part this stage's blocks write, for its size) as
        entry `entry_id`; returns the entries evicted for the budget (maybe this one),
        none when not `budgeted`."""
        self.drop([entry_id])
        stored = _Stored(cache, tokens, cache_bytes(local))
        self._entries[entry_id] = stored
        self.nbytes += stored.nbytes
        evicted: list[int] = []
        while budgeted and self.nbytes > self.budget_bytes and self._entries:
            oldest = next(iter(self._entries))
            self.drop([oldest])
            evicted.append(oldest)
        return evicted

    def copy_prefix(self, entry_id: int, tokens: int) -> list[Any]:
        """A copy of entry `entry_id` cut to its first `tokens` tokens, for a new request
        (the entry itself stays for others); raises CacheMiss when that cannot be."""
        stored = self._entries.get(entry_id)
        if stored is None:
            self.misses += 1
            raise CacheMiss(f"prefix cache entry {entry_id} is not held on this stage")
        if tokens > stored.tokens or (tokens < stored.tokens and not cache_trimmable(stored.cache)):
            self.misses += 1
            raise CacheMiss(f"prefix cache entry {entry_id} cannot be cut to {tokens} tokens")
        # One deepcopy keeps the aliasing of positions that share a cache.
        cache: list[Any] = copy.deepcopy(stored.cache)
        if tokens < stored.tokens:
            trim_prompt_cache(_unique(cache), stored.tokens - tokens)
        self._entries.move_to_end(entry_id)
        self.hits += 1
        return cache

    def drop(self, entry_ids: Iterable[int]) -> None:
        for entry_id in entry_ids:
            stored = self._entries.pop(entry_id, None)
            if stored is not None:
                self.nbytes -= stored.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def stats(self) -> dict[str, int]:
        return {
            "entries": len(self._entries),
            "bytes": self.nbytes,
            "budget_bytes": self.budget_bytes,
        }


@dataclass(frozen=True)
class PrefixHit:
    entry_id: int
    tokens: int  # prompt tokens the request starts with from the entry


@dataclass
class _Indexed:
    tokens: tuple[int, ...]
    trimmable: bool


class PrefixIndex:
    """Stage 0's index of every stored entry: which token sequence each one holds."""

    def __init__(self, min_reuse: int = MIN_REUSE_TOKENS) -> None:
        self._min_reuse = min_reuse
        self._trie = PromptTrie()
        self._entries: dict[int, _Indexed] = {}
        self._next_id = 1
        self.prompt_tokens = 0  # every looked-up prompt's tokens
        self.reused_tokens = 0  # of those, the ones served from an entry

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: int) -> bool:
        return entry_id in self._entries

    def entry_ids(self) -> list[int]:
        return list(self._entries)

    def new_id(self) -> int:
        entry_id = self._next_id
        self._next_id += 1
        return entry_id

    def lookup(self, prompt: Sequence[int]) -> PrefixHit | None:
        """The entry sharing the longest usable prefix with `prompt` (the prompt's last
        token is always computed: its logits start the generation)."""
        if not self._entries:
            return None
        tokens = list(prompt)
        found = self._trie.search(_TRIE_KEY, tokens)
        limit = len(tokens) - 1
        best: PrefixHit | None = None
        # An entry that extends past the shared prefix: usable if a copy can be cut.
        if found.longer is not None:
            entry_id = self._trie.get(_TRIE_KEY, found.longer)
            if self._entries[entry_id].trimmable:
                best = PrefixHit(entry_id, min(found.common_prefix, limit))
        # An entry that is itself a prefix of the prompt (or the whole prompt).
        for candidate in (found.exact, found.shorter):
            if candidate is None:
                continue
            entry_id = self._trie.get(_TRIE_KEY, candidate)
            length = len(candidate)
            if length > limit and not self._entries[entry_id].trimmable:
                continue
            usable = min(length, limit)
            if best is None or usable > best.tokens:
                best = PrefixHit(entry_id, usable)
        if best is None or best.tokens < self._min_reuse:
            return None
        return best

    def record(self, prompt_tokens: int, reused: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.reused_tokens += reused

    def add(self, entry_id: int, tokens: Sequence[int], trimmable: bool) -> list[int]:
        """Index entry `entry_id` holding `tokens`; returns entries it makes redundant (a
        trimmable entry serves every prefix of itself), to evict everywhere."""
        key = list(tokens)
        redundant: list[int] = []
        previous = self._trie.add(_TRIE_KEY, key, entry_id)
        if previous is not None and previous != entry_id:
            self._entries.pop(previous, None)
            redundant.append(previous)
        self._entries[entry_id] = _Indexed(tuple(key), trimmable)
        if trimmable:
            for _, shorter_id in self._trie.pop_prefixes(_TRIE_KEY, key):
                self._entries.pop(shorter_id, None)
                redundant.append(shorter_id)
        return redundant

    def forget(self, entry_ids: Iterable[int]) -> None:
        for entry_id in entry_ids:
            indexed = self._entries.pop(entry_id, None)
            if indexed is None:
                continue
            try:
                if self._trie.get(_TRIE_KEY, list(indexed.tokens)) == entry_id:
                    self._trie.pop(_TRIE_KEY, list(indexed.tokens))
            except KeyError:
                log.debug("prefix entry %d was already out of the trie", entry_id)

    def clear(self) -> None:
        self._trie = PromptTrie()
        self._entries.clear()

    def mark_untrimmable(self, entry_id: int) -> None:
        indexed = self._entries.get(entry_id)
        if indexed is not None:
            indexed.trimmable = False

    def stats(self) -> dict[str, Any]:
        rate = self.reused_tokens / self.prompt_tokens if self.prompt_tokens else None
        return {
            "indexed_entries": len(self._entries),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.reused_tokens,
            "hit_rate": round(rate, 4) if rate is not None else None,
        }
