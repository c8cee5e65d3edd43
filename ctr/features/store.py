"""The tiered feature store: L1 (in-process) -> L2 (Redis) -> L3 (SQL).

A request's keys (the user's groups and every candidate ad's) go to each cache tier in
one batched call; what no tier has is read from L3, one query per group, all groups
concurrently, with concurrent misses of the same key coalesced into one read. Values
found below are backfilled into the tiers above. A failing L2 is skipped behind a
circuit breaker, so a dead Redis costs no per-request timeout; a failing L3 group gives
default features. Both are reported in `degraded`.

Every value carries the version of the write that made it (ctr/features/versions.py), and
no tier takes an older version over a newer one: a read of L3 that was in flight while a
write happened back-fills nothing over the write (nor over its tombstone in L1). An L1 copy
of an L2 entry expires with it (it keeps L2's remaining TTL). While this process may miss
other processes' writes (`l1_ttl_cap_s`, set by ctr/features/coherence.py), L1 keeps
nothing longer than that cap.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.exceptions import RedisError

from ctr import metrics
from ctr.degraded import Reason, group_default, is_features
from ctr.features import schema
from ctr.features.schema import FeatureGroup
from ctr.features.tiers import MISS, NEGATIVE, CacheTier, MemoryTier, feature_key
from ctr.features.versions import NONE
from ctr.resilience.breaker import BreakerOpen, CircuitBreaker

Row = tuple[Any, ...]
Key = tuple[str, int, str]  # L1's key (group, version, id: ctr/features/tiers.py); L2's is its hash (feature_key)
L2_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
L3_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError, TimeoutError)
try:  # asyncpg is only needed with PostgreSQL
    import asyncpg

    # InternalClientError: a connection left mid-operation when the server went away
    L3_ERRORS += (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
except ImportError:  # pragma: no cover
    pass


log = logging.getLogger(__name__)


class Absent(enum.Enum):
    """Why a key has no row: the entity is unknown (kept in the caches as NEGATIVE, for the
    negative TTL), or its read failed (never cached; the group gets defaults)."""

    UNKNOWN = "unknown"
    FAILED = "failed"


def cached(value: Row | Absent) -> Row:
    """A found value as the caches hold it (NEGATIVE for an unknown entity)."""
    return NEGATIVE if value is Absent.UNKNOWN else value  # type: ignore[return-value]


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
    """L3: versioned rows by entity id for one group (unknown ids are absent), and writes that
    only replace a row with a newer version (they return how many did)."""

    name: str

    async def get_many(
        self, group: FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, tuple[Row, int]]: ...

    async def put_many(
        self, group: FeatureGroup, rows: Sequence[tuple[str, Sequence[Any], int]], announce: bool = False
    ) -> int: ...

    async def announced(self, group: FeatureGroup, items: Sequence[tuple[str, int]]) -> None: ...

    async def unannounced(self, older_than_s: float, limit: int = 1000) -> list[tuple[str, str]]: ...

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
        self.l1_ttl_cap_s: float | None = None  # set while other processes' writes may be missed
        # Set by ctr/features/coherence.py: "use"; "fill" (read around L2, still back-filled: for a
        # while after Redis came back, its entries may predate writes); "off" (Redis is down)
        self.l2_mode = "use"
        self.negative_ttl_s = negative_ttl_s
        self.l2_timeout_s, self.l3_timeout_s = l2_timeout_s, l3_timeout_s
        self.l2_breaker = l2_breaker or CircuitBreaker("l2", min_calls=5, cooldown_s=2.0, trial_timeout_s=0.5)
        self.l3_breaker = l3_breaker or CircuitBreaker("l3", min_calls=5, cooldown_s=2.0, trial_timeout_s=0.5)
        self._inflight: dict[Key, asyncio.Future[tuple[Row | Absent, int]]] = {}  # (value, L3's version)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._counts = {"lookups": 0, "l1": 0, "l2": 0}

    def counts(self) -> dict[str, int]:
        """Keys looked up since start, and how many L1 and L2 answered (a copy)."""
        return dict(self._counts)

    def ttl(self, group: FeatureGroup, value: Any) -> float:
        return min(group.ttl_s, self.negative_ttl_s) if value == NEGATIVE else group.ttl_s

    def l1_ttl(self, ttl_s: float) -> float:
        """An L1 entry's TTL: `ttl_s`, capped while writes elsewhere may go unseen."""
        cap = self.l1_ttl_cap_s
        return ttl_s if cap is None else min(ttl_s, cap)

    async def get(
        self, requests: Sequence[tuple[FeatureGroup, Sequence[str]]], l3_timeout_s: float | None = None
    ) -> tuple[list[list[Row | None]], list[str]]:
        """Values per request (None for an unknown entity or a failed read), and what was degraded.
        `l3_timeout_s` replaces the L3 budget of the reads this call starts (warming)."""
        t0 = time.perf_counter()
        l1 = self.l1
        now = l1.clock()
        spaces = [(g.name, g.version) for g, _ in requests]
        hot = [l1.peek(space, ids, now) for space, (_, ids) in zip(spaces, requests, strict=True)]
        if None not in hot:  # the common case: all in L1, one dict get per id
            asked = sum(map(len, hot))  # type: ignore[arg-type]
            self._count(asked, asked)
            self._observe("l1", asked, asked, t0)
            return hot, []  # type: ignore[return-value]
        want: dict[Key, tuple[FeatureGroup, str]] = {}
        found: dict[Key, Any] = {}
        req_keys = []
        for (group, ids), space in zip(requests, spaces, strict=True):
            keys = [(group.name, group.version, i) for i in ids]
            req_keys.append(keys)
            for k, i, v in zip(keys, ids, l1.get_ids(space, ids, now), strict=True):
                want[k] = (group, i)
                if v is not MISS:
                    found[k] = v  # None: an unknown entity
        missing = [k for k in want if k not in found]
        degraded: list[str] = []
        # lookups and L1 hits counted together, before any await: hit rates never exceed 1
        self._count(len(want), len(found))
        self._observe("l1", len(want), len(found), t0)
        l2_ok = self.l2 is not None and self.l2_mode != "off"
        passed: dict[Key, tuple[Any, int]] = {}  # L2 entries older than a write this process heard of
        if missing and self.l2 is not None and self.l2_mode != "use":
            degraded.append(Reason.L2_BYPASSED)
        elif missing and self.l2 is not None:
            try:
                missing = await self._from_l2(missing, want, found, passed)
            except (*L2_ERRORS, BreakerOpen) as exc:
                l2_ok = False
                degraded.append(Reason.L2_BYPASSED)
                if not isinstance(exc, BreakerOpen):
                    metrics.CACHE_ERRORS.labels("l2").inc()
        if missing:
            await self._from_origin(missing, want, found, l2_ok, degraded, l3_timeout_s or self.l3_timeout_s, passed)
        return [[self._value(found.get(k)) for k in keys] for keys in req_keys], degraded

    @staticmethod
    def _value(v: Any) -> Row | None:
        """A row, or None for every kind of absence (a miss, NEGATIVE, Absent)."""
        return None if v is None or isinstance(v, Absent) or v == NEGATIVE else v

    def _observe(self, tier: str, asked: int, hits: int, t0: float) -> None:
        hit, miss, latency = _TIER_METRICS[tier]
        hit.inc(hits)
        miss.inc(asked - hits)
        latency.observe(time.perf_counter() - t0)

    def _count(self, lookups: int, l1_hits: int = 0, l2_hits: int = 0) -> None:
        """Keys looked up and hits; a lookup is counted when L1 answers, its L2 hits later (so
        neither rate ever reads above 1, even while other lookups wait on L2 or L3)."""
        c = self._counts
        c["lookups"] += lookups
        c["l1"] += l1_hits
        c["l2"] += l2_hits
        if c["lookups"]:
            _HIT_RATE_L1.set(c["l1"] / c["lookups"])
            _HIT_RATE_L2.set((c["l1"] + c["l2"]) / c["lookups"])

    async def _from_l2(
        self,
        keys: list[Key],
        want: dict[Key, tuple[FeatureGroup, str]],
        found: dict[Key, Any],
        passed: dict[Key, tuple[Any, int]],
    ) -> list[Key]:
        """The keys L2 did not answer; `passed` takes the entries read around (older than a
        write this process heard of): L3 may be older still (`_from_origin`)."""
        assert self.l2 is not None
        l2 = self.l2
        t0 = time.perf_counter()
        epoch = self.l1.epoch
        l2_keys = [feature_key(*want[k]) for k in keys]

        async def read() -> list[Any | None]:
            async with asyncio.timeout(self.l2_timeout_s):
                return await l2.get_many(l2_keys)

        entries = await self.l2_breaker.call(read, L2_ERRORS)
        still, hits = [], []
        l1 = self.l1
        for k, e in zip(keys, entries, strict=True):
            if e is None or l1.newer_than(k, e[1]):  # a miss, or older than a write this process saw
                still.append(k)
                if e is not None:
                    passed[k] = (e[0], e[1])
            else:
                found[k] = e[0]
                hits.append((k, e[0], e[1], self.l1_ttl(e[2])))  # L2's remaining TTL
        self._observe("l2", len(keys), len(hits), t0)
        self._count(0, 0, len(hits))
        if hits and epoch == l1.epoch:  # a flush while L2 answered: its copies may predate missed writes
            self.l1.set_many_now(hits)
        return still

    async def _from_origin(
        self,
        keys: list[Key],
        want: dict[Key, tuple[FeatureGroup, str]],
        found: dict[Key, Any],
        l2_ok: bool,
        degraded: list[str],
        timeout_s: float,
        passed: dict[Key, tuple[Any, int]],
    ) -> None:
        """Values of `keys` from L3: joins the reads already in flight, starts one for the rest.
        Each caller waits on its own shield, so a caller whose deadline cancels it never
        cancels a read that other callers (or the one that started it) still wait on.

        `passed`: L2 entries read around because this process heard of a newer write. L3 is
        not always newer: a write-behind write is in L3 only once the writer committed it (its
        announcement goes out before its L2 update, and a killed writer commits nothing until
        it is back), so the newer version of the two is served."""
        flights = self._flights(keys, want, l2_ok, timeout_s)
        results = await asyncio.shield(asyncio.gather(*flights.values()))
        for k, (value, version) in zip(flights, results, strict=True):
            held = passed.get(k)
            if held is not None and value is not Absent.FAILED and held[1] > version:
                value = held[0]  # L3 lags L2 (write-behind not committed yet)
            found[k] = value
        for name in sorted({want[k][0].name for k in keys if found[k] is Absent.FAILED}):
            reason = group_default(name)
            metrics.DEGRADED.labels(reason).inc()
            degraded.append(reason)

    def _flights(
        self, keys: list[Key], want: dict[Key, tuple[FeatureGroup, str]], l2_ok: bool, timeout_s: float
    ) -> dict[Key, asyncio.Future[tuple[Row | Absent, int]]]:
        """Single flight: the shared future of every key, starting one read for the keys
        nobody is reading yet."""
        new = [k for k in keys if k not in self._inflight]
        if new:
            loop = asyncio.get_running_loop()
            futures = {k: loop.create_future() for k in new}
            self._inflight.update(futures)
            self._background(self._read_origin({k: want[k] for k in new}, futures, l2_ok, timeout_s))
        return {k: self._inflight[k] for k in keys}

    async def _read_origin(
        self,
        want: dict[Key, tuple[FeatureGroup, str]],
        futures: dict[Key, asyncio.Future[tuple[Row | Absent, int]]],
        l2_ok: bool,
        timeout_s: float,
    ) -> None:
        """One read per group, all groups at once; resolves every future with (value, L3's
        version) (Absent.FAILED where a read failed), then backfills L1 and L2 with what was
        found, each entry only over an older version. Runs as its own task."""
        t0 = time.perf_counter()
        epoch = self.l1.epoch
        by_group: dict[FeatureGroup, list[Key]] = {}
        for k, (group, _) in want.items():
            by_group.setdefault(group, []).append(k)
        versions: dict[Key, int] = {}
        try:
            results = await asyncio.gather(
                *(self._read(g, [want[k][1] for k in ks], timeout_s) for g, ks in by_group.items()),
                return_exceptions=True,
            )
            for (group, ks), res in zip(by_group.items(), results, strict=True):
                if isinstance(res, BaseException) and not isinstance(res, (*L3_ERRORS, BreakerOpen)):
                    log.error("unexpected error reading %s from L3", group.name, exc_info=res)
                for k in ks:
                    got = None if isinstance(res, BaseException) else res.get(want[k][1])
                    if got is not None:
                        versions[k] = got[1]
                    failed = isinstance(res, BaseException)
                    value = Absent.FAILED if failed else Absent.UNKNOWN if got is None else got[0]
                    futures[k].set_result((value, versions.get(k, NONE)))
        finally:
            for k, fut in futures.items():
                if not fut.done():
                    fut.set_result((Absent.FAILED, NONE))
                self._inflight.pop(k, None)
        got = {k: fut.result()[0] for k, fut in futures.items()}
        self._observe("l3", len(got), sum(not isinstance(v, Absent) for v in got.values()), t0)
        fresh = [(k, cached(v), versions.get(k, NONE), self.ttl(want[k][0], cached(v)))
                 for k, v in got.items() if v is not Absent.FAILED]  # fmt: skip
        if fresh and epoch == self.l1.epoch:  # a flush during the read: what it read may predate missed writes
            self.l1.set_many_now([(k, v, ver, self.l1_ttl(ttl)) for k, v, ver, ttl in fresh])
        # L2 never takes a row older than a write this process has heard of (a write-behind
        # write whose L2 entry was evicted before the writer committed it)
        fresh = [f for f in fresh if not self.l1.newer_than(f[0], f[2])]
        if fresh and l2_ok and self.l2 is not None:
            await self.l2.set_many([(feature_key(*want[k]), v, ver, ttl) for k, v, ver, ttl in fresh])

    async def _read(self, group: FeatureGroup, ids: list[str], timeout_s: float) -> dict[str, tuple[Row, int]]:
        """One L3 read, bounded by `timeout_s`, behind the L3 breaker."""

        async def once() -> dict[str, tuple[Row, int]]:
            # the store applies the timeout itself (asyncpg cancels a query cleanly; an outer
            # cancellation can leave its connection mid-operation); this is the backstop
            async with asyncio.timeout(2 * timeout_s):
                return await self.origin.get_many(group, ids, timeout_s=timeout_s)

        try:
            return await self.l3_breaker.call(once, L3_ERRORS)
        except L3_ERRORS:
            metrics.CACHE_ERRORS.labels("l3").inc()
            raise

    def _background(self, coro: Awaitable[Any]) -> None:
        """Run `coro` off the request path (L3 reads, L2 backfill); an L2 failure only counts as an L2 error."""

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

    def __init__(
        self,
        store: TieredStore,
        context_provider: ContextProvider | None = None,
        fs: schema.FeatureSchema = schema.DEFAULT,
    ) -> None:
        self.store = store
        self.context_provider = context_provider
        self.schema = fs

    async def lookup(self, user_id: str, ad_ids: Sequence[str], context: dict[str, Any] | None = None) -> Features:
        fs = self.schema
        requests = [(fs.user_static, [user_id]), (fs.user_behavioral, [user_id]),
                    (fs.ad_meta, ad_ids), (fs.ad_stats, ad_ids)]  # fmt: skip
        if self.context_provider is not None and context is not None:
            (values, degraded), ctx = await asyncio.gather(self.store.get(requests), self.context_provider(context))
        else:
            (values, degraded), ctx = await self.store.get(requests), context
        (us,), (ub,), am, ast = values
        failed = any(map(is_features, degraded))  # a failed group reads as unknown
        if not failed and us is None and ub is None:
            degraded.append(Reason.FEATURES_USER)
        # no ad lacks both groups when either list has no None (a C scan, the common case)
        both = None in am and None in ast
        if not failed and both and any(m is None and s is None for m, s in zip(am, ast, strict=True)):
            degraded.append(Reason.FEATURES_AD)
        return Features(us, ub, am, ast, ctx, degraded)
