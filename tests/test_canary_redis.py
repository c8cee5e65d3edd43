"""Rollout state in a real private Redis: shared by processes, decided once, surviving a
gateway restart and a Redis restart; the last known split is served while Redis is down."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from servers import RedisProcess

from ctr.bench.canary_sim import FakeClock
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.counts import Counts, latency_bucket
from ctr.serving.canary.plan import Phase, Plan
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.state import Arm, RedisStore

PLAN = Plan((Phase(0.05, 60), Phase(0.5, 60)), interval_s=10)
STABLE, CANARY = Arm("ctr_model:a"), Arm("ctr_model:b", ("http://canary:3000",))


@pytest.fixture()
def redis_proc() -> Iterator[RedisProcess]:
    p = RedisProcess()
    yield p
    p.close()


def good(n: int) -> dict[str, float]:
    return dict(
        requests=n, errors=n // 2000, impressions=n, clicks=n // 20, scored=n, scored_clicks=n // 20, pred_sum=n / 20
    )


def client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


async def feed(store: RedisStore, rid: str, n: int, stratum: str = "0:0") -> None:
    d = Counts().put("canary", stratum, 3.0, **good(n)).put("stable", stratum, 3.0, **good(10 * n))
    await store.add(rid, d)


def test_counters_round_trip_through_redis(redis_proc: RedisProcess) -> None:
    """Every counter, the predicted-CTR sum and the latency histogram add up in Redis."""

    async def go() -> None:
        store = RedisStore(client(redis_proc.url))
        await feed(store, "r1", 2000)
        await feed(store, "r1", 2000, stratum="1:7")
        got = await store.counters("r1")
        assert got.strata() == ["0:0", "1:7"]
        canary = got["canary"].to_dict()
        assert {k: canary[k] for k in good(4000)} == pytest.approx(good(4000))
        assert got["stable"].requests == 40_000 and got["stable"].latency[latency_bucket(3.0)] == 40_000
        # per unit and per stratum, not only the totals
        assert got.matrix("canary", "requests", ["1:7"]).tolist() == [[2000 / 64] * 64]
        await store.r.aclose()

    asyncio.run(go())


def test_two_controllers_make_one_decision(redis_proc: RedisProcess) -> None:
    """Two gateway processes' controllers step at the same moment: one advance, recorded once."""

    async def go() -> None:
        clock = FakeClock(0.0)
        a = Controller(RedisStore(client(redis_proc.url)), clock=clock, owner="gw-a")
        b = Controller(RedisStore(client(redis_proc.url)), clock=clock, owner="gw-b")
        r = await a.start(STABLE, CANARY, PLAN)
        await feed(a.store, r.id, 4_000_000)  # type: ignore[arg-type]
        clock.t = 61
        results = await asyncio.gather(a.step(), b.step(), a.step(), b.step())
        decided = [d for d in results if d is not None and d.action == "advance"]
        r = await a.store.load()
        assert r is not None and r.phase == 1 and r.share == 0.5
        assert [h["action"] for h in r.history] == ["start", "advance"]
        assert len(decided) == 1
        # A manual rollback racing an automatic step: the compare-and-set lets one apply.
        clock.t = 200
        await feed(a.store, r.id, 2_000_000)  # type: ignore[arg-type]
        await asyncio.gather(a.step(), b.rollback(by="bob"))
        r = await a.store.load()
        assert r is not None and not r.active
        assert sum(h["action"] in ("promote", "rollback") for h in r.history) == 1

    asyncio.run(go())


def test_rollout_survives_a_gateway_restart_and_a_redis_restart(redis_proc: RedisProcess) -> None:
    """A new process sees the rollout; Redis down -> the last known split is served and the
    status says so; Redis back empty -> the rollout is restored and resumes where it was."""

    async def go() -> None:
        clock = FakeClock(0.0)
        store = RedisStore(client(redis_proc.url))
        gw = CanaryRuntime(store, Controller(store, clock=clock), clock=clock)
        r = await gw.controller.start(STABLE, CANARY, PLAN)
        await feed(store, r.id, 4_000_000)
        clock.t = 61
        await gw.sync()
        assert gw.rollout is not None and gw.rollout.phase == 1  # advanced by the lease holder
        users = [f"u{i}" for i in range(2000)]
        split = [gw.arm(u) for u in users]
        assert 0.4 < split.count("canary") / len(split) < 0.6

        # The gateway restarts: a fresh runtime reads the same rollout.
        store2 = RedisStore(client(redis_proc.url))
        gw2 = CanaryRuntime(store2, Controller(store2, clock=clock), clock=clock)
        await gw2.sync()
        assert gw2.rollout == gw.rollout and [gw2.arm(u) for u in users] == split

        # Redis goes down: same split, counters kept in memory, status says so.
        redis_proc.kill()
        gw.record_request("canary", 0.003, error=False)
        clock.t = 70
        await gw.sync()
        assert gw.stale_since == 70 and [gw.arm(u) for u in users] == split
        status = gw.status()
        assert status["store"] == "unavailable" and status["serving_last_known_split_since"] == 70

        # Redis comes back empty (no persistence): the rollout is put back and resumes.
        redis_proc.start()
        clock.t = 80
        await gw.sync()
        back = await store.load()
        assert gw.stale_since is None and back is not None
        assert (back.id, back.salt, back.phase, back.started_at, back.phase_started_at) == (
            r.id,
            r.salt,
            1,
            r.started_at,
            61.0,
        )
        counts = await store.counters(r.id)
        assert counts["canary"].requests == 4_000_001  # the snapshot plus what was buffered while down
        assert [gw.arm(u) for u in users] == split
        await store.r.aclose()
        await store2.r.aclose()

    asyncio.run(go())
