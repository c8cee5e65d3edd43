"""The feature path: L1 TTLs on an injected clock, tier backfill, negative caching,
versioned keys, the SQLite store, and degradation when the database fails."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers import FakeClock

from ctr.features import schema
from ctr.features.sql import SqliteStore, sqlite_path
from ctr.features.store import FeatureLookup, TieredStore
from ctr.features.tiers import MemoryTier, feature_key, l1_key


class CountingSource:
    """An origin that counts its reads (wrapping a real SQLite store)."""

    name = "l3"

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.calls: list[tuple[str, list[str]]] = []

    async def get_many(
        self, group: schema.FeatureGroup, ids: Sequence[str], timeout_s: float | None = None
    ) -> dict[str, tuple[tuple[Any, ...], int]]:
        self.calls.append((group.name, list(ids)))
        return self.store.read(group, ids)


@pytest.fixture
def db(tmp_path: Path) -> SqliteStore:
    store = SqliteStore(tmp_path / "f.db")
    store.write(schema.USER_STATIC, [("u1", [30, "f", 3, 2], 1), ("u2", [50, "m", 1, 0], 1)])
    store.write(schema.USER_BEHAVIORAL, [("u1", [100, 4], 1)])
    store.write(schema.AD_META, [("a1", [5, 2, "image"], 1), ("a2", [6, 3, "video"], 1)])
    store.write(schema.AD_STATS, [("a1", [5000, 200], 1), ("a2", [3000, 90], 1)])
    return store


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def get(store: TieredStore, group: schema.FeatureGroup, ids: list[str]) -> list[Any]:
    values, _ = run(store.get([(group, ids)]))
    return values[0]


def test_memory_tier_expires_per_entry_ttl() -> None:
    """Each entry lives its own TTL on the injected clock; TTL 0 is never stored."""
    clock = FakeClock(1000.0)
    tier = MemoryTier(clock=clock)
    tier.set_many_now([("short", (1,), 1, 10.0), ("long", (2,), 1, 100.0), ("never", (3,), 1, 0.0)])
    assert tier.get_many_now(["short", "long", "never"]) == [(1,), (2,), None]
    clock.t += 50
    assert tier.get_many_now(["short", "long"]) == [None, (2,)]
    clock.t += 51
    assert tier.get_many_now(["long"]) == [None]


def test_memory_tier_is_bounded() -> None:
    """Past max_entries the least recently used entry goes."""
    tier = MemoryTier(max_entries=2)
    tier.set_many_now([("a", (1,), 1, 60.0), ("b", (2,), 1, 60.0)])
    tier.get_many_now(["a"])
    tier.set_many_now([("c", (3,), 1, 60.0)])
    assert tier.get_many_now(["a", "b", "c"]) == [(1,), None, (3,)]


def test_keys_change_with_version_entity_and_group() -> None:
    """Bumping a group's version gives every entity a new key (old entries unreachable)."""
    g = schema.USER_STATIC
    bumped = dataclasses.replace(g, version=g.version + 1)
    assert feature_key(g, "u1") != feature_key(bumped, "u1")
    assert feature_key(g, "u1") != feature_key(schema.USER_BEHAVIORAL, "u1")
    assert feature_key(g, "u1") == feature_key(g, "u1")


def test_tiered_read_backfills_and_serves_from_l1(db: SqliteStore) -> None:
    """A first read goes to the database and fills L1; the second never leaves L1."""
    origin = CountingSource(db)
    l1 = MemoryTier()
    store = TieredStore(l1, origin)
    first = get(store, schema.AD_META, ["a1", "a2"])
    assert first == [(5, 2, "image"), (6, 3, "video")]
    assert get(store, schema.AD_META, ["a2", "a1"]) == [(6, 3, "video"), (5, 2, "image")]
    assert origin.calls == [("ad_meta", ["a1", "a2"])] or origin.calls == [("ad_meta", ["a2", "a1"])]
    assert len(l1) == 2


def test_lower_tier_hit_backfills_upper_tier_only_with_its_misses(db: SqliteStore) -> None:
    """An L2 hit is copied into L1; nothing L1 already had is rewritten."""
    l1, l2 = MemoryTier(), MemoryTier()
    l2.set_many_now([(feature_key(schema.AD_META, "a1"), (9, 9, "text"), 1, 60.0)])
    origin = CountingSource(db)
    store = TieredStore(l1, origin, l2)
    assert get(store, schema.AD_META, ["a1", "a2"]) == [(9, 9, "text"), (6, 3, "video")]
    assert origin.calls == [("ad_meta", ["a2"])]
    assert l1.get_many_now([l1_key(schema.AD_META, "a1")]) == [(9, 9, "text")]


def test_unknown_ids_are_cached_negatively_for_a_short_ttl(db: SqliteStore) -> None:
    """Cold-start ids hit the database once per negative TTL, not once per request."""
    clock = FakeClock(1000.0)
    origin = CountingSource(db)
    store = TieredStore(MemoryTier(clock=clock), origin, negative_ttl_s=30.0)
    assert get(store, schema.AD_META, ["ghost"]) == [None]
    assert get(store, schema.AD_META, ["ghost"]) == [None]
    assert len(origin.calls) == 1
    clock.t += 31
    get(store, schema.AD_META, ["ghost"])
    assert len(origin.calls) == 2


def test_lookup_reports_unknown_entities(db: SqliteStore) -> None:
    """Unknown users and ads come back as None and are named in `degraded`."""
    lookup = FeatureLookup(TieredStore(MemoryTier(), db))
    f = run(lookup.lookup("u2", ["a1", "nope"]))
    assert f.user_static == (50, "m", 1, 0) and f.user_behavioral is None
    assert f.ad_meta[1] is None and f.ad_stats[0] == (5000, 200)
    assert f.degraded == ["features:ad:default"]
    assert run(lookup.lookup("ghost", ["a1"])).degraded == ["features:user:default"]


def test_database_failure_degrades_to_defaults(tmp_path: Path) -> None:
    """A broken database gives default features and says which groups, not an exception."""
    store = SqliteStore(tmp_path / "f.db")
    run(store.close())  # every read now raises sqlite3.ProgrammingError (a sqlite3.Error)
    lookup = FeatureLookup(TieredStore(MemoryTier(), store))
    f = run(lookup.lookup("u1", ["a1"]))
    assert f.user_static is None and f.ad_meta == [None]
    assert sorted(f.degraded) == sorted(f"features:{g.name}:default" for g in schema.GROUPS)
    with pytest.raises(sqlite3.Error):
        store.read(schema.AD_META, ["a1"])


def test_sqlite_url_parsing() -> None:
    """Only sqlite:/// URLs name a SQLite file."""
    assert sqlite_path("sqlite:////tmp/x.db") == Path("/tmp/x.db")
    with pytest.raises(ValueError, match="sqlite"):
        sqlite_path("postgresql://localhost/test")


def test_l1_hit_rate_never_reads_above_one_while_a_lookup_waits(db: SqliteStore) -> None:
    """A lookup's L1 hits are counted with its lookups, before it waits on L3: another lookup
    that ends meanwhile sets the hit-rate gauges to at most 1 (they read 2.0 here before)."""
    from ctr import metrics

    class Gated(CountingSource):
        gate: asyncio.Event

        async def get_many(self, group: schema.FeatureGroup, ids: Sequence[str], timeout_s: float | None = None) -> Any:
            await self.gate.wait()
            return await super().get_many(group, ids, timeout_s)

    async def go() -> None:
        origin = Gated(db)
        origin.gate = asyncio.Event()
        store = TieredStore(MemoryTier(), origin)
        store.l1.set_many_now([(l1_key(schema.AD_META, "a1"), (5, 2, "image"), 1, 60.0)])
        waiting = asyncio.create_task(store.get([(schema.AD_META, ["a1", "a2"])]))  # a1 in L1, a2 from L3
        await asyncio.sleep(0)
        await store.get([(schema.AD_META, ["a1"])])  # all in L1, ends first
        for tier in ("l1", "l2"):
            assert metrics.CACHE_HIT_RATE.labels(tier)._value.get() <= 1.0
        c = store.counts()
        assert c["l1"] + c["l2"] <= c["lookups"] == 3
        origin.gate.set()
        await waiting
        assert store.counts() == {"lookups": 3, "l1": 2, "l2": 0}

    run(go())


def test_l1_peek_answers_only_when_every_id_is_live() -> None:
    """The hot path reads a whole group's ids: values (None for an unknown entity) when all
    are live, else None; a version bump is another map."""
    clock = FakeClock(0.0)
    l1 = MemoryTier(clock=clock)
    space = (schema.AD_META.name, schema.AD_META.version)
    l1.set_many_now([(l1_key(schema.AD_META, "a1"), (1,), 1, 10.0), (l1_key(schema.AD_META, "a2"), (), 0, 5.0)])
    assert l1.peek(space, ["a1", "a2"], clock()) == [(1,), None]
    assert l1.peek(space, [], clock()) == []
    assert l1.peek(space, ["a1", "a3"], clock()) is None
    assert l1.peek((schema.AD_META.name, schema.AD_META.version + 1), ["a1"], clock()) is None
    clock.advance(6)
    assert l1.peek(space, ["a1", "a2"], clock()) is None
    assert l1.get_many_now([l1_key(schema.AD_META, "a1"), l1_key(schema.AD_META, "a2")]) == [(1,), None]


def test_l1_generations_bound_entries_and_keep_what_is_read() -> None:
    """Never more than max_entries; an entry read once per generation survives eviction."""
    l1 = MemoryTier(max_entries=100)
    hot = l1_key(schema.AD_META, "hot")
    l1.set_many_now([(hot, (1,), 1, 60.0)])
    for i in range(1000):
        l1.set_many_now([(l1_key(schema.USER_STATIC, f"u{i}"), (i,), 1, 60.0)])
        if i % 40 == 0:
            assert l1.get_many_now([hot]) == [(1,)]
        assert len(l1) <= 100
    assert l1.get_many_now([hot]) == [(1,)]
    assert l1.get_many_now([l1_key(schema.USER_STATIC, "u0")]) == [None]  # not read since: evicted


def test_an_l1_tombstone_outlives_eviction_and_flush() -> None:
    """A tombstone is kept apart from the entries: neither a generation turning over nor a
    flush lets an older in-flight fill back in while it lives."""
    clock = FakeClock(0.0)
    l1 = MemoryTier(max_entries=4, clock=clock, tombstone_s=30.0)
    k = l1_key(schema.AD_STATS, "a1")
    l1.invalidate_now([(k, 9)])
    for i in range(20):
        l1.set_many_now([(l1_key(schema.AD_STATS, f"x{i}"), (i,), 1, 60.0)])
    l1.clear()
    l1.set_many_now([(k, (1,), 5, 60.0)])
    assert l1.get_many_now([k]) == [None] and l1.newer_than(k, 5)
    clock.advance(31)
    l1.set_many_now([(k, (1,), 5, 60.0)])
    assert l1.get_many_now([k]) == [(1,)] and not l1.newer_than(k, 5)


def test_repeated_writes_of_one_key_do_not_push_out_another_keys_tombstone() -> None:
    """The tombstone bound counts tombstones, not records: ten writes of one hot key leave two
    live tombstones (under the bound of 4), so the other key's still refuses an older fill (the
    old code counted the hot key's superseded records and dropped it)."""
    clock = FakeClock(0.0)
    l1 = MemoryTier(max_entries=4, clock=clock, tombstone_s=30.0)
    other, hot = l1_key(schema.AD_STATS, "a1"), l1_key(schema.AD_STATS, "hot")
    l1.invalidate_now([(other, 9)])
    for v in range(1, 11):
        l1.invalidate_now([(hot, v)])
    l1.set_many_now([(other, (1,), 5, 60.0)])  # a read that started before the write of version 9
    assert l1.get_many_now([other]) == [None] and l1.newer_than(other, 5)
    for n in range(10):  # past the bound in tombstones, the oldest go first
        l1.invalidate_now([(l1_key(schema.AD_STATS, f"k{n}"), 1)])
    assert not l1.newer_than(other, 5) and l1.newer_than(l1_key(schema.AD_STATS, "k9"), 0)


def test_a_write_behind_read_around_l2_never_serves_older_than_l2(tmp_path: Path) -> None:
    """The consistency checker (CI, 40 s run): one write-behind read 6.78 s stale, 6.9 s after
    the writer's SIGKILL. A write-behind write is announced before its L2 update: a process
    reading in between has a tombstone newer than L2's entry and reads around it, to L3; but L3
    has only what the writer committed, with the writer dead the row from before the kill. The
    read served that, older than the L2 entry it had passed over (the previous write,
    acknowledged 6 s before). Now it serves the newer of the two. No Redis, no sleeps: L2 is an
    in-memory tier, the channel delivers in the test's hands, the clocks are injected."""
    from collections.abc import Awaitable, Callable

    from ctr.features.coherence import Coherence, read_message
    from ctr.features.versions import VersionClock
    from ctr.features.writes import FeatureWriter

    g = schema.AD_STATS

    class Stream:  # the write-behind stream: Redis takes every entry; no writer reads them (killed)
        def __init__(self) -> None:
            self.entries: list[dict[str, Any]] = []

        async def xadd(self, name: str, fields: dict[str, Any]) -> bytes:
            self.entries.append(fields)
            return b"%d-0" % len(self.entries)

    class Bus:  # the channel: delivers each message to the listeners, then lets the test act
        def __init__(self) -> None:
            self.listeners: list[Coherence] = []
            self.between: Callable[[], Awaitable[None]] | None = None

        async def publish(self, channel: str, data: bytes) -> int:
            for c in self.listeners:
                c.apply(*read_message(data))
            if self.between is not None:  # the writing process has not updated L2 yet
                await self.between()
            return len(self.listeners)

    async def read(store: TieredStore) -> Any:
        (values,), _ = await store.get([(g, ["a-behind"])])
        return values[0]

    async def go() -> None:
        clock, wall = FakeClock(), FakeClock(1_700_000_000.0)
        versions = VersionClock(lambda: int(wall() * 1e9))
        db = SqliteStore(tmp_path / "f.db")
        l2 = MemoryTier(clock=clock)  # shared by both processes, compare-newer like Redis's script
        bus = Bus()

        def process(publisher: Bus | None) -> tuple[TieredStore, Coherence]:
            store = TieredStore(MemoryTier(clock=clock), db, l2, l2_timeout_s=5.0, l3_timeout_s=5.0)
            coherence = Coherence(store, publisher, None, clock=clock, versions=versions)
            store.l1_ttl_cap_s = None  # subscribed: hears every write (through `bus`)
            return store, coherence

        a, a_coherence = process(bus)  # the gateway process that takes the writes
        b, b_coherence = process(None)  # another gateway process
        bus.listeners.append(b_coherence)
        writer = FeatureWriter(a, {g.name: "behind"}, Stream(), coherence=a_coherence, clock=versions)  # type: ignore[arg-type]

        # seq 1 was committed by the writer (L3 and L2 have it); then the writer is SIGKILLed
        v1 = versions.next()
        db.write(g, [("a-behind", [1, 1], v1)])
        await l2.set_many([(feature_key(g, "a-behind"), (1, 1), v1, g.ttl_s)])
        assert await read(b) == (1, 1)

        wall.advance(0.5)
        clock.advance(0.5)
        assert (await writer.put(g, [("a-behind", [2, 1])])).mode == "behind"  # acknowledged at 0.5 s
        assert db.read(g, ["a-behind"])["a-behind"][0] == (1, 1)  # not in L3: no writer
        assert await read(b) == (2, 1)  # B heard of it and reads it from L2

        wall.advance(6.0)
        clock.advance(6.0)  # the writer is still not back
        seen: list[Any] = []

        async def b_reads() -> None:
            seen.append(await read(b))

        bus.between = b_reads  # B reads after the announcement of seq 3, before its L2 update
        await writer.put(g, [("a-behind", [3, 1])])
        bus.between = None
        # seq 2 was acknowledged 6 s before this read began: the read must not miss it (the
        # old code gave it seq 1, L3's row)
        assert seen == [(2, 1)]
        assert await read(b) == (3, 1)  # after the L2 update: the newest
        await a.drain()
        await b.drain()
        await db.close()

    run(go())


def test_tombstone_records_stay_bounded_under_a_hot_key() -> None:
    """Each write of a key appends a record; a hot key's replaced ones are compacted away, so
    the records stay within twice the tombstones (plus a constant), whatever the write rate."""
    clock = FakeClock(0.0)
    l1 = MemoryTier(max_entries=4, clock=clock, tombstone_s=30.0)
    hot = l1_key(schema.AD_STATS, "hot")
    for v in range(1, 5001):
        l1.invalidate_now([(hot, v)])
    assert len(l1._tomb_order) <= 2 + 1024 and l1.newer_than(hot, 4999) and not l1.newer_than(hot, 5000)
