"""Cache tiers: a small protocol, the in-process L1, and the versioned key scheme."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

from lru import LRU

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
    """One cache tier. Values are raw feature tuples or NEGATIVE; a miss is None."""

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]: ...

    async def set_many(self, items: Sequence[tuple[str, Any, float]]) -> None:
        """Store (key, value, ttl_s) triples; a TTL of 0 stores nothing."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None: ...

    async def close(self) -> None: ...


class MemoryTier:
    """L1: a bounded in-process LRU (lru-dict, in C) with a TTL per entry on an injected clock.

    cachetools' TLRUCache was measured at 2.2 us a read (0.44 ms for the 202 keys of one
    request); lru-dict plus an expiry stamp in the value reads the same keys in ~26 us.
    Bounded by entries; `max_bytes` (approximate, ~460 B a user_static entry, measured by
    `ctr bench features`) lowers the bound.
    """

    name = "l1"
    ENTRY_BYTES = 460

    def __init__(
        self, max_entries: int = 500_000, clock: Callable[[], float] = time.monotonic, max_bytes: int | None = None
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        if max_bytes is not None:
            max_entries = max(1, min(max_entries, max_bytes // self.ENTRY_BYTES))
        self.clock = clock
        self._cache = LRU(max_entries)

    def __len__(self) -> int:
        return len(self._cache)

    def get_many_now(self, keys: Sequence[Hashable]) -> list[Any | None]:
        """The synchronous read (L1 never waits on I/O)."""
        now = self.clock()
        get = self._cache.get
        return [e[0] if (e := get(k)) is not None and e[1] > now else None for k in keys]

    async def get_many(self, keys: Sequence[Hashable]) -> list[Any | None]:
        return self.get_many_now(keys)

    def set_many_now(self, items: Sequence[tuple[Hashable, Any, float]]) -> None:
        now = self.clock()
        cache = self._cache
        for key, value, ttl_s in items:
            if ttl_s > 0:
                cache[key] = (value, now + ttl_s)

    async def set_many(self, items: Sequence[tuple[Hashable, Any, float]]) -> None:
        self.set_many_now(items)

    async def delete_many(self, keys: Sequence[Hashable]) -> None:
        for k in keys:
            self._cache.pop(k, None)

    async def close(self) -> None:
        self._cache.clear()
