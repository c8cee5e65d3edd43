"""Cache tiers: a small protocol, the in-process L1, and the versioned key scheme."""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any, Protocol

from ctr.features.schema import FeatureGroup

# A cached "this entity does not exist" (cached for a short TTL so cold-start traffic
# does not hammer the database).
NEGATIVE: tuple[()] = ()


def l1_key(group: FeatureGroup, entity_id: str) -> tuple[str, int, str]:
    """L1's key: (group, version, id), hashed by the dict itself; a version bump changes it."""
    return (group.name, group.version, entity_id)


def feature_key(group: FeatureGroup, entity_id: str) -> str:
    """L2's key, a hash of (entity type, group, version, entity id): bumping a group's
    version makes every old entry unreachable without a flush."""
    raw = f"{group.entity}\x1f{group.name}\x1f{group.version}\x1f{entity_id}".encode()
    h = hashlib.blake2b(raw, digest_size=12).hexdigest()
    # The hash tag {h[0]} puts a request's keys in at most 16 cluster slots: measured on a
    # 3-master cluster, reading 202 keys took p50 0.71 ms over 16 slots against 2.55 ms
    # spread over every slot (redis-py's mget_nonatomic pipelines one MGET per slot).
    return f"f:{{{h[0]}}}:{h}"


class CacheTier(Protocol):
    """One cache tier. Values are raw feature tuples or NEGATIVE, each with the version of the
    write it came from; a miss is None. A set never replaces a newer version."""

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[tuple[Any, int, float] | None]:
        """(value, version, seconds left) per key, or None."""
        ...

    async def set_many(self, items: Sequence[tuple[str, Any, int, float]]) -> None:
        """Store (key, value, version, ttl_s) entries; a TTL of 0 stores nothing."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


class MemoryTier:
    """L1: a bounded in-process cache with a TTL per entry on an injected clock, one plain dict
    per (group, version) keyed by the entity id, so a request's lookup is one dict get per id.

    A key is `l1_key(group, id)` = (group, version, id): it lives in the map of (group, version)
    under `id` (an id string caches its hash: nothing is built or hashed per id but the get).
    Any other key (the tier used as a plain cache, as the tier contract tests do) lives in a
    map of its own. `peek` reads a whole request's ids of one group in C loops (map, min,
    itemgetter): no (group, version, id) tuple is built and hashed per id (`ctr bench l1`:
    2.7x faster per request). Measured beside it (docs/performance.md): cachetools'
    TLRUCache, pure Python, 3.6x slower than the old lookup; lru-dict's C LRU, 1.8x a plain
    dict's get (it relinks its list on every hit). So this small class is our own.

    Bounded by entries (`max_bytes`, approximate, ~460 B a user_static entry measured by
    `ctr bench features`, lowers the bound) in two generations, the segmented-LRU
    approximation that needs no write on a hit: new entries go into the young generation;
    when it holds half the bound it becomes the old one and the previous old generation is
    dropped; a hit in the old generation moves the entry back into the young one. So an
    entry read once per generation stays, and L1 never holds more than `max_entries`.

    An entry is (value, expires_at, version); an unknown entity's value is None. A write seen
    by this process (its own, or another's through ctr/features/coherence.py) removes older
    entries and leaves a tombstone (the write's version, kept `tombstone_s`, apart from the
    entries: no generation drops it early, and a flush keeps it): a fill of an older version
    (a read that was in flight while the write happened) is refused while it lives.
    """

    name = "l1"
    ENTRY_BYTES = 460

    def __init__(
        self,
        max_entries: int = 500_000,
        clock: Callable[[], float] = time.monotonic,
        max_bytes: int | None = None,
        tombstone_s: float = 30.0,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None:
            max_entries = max(1, min(max_entries, max_bytes // self.ENTRY_BYTES))
        self.clock = clock
        self.tombstone_s = tombstone_s
        self.max_entries = max_entries
        self.epoch = 0  # counts flushes: a fill from a read that started before one is dropped
        self._generation = max(1, max_entries // 2)
        self._young: dict[Hashable, dict[Hashable, Entry]] = {}
        self._old: dict[Hashable, dict[Hashable, Entry]] = {}
        self._young_n = 0
        self._tombs: dict[Hashable, dict[Hashable, tuple[int, float]]] = {}  # (version, until)
        self._tomb_order: deque[tuple[float, Hashable, Hashable]] = deque()  # one record per tombstone set
        self._tomb_n = 0  # tombstones held (a key's newer tombstone replaces its older one)

    def __len__(self) -> int:
        return sum(map(len, self._young.values())) + sum(map(len, self._old.values()))

    # ------------------------------------------------------------------ the request path
    def peek(self, space: Hashable, ids: Sequence[str], now: float) -> list[Any] | None:
        """The values of `ids` in the map `space` (None for an unknown entity) when every one
        is live in the young generation; else None (ask `get_ids`). The hot path: no Python
        per id."""
        m = self._young.get(space)
        if m is None:
            return None if ids else []
        es = list(map(m.get, ids, repeat(_MISS_ENTRY)))
        if es and min(map(_EXPIRES, es)) <= now:
            return None
        return list(map(_VALUE, es))

    def get_ids(self, space: Hashable, ids: Sequence[Hashable], now: float) -> list[Any]:
        """The values of `ids` in `space` (None for an unknown entity, MISS for a miss, an
        expired entry or a tombstone)."""
        return [MISS if (e := self._entry(space, i, now)) is None else e[0] for i in ids]

    def _entry(self, space: Hashable, i: Hashable, now: float, promote: bool = True) -> Entry | None:
        """The live entry of `i`, moved into the young generation when found in the old one."""
        young = self._young.get(space)
        if young is not None and (e := young.get(i)) is not None:
            return e if e[1] > now else None
        old = self._old.get(space)
        if old is None or (e := old.get(i)) is None or e[1] <= now:
            return None
        if promote:
            self._put(space, i, e)
        return e

    def _put(self, space: Hashable, i: Hashable, entry: Entry) -> None:
        young = self._young.get(space)
        if young is None or i not in young:
            if self._young_n >= self._generation:  # the young generation is full: it turns old
                self._old, self._young, self._young_n = self._young, {}, 0
                young = None
            if young is None:
                young = self._young[space] = {}
            self._young_n += 1
        young[i] = entry
        old = self._old.get(space)
        if old:
            old.pop(i, None)

    def _tomb(self, space: Hashable, i: Hashable, now: float) -> int | None:
        """The version of the live tombstone of `i`, if any."""
        t = self._tombs.get(space, {}).get(i)
        return t[0] if t is not None and t[1] > now else None

    # ------------------------------------------------------------------ keyed (writes, fills, the tier contract)
    def get_many_now(self, keys: Sequence[Hashable]) -> list[Any | None]:
        """The values (None for a miss, an expired entry or a tombstone; NEGATIVE for an unknown
        entity); L1 never waits on I/O."""
        now = self.clock()
        return [None if (e := self._entry(*_split(k), now)) is None else _stored(e[0]) for k in keys]

    async def get_many(self, keys: Sequence[Hashable]) -> list[tuple[Any, int, float] | None]:
        now = self.clock()
        return [None if (e := self._entry(*_split(k), now)) is None else (_stored(e[0]), e[2], e[1] - now)
                for k in keys]  # fmt: skip

    def newer_than(self, key: Hashable, version: int) -> bool:
        """Whether this process knows of a write of `key` newer than `version` (a live tombstone or entry)."""
        space, i = _split(key)
        now = self.clock()
        e = self._entry(space, i, now, promote=False)
        tomb = self._tomb(space, i, now)
        return (e is not None and e[2] > version) or (tomb is not None and tomb > version)

    def set_many_now(self, items: Sequence[tuple[Hashable, Any, int, float]]) -> None:
        """Store (key, value, version, ttl_s) entries, none over a live entry or tombstone of a newer version."""
        now = self.clock()
        for key, value, version, ttl_s in items:
            if ttl_s <= 0:
                continue
            space, i = _split(key)
            e = self._entry(space, i, now, promote=False)
            tomb = self._tomb(space, i, now)
            if (e is None or e[2] <= version) and (tomb is None or tomb <= version):
                self._put(space, i, (None if value == NEGATIVE else value, now + ttl_s, version))

    async def set_many(self, items: Sequence[tuple[Hashable, Any, int, float]]) -> None:
        self.set_many_now(items)

    def invalidate_now(self, items: Sequence[tuple[Hashable, int]]) -> None:
        """A write of version `version` happened to each key: what is older goes, a tombstone stays."""
        now = self.clock()
        until = now + self.tombstone_s
        for key, version in items:
            space, i = _split(key)
            for gen in (self._young, self._old):
                m = gen.get(space)
                if m is not None and (e := m.get(i)) is not None and e[2] < version:
                    del m[i]
                    self._young_n -= gen is self._young
            tombs = self._tombs.setdefault(space, {})
            t = tombs.get(i)
            if t is None or t[1] <= now or t[0] < version:
                self._tomb_n += t is None
                tombs[i] = (version, until)
                self._tomb_order.append((until, space, i))
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Tombstones leave when they expire, the oldest first also past `max_entries` of them
        (records of a replaced tombstone leave without removing anything)."""
        order = self._tomb_order
        while order and (order[0][0] <= now or self._tomb_n > self.max_entries):
            until, space, i = order.popleft()
            tombs = self._tombs.get(space)
            if tombs is not None and (t := tombs.get(i)) is not None and t[1] == until:
                del tombs[i]
                self._tomb_n -= 1
        if len(order) > 2 * self._tomb_n + 1024:  # mostly records of replaced tombstones (a hot key): one each
            live = sorted((t[1], space, i) for space, m in self._tombs.items() for i, t in m.items())
            self._tomb_order = deque(live)

    def clear(self) -> None:
        """Drop every entry (a flush); tombstones stay: the writes they record did happen."""
        self._young, self._old, self._young_n = {}, {}, 0
        self.epoch += 1

    async def delete_many(self, keys: Sequence[Hashable]) -> None:
        for k in keys:
            space, i = _split(k)
            for gen in (self._young, self._old):
                m = gen.get(space)
                if m is not None and m.pop(i, None) is not None:
                    self._young_n -= gen is self._young

    async def close(self) -> None:
        self.clear()
        self._tombs.clear()
        self._tomb_order.clear()
        self._tomb_n = 0


Entry = tuple[Any, float, int]  # (value, expires_at, version)
MISS: Any = object()  # get_ids: no live value
_MISS_ENTRY: Entry = (None, -math.inf, -1)
_EXPIRES, _VALUE = itemgetter(1), itemgetter(0)


def _split(key: Hashable) -> tuple[Hashable, Hashable]:
    """(map, id) of a key: an l1_key's map is its (group, version); any other key has one of its own."""
    if type(key) is tuple and len(key) == 3:
        return (key[0], key[1]), key[2]
    return None, key


def _stored(value: Any) -> Any:
    """An entry's value as the tier contract has it (NEGATIVE for an unknown entity)."""
    return NEGATIVE if value is None else value
