"""Feature writes: validation, write-through, and write-behind that survives SIGKILL."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BIN, ROOT
from redis.asyncio import Redis

from ctr.features import schema
from ctr.features.redis_tier import RedisTier, connect
from ctr.features.sql import SqliteStore
from ctr.features.store import TieredStore
from ctr.features.tiers import MemoryTier, feature_key, l1_key
from ctr.features.writes import GROUP, STREAM, FeatureWriter, _commit, ensure_group, run_writer, validate_rows


@pytest.fixture
def redis_url(redis_url: str) -> str:
    """A database of the session's Redis that no served FeatureService's writer consumes
    (theirs, on database 0, would take the stream's entries into their own L3)."""
    return redis_url.rsplit("/", 1)[0] + "/7"


@pytest.mark.parametrize(
    ("group", "rows", "needle"),
    [
        ("nope", [{"id": "a", "values": [1, 2]}], "unknown feature group"),
        ("ad_stats", [], "non-empty list"),
        ("ad_stats", [{"id": "", "values": [1, 2]}], "rows[0]"),
        ("ad_stats", [{"id": "a", "values": [1]}], "want 2 values"),
        ("ad_stats", [{"id": "a", "values": [1, -2]}], "values.clicks: want a non-negative int"),
        ("ad_meta", [{"id": "a", "values": [1, 2, 3]}], "values.creative: want a string"),
        ("ad_stats", [{"id": "a", "values": [1.5, 2]}], "values.impressions"),
    ],
)
def test_bad_writes_are_refused_with_the_reason(group: str, rows: object, needle: str) -> None:
    """Nothing malformed reaches a store; the message names the problem."""
    with pytest.raises(ValueError) as err:
        validate_rows(group, rows)
    assert needle in str(err.value)


def test_write_through_commits_then_caches(redis_url: str, tmp_path: Path) -> None:
    """The database has the row when put returns, and so do L2 and this process's L1."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        store = TieredStore(MemoryTier(), db, RedisTier(connect(redis_url)))
        writer = FeatureWriter(store, {"ad_meta": "through"}, connect(redis_url))  # type: ignore[arg-type]
        group, rows = validate_rows("ad_meta", [{"id": "a-wt", "values": [7, 3, "text"]}])
        assert (await writer.put(group, rows)).mode == "through"
        assert db.read(group, ["a-wt"])["a-wt"][0] == (7, 3, "text")
        [entry] = await store.l2.get_many([feature_key(group, "a-wt")])  # type: ignore[union-attr]
        assert entry is not None and entry[0] == (7, 3, "text")
        assert store.l1.get_many_now([l1_key(group, "a-wt")]) == [(7, 3, "text")]

    asyncio.run(go())


def test_write_behind_without_redis_goes_through(tmp_path: Path) -> None:
    """No stream to queue on: the write is committed synchronously instead of being lost."""

    async def go() -> None:
        db = SqliteStore(tmp_path / "f.db")
        writer = FeatureWriter(TieredStore(MemoryTier(), db), {"ad_stats": "behind"}, None)
        group, rows = validate_rows("ad_stats", [{"id": "a1", "values": [10, 1]}])
        assert (await writer.put(group, rows)).mode == "through"
        assert db.read(group, ["a1"])["a1"][0] == (10, 1)

    asyncio.run(go())


def _writer(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / "ctr"), "features", "writer", "--consumer", "w1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def _wait(cond: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.002)
    raise TimeoutError(what)


def test_write_behind_survives_a_writer_killed_mid_stream(redis_url: str, tmp_path: Path) -> None:
    """Every acknowledged write reaches the database although the writer was SIGKILLed
    while committing: its unacknowledged entries stay pending and the restarted writer
    commits them."""
    n = 3000
    db_path = tmp_path / "f.db"
    db = SqliteStore(db_path)

    async def produce() -> None:
        r = Redis.from_url(redis_url)
        await r.delete(STREAM)
        writer = FeatureWriter(TieredStore(MemoryTier(), db), {"ad_stats": "behind"}, r)
        for i in range(n):  # one stream entry per write, each acknowledged to the caller
            assert (await writer.put(schema.AD_STATS, [(f"wb{i}", [i, i % 7])])).mode == "behind"
        await r.aclose()

    asyncio.run(produce())
    assert db.count(schema.AD_STATS) == 0  # nothing committed yet: it is all in the stream
    env = {**os.environ, "CTR_REDIS_URL": redis_url, "CTR_DATABASE_URL": f"sqlite:///{db_path}"}
    first = _writer(env)
    try:
        _wait(lambda: db.count(schema.AD_STATS) >= 50, 60, "the writer committed nothing")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = db.count(schema.AD_STATS)
    assert killed_at < n, "the writer finished before it could be killed mid-stream"

    second = _writer(env)
    try:
        _wait(lambda: db.count(schema.AD_STATS) == n, 60, "not every write reached the database")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(10)
    rows = db.read(schema.AD_STATS, [f"wb{i}" for i in range(n)])
    assert all(rows[f"wb{i}"][0] == (i, i % 7) for i in range(n))

    async def leftovers() -> tuple[int, int]:
        r = Redis.from_url(redis_url)
        try:
            pending = await r.xpending(STREAM, GROUP)
            return int(await r.xlen(STREAM)), int(pending["pending"])
        finally:
            await r.aclose()

    assert asyncio.run(leftovers()) == (0, 0)


async def _xreadgroup_calls(r: Any) -> int:
    """How many XREADGROUP calls Redis has served (its command statistics)."""
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_xreadgroup", {}).get("calls", 0))


def test_the_writer_outlives_an_idle_stream(redis_url: str, tmp_path: Path) -> None:
    """The service's writer blocks on the stream between writes: its client must not time
    out under the blocked read (L2's 50 ms timeout did, and the writer task died), and a
    write made after the idle period still reaches the database."""
    from ctr.features import stack as feature_stack
    from ctr.settings import Settings

    settings = Settings(redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'f.db'}",
                        write_modes={"ad_stats": "behind"})  # fmt: skip

    async def go() -> None:
        async with feature_stack.opened(settings) as stack:
            assert stack.writer.redis is not None
            stop = asyncio.Event()
            task = asyncio.create_task(run_writer(stack.writer.redis, stack.store.origin, "idle", stop, block_ms=100))
            reads = await _xreadgroup_calls(stack.writer.redis)
            for _ in range(500):  # three blocked reads of 100 ms on an empty stream, each past L2's timeout
                if await _xreadgroup_calls(stack.writer.redis) >= reads + 3:
                    break
                await asyncio.sleep(0.01)
            assert not task.done(), task.exception()
            group, rows = validate_rows("ad_stats", [{"id": "a-idle", "values": [5, 1]}])
            assert (await stack.writer.put(group, rows)).mode == "behind"
            for _ in range(500):  # the writer commits within a blocked read or two
                if stack.store.origin.read(group, ["a-idle"]):  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.01)
            assert stack.store.origin.read(group, ["a-idle"])["a-idle"][0] == (5, 1)  # type: ignore[attr-defined]
            stop.set()
            assert await task >= 1

    asyncio.run(go())


def test_a_batch_of_stream_entries_commits_the_last_write_of_each_entity(redis_url: str, tmp_path: Path) -> None:
    """The writer commits a batch with one upsert per group; the later write of an entity wins,
    and every entry is acknowledged and dropped from the stream."""
    from ctr.features import stack as feature_stack
    from ctr.settings import Settings

    settings = Settings(redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'f.db'}",
                        write_modes={"ad_stats": "behind", "ad_meta": "behind"})  # fmt: skip

    async def go() -> None:
        async with feature_stack.opened(settings) as stack:
            redis = stack.writer.redis
            assert redis is not None
            await redis.delete(STREAM)
            for values in ([1, 0], [2, 1], [3, 1]):
                await stack.writer.put(*validate_rows("ad_stats", [{"id": "a-last", "values": values}]))
            await stack.writer.put(*validate_rows("ad_meta", [{"id": "a-last", "values": [4, 2, "text"]}]))
            await ensure_group(redis)
            resp = await redis.xreadgroup(GROUP, "batch", {STREAM: ">"}, count=100)
            assert len(resp[0][1]) == 4
            assert await _commit(redis, stack.store.origin, resp[0][1], stack.schema) == 2  # one row per group
            origin = stack.store.origin
            assert origin.read(schema.AD_STATS, ["a-last"])["a-last"][0] == (3, 1)  # type: ignore[attr-defined]
            assert origin.read(schema.AD_META, ["a-last"])["a-last"][0] == (4, 2, "text")  # type: ignore[attr-defined]
            assert await redis.xlen(STREAM) == 0 and (await redis.xpending(STREAM, GROUP))["pending"] == 0

    asyncio.run(go())
