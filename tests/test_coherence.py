"""One truth for features across processes and tiers: every defect of the feature-coherence
issue reproduced against real Redis and SQLite (each test failed on the code before
versioned writes and the feature-write channel), and the channel's own behaviour: a
write reaches another process's L1, a lost or silent Redis flushes L1 and caps it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from servers import RedisProcess, free_port, redis_server

from ctr.api.edge import Edge
from ctr.api.routes import make_app
from ctr.features import schema
from ctr.features import stack as feature_stack
from ctr.features.coherence import Coherence
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.sql import SqliteStore
from ctr.features.store import TieredStore
from ctr.features.tiers import MemoryTier, feature_key, l1_key
from ctr.features.writes import STREAM, Consumer, FeatureWriter, check_stream_redis, consumer_name
from ctr.settings import Settings

G = schema.AD_STATS


@pytest.fixture
def redis_url(redis_url: str) -> str:
    """A database of the session's Redis that no served FeatureService's writer consumes."""
    return redis_url.rsplit("/", 1)[0] + "/6"


async def until(cond: Callable[[], Awaitable[bool] | bool], timeout_s: float, what: str) -> float:
    """Wait (polling a real server's effect) until `cond`; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < timeout_s:
        got = cond()
        if await got if asyncio.iscoroutine(got) else got:
            return loop.time() - start
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")


def process(url: str, db: Path, **kw: Any) -> tuple[TieredStore, FeatureWriter, Coherence]:
    """What one gateway process holds: its own L1, the shared L2 and L3, a writer, a listener."""
    # generous Redis timeouts: what is tested is coherence, not a loaded machine's latency
    store = TieredStore(MemoryTier(), SqliteStore(db), RedisTier(connect(url, timeout_s=2.0)), l2_timeout_s=2.0)
    listen = kw.pop("listen", True)
    coherence = Coherence(store, store.l2.client if store.l2 else None,  # type: ignore[attr-defined]
                          (lambda: Redis.from_url(url)) if listen else None, **kw)  # fmt: skip
    stream = connect(url, 2.0)
    writer = FeatureWriter(store, {"ad_stats": "behind", "ad_meta": "through"}, stream, coherence=coherence)  # type: ignore[arg-type]
    return store, writer, coherence


async def read(store: TieredStore, group: schema.FeatureGroup, entity: str) -> Any:
    (values,), _ = await store.get([(group, [entity])])
    return values[0]


async def close(store: TieredStore, writer: FeatureWriter, coherence: Coherence) -> None:
    await coherence.close()
    await writer.close()
    await store.drain()
    await store.origin.close()
    if store.l2 is not None:
        await store.l2.close()
    if writer.redis is not None:
        await writer.redis.aclose()


class PausedOrigin:
    """A real SQLite L3 whose reads take their rows at once but hand them back only when the
    test opens the gate: a read in flight while a write happens, with no timing involved."""

    name = "l3"

    def __init__(self, db: SqliteStore) -> None:
        self.db = db
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def get_many(self, group: schema.FeatureGroup, ids: Sequence[str], timeout_s: float | None = None) -> Any:
        rows = self.db.read(group, ids)
        self.started.set()
        await self.gate.wait()
        return rows

    async def put_many(self, group: schema.FeatureGroup, rows: Any, announce: bool = False) -> int:
        return await self.db.put_many(group, rows, announce)

    async def announced(self, group: schema.FeatureGroup, items: Any) -> None:
        await self.db.announced(group, items)


def test_a_stale_read_never_overwrites_a_fresh_write(redis_url: str, tmp_path: Path) -> None:
    """Defect 1: an L3 read that started before a write and ends after it back-filled the old
    row into L1 and L2 with a fresh TTL (L3 (5200, 210), L2 (100, 5) for 900 s). Now neither
    tier takes the older version."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        db.write(G, [("a-race", [100, 5], 1)])
        origin = PausedOrigin(db)
        l2 = RedisTier(connect(redis_url, timeout_s=2.0))
        store = TieredStore(MemoryTier(), origin, l2, l2_timeout_s=2.0, l3_timeout_s=30.0)  # type: ignore[arg-type]
        await store.l2.delete_many([feature_key(G, "a-race")])  # type: ignore[union-attr]
        writer = FeatureWriter(store, {G.name: "through"}, None)
        reader = asyncio.create_task(read(store, G, "a-race"))
        await origin.started.wait()  # the read has the old row in hand
        assert (await writer.put(G, [("a-race", [5200, 210])])).mode == "through"
        origin.gate.set()
        assert await reader == (100, 5)  # it was concurrent with the write: either answer is right
        await store.drain()  # the back-fill ran
        [l2] = await store.l2.get_many([feature_key(G, "a-race")])  # type: ignore[union-attr]
        assert l2 is not None and l2[0] == (5200, 210)
        assert store.l1.get_many_now([l1_key(G, "a-race")]) == [(5200, 210)]
        assert db.read(G, ["a-race"])["a-race"][0] == (5200, 210)
        await store.l2.close()  # type: ignore[union-attr]
        await db.close()

    asyncio.run(go())


def test_the_writer_refreshes_the_caches_of_what_it_committed(redis_url: str, tmp_path: Path) -> None:
    """Defect 2: the write-behind writer committed to L3 but never touched the caches, so a
    read in between (its L2 entry evicted) back-filled the old L3 row and served it past the
    commit. Now the commit refreshes L2 and tells every process's L1."""

    async def go() -> None:
        db_path = tmp_path / "f.db"
        SqliteStore(db_path).write(G, [("a-lag", [1, 0], 1)])
        a = process(redis_url, db_path)
        b = process(redis_url, db_path)
        store_a, writer_a, coh_a = a
        store_b, _, coh_b = b
        await coh_a.start()
        await coh_b.start()
        r = writer_a.redis
        assert r is not None
        await r.delete(STREAM)
        await writer_a.put(G, [("a-lag", [2, 1])])  # behind: queued, caches set
        await store_a.l2.delete_many([feature_key(G, "a-lag")])  # type: ignore[union-attr]  # evicted
        await until(lambda: store_b.l1.newer_than(l1_key(G, "a-lag"), 1), 2, "b heard the write")
        assert await read(store_b, G, "a-lag") == (1, 0)  # L3 is behind: the old row
        await store_b.drain()
        # not back-filled into L2 over the write b has heard of (review: the old row would have
        # been served from L2 by every process once the tombstones expired)
        assert await store_b.l2.get_many([feature_key(G, "a-lag")]) == [None]  # type: ignore[union-attr]
        consumer = Consumer(r, store_a.origin, "w", block_ms=10, on_commit=writer_a.refresh)
        await consumer.recover()
        assert await consumer.step() == 1
        took = await until(lambda: _reads(store_b, (2, 1)), 2.5, "b reads the committed row")
        assert took < 2.5
        for p in (a, b):
            await close(*p)

    asyncio.run(go())


async def _reads(store: TieredStore, want: tuple[int, ...]) -> bool:
    return await read(store, G, "a-lag") == want


def test_an_older_pending_entry_claimed_late_does_not_reorder_writes(redis_url: str, tmp_path: Path) -> None:
    """Defect 3: a replacement writer claimed a dead writer's older pending entry after
    committing a newer one, and L3 ended at (1000, 10) though (2000, 99) was acknowledged
    last. Now the older version does not replace the newer; and writer names are unique per
    process (several writers on one host shared one name)."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        r = connect(redis_url, 2.0)
        assert isinstance(r, Redis)
        await r.delete(STREAM)
        writer = FeatureWriter(TieredStore(MemoryTier(), db), {G.name: "behind"}, r)
        await writer.put(G, [("a-order", [1000, 10])])
        dead = Consumer(r, db, consumer_name(), block_ms=10)
        await dead.recover()

        def die(step: str) -> None:
            raise RuntimeError("killed")

        dead.on_step = die
        with pytest.raises(RuntimeError):
            await dead.step()  # read the older entry, died before committing it
        await writer.put(G, [("a-order", [2000, 99])])
        heir = Consumer(r, db, consumer_name(), block_ms=10, claim_idle_s=3600)
        assert heir.name != dead.name
        assert await heir.step() == 1  # the newer entry
        heir.claim_idle_s = 0.0
        await heir.claim()  # then the dead writer's older one
        assert db.read(G, ["a-order"])["a-order"][0] == (2000, 99)
        assert (await r.xpending(STREAM, "ctr-writers"))["pending"] == 0
        await r.aclose()
        await db.close()

    asyncio.run(go())


async def admin_write(writer: FeatureWriter, body: dict[str, Any]) -> httpx.Response:
    """POST /admin/features to the gateway's app, in this event loop."""
    app = make_app(Edge(admin_token="t", writer=writer))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.post("/admin/features", headers={"authorization": "Bearer t"}, json=body)


def test_write_through_with_redis_down_is_done_and_repaired_after_an_aof_restart(tmp_path: Path) -> None:
    """Defect 4: with Redis down a write-through committed L3, then answered 503 "write not
    done" naming Redis's address, left this process's L1 old, and a Redis restarted from its
    AOF brought the old L2 entry back for a day. Now: 200 (L3 is the truth) saying the cache
    update is deferred, L1 updated, and the queued update lands once Redis is back."""
    redis = RedisProcess("--appendonly", "yes", "--appendfsync", "always")
    key = feature_key(schema.AD_META, "a-aof")

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        store = TieredStore(MemoryTier(), db, RedisTier(connect(redis.url, timeout_s=2.0)))
        writer = FeatureWriter(store, {"ad_meta": "through"}, None)
        await store.l2.set_many([(key, (1, 1, "old"), 1, 86400.0)])  # type: ignore[union-attr]
        redis.kill()
        r = await admin_write(writer, {"group": "ad_meta", "rows": [{"id": "a-aof", "values": [2, 2, "new"]}]})
        assert r.status_code == 200, r.text
        assert r.json() == {"group": "ad_meta", "written": 1, "mode": "through", "degraded": ["cache:l2:deferred"]}
        assert db.read(schema.AD_META, ["a-aof"])["a-aof"][0] == (2, 2, "new")
        assert store.l1.get_many_now([l1_key(schema.AD_META, "a-aof")]) == [(2, 2, "new")]
        redis.start()  # from its AOF: the old entry is back
        assert (await store.l2.get_many([key]))[0][0] == (1, 1, "old")  # type: ignore[union-attr,index]
        assert await writer.repair(older_than_s=0) == 1
        [entry] = await store.l2.get_many([key])  # type: ignore[union-attr]
        assert entry is not None and entry[0] == (2, 2, "new")
        await store.l2.close()  # type: ignore[union-attr]
        await db.close()

    try:
        asyncio.run(go())
    finally:
        redis.close()


def test_a_write_l3_refused_is_a_503_that_names_no_address(tmp_path: Path) -> None:
    """Defect 4, the body: a store error answers 503 naming the tier, not its address."""

    async def go() -> httpx.Response:
        db = SqliteStore(tmp_path / "f.db")
        await db.close()
        store = TieredStore(MemoryTier(), db, RedisTier(connect(f"redis://127.0.0.1:{free_port()}/0")))
        writer = FeatureWriter(store, {"ad_meta": "through"}, None)
        return await admin_write(writer, {"group": "ad_meta", "rows": [{"id": "a1", "values": [2, 2, "new"]}]})

    r = asyncio.run(go())
    assert r.status_code == 503 and "L3" in r.json()["error"] and "127.0.0.1" not in r.text


def test_sqlite_reads_run_off_the_event_loop_within_the_l3_timeout(tmp_path: Path) -> None:
    """Defect 5: SQLite reads ran on the event loop (1,000 never-seen ids: 43-57 ms a request,
    every other request stalled) and ignored CTR_L3_TIMEOUT_MS. Now they run on the store's
    thread, and a read past the timeout gives default features while the loop goes on."""
    db = SqliteStore(tmp_path / "f.db")
    release = threading.Event()
    threads: list[int] = []
    real = db.read

    def slow(group: schema.FeatureGroup, ids: Sequence[str]) -> Any:
        threads.append(threading.get_ident())
        release.wait(5)
        return real(group, ids)

    db.read = slow  # type: ignore[method-assign]

    async def go() -> None:
        store = TieredStore(MemoryTier(), db, l3_timeout_s=0.05)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        (values,), degraded = await store.get([(G, [f"new{i}" for i in range(1000)])])
        t.cancel()
        release.set()
        assert values == [None] * 1000 and degraded == [f"features:{G.name}:default"]
        assert ticks > 10  # the loop ran other tasks while the read waited
        assert threads and threading.get_ident() not in threads
        await db.close()

    asyncio.run(go())


def test_write_behind_refuses_a_redis_that_may_evict_its_stream(tmp_path: Path) -> None:
    """Defect 6: the stream lived in the cache Redis, whose allkeys-* eviction may drop
    unacknowledged writes. Now write-behind refuses such a Redis (writes go through, a
    clear log line says why), and CTR_STREAM_REDIS_URL gives the stream a Redis of its own."""
    evicting = RedisProcess("--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")
    try:
        with redis_server() as safe:

            async def go() -> None:
                assert "allkeys-lru" in (await check_stream_redis(Redis.from_url(evicting.url)) or "")
                assert await check_stream_redis(Redis.from_url(safe)) is None
                base = {"database_url": f"sqlite:///{tmp_path / 'f.db'}", "write_modes": {G.name: "behind"}}
                async with feature_stack.opened(Settings(redis_url=evicting.url, **base)) as stack:
                    assert stack.writer.stream_refused and "CTR_STREAM_REDIS_URL" in stack.writer.stream_refused
                    assert (await stack.writer.put(G, [("a-ev", [1, 1])])).mode == "through"
                settings = Settings(redis_url=evicting.url, stream_redis_url=safe, **base)
                async with feature_stack.opened(settings) as stack:
                    assert stack.writer.stream_refused is None
                    assert (await stack.writer.put(G, [("a-ev", [2, 2])])).mode == "behind"
                    assert await Redis.from_url(safe).xlen(STREAM) == 1

            asyncio.run(go())
    finally:
        evicting.close()


def test_a_write_reaches_another_process_l1_and_its_negative_entry(redis_url: str, tmp_path: Path) -> None:
    """Process B remembers an ad as unknown (a negative entry, 60 s); process A writes it
    (both modes): B reads the new rows at once, and an L1 copy B fills from L2 keeps L2's
    remaining TTL."""

    async def go() -> None:
        db_path = tmp_path / "f.db"
        a, b = process(redis_url, db_path), process(redis_url, db_path)
        for p in (a, b):
            await p[2].start()
        store_b = b[0]
        assert await read(store_b, schema.AD_META, "a-new") is None
        assert await read(store_b, G, "a-new") is None
        await store_b.drain()
        assert a[2].listening and b[2].listening and store_b.l1_ttl_cap_s is None
        await a[1].put(schema.AD_META, [("a-new", [3, 4, "video"])])
        await a[1].put(G, [("a-new", [900, 40])])
        await until(lambda: _reads_both(store_b), 2.5, "B reads both writes")
        assert b[2].applied >= 2
        (entry,) = await store_b.l1.get_many([l1_key(G, "a-new")])
        assert entry is not None and entry[2] <= G.ttl_s  # not a fresh full TTL beyond L2's
        for p in (a, b):
            await close(*p)

    asyncio.run(go())


async def _reads_both(store: TieredStore) -> bool:
    return await read(store, schema.AD_META, "a-new") == (3, 4, "video") and await read(store, G, "a-new") == (900, 40)


def test_an_l1_copy_of_an_l2_entry_keeps_its_remaining_ttl(redis_url: str, tmp_path: Path) -> None:
    """An entry written to L2 900 s ago with a 1,000 s TTL lives 100 s more in L1, not 1,000."""

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    async def go() -> None:
        wall = Clock()
        wall.now = 1_000_000.0
        l2 = RedisTier(connect(redis_url, timeout_s=2.0), wall=wall)
        key = feature_key(G, "a-ttl")
        await l2.set_many([(key, (1, 1), 5, 1000.0)])
        wall.now += 900
        l1_clock = Clock()
        store = TieredStore(MemoryTier(clock=l1_clock), SqliteStore(tmp_path / "f.db"), l2, l2_timeout_s=2.0)
        assert await read(store, G, "a-ttl") == (1, 1)
        l1_clock.now = 99
        assert store.l1.get_many_now([l1_key(G, "a-ttl")]) == [(1, 1)]
        l1_clock.now = 101
        assert store.l1.get_many_now([l1_key(G, "a-ttl")]) == [None]
        await l2.close()

    asyncio.run(go())


def test_a_lost_or_silent_channel_flushes_l1_and_caps_it(tmp_path: Path) -> None:
    """Redis killed: the listener flushes L1 and caps new entries at CTR_L1_UNSYNCED_TTL_S;
    Redis back: subscribed again, L1 flushed once more (writes in between were missed), cap
    lifted, L2 read around for CTR_L2_PROBATION_S (the consistency checker found a read 10.5 s
    stale without it: an entry older than a write made while Redis was down, back from its AOF).
    Redis frozen (SIGSTOP: no error, just silence): flushed within the stale bound."""
    redis = RedisProcess()

    async def go() -> None:
        store, writer, coh = process(redis.url, tmp_path / "f.db", ping_s=0.05, stale_s=0.3, unsynced_ttl_s=0.5,
                                     l2_probation_s=0.3)  # fmt: skip
        assert store.l1_ttl_cap_s == 0.5  # not listening yet
        await coh.start()
        assert coh.listening and store.l1_ttl_cap_s is None
        store.l1.set_many_now([(l1_key(G, "x"), (1, 1), 1, 600.0)])
        flushes = coh.flushes
        redis.kill()
        await until(lambda: not coh.listening, 2, "the listener notices Redis is gone")
        assert len(store.l1) == 0 and store.l1_ttl_cap_s == 0.5 and coh.flushes > flushes
        # and L2 is read around until well after the listener is back (the checker found a read
        # 9.8 s stale: Redis answered again with an entry from its AOF before the listener did)
        assert store.l2_mode == "off"
        redis.start()
        await until(lambda: coh.listening, 5, "subscribed again")
        assert coh._run_id is not None
        assert store.l1_ttl_cap_s is None
        assert store.l2_mode == "fill"  # Redis may be back with entries older than writes made meanwhile
        await until(lambda: store.l2_mode == "use", 2, "L2 trusted again after the probation")
        store.l1.set_many_now([(l1_key(G, "y"), (1, 1), 1, 600.0)])
        assert redis.proc is not None
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            took = await until(lambda: not coh.listening, 3, "the listener notices the silence")
            assert len(store.l1) == 0 and took < 1.0
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        await until(lambda: coh.listening, 5, "subscribed again after the silence")
        await close(store, writer, coh)

    try:
        asyncio.run(go())
    finally:
        redis.close()


def test_a_tombstone_refuses_an_older_fill_but_not_the_write() -> None:
    """L1: a write seen from elsewhere leaves a tombstone; an in-flight older fill is refused,
    the written version (or a newer one) is taken; an expired entry takes anything."""

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    l1 = MemoryTier(clock=clock, tombstone_s=30.0)
    l1.set_many_now([("k", (1,), 5, 600.0)])
    l1.invalidate_now([("k", 9)])
    assert l1.get_many_now(["k"]) == [None] and l1.newer_than("k", 5)
    l1.set_many_now([("k", (1,), 5, 600.0)])
    assert l1.get_many_now(["k"]) == [None]
    l1.set_many_now([("k", (2,), 9, 600.0)])
    assert l1.get_many_now(["k"]) == [(2,)]
    l1.invalidate_now([("k", 9)])  # its own write announced back: nothing changes
    assert l1.get_many_now(["k"]) == [(2,)]
    clock.now = 601
    l1.set_many_now([("k", (0,), 1, 60.0)])
    assert l1.get_many_now(["k"]) == [(0,)]


def test_a_read_in_flight_across_an_l1_flush_fills_nothing(tmp_path: Path) -> None:
    """A read that started before L1 was flushed (the channel lost: writes elsewhere may have
    been missed) does not put what it read into L1 (review: it stayed for the full TTL)."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        db.write(G, [("a-epoch", [1, 1], 10)])
        origin = PausedOrigin(db)
        store = TieredStore(MemoryTier(), origin, l3_timeout_s=30.0)  # type: ignore[arg-type]
        reader = asyncio.create_task(read(store, G, "a-epoch"))
        await origin.started.wait()
        store.l1.clear()  # the listener lost the channel
        origin.gate.set()
        assert await reader == (1, 1)
        await store.drain()
        assert store.l1.get_many_now([l1_key(G, "a-epoch")]) == [None]
        assert await read(store, G, "a-epoch") == (1, 1)  # a read after the flush fills as usual
        await store.drain()
        assert store.l1.get_many_now([l1_key(G, "a-epoch")]) == [(1, 1)]
        await db.close()

    asyncio.run(go())


def test_a_later_write_wins_over_a_process_whose_clock_is_ahead(tmp_path: Path) -> None:
    """Process A's clock runs an hour ahead; a write through B acknowledged after A's still
    wins in L3 and in the caches (review: L3 refused it and the answer said written)."""
    from ctr.features.versions import VersionClock

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        ahead = VersionClock(lambda: time.time_ns() + 3600 * 10**9)
        a = FeatureWriter(TieredStore(MemoryTier(), db), {}, clock=ahead)
        b = FeatureWriter(TieredStore(MemoryTier(), db), {})
        await a.put(schema.AD_META, [("a-skew", [1, 1, "from-a"])])
        await b.put(schema.AD_META, [("a-skew", [2, 2, "from-b"])])
        assert db.read(schema.AD_META, ["a-skew"])["a-skew"][0] == (2, 2, "from-b")
        assert b.store.l1.get_many_now([l1_key(schema.AD_META, "a-skew")]) == [(2, 2, "from-b")]
        await db.close()

    asyncio.run(go())


def test_warming_is_not_cut_by_the_request_budget(tmp_path: Path) -> None:
    """Warming reads the warm set in chunks of 2,000 ids: with the request path's L3 budget
    every chunk timed out and opened the L3 breaker (review); it gets a budget of its own."""
    from ctr.features.warm import warm

    class Slow(SqliteStore):
        async def get_many(self, group: schema.FeatureGroup, ids: Sequence[str], timeout_s: float | None = None) -> Any:
            await asyncio.sleep(0.05)
            return await super().get_many(group, ids, timeout_s)

    async def go() -> None:
        db = Slow(tmp_path / "f.db")
        users = [f"u{i}" for i in range(3000)]
        db.write(schema.USER_STATIC, [(u, [30, "f", 1, 1], 1) for u in users])
        await db.put_warm_set("user", users)
        store = TieredStore(MemoryTier(), db, l3_timeout_s=0.01)
        _, degraded = await store.get([(schema.USER_STATIC, ["u1"])])
        assert degraded == ["features:user_static:default"]  # a request's read: cut at its budget
        await warm(store, 3000)
        assert len(store.l1) >= 3000 and store.l3_breaker.state.name == "CLOSED"
        await db.close()

    asyncio.run(go())


def test_a_gateway_starts_while_redis_is_down(tmp_path: Path) -> None:
    """Write-behind's check of the stream's Redis does not keep a process from starting when
    Redis is down (review: ConnectionError escaped on_startup, and the worker never came up)."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=dead, database_url=f"sqlite:///{tmp_path / 'f.db'}")

    async def go() -> None:
        assert await check_stream_redis(Redis.from_url(dead)) is None
        stack = feature_stack.features(settings, shared=True)
        try:
            await stack.start()
            assert not stack.coherence.listening and stack.store.l1_ttl_cap_s == settings.l1_unsynced_ttl_s
            _, degraded = await stack.store.get([(schema.AD_META, ["a1"])])
            assert "cache:l2:bypassed" in degraded
        finally:
            await feature_stack.close(stack)

    asyncio.run(go())


def test_after_a_redis_restart_no_l2_entry_from_before_it_survives(tmp_path: Path) -> None:
    """Redis restarted from its AOF brings back entries older than writes made while it was
    down; the process that queued their cache update may have died meanwhile (review). The
    first listener to see Redis's new run id deletes L2's feature entries, once."""
    redis = RedisProcess("--appendonly", "yes", "--appendfsync", "always")

    async def go() -> None:
        store, writer, coh = process(redis.url, tmp_path / "f.db", ping_s=0.05, stale_s=0.3)
        other = process(redis.url, tmp_path / "f.db", ping_s=0.05, stale_s=0.3)
        await coh.start()
        await other[2].start()
        key = feature_key(G, "a-old")
        await store.l2.set_many([(key, (1, 1), 1, 86400.0)])  # type: ignore[union-attr]
        redis.kill()
        redis.start()  # the entry is back from the AOF
        await until(lambda: coh.listening and other[2].listening, 5, "both subscribed again")
        await until(lambda: _gone(store, key), 5, "the old entry deleted")
        raw = Redis.from_url(redis.url)
        assert len([k async for k in raw.scan_iter(match="ctr:features:l2-reset:*")]) == 1  # one wiper
        await raw.aclose()
        for p in ((store, writer, coh), other):
            await close(*p)

    try:
        asyncio.run(go())
    finally:
        redis.close()


async def _gone(store: TieredStore, key: str) -> bool:
    return await store.l2.get_many([key]) == [None]  # type: ignore[union-attr]


def test_an_announcement_outlives_the_process_that_owed_it(redis_url: str, tmp_path: Path) -> None:
    """Process A commits a write-through while Redis does not answer it and dies before it
    could announce the write (review and attack: the retry lived in A's memory, and B served
    the old row for the rest of its TTL). The commit noted the announcement in L3, and B's
    repair loop makes it: B (and every listener) reads the new row."""

    async def go() -> None:
        db_path = tmp_path / "f.db"
        b = process(redis_url, db_path)
        c = process(redis_url, db_path)
        for p in (b, c):
            await p[2].start()
        SqliteStore(db_path).write(schema.AD_META, [("a-owed", [1, 1, "old"], 1)])
        for p in (b, c):
            assert await read(p[0], schema.AD_META, "a-owed") == (1, 1, "old")
        a = process(f"redis://127.0.0.1:{free_port()}/0", db_path, listen=False)  # Redis unreachable from A
        done = await a[1].put(schema.AD_META, [("a-owed", [2, 2, "new"])])
        assert done.mode == "through" and done.cache_deferred
        await close(*a)  # A is gone, its announcement owed
        assert await read(c[0], schema.AD_META, "a-owed") == (1, 1, "old")  # nobody told C yet
        assert await b[1].repair(older_than_s=0) == 1
        await until(lambda: _reads_new(c[0]), 2, "C reads the new row")
        assert await read(b[0], schema.AD_META, "a-owed") == (2, 2, "new")
        assert await b[1].repair(older_than_s=0) == 0  # nothing owed any more
        for p in (b, c):
            await close(*p)

    asyncio.run(go())


async def _reads_new(store: TieredStore) -> bool:
    return await read(store, schema.AD_META, "a-owed") == (2, 2, "new")


def test_a_large_write_is_announced_in_chunks(redis_url: str, tmp_path: Path) -> None:
    """5,000 rows in one write-through, L2 at its production timeout: the announcement goes in
    chunks, so it lands (attack: one pipeline of 19,000 scripts outlasted the 50 ms socket
    timeout, the message was never sent, and another process kept the old rows)."""

    async def go() -> None:
        db_path = tmp_path / "f.db"
        ids = [f"big{i}" for i in range(5000)]
        SqliteStore(db_path).write(schema.AD_META, [(i, [1, 1, "old"], 1) for i in ids])
        a = process(redis_url, db_path)
        b = process(redis_url, db_path)
        for p in (a, b):
            await p[2].start()
        assert await read(b[0], schema.AD_META, "big4999") == (1, 1, "old")
        a[0].l2 = RedisTier(connect(redis_url))  # 50 ms, as served
        done = await a[1].put(schema.AD_META, [(i, [2, 2, "new"]) for i in ids])
        assert not done.cache_deferred
        await until(lambda: _reads_meta(b[0], "big4999", (2, 2, "new")), 2.5, "B reads the new row")
        for p in (a, b):
            await close(*p)

    asyncio.run(go())


async def _reads_meta(store: TieredStore, entity: str, want: tuple[Any, ...]) -> bool:
    return await read(store, schema.AD_META, entity) == want
