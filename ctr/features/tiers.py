"""Cache tiers: a small protocol, the in-process L1, and the versioned key scheme."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cachetools import TLRUCache

from ctr.schema import FeatureGroup

# A cached "this entity does not exist" (cached for a short TTL so cold-start traffic
# does not hammer the database).
NEGATIVE: tuple[()] = ()


def feature_key(group: FeatureGroup, entity_id: str) -> str:
    """A hash of (entity type, group, version, entity id): bumping a group's version
    makes every old entry unreachable without a flush."""
    raw = f"{group.entity}\x1f{group.name}\x1f{group.version}\x1f{entity_id}".encode()
    return "f:" + hashlib.blake2b(raw, digest_size=12).hexdigest()


class CacheTier(Protocol):
    """One cache tier. Values are raw feature tuples or NEGATIVE; a miss is None."""

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]: ...

    async def set_many(self, items: Sequence[tuple[str, Any, float]]) -> None:
        """Store (key, value, ttl_s) triples."""
        ...


class MemoryTier:
    """L1: a bounded in-process TTL+LRU cache (cachetools.TLRUCache), TTL per entry."""

    name = "l1"

    def __init__(self, max_entries: int = 500_000, clock: Callable[[], float] | None = None) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        kwargs: dict[str, Any] = {"timer": clock} if clock is not None else {}
        self._cache: TLRUCache[str, tuple[Any, float]] = TLRUCache(
            maxsize=max_entries, ttu=lambda _k, v, now: now + v[1], **kwargs
        )

    def __len__(self) -> int:
        return len(self._cache)

    def get_many_now(self, keys: Sequence[str]) -> list[Any | None]:
        """The synchronous read (L1 never waits on I/O)."""
        get = self._cache.get
        out: list[Any | None] = []
        for k in keys:
            e = get(k)
            out.append(None if e is None else e[0])
        return out

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        return self.get_many_now(keys)

    async def set_many(self, items: Sequence[tuple[str, Any, float]]) -> None:
        for key, value, ttl_s in items:
            if ttl_s > 0:
                self._cache[key] = (value, ttl_s)
