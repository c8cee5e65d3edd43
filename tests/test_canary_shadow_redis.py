"""The shadow phase's pairs and paired counters in a real private Redis, shared by two gateway
processes' taps: a pair stored by one is joined by a feedback that reaches the other, at most
once; both flush into one pooled gate; a Redis that is down degrades (counted), never raises."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis
from servers import RedisProcess
from test_canary_shadow import CFG, SHADOW_PLAN, Arms, Pool

from ctr.bench.canary_sim import FakeClock
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.paired import PairedCounts
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.shadow import RedisShadowStore, Shadow
from ctr.serving.canary.state import Arm, RedisStore


@pytest.fixture()
def redis_proc() -> Iterator[RedisProcess]:
    p = RedisProcess()
    yield p
    p.close()


def client(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


async def _process(url: str, clock: FakeClock, pool: Pool) -> tuple[Controller, Shadow, CanaryRuntime]:
    """One gateway process's view: its own clients, the shared Redis."""
    r = client(url)
    store = RedisStore(r, prefix="t:shadow:")
    ctl = Controller(store, clock=clock)
    runtime = CanaryRuntime(store, ctl, clock=clock)
    tap = Shadow(Arms(runtime, pool), RedisShadowStore(r, prefix="t:shadow:"), sample=1.0, max_inflight=64, cfg=CFG)
    ctl.paired = tap.gate
    return ctl, tap, runtime


def test_pairs_join_across_processes_once_and_pool_in_one_gate(redis_proc: RedisProcess) -> None:
    async def go() -> None:
        clock = FakeClock(1000.0)
        pool = Pool(10.0)
        pool.gate.set()
        (ctl_a, tap_a, rt_a), (_, tap_b, rt_b) = [await _process(redis_proc.url, clock, pool) for _ in range(2)]
        await ctl_a.start(Arm("ctr_model:a"), Arm("ctr_model:b", ("http://c",)), SHADOW_PLAN)
        for rt, tap in ((rt_a, tap_a), (rt_b, tap_b)):
            await rt.sync()
            tap.refresh()
        x = np.zeros((1, 3), np.int64)
        rng = np.random.default_rng(0)
        for i in range(3000):
            tap_a.offer(f"r{i}", f"u{i}", ["a1"], x, [0.05])
            if len(tap_a.tasks) >= 64:
                await asyncio.gather(*tap_a.tasks)
        await asyncio.gather(*tap_a.tasks)
        joins = [await tap_b.join(f"r{i}", "a1", bool(rng.random() < 0.05)) for i in range(3000)]
        assert all(joins)
        assert not await tap_a.join("r0", "a1", True)  # the replay reaches the other process: nothing
        await tap_a.flush()
        await tap_b.flush()
        pooled = await tap_a.store.load(rt_a.rollout.id)  # type: ignore[union-attr]
        assert pooled.total("n") == 3000 and pooled.ops["stored"] == 3000 and pooled.ops["joined"] == 3000
        clock.t += 61
        d = await ctl_a.step()
        assert d is not None and d.action == "rollback" and "paired gate" in d.reason
        status = await tap_b.status()
        assert status is not None and status["pairs_joined"] == 3000 and status["verdict"] == "harm"
        for rt in (rt_a, rt_b):
            await rt.store.r.aclose()  # type: ignore[attr-defined]

    asyncio.run(go())


def test_pairs_expire_and_a_down_store_degrades(redis_proc: RedisProcess) -> None:
    async def go() -> None:
        store = RedisShadowStore(client(redis_proc.url), prefix="t:exp:")
        await store.put("r1", "id1", {"a1": (0.1, 0.2, 3)}, ttl_s=30)
        assert await store.take("r1", "id1", "a2") is None  # an ad that was not served
        assert 0 < await store.r.pttl(store._pair_key("r1", "id1")) <= 30_000  # Redis expires it (its own clock)
        await store.put("r1", "id2", {"a1": (0.1, 0.2, 3)}, ttl_s=60)
        assert await store.take("r1", "id2", "a1") == (0.1, 0.2, 3)
        delta = PairedCounts()
        delta.record(np.array([0.1]), np.array([0.2]), np.array([1.0]), np.array([3]))
        delta.ops["offered"] = 2
        await store.add("r1", delta)
        back = await store.load("r1")
        assert np.allclose(back.counts, delta.counts) and (back.hist == delta.hist).all() and back.ops["offered"] == 2
        redis_proc.kill()
        clock = FakeClock(0.0)
        ctl = Controller(RedisStore(store.r), clock=clock)
        runtime = CanaryRuntime(ctl.store, ctl, clock=clock)
        tap = Shadow(Arms(runtime, Pool()), store, sample=1.0)
        tap.rollout_id = "r1"
        assert not await tap.join("id3", "a1", True) and tap.delta.ops["join_errors"] == 1
        tap.delta.record(np.array([0.1]), np.array([0.2]), np.array([1.0]), np.array([3]))
        await tap.flush()  # kept for the next try
        assert tap.delta.total("n") == 1
        await store.r.aclose()

    asyncio.run(go())
