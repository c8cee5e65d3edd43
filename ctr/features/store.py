"""The tiered feature store: reads go through the cache tiers to the database and
backfill the tiers on the way back; user and ad groups are fetched concurrently."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ctr import metrics, schema
from ctr.features.tiers import NEGATIVE, CacheTier, feature_key
from ctr.schema import FeatureGroup

Row = tuple[Any, ...]


class FeatureSource(Protocol):
    """The origin (L3): rows by entity id for one group; unknown ids are absent."""

    name: str

    async def get_many(self, group: FeatureGroup, ids: Sequence[str]) -> dict[str, Row]: ...


class TieredStore:
    """Cache tiers in order (L1 first), then the origin."""

    def __init__(self, tiers: Sequence[CacheTier], origin: FeatureSource, negative_ttl_s: float = 60.0) -> None:
        self.tiers = list(tiers)
        self.origin = origin
        self.negative_ttl_s = negative_ttl_s

    async def get(self, group: FeatureGroup, ids: Sequence[str]) -> list[Row | None]:
        """One value per id: the feature tuple, or None for an unknown entity."""
        keys = [feature_key(group, i) for i in ids]
        found: list[Any | None] = [None] * len(ids)
        missing = list(range(len(ids)))
        missed_by: list[list[int]] = []  # per tier consulted: the positions it missed
        for tier in self.tiers:
            if not missing:
                break
            values = await tier.get_many([keys[i] for i in missing])
            still = []
            for i, v in zip(missing, values, strict=True):
                if v is None:
                    still.append(i)
                else:
                    found[i] = v
            metrics.CACHE_LOOKUPS.labels(tier.name, "hit").inc(len(missing) - len(still))
            metrics.CACHE_LOOKUPS.labels(tier.name, "miss").inc(len(still))
            missed_by.append(still)
            missing = still
        if missing:
            rows = await self.origin.get_many(group, list({ids[i] for i in missing}))
            for i in missing:
                found[i] = rows.get(ids[i], NEGATIVE)
        for t, positions in enumerate(missed_by):  # backfill each tier with what it missed
            items = [
                (keys[i], found[i], group.ttl_s if found[i] != NEGATIVE else min(group.ttl_s, self.negative_ttl_s))
                for i in positions
            ]
            if items:
                await self.tiers[t].set_many(items)
        return [None if v == NEGATIVE else tuple(v) for v in found]


@dataclass(slots=True)
class Features:
    """The raw features of one request, and what was substituted."""

    user_static: Row | None
    user_behavioral: Row | None
    ad_meta: list[Row | None]
    ad_stats: list[Row | None]
    degraded: list[str] = field(default_factory=list)


class FeatureLookup:
    """All feature groups of one request, fetched concurrently, failures degraded to defaults."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    async def _group(self, group: FeatureGroup, ids: Sequence[str], degraded: list[str]) -> list[Row | None]:
        try:
            return await self.store.get(group, ids)
        except (sqlite3.Error, OSError, TimeoutError):
            reason = f"features:{group.name}:default"
            metrics.DEGRADED.labels(reason).inc()
            degraded.append(reason)
            return [None] * len(ids)

    async def lookup(self, user_id: str, ad_ids: Sequence[str]) -> Features:
        degraded: list[str] = []
        us, ub, am, ast = await asyncio.gather(
            self._group(schema.USER_STATIC, [user_id], degraded),
            self._group(schema.USER_BEHAVIORAL, [user_id], degraded),
            self._group(schema.AD_META, ad_ids, degraded),
            self._group(schema.AD_STATS, ad_ids, degraded),
        )
        failed = bool(degraded)  # a failed group reads as unknown: don't report both
        if not failed and us[0] is None and ub[0] is None:
            degraded.append("features:user:default")
        if not failed and any(m is None and s is None for m, s in zip(am, ast, strict=True)):
            degraded.append("features:ad:default")
        return Features(us[0], ub[0], am, ast, degraded)
