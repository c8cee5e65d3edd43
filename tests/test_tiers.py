"""One contract suite for every tier: the cache tiers (in-memory, real Redis, real Redis
Cluster) and the L3 stores (SQLite, real PostgreSQL); then the tiered store over real
Redis: backfill, a dead L2 behind its breaker, coalesced misses, concurrent groups."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock
from servers import free_port

from ctr.features import schema
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.sql import SqliteStore
from ctr.features.store import FeatureLookup, TieredStore
from ctr.features.tiers import NEGATIVE, MemoryTier, l1_key
from ctr.resilience.breaker import CircuitBreaker, State

TierFactory = Callable[[], Awaitable[Any]]


@pytest.fixture(params=["memory", "redis", "cluster"])
def cache(request: pytest.FixtureRequest) -> tuple[str, Callable[[], Any]]:
    """(kind, make) where make() builds the tier inside the test's event loop."""
    kind = request.param
    if kind == "memory":
        return kind, MemoryTier
    url = request.getfixturevalue("redis_url" if kind == "redis" else "cluster_url")
    return kind, lambda: RedisTier(connect(url, timeout_s=2.0))


def keys(n: int) -> list[str]:
    prefix = uuid.uuid4().hex
    return [f"t:{prefix}:{i}" for i in range(n)]


async def _close(tier: Any) -> None:
    if isinstance(tier, RedisTier):
        await tier.close()


def values(entries: list[Any]) -> list[Any]:
    return [None if e is None else e[0] for e in entries]


def test_cache_contract_round_trip(cache: tuple[str, Callable[[], Any]]) -> None:
    """Misses are None; values (ints and strings, and the negative marker) come back in order
    with their versions, also across many cluster slots; TTL 0 stores nothing; deletes remove."""

    async def go() -> None:
        tier = cache[1]()
        try:
            ks = keys(300)
            assert await tier.get_many(ks[:3]) == [None, None, None]
            await tier.set_many([(k, (i, f"s{i}"), i + 1, 60.0) for i, k in enumerate(ks[:299])]
                                + [(ks[299], NEGATIVE, 0, 60.0)])  # fmt: skip
            got = await tier.get_many(list(reversed(ks)))
            assert values(got) == [NEGATIVE, *((i, f"s{i}") for i in reversed(range(299)))]
            assert [e[1] for e in got] == [0, *(i + 1 for i in reversed(range(299)))]
            await tier.set_many([(ks[0] + "x", (1,), 1, 0.0)])
            assert await tier.get_many([ks[0] + "x"]) == [None]
            await tier.delete_many(ks[:2])
            assert values(await tier.get_many(ks[:3])) == [None, None, (2, "s2")]
        finally:
            await _close(tier)

    asyncio.run(go())


def test_cache_contract_a_set_never_replaces_a_newer_version(cache: tuple[str, Callable[[], Any]]) -> None:
    """An older version (a back-fill from a read that was in flight during a write) does not
    replace a newer one; the same or a newer version does; an unknown entity (version 0)
    never hides a write."""

    async def go() -> None:
        tier = cache[1]()
        try:
            ks = keys(3)
            await tier.set_many([(ks[0], (5200, 210), 20, 60.0), (ks[1], NEGATIVE, 0, 60.0), (ks[2], (1,), 5, 60.0)])
            await tier.set_many([(ks[0], (100, 5), 10, 900.0), (ks[1], (7, 7), 30, 60.0), (ks[2], (2,), 5, 60.0)])
            assert values(await tier.get_many(ks)) == [(5200, 210), (7, 7), (2,)]
            await tier.set_many([(ks[1], NEGATIVE, 0, 60.0)])
            assert values(await tier.get_many(ks[1:2])) == [(7, 7)]
        finally:
            await _close(tier)

    asyncio.run(go())


def test_cache_contract_ttl(cache: tuple[str, Callable[[], Any]], request: pytest.FixtureRequest) -> None:
    """Each entry expires after its own TTL: on the injected clock in memory, by the
    server's own expiry (read back with PTTL, no sleeping) in Redis."""
    kind, make = cache

    async def go() -> None:
        ks = keys(2)
        if kind == "memory":
            clock = FakeClock()
            tier = MemoryTier(clock=clock)
            await tier.set_many([(ks[0], (1,), 1, 900.0), (ks[1], (2,), 1, 86400.0)])
            clock.t = 901
            assert values(await tier.get_many(ks)) == [None, (2,)]
            return
        tier = make()
        try:
            await tier.set_many([(ks[0], (1,), 1, 900.0), (ks[1], (2,), 1, 86400.0)])
            ttl0, ttl1 = await tier.client.pttl(ks[0]), await tier.client.pttl(ks[1])
            assert 899_000 < ttl0 <= 900_000 and 86_399_000 < ttl1 <= 86_400_000
        finally:
            await _close(tier)

    asyncio.run(go())


@pytest.fixture(params=["sqlite", "postgres"])
def origin(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Any]:
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / f"{uuid.uuid4().hex}.db")
    from ctr.features.postgres import PostgresStore

    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


def test_origin_contract(origin: Callable[[], Any]) -> None:
    """L3: batch reads return only known ids, with versions; an upsert replaces a row only
    with a newer version (a replayed or reordered write changes nothing), and says how many
    rows it replaced; meta and warm sets round-trip."""

    async def go() -> None:
        db = origin()
        try:
            ids = [f"e{uuid.uuid4().hex[:8]}{i}" for i in range(200)]
            assert await db.get_many(schema.AD_STATS, ids[:5]) == {}
            assert await db.put_many(schema.AD_STATS, [(i, [n, n // 10], 10) for n, i in enumerate(ids)]) == 200
            got = await db.get_many(schema.AD_STATS, [*ids, "ghost"])
            assert len(got) == 200 and got[ids[42]] == ((42, 4), 10)
            assert await db.put_many(schema.AD_STATS, [(ids[42], [1, 1], 11), (ids[43], [9, 9], 9)]) == 1
            assert await db.put_many(schema.AD_STATS, [(ids[42], [2, 2], 11)]) == 0  # the same version again
            assert await db.get_many(schema.AD_STATS, ids[42:44]) == {ids[42]: ((1, 1), 11), ids[43]: ((43, 4), 10)}
            # one statement with an id twice: the newest wins
            assert await db.put_many(schema.AD_STATS, [(ids[44], [3, 3], 30), (ids[44], [2, 2], 20)]) == 1
            assert (await db.get_many(schema.AD_STATS, [ids[44]]))[ids[44]] == ((3, 3), 30)
            await db.put_many(schema.USER_STATIC, [(ids[0], [30, "f", 3, 2], 1)])
            assert (await db.get_many(schema.USER_STATIC, [ids[0]]))[ids[0]] == ((30, "f", 3, 2), 1)
            await db.set_meta("k", "v1")
            await db.set_meta("k", "v2")
            assert await db.get_meta("k") == "v2" and await db.get_meta("nope") is None
            await db.put_warm_set("user", ["u3", "u1", "u2"])
            await db.put_warm_set("user", ["u9", "u8"])
            assert await db.get_warm_set("user", 10) == ["u9", "u8"]
            assert await db.get_warm_set("user", 1) == ["u9"]
        finally:
            await db.close()

    asyncio.run(go())


class SlowOrigin:
    """An L3 whose reads wait per group (injected delays, or at a barrier) and record their order."""

    name = "l3"

    def __init__(self, delays: dict[str, float], barrier: asyncio.Barrier | None = None) -> None:
        self.delays = delays
        self.barrier = barrier
        self.events: list[str] = []
        self.reads = 0

    async def get_many(
        self, group: schema.FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, tuple[tuple[Any, ...], int]]:
        self.reads += 1
        self.events.append(f"start:{group.entity}")
        if self.barrier is not None:
            await asyncio.wait_for(self.barrier.wait(), 5.0)
        else:
            await asyncio.sleep(self.delays.get(group.entity, 0.0))
        self.events.append(f"end:{group.entity}")
        return {i: ((1, 1) if group.entity == "user" and len(group.fields) == 2 else (1, 1, "x"), 1) for i in ids}


def test_user_ad_and_context_are_fetched_concurrently() -> None:
    """The two user groups, the two ad groups and the context each wait at one barrier of five:
    it opens only if all five reads are in flight at once (one after another, it times out), so
    the feature stage costs the slowest of them, not their sum. No delays, no sleeps."""

    async def go() -> None:
        barrier = asyncio.Barrier(5)
        origin = SlowOrigin({}, barrier)
        events = origin.events

        async def context(ctx: dict[str, Any]) -> dict[str, Any]:
            events.append("start:context")
            await asyncio.wait_for(barrier.wait(), 5.0)
            events.append("end:context")
            return ctx

        lookup = FeatureLookup(TieredStore(MemoryTier(), origin), context_provider=context)
        await lookup.lookup("u1", ["a1", "a2"], {"hour": 1})
        starts = [i for i, e in enumerate(events) if e.startswith("start")]
        first_end = min(i for i, e in enumerate(events) if e.startswith("end"))
        assert len(starts) == 5 and max(starts) < first_end  # 2 user groups, 2 ad groups, context

    asyncio.run(go())


def test_concurrent_misses_of_a_key_are_read_once() -> None:
    """Ten requests missing the same keys at once cause one L3 read per group."""

    async def go() -> None:
        origin = SlowOrigin({"ad": 0.01})
        store = TieredStore(MemoryTier(), origin)
        await asyncio.gather(*(store.get([(schema.AD_META, ["a1", "a2"])]) for _ in range(10)))
        assert origin.reads == 1

    asyncio.run(go())


def test_redis_l2_is_backfilled_and_serves_other_processes(redis_url: str, tmp_path: Path) -> None:
    """An L3 read fills L2; a second store (another process's, with an empty L1) then hits L2."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        ad = f"a{uuid.uuid4().hex[:6]}"
        db.write(schema.AD_META, [(ad, [1, 2, "video"], 1)])
        # budgets of seconds, not the production 20/25 ms: on a loaded machine the first Redis
        # connection or SQLite read can take longer, and a bypassed L2 back-fills nothing
        first = TieredStore(
            MemoryTier(), db, RedisTier(connect(redis_url, timeout_s=2.0)), l2_timeout_s=2.0, l3_timeout_s=2.0
        )
        assert (await first.get([(schema.AD_META, [ad])]))[1] == []
        await first.drain()
        second = TieredStore(
            MemoryTier(), SlowOrigin({}), RedisTier(connect(redis_url, timeout_s=2.0)), l2_timeout_s=2.0
        )
        values, degraded = await second.get([(schema.AD_META, [ad])])
        assert values == [[(1, 2, "video")]] and degraded == []
        assert second.origin.reads == 0  # type: ignore[attr-defined]
        assert second.l1.get_many_now([l1_key(schema.AD_META, ad)]) == [(1, 2, "video")]

    asyncio.run(go())


def test_dead_redis_is_bypassed_then_skipped_by_the_breaker(tmp_path: Path) -> None:
    """With nothing listening on the L2 port, requests still get features (from L3) flagged
    cache:l2:bypassed, and once the breaker opens L2 is not even tried."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        db.write(schema.AD_META, [("a1", [1, 2, "video"], 1)])
        tier = RedisTier(connect(f"redis://127.0.0.1:{free_port()}/0"))
        calls = 0
        real = tier.get_many

        async def counting(ks: Sequence[str]) -> list[Any]:
            nonlocal calls
            calls += 1
            return await real(ks)

        tier.get_many = counting  # type: ignore[method-assign]
        clock = FakeClock()
        breaker = CircuitBreaker("l2-test", min_calls=3, cooldown_s=5.0, clock=clock)
        store = TieredStore(MemoryTier(), db, tier, l2_breaker=breaker, negative_ttl_s=0.0)
        for n in range(6):
            store.l1 = MemoryTier()  # force a miss every time
            values, degraded = await store.get([(schema.AD_META, ["a1"])])
            assert values == [[(1, 2, "video")]] and degraded == ["cache:l2:bypassed"], n
        assert breaker.state is State.OPEN and calls == 3
        clock.t += 5  # cooldown over: one trial goes to Redis again (and fails)
        store.l1 = MemoryTier()
        await store.get([(schema.AD_META, ["a1"])])
        assert calls == 4 and breaker.state is State.OPEN

    asyncio.run(go())


class GatedOrigin:
    """An L3 whose reads wait until the test opens the gate: no timing involved."""

    name = "l3"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.reads = 0

    async def get_many(
        self, group: schema.FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, tuple[tuple[Any, ...], int]]:
        self.reads += 1
        await self.gate.wait()
        return {i: ((7, 3, "video"), 1) for i in ids}


async def _settle() -> None:
    """Let every ready task run until it blocks (a few loop turns; no time passes)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def _two_lookups_of_one_key() -> tuple[GatedOrigin, TieredStore, asyncio.Task[Any], asyncio.Task[Any]]:
    origin = GatedOrigin()
    store = TieredStore(MemoryTier(), origin)  # type: ignore[arg-type]
    owner = asyncio.create_task(store.get([(schema.AD_META, ["a1"])]))
    await _settle()  # the owner starts the read
    waiter = asyncio.create_task(store.get([(schema.AD_META, ["a1"])]))
    await _settle()  # the waiter joins it
    assert origin.reads == 1
    return origin, store, owner, waiter


def test_a_waiter_whose_deadline_passes_does_not_fail_the_owner() -> None:
    """Shared lookup, waiter cancelled first (its deadline): the owner still gets its row, no
    InvalidStateError (the old code let the waiter cancel the shared future)."""

    async def go() -> None:
        origin, _, owner, waiter = await _two_lookups_of_one_key()
        waiter.cancel()
        await _settle()
        origin.gate.set()
        assert await owner == ([[(7, 3, "video")]], [])
        assert waiter.cancelled()

    asyncio.run(go())


def test_an_owner_whose_deadline_passes_leaves_the_read_to_its_waiters() -> None:
    """Shared lookup, owner cancelled first: the waiter, which still has time, gets the real
    row rather than default features (the old code failed every waiter with the owner)."""

    async def go() -> None:
        origin, store, owner, waiter = await _two_lookups_of_one_key()
        owner.cancel()
        await _settle()
        origin.gate.set()
        assert await waiter == ([[(7, 3, "video")]], [])
        assert owner.cancelled()
        await store.drain()
        assert store.l1.get_many_now([l1_key(schema.AD_META, "a1")]) == [(7, 3, "video")]  # backfilled

    asyncio.run(go())
