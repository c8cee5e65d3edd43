"""The feature-write history checker (ctr/bench/consistency.py) on real processes: a real
`bentoml serve` with two gateway processes over a private Redis (append-only, fsync always)
and PostgreSQL, writes in both modes and reads sent to every process, while Redis is killed
and restarted from its AOF, the write-behind writer is SIGKILLed, PostgreSQL is restarted
and a gateway process is SIGKILLed.

`make test` runs a bounded version (CONSISTENCY_S=40); `make consistency` runs minutes and
writes the report to reports/consistency.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator

import asyncpg
import psutil
import pytest
from conftest import Server
from redis import Redis
from servers import PostgresProcess, RedisProcess

from ctr.bench import consistency
from ctr.bench.profile import service_workers
from ctr.features.writes import GROUP, STREAM

DURATION_S = float(os.environ.get("CONSISTENCY_S", "40"))
REPORT = os.environ.get("CONSISTENCY_REPORT", "")
# The stated bounds (docs/feature-store.md): a write acknowledged at t is read by every
# gateway process from t + S on, faults included. Write-behind's is longer: when the
# announcement at the write failed, the writer's commit makes it, and a SIGKILLed writer is
# restarted first (a 40 s run on a machine running two other test suites measured 3.01 s).
BOUNDS_S = {"through": 3.0, "behind": 5.0}


def test_the_checker_catches_a_lost_a_reordered_and_a_stale_write() -> None:
    """The checker itself can fail: a history with a lost ledger row, an entity whose L3 row
    is older than its last acknowledged write, and a read staler than S is flagged on each
    count; the same history with the defects mended passes."""
    W, R = consistency.Write, consistency.Read
    h = consistency.History(
        writes=[W("through", "e1", 1, "l1", 0.0, 0.1, True), W("through", "e1", 2, "l2", 1.0, 1.1, True),
                W("behind", "e2", 3, "l3", 1.0, 1.1, False)],
        reads=[R("through", "e1", 7, 1.5, 1.6, 1, False),  # 0.4 s after write 2: within S
               R("through", "e1", 8, 5.0, 5.1, 1, False),  # 3.9 s after write 2: over S
               R("through", "e1", 8, 5.0, 5.1, -1, True)],  # default features: not a sample
    )  # fmt: skip
    bad = consistency.check(h, {"e1": 1, "l1": 1}, {"through": 3.0, "behind": 3.0})
    assert bad.lost == ["l2"] and bad.reordered == ["e1"] and bad.violations == {"through": 1, "behind": 0}
    assert bad.staleness == {("through", 7): pytest.approx(0.4), ("through", 8): pytest.approx(3.9)}
    assert bad.degraded_reads == 1 and not bad.ok
    h.reads.pop(1)
    good = consistency.check(h, {"e1": 2, "l1": 1, "l2": 2}, {"through": 3.0, "behind": 3.0})
    assert good.ok and good.acked == 2


@pytest.fixture(scope="module")
def rig(small_setup: dict[str, str]) -> Iterator[tuple[Server, RedisProcess, PostgresProcess]]:
    redis, pg = RedisProcess("--appendonly", "yes", "--appendfsync", "always"), PostgresProcess()
    env = {**small_setup, "CTR_REDIS_URL": redis.url, "CTR_DATABASE_URL": pg.url, "CTR_GATEWAY_WORKERS": "2",
           "CTR_WARM": "false", "CTR_BREAKER_WINDOW_S": "2", "CTR_BREAKER_MIN_CALLS": "5",
           "CTR_BREAKER_COOLDOWN_S": "0.5"}  # fmt: skip
    server = Server("service:CTRGateway", env)
    try:
        yield server, redis, pg
    finally:
        server.stop()
        redis.close()
        pg.close()


def _kill(server: Server, service: str) -> None:
    psutil.Process(service_workers(server.proc.pid)[service]).kill()


def _back(server: Server, service: str, timeout_s: float = 60.0) -> None:
    """Until BentoML has restarted the killed worker (its service name is listed again)."""
    deadline = time.monotonic() + timeout_s
    while service not in service_workers(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def faults(
    server: Server, redis: RedisProcess, pg: PostgresProcess, duration_s: float
) -> list[tuple[float, str, object]]:
    hold = min(10.0, max(2.0, duration_s / 20))

    def redis_down() -> None:
        redis.kill()
        time.sleep(hold)
        redis.start()

    def pg_down() -> None:
        pg.stop()
        time.sleep(hold)
        pg.start()

    def kill(service: str) -> object:
        def go() -> None:
            _kill(server, service)
            _back(server, service)

        return go

    return [
        (duration_s * 0.12, "Redis SIGKILLed, restarted from its AOF", redis_down),
        (duration_s * 0.35, "write-behind writer SIGKILLed", kill("ctr_features")),
        (duration_s * 0.55, "PostgreSQL restarted", pg_down),
        (duration_s * 0.78, "a gateway process SIGKILLed", kill("ctr_gateway#2")),
    ]


def drained(redis_url: str, timeout_s: float = 90.0) -> None:
    """Until the write-behind stream is empty (a killed writer's entries are claimed after 30 s)."""
    r = Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if r.xlen(STREAM) == 0 and r.xpending(STREAM, GROUP)["pending"] == 0:
                    return
            time.sleep(0.5)
        raise AssertionError("the write-behind stream did not drain")
    finally:
        r.close()


async def _l3(url: str, prefix: str) -> dict[str, int]:
    con = await asyncpg.connect(url)
    try:
        rows = await con.fetch("SELECT entity_id, value::text FROM features WHERE entity_id LIKE $1", prefix + "%")
    finally:
        await con.close()
    import orjson

    return consistency.l3_seqs([(r[0], orjson.loads(r[1])) for r in rows])


@pytest.mark.timeout(DURATION_S + 400)
def test_feature_writes_are_never_lost_reordered_or_stale_past_the_bound(
    rig: tuple[Server, RedisProcess, PostgresProcess],
) -> None:
    """Lost 0, reordered 0, and no read (in any process, either mode) staler than S."""
    server, redis, pg = rig
    driver = consistency.Driver(server.url, "test-token")
    history = driver.history

    def inject() -> None:
        for at_s, name, fn in faults(server, redis, pg, DURATION_S):
            delay = at_s - driver.now()
            if delay > 0:
                time.sleep(delay)
            history.faults.append((driver.now(), name))
            fn()  # type: ignore[operator]

    t = threading.Thread(target=inject, daemon=True)
    t.start()
    asyncio.run(driver.run(DURATION_S))
    t.join(120)
    drained(redis.url)
    verdict = consistency.check(history, asyncio.run(_l3(pg.url, driver.prefix)), BOUNDS_S)
    text = consistency.report(verdict, BOUNDS_S, history, DURATION_S)
    print("\n" + text)
    if REPORT:
        os.makedirs(os.path.dirname(REPORT) or ".", exist_ok=True)
        with open(REPORT, "w") as f:
            f.write(text + "\n")
    assert len(history.faults) == 4
    assert len(consistency.pids(history)) >= 2, "the reads did not reach two gateway processes"
    assert verdict.acked > 0.5 * verdict.writes and verdict.reads > 100
    assert verdict.lost == [] and verdict.reordered == []
    assert verdict.violations == {"through": 0, "behind": 0}, text
