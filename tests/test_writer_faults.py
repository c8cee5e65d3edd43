"""The write-behind writer under faults: L3 down, Redis restarted (with and without
persistence), a consumer killed mid-batch, a poisoned entry, a stream that refuses a write.
Real Redis, PostgreSQL and SQLite; the writer runs in the test's event loop."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis
from redis.exceptions import RedisError
from servers import PostgresProcess, RedisProcess, free_port

from ctr.features import schema
from ctr.features import stack as feature_stack
from ctr.features.postgres import PostgresStore
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.sql import SqliteStore
from ctr.features.store import FeatureSource, TieredStore
from ctr.features.tiers import MemoryTier, feature_key, l1_key
from ctr.features.writes import (
    DEAD_STREAM,
    GROUP,
    STREAM,
    STREAM_TIMEOUT_S,
    Consumer,
    FeatureWriter,
    _pid_namespace,
    consumer_name,
    dead_writer,
    run_writer,
)
from ctr.settings import Settings


@pytest.fixture
def redis_url(redis_url: str) -> str:
    """A database of the session's Redis that no served FeatureService's writer consumes
    (theirs, on database 0, would take the stream's entries into their own L3)."""
    return redis_url.rsplit("/", 1)[0] + "/7"


G = schema.AD_STATS


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until(cond: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while loop.time() < end:
        if await cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for: {what}")


async def committed(origin: FeatureSource, ids: list[str]) -> dict[str, tuple]:
    try:
        return rows(await origin.get_many(G, ids))
    except Exception:  # L3 still down
        return {}


def rows(versioned: dict[str, tuple]) -> dict[str, tuple]:
    """L3's rows without their versions."""
    return {k: v[0] for k, v in versioned.items()}


def stream_writer(redis_url: str, origin: FeatureSource) -> tuple[FeatureWriter, Redis]:
    stream = connect(redis_url, STREAM_TIMEOUT_S)
    assert isinstance(stream, Redis)
    return FeatureWriter(TieredStore(MemoryTier(), origin), {G.name: "behind"}, stream), stream


def test_caches_are_written_only_after_the_stream_took_the_write(redis_url: str, tmp_path: Path) -> None:
    """The stream refuses the write (its Redis is gone): the caller gets the error and no
    cache holds the value (the old code wrote L2 and L1 first, then lost the write)."""

    async def go() -> None:
        l2 = RedisTier(connect(redis_url))
        store = TieredStore(MemoryTier(), SqliteStore(tmp_path / "f.db"), l2)
        dead = connect(f"redis://127.0.0.1:{free_port()}/0", STREAM_TIMEOUT_S)
        writer = FeatureWriter(store, {G.name: "behind"}, dead)  # type: ignore[arg-type]
        with pytest.raises(RedisError):
            await writer.put(G, [("a-lost", [5, 1])])
        assert await l2.get_many([feature_key(G, "a-lost")]) == [None]
        assert store.l1.get_many_now([l1_key(G, "a-lost")]) == [None]
        await l2.close()
        await dead.aclose()

    asyncio.run(go())


def test_a_poisoned_entry_is_dead_lettered_and_the_rest_committed(redis_url: str, tmp_path: Path) -> None:
    """Malformed entries between good ones go to the dead-letter stream, counted; the good
    ones are committed and nothing stays pending (the old code failed the whole batch)."""
    poison = [
        {"group": "ad_stats", "rows": "not json"},
        {"group": "no_such_group", "rows": '[["a1", [1, 2]]]'},
        {"group": "ad_stats", "rows": '[["a1", [1, "two"]]]'},
        {"group": "ad_stats", "rows": '[["a\\u0000nul", [1, 2]]]'},
        {"rows": '[["a1", [1, 2]]]'},
    ]

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        writer, r = stream_writer(redis_url, db)
        await r.delete(STREAM, DEAD_STREAM)
        await writer.put(G, [("good-0", [1, 0])])
        for p in poison:
            await r.xadd(STREAM, p)  # type: ignore[arg-type]
        await writer.put(G, [("good-1", [2, 1])])
        before = metric("ctr_feature_writes_dead_lettered_total")
        stop = asyncio.Event()
        task = asyncio.create_task(run_writer(r, db, "w-poison", stop, block_ms=20, backoff_s=0.01))
        await until(lambda: _have(db, 2), 10, "the good entries committed")
        stop.set()
        await task
        assert rows(db.read(G, ["good-0", "good-1"])) == {"good-0": (1, 0), "good-1": (2, 1)}
        dead = await r.xrange(DEAD_STREAM)
        assert len(dead) == len(poison)
        assert all(b"reason" in fields and b"entry_id" in fields for _, fields in dead)
        assert b"unknown feature group" in dead[1][1][b"reason"]
        assert metric("ctr_feature_writes_dead_lettered_total") - before == len(poison)
        assert await r.xlen(STREAM) == 0 and (await r.xpending(STREAM, GROUP))["pending"] == 0
        await r.aclose()

    asyncio.run(go())


def _have(db: SqliteStore, n: int) -> Awaitable[bool]:
    async def check() -> bool:
        return db.count(G) >= n

    return check()


class Killed(Exception):
    """Stands for the process dying at a chosen step of a commit."""


def dying_at(step: str) -> Callable[[str], None]:
    """A commit step hook that stands for the process dying at `step`."""

    def die(at: str) -> None:
        if at == step:
            raise Killed(at)

    return die


async def killed_holding_30(redis_url: str, db: SqliteStore, name: str, step: str) -> Redis:
    """30 write-behind writes, and consumer `name` killed at `step` of committing them: all
    30 read by it, pending, unacknowledged. Returns the stream's client."""
    writer, r = stream_writer(redis_url, db)
    await r.delete(STREAM)
    for i in range(30):
        await writer.put(G, [(f"k{i}", [i, 0])])

    a = Consumer(r, db, name, on_step=dying_at(step), block_ms=10)
    await a.recover()  # makes the group
    with pytest.raises(Killed):
        await a.step()
    assert (await r.xpending(STREAM, GROUP))["pending"] == 30
    return r


@pytest.mark.parametrize("step", ["read", "upserted"])
def test_a_consumer_killed_mid_batch_leaves_its_entries_to_another(redis_url: str, tmp_path: Path, step: str) -> None:
    """Consumer A dies after reading a batch (before or after the upsert, before the XACK):
    its entries stay pending, and consumer B claims them (XAUTOCLAIM) and commits them."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        r = await killed_holding_30(redis_url, db, "a", step)
        assert db.count(G) == (30 if step == "upserted" else 0)
        b = Consumer(r, db, "b", claim_idle_s=0.0, block_ms=10)
        assert await b.step() == (0 if step == "upserted" else 30)  # a replay of what A upserted writes nothing
        assert rows(db.read(G, [f"k{i}" for i in range(30)])) == {f"k{i}": (i, 0) for i in range(30)}
        assert (await r.xpending(STREAM, GROUP))["pending"] == 0 and await r.xlen(STREAM) == 0
        await r.aclose()

    asyncio.run(go())


def _reaped() -> int:
    """The pid of a process that ran and was reaped (gone)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_dead_writer_is_known_by_its_host_namespace_and_pid() -> None:
    """Only a name of this host and pid namespace whose process is gone is dead; a live pid,
    another host (one whose name this host's prefixes), another namespace (two containers of
    a pod share a hostname) or a name of another form waits `claim_idle_s`, and none raises."""
    host = socket.gethostname()
    ns = _pid_namespace()
    assert dead_writer(f"writer-{host}-{ns}-{_reaped()}-abc123")
    assert not dead_writer(f"writer-{host}-{ns}-{os.getpid()}-abc123")
    assert not dead_writer(f"writer-{host}-12-{_reaped()}-abc123", host=host)  # another namespace
    assert not dead_writer(f"writer-{host}x-{ns}-{_reaped()}-abc123")
    assert not dead_writer(f"writer-web-12-{ns}-{_reaped()}-abc", host="web")  # host web-12, not web
    for odd in ("a", f"writer-{host}-{ns}-x-1", f"writer-{host}-{ns}-\u00b2-1", f"writer-{host}-{ns}-{10**30}-1"):
        assert not dead_writer(odd)
    assert not dead_writer(consumer_name())  # this process: alive


def test_a_restarted_writer_commits_a_dead_ones_entries_at_once(redis_url: str, tmp_path: Path) -> None:
    """A writer of this host dies holding 30 read, unacknowledged entries; the writer that
    replaces it (a new name, as BentoML restarts one) commits them on its first round once
    the dead one is idle for `dead_idle_s`, not after `claim_idle_s` (30 s: before, they
    waited that long). A writer whose process runs is never claimed from."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        gone = f"writer-{socket.gethostname()}-{_pid_namespace()}-{_reaped()}-dead00"
        r = await killed_holding_30(redis_url, db, gone, "read")
        b = Consumer(r, db, consumer_name(), claim_idle_s=30.0, block_ms=10)
        assert await b.recover() == 0  # its own name holds nothing
        b.dead_idle_s = 60.0
        assert await b.step() == 0  # the dead one read them less than a minute ago (a live one might still)
        b.dead_idle_s = 0.0
        assert await b.step() == 30
        assert rows(db.read(G, [f"k{i}" for i in range(30)])) == {f"k{i}": (i, 0) for i in range(30)}
        assert (await r.xpending(STREAM, GROUP))["pending"] == 0
        writer, stream = stream_writer(redis_url, db)
        for i in range(30, 40):  # a live writer's batch stays its own
            await writer.put(G, [(f"k{i}", [i, 0])])
        live = Consumer(r, db, consumer_name(), block_ms=10, on_step=dying_at("read"))
        with pytest.raises(Killed):
            await live.step()
        assert await b.step() == 0 and (await r.xpending(STREAM, GROUP))["pending"] == 10
        await stream.aclose()
        await r.aclose()

    asyncio.run(go())


def test_a_consumer_named_in_bytes_that_are_not_utf8_stops_no_writer(redis_url: str, tmp_path: Path) -> None:
    """Any client can add a consumer with any name to the group (XGROUP CREATECONSUMER); one
    that is not UTF-8 made every writer's round raise (its name decoded strictly), so nothing
    was committed. Now the writer reads past it."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        writer, r = stream_writer(redis_url, db)
        await r.delete(STREAM)
        b = Consumer(r, db, consumer_name(), block_ms=10)
        await b.recover()
        await r.execute_command("XGROUP", "CREATECONSUMER", STREAM, GROUP, b"\xff\xfe-writer")
        await writer.put(G, [("k1", [1, 0])])
        assert await b.recover() == 0 and await b.step() == 1 and await b.prune(idle_s=0.0) >= 1
        await r.aclose()

    asyncio.run(go())


def test_every_acknowledged_write_reaches_l3_after_it_was_down(redis_url: str) -> None:
    """PostgreSQL stops for a while under a steady stream of write-behind writes, then comes
    back: the writer logs and counts the failures, keeps going, and L3 ends with every
    acknowledged write (the old writer died on the first L3 error)."""
    pg = PostgresProcess()
    n = 300

    async def go() -> None:
        origin = PostgresStore(pg.url, timeout_s=1.0)
        writer, r = stream_writer(redis_url, origin)
        await r.delete(STREAM)
        stop = asyncio.Event()
        before = metric("ctr_writer_failures_total", kind="l3")
        task = asyncio.create_task(run_writer(r, origin, "w-l3", stop, block_ms=20, backoff_s=0.01, max_backoff_s=0.2))
        acked = []
        for i in range(n):
            if i == n // 3:
                await until(lambda: _pg_has(origin, acked), 20, "writes before the outage committed")
                await asyncio.to_thread(pg.stop)
            if i == 2 * n // 3:
                await until(lambda: _failed(before), 20, "the writer to fail against the stopped L3")
                await asyncio.to_thread(pg.start)
            await writer.put(G, [(f"p{i}", [i, 1])])
            acked.append(f"p{i}")
            await asyncio.sleep(0.001)
        await until(lambda: _pg_has(origin, acked), 30, "every acknowledged write in L3")
        assert not task.done()
        stop.set()
        await task
        assert rows(await origin.get_many(G, acked)) == {f"p{i}": (i, 1) for i in range(n)}
        assert metric("ctr_writer_failures_total", kind="l3") > before
        await origin.close()
        await r.aclose()

    try:
        asyncio.run(go())
    finally:
        pg.close()


async def _pg_has(origin: FeatureSource, ids: list[str]) -> bool:
    return len(await committed(origin, ids)) == len(ids)


async def _failed(before: float) -> bool:
    return metric("ctr_writer_failures_total", kind="l3") > before


def _settings(redis_url: str, tmp_path: Path) -> Settings:
    return Settings(redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'f.db'}", write_modes={G.name: "behind"})


def test_redis_restarted_without_persistence(tmp_path: Path) -> None:
    """Redis restarts empty (no persistence): the first write after it succeeds on a fresh
    connection, the writer recreates its consumer group and commits every later write
    (the old writer died and, had it lived, would have found no group)."""
    redis = RedisProcess()

    async def go() -> None:
        async with feature_stack.opened(_settings(redis.url, tmp_path)) as stack:
            r, db = stack.writer.redis, stack.store.origin
            assert r is not None and isinstance(db, SqliteStore) and stack.store.l2 is not None
            stop = asyncio.Event()
            task = asyncio.create_task(run_writer(r, db, "w-restart", stop, block_ms=20, backoff_s=0.01))
            await stack.writer.put(G, [("before", [1, 1])])
            await until(lambda: _have(db, 1), 10, "the first write committed")
            before = metric("ctr_writer_failures_total", kind="nogroup") + metric("ctr_writer_failures_total",
                                                                                  kind="redis")  # fmt: skip
            redis.kill()
            redis.start()
            # pooled connections are stale now: the next commands retry once on a fresh one
            assert await stack.store.l2.get_many([feature_key(G, "before")]) == [None]
            for i in range(20):
                assert (await stack.writer.put(G, [(f"after{i}", [i, 2])])).mode == "behind"
            await until(lambda: _have(db, 21), 10, "writes after the restart committed")
            assert not task.done()
            stop.set()
            await task
            assert rows(db.read(G, [f"after{i}" for i in range(20)])) == {f"after{i}": (i, 2) for i in range(20)}
            after = metric("ctr_writer_failures_total", kind="nogroup") + metric("ctr_writer_failures_total",
                                                                                 kind="redis")  # fmt: skip
            assert after > before
            assert await r.xinfo_groups(STREAM)  # the group exists again

    try:
        asyncio.run(go())
    finally:
        redis.close()


def test_acknowledged_writes_survive_sigkill_of_redis_with_aof(tmp_path: Path) -> None:
    """With `appendonly yes` (appendfsync everysec, Redis's default), Redis writes each XADD
    to its AOF before it answers: SIGKILL of Redis itself loses no acknowledged write; after
    the restart the writer commits them all. (Surviving a crash of the host needs
    `appendfsync always`; see the README.)"""
    redis = RedisProcess("--appendonly", "yes", "--appendfsync", "everysec")
    n = 500

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        writer, r = stream_writer(redis.url, db)
        for i in range(n):
            await writer.put(G, [(f"aof{i}", [i, 3])])
        redis.kill()  # SIGKILL, right after the last acknowledgement
        redis.start()
        stop = asyncio.Event()
        task = asyncio.create_task(run_writer(r, db, "w-aof", stop, block_ms=20, backoff_s=0.01))
        await until(lambda: _have(db, n), 20, "every acknowledged write committed after the restart")
        stop.set()
        await task
        assert rows(db.read(G, [f"aof{i}" for i in range(n)])) == {f"aof{i}": (i, 3) for i in range(n)}
        await r.aclose()

    try:
        asyncio.run(go())
    finally:
        redis.close()


def test_stream_entry_format_is_what_the_writer_reads() -> None:
    """The entry the writer parses is the one FeatureWriter appends (group name, JSON rows, the
    write's version); an entry from before versions gets its stream id's time in microseconds."""
    from ctr.features.writes import parse_entry

    data = {b"group": b"ad_stats", b"rows": orjson.dumps([["a1", [3, 1]]])}
    group, parsed = parse_entry(b"1700000000123-4", {**data, b"version": b"42"}, schema.DEFAULT)
    assert group is G and parsed == [("a1", (3, 1), 42)]
    assert parse_entry(b"1700000000123-4", data, schema.DEFAULT)[1] == [("a1", (3, 1), 1700000000123004)]
