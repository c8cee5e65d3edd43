"""The tiered feature store: L1 (in-process) -> L2 (Redis) -> L3 (SQL).

A request's keys (the user's groups and every candidate ad's) go to each cache tier in
one batched call; what no tier has is read from L3, one query per group, all groups
concurrently, with concurrent misses of the same key coalesced into one read. Values
found below are backfilled into the tiers above. A failing L2 is skipped behind a
circuit breaker, so a dead Redis costs no per-request timeout; a failing L3 group gives
default features. Both are reported in `degraded`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from ctr import metrics, schema
from ctr.breaker import BreakerOpen, CircuitBreaker
from ctr.features.tiers import NEGATIVE, CacheTier, MemoryTier, feature_key
from ctr.schema import FeatureGroup

Row = tuple[Any, ...]
Key = tuple[str, int, str]  # L1's key (group, version, id); L2's is its hash (feature_key)
_FAILED = object()  # an L3 read that failed: not cached, reported, defaults used
L2_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
L3_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, TimeoutError)
try:  # asyncpg is only needed with PostgreSQL
    import asyncpg

    # InternalClientError: a connection left mid-operation when the server went away
    L3_ERRORS += (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
except ImportError:  # pragma: no cover
    pass


_TIER_METRICS = {
    t: (
        metrics.CACHE_LOOKUPS.labels(t, "hit"),
        metrics.CACHE_LOOKUPS.labels(t, "miss"),
        metrics.CACHE_LATENCY.labels(t),
    )
    for t in ("l1", "l2", "l3")
}

_HIT_RATE_L1, _HIT_RATE_L2 = metrics.CACHE_HIT_RATE.labels("l1"), metrics.CACHE_HIT_RATE.labels("l2")


class FeatureSource(Protocol):
    """L3: rows by entity id for one group (unknown ids are absent), and writes."""

    name: str

    async def get_many(
        self, group: FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, Row]: ...

    async def put_many(self, group: FeatureGroup, rows: Sequence[tuple[str, Sequence[Any]]]) -> int: ...

    async def get_warm_set(self, kind: str, limit: int) -> list[str]: ...

    async def put_warm_set(self, kind: str, items: Sequence[str]) -> None: ...

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def close(self) -> None: ...


class TieredStore:
    def __init__(
        self,
        l1: MemoryTier,
        origin: FeatureSource,
        l2: CacheTier | None = None,
        *,
        negative_ttl_s: float = 60.0,
        l2_timeout_s: float = 0.02,
        l3_timeout_s: float = 0.025,
        l2_breaker: CircuitBreaker | None = None,
        l3_breaker: CircuitBreaker | None = None,
    ) -> None:
        self.l1, self.l2, self.origin = l1, l2, origin
        self.negative_ttl_s = negative_ttl_s
        self.l2_timeout_s, self.l3_timeout_s = l2_timeout_s, l3_timeout_s
        self.l2_breaker = l2_breaker or CircuitBreaker("l2", min_calls=5, cooldown_s=2.0, trial_timeout_s=0.5)
        self.l3_breaker = l3_breaker or CircuitBreaker("l3", min_calls=5, cooldown_s=2.0, trial_timeout_s=0.5)
        self._inflight: dict[Key, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counts = {"lookups": 0, "l1": 0, "l2": 0}

    def ttl(self, group: FeatureGroup, value: Any) -> float:
        return min(group.ttl_s, self.negative_ttl_s) if value == NEGATIVE else group.ttl_s

    async def get(
        self, requests: Sequence[tuple[FeatureGroup, Sequence[str]]]
    ) -> tuple[list[list[Row | None]], list[str]]:
        """Values per request (None for an unknown entity or a failed read), and what was degraded."""
        t0 = time.perf_counter()
        req_keys = [[(g.name, g.version, i) for i in ids] for g, ids in requests]  # l1_key, inlined (hot path)
        req_vals = [self.l1.get_many_now(keys) for keys in req_keys]
        asked = sum(len(k) for k in req_keys)
        if all(None not in vals for vals in req_vals):  # the common case: all in L1
            self._observe("l1", asked, asked, t0)
            self._counts["l1"] += asked
            self._count(asked)
            return [[v or None for v in vals] for vals in req_vals], []  # NEGATIVE is () -> None
        want: dict[Key, tuple[FeatureGroup, str]] = {}
        found: dict[Key, Any] = {}
        for (group, ids), keys, vals in zip(requests, req_keys, req_vals, strict=True):
            for k, i, v in zip(keys, ids, vals, strict=True):
                want[k] = (group, i)
                if v is not None:
                    found[k] = v
        missing = [k for k in want if k not in found]
        degraded: list[str] = []
        self._observe("l1", len(want), len(found), t0)
        self._counts["l1"] += len(found)
        l2_ok = self.l2 is not None
        if missing and self.l2 is not None:
            try:
                missing = await self._from_l2(missing, want, found)
            except (*L2_ERRORS, BreakerOpen) as exc:
                l2_ok = False
                degraded.append("cache:l2:bypassed")
                if not isinstance(exc, BreakerOpen):
                    metrics.CACHE_ERRORS.labels("l2").inc()
        if missing:
            await self._from_origin(missing, want, found, l2_ok, degraded)
        self._count(len(want))
        return [[self._value(found.get(k)) for k in keys] for keys in req_keys], degraded

    @staticmethod
    def _value(v: Any) -> Row | None:
        return None if v is None or v is _FAILED or v == NEGATIVE else v

    def _observe(self, tier: str, asked: int, hits: int, t0: float) -> None:
        hit, miss, latency = _TIER_METRICS[tier]
        hit.inc(hits)
        miss.inc(asked - hits)
        latency.observe(time.perf_counter() - t0)

    def _count(self, lookups: int) -> None:
        c = self._counts
        c["lookups"] += lookups
        if c["lookups"]:
            _HIT_RATE_L1.set(c["l1"] / c["lookups"])
            _HIT_RATE_L2.set((c["l1"] + c["l2"]) / c["lookups"])

    async def _from_l2(
        self, keys: list[Key], want: dict[Key, tuple[FeatureGroup, str]], found: dict[Key, Any]
    ) -> list[Key]:
        assert self.l2 is not None
        l2 = self.l2
        t0 = time.perf_counter()
        l2_keys = [feature_key(*want[k]) for k in keys]

        async def read() -> list[Any | None]:
            async with asyncio.timeout(self.l2_timeout_s):
                return await l2.get_many(l2_keys)

        values = await self.l2_breaker.call(read, L2_ERRORS)
        still, hits = [], []
        for k, v in zip(keys, values, strict=True):
            if v is None:
                still.append(k)
            else:
                found[k] = v
                hits.append((k, v, self.ttl(want[k][0], v)))
        self._observe("l2", len(keys), len(hits), t0)
        self._counts["l2"] += len(hits)
        if hits:
            self.l1.set_many_now(hits)
        return still

    async def _from_origin(
        self,
        keys: list[Key],
        want: dict[Key, tuple[FeatureGroup, str]],
        found: dict[Key, Any],
        l2_ok: bool,
        degraded: list[str],
    ) -> None:
        loop = asyncio.get_running_loop()
        mine = [k for k in keys if k not in self._inflight]
        theirs = {k: self._inflight[k] for k in keys if k in self._inflight}
        futures = {k: loop.create_future() for k in mine}
        self._inflight.update(futures)
        t0 = time.perf_counter()
        try:
            by_group: dict[FeatureGroup, list[Key]] = {}
            for k in mine:
                by_group.setdefault(want[k][0], []).append(k)
            groups = list(by_group)
            results = await asyncio.gather(
                *(self._read(g, [want[k][1] for k in by_group[g]]) for g in groups), return_exceptions=True
            )
            for g, res in zip(groups, results, strict=True):
                if isinstance(res, BaseException) and not isinstance(res, (*L3_ERRORS, BreakerOpen)):
                    raise res
                for k in by_group[g]:
                    futures[k].set_result(_FAILED if isinstance(res, BaseException) else res.get(want[k][1], NEGATIVE))
        finally:
            for k, fut in futures.items():
                if not fut.done():
                    fut.set_result(_FAILED)
                self._inflight.pop(k, None)
        if mine:
            hits = sum(f.result() is not NEGATIVE and f.result() is not _FAILED for f in futures.values())
            self._observe("l3", len(mine), hits, t0)
        for k, fut in (*futures.items(), *theirs.items()):
            found[k] = await fut
        failed = sorted({want[k][0].name for k in keys if found[k] is _FAILED})
        for name in failed:
            reason = f"features:{name}:default"
            metrics.DEGRADED.labels(reason).inc()
            degraded.append(reason)
        fresh = [(k, found[k], self.ttl(want[k][0], found[k])) for k in mine if found[k] is not _FAILED]
        if fresh:
            self.l1.set_many_now(fresh)
            if l2_ok and self.l2 is not None:
                self._background(self.l2.set_many([(feature_key(*want[k]), v, t) for k, v, t in fresh]))

    async def _read(self, group: FeatureGroup, ids: list[str]) -> dict[str, Row]:
        """One L3 read, bounded by the L3 timeout, behind the L3 breaker."""

        async def once() -> dict[str, Row]:
            # the store applies the timeout itself (asyncpg cancels a query cleanly; an outer
            # cancellation can leave its connection mid-operation); this is the backstop
            async with asyncio.timeout(2 * self.l3_timeout_s):
                return await self.origin.get_many(group, ids, timeout_s=self.l3_timeout_s)

        try:
            return await self.l3_breaker.call(once, L3_ERRORS)
        except L3_ERRORS:
            metrics.CACHE_ERRORS.labels("l3").inc()
            raise

    def _background(self, coro: Awaitable[Any]) -> None:
        """Backfill L2 off the request path; a failure only counts as an L2 error."""

        async def run() -> None:
            try:
                await coro
            except L2_ERRORS:
                metrics.CACHE_ERRORS.labels("l2").inc()

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for background backfills (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks))


@dataclass(slots=True)
class Features:
    """The raw features of one request, and what was substituted."""

    user_static: Row | None
    user_behavioral: Row | None
    ad_meta: list[Row | None]
    ad_stats: list[Row | None]
    context: Any = None
    degraded: list[str] = field(default_factory=list)


ContextProvider = Callable[[dict[str, Any]], Awaitable[Any]]


class FeatureLookup:
    """All feature groups of one request: the stored ones through the tiers, the context
    computed (TTL 0) by `context_provider`, both at once."""

    def __init__(self, store: TieredStore, context_provider: ContextProvider | None = None) -> None:
        self.store = store
        self.context_provider = context_provider

    async def lookup(self, user_id: str, ad_ids: Sequence[str], context: dict[str, Any] | None = None) -> Features:
        requests = [(schema.USER_STATIC, [user_id]), (schema.USER_BEHAVIORAL, [user_id]),
                    (schema.AD_META, ad_ids), (schema.AD_STATS, ad_ids)]  # fmt: skip
        if self.context_provider is not None and context is not None:
            (values, degraded), ctx = await asyncio.gather(self.store.get(requests), self.context_provider(context))
        else:
            (values, degraded), ctx = await self.store.get(requests), context
        (us,), (ub,), am, ast = values
        failed = any(d.startswith("features:") for d in degraded)  # a failed group reads as unknown
        if not failed and us is None and ub is None:
            degraded.append("features:user:default")
        if not failed and any(m is None and s is None for m, s in zip(am, ast, strict=True)):
            degraded.append("features:ad:default")
        return Features(us, ub, am, ast, ctx, degraded)
