"""The model pool with fake replicas and a fake clock: assignment then coalescing per replica,
a failed coalesced call retried on another replica (one budget token per batch), ejection and
return through probes, per-replica breakers, DNS membership changes, and the gateway on top."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import numpy as np
import pytest
from helpers import FakeClock

from ctr.api.contract import PredictRequest
from ctr.model.segments import SegmentTable
from ctr.resilience.breaker import BreakerOpen, CircuitBreaker
from ctr.resilience.deadline import REMOTE_ERRORS
from ctr.resilience.retry import Retrier, RetryBudget
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway
from ctr.serving.pool import FixedSource, HealthConfig, ModelPool, PoolConfig, Status, UrlSource, parse_urls


class FakeReplica:
    """Answers x[:, 0] as float scores; `dead` refuses connections; each call advances the clock."""

    def __init__(self, name: str, clock: FakeClock, latency_s: float = 0.001) -> None:
        self.name, self.clock, self.latency_s = name, clock, latency_s
        self.dead = False
        self.calls: list[int] = []
        self.closed = False

    async def infer(self, x: np.ndarray) -> np.ndarray:
        await asyncio.sleep(0)
        self.clock.t += self.latency_s
        self.calls.append(len(x))
        if self.dead:
            raise aiohttp.ClientConnectionError("refused")
        return x[:, 0].astype(np.float32)

    async def ready(self) -> bool:
        return not self.dead

    async def close(self) -> None:
        self.closed = True


HEALTH = HealthConfig(window_s=5.0, min_calls=5, ejection_base_s=2.0, ejection_max_s=10.0, probe_passes=2)


def make_pool(names: list[str], policy: str = "round_robin", source=None, budget: RetryBudget | None = None):
    clock = FakeClock(100.0)
    replicas = {n: FakeReplica(n, clock) for n in names}

    def factory(url: str) -> FakeReplica:
        return replicas.setdefault(url, FakeReplica(url, clock))

    retrier = Retrier("model", REMOTE_ERRORS, budget or RetryBudget("model", 0.1, min_tokens=10), attempts=3)
    pool = ModelPool("test", source or FixedSource(names), factory, PoolConfig(policy=policy, health=HEALTH,
                     deadline_s=1.0), retrier, lambda n: CircuitBreaker(n, min_calls=5, clock=clock), clock,
                     random.Random(1))  # fmt: skip
    return pool, replicas, clock


def rows(n: int, v: int = 1) -> np.ndarray:
    return np.full((n, 3), v, dtype=np.int64)


def test_requests_are_assigned_then_coalesced_per_replica() -> None:
    """Six concurrent requests over two replicas (round robin): three to each, in at most two calls each."""

    async def go() -> None:
        pool, reps, _ = make_pool(["a", "b"])
        await pool.start(background=False)
        ys = await asyncio.gather(*(pool.submit(rows(2, v)) for v in range(6)))
        assert [list(y) for y in ys] == [[float(v)] * 2 for v in range(6)]
        assert sum(reps["a"].calls) == sum(reps["b"].calls) == 6
        assert len(reps["a"].calls) <= 2 and len(reps["b"].calls) <= 2

    asyncio.run(go())


def test_a_dead_replica_is_retried_elsewhere_then_ejected() -> None:
    """One of three refuses connections: every request still gets the model's answer (its batches
    retried on another replica), its breaker opens, and the passive check ejects it."""

    async def go() -> None:
        pool, reps, _ = make_pool(["a", "b", "c"])
        await pool.start(background=False)
        reps["b"].dead = True
        for v in range(30):
            assert list(await pool.submit(rows(1, v))) == [float(v)]
        pool.evaluate()
        state = {s["replica"]: s for s in pool.snapshot()}
        assert state["b"]["health"] == "ejected" and state["b"]["reason"] == "errors"
        assert state["b"]["breaker"] == "open"
        before = len(reps["b"].calls)
        await asyncio.gather(*(pool.submit(rows(1)) for _ in range(20)))
        assert len(reps["b"].calls) == before  # no traffic while ejected

    asyncio.run(go())


def test_a_failed_batch_spends_one_retry_token() -> None:
    """A coalesced call of five requests that fails once is retried once, as one call."""

    async def go() -> None:
        budget = RetryBudget("model", 0.0, min_tokens=3)
        pool, reps, _ = make_pool(["a", "b"], budget=budget)
        await pool.start(background=False)
        reps["a"].dead = True
        pool.members[0].coalescer.max_inflight = 1
        member = pool.members[0]
        ys = await asyncio.gather(*(member.coalescer.submit(rows(1, v)) for v in range(5)))
        assert [float(y[0]) for y in ys] == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert budget.tokens == 3 - len(reps["a"].calls)
        assert sum(reps["b"].calls) == 5

    asyncio.run(go())


def test_an_ejected_replica_comes_back_after_probes() -> None:
    """Ejected; after its ejection time it is probed, and only passing probes readmit it."""

    async def go() -> None:
        pool, reps, clock = make_pool(["a", "b", "c"])
        await pool.start(background=False)
        reps["c"].dead = True
        for _ in range(30):
            await pool.submit(rows(1))
        pool.evaluate()
        assert pool.members[2].health.status is Status.EJECTED
        clock.t += 2.0
        pool.evaluate()
        await pool.probe_all()  # still dead: no pass
        pool.evaluate()
        assert pool.members[2].health.status is Status.PROBING
        reps["c"].dead = False
        await pool.probe_all()
        await pool.probe_all()
        pool.evaluate()
        assert pool.members[2].health.status is Status.HEALTHY
        clock.t += 10.0  # the breaker's cooldown: a half-open trial closes it
        n = len(reps["c"].calls)
        for _ in range(9):
            await pool.submit(rows(1))
        assert len(reps["c"].calls) > n

    asyncio.run(go())


def test_all_breakers_open_is_a_breaker_open_failure() -> None:
    """Every replica down: the pool refuses with NoReplica (a BreakerOpen), and the gateway answers
    from the fallback table with model:breaker_open."""

    async def go() -> None:
        pool, reps, _ = make_pool(["a", "b"])
        await pool.start(background=False)
        for r in reps.values():
            r.dead = True
        for _ in range(20):
            with pytest.raises((*REMOTE_ERRORS, BreakerOpen)):
                await pool.submit(rows(1))
        with pytest.raises(BreakerOpen):
            await pool.submit(rows(1))
        table = SegmentTable({}, {}, 40.0, 1000.0)

        async def features(user_id, ad_ids, context, deadline):
            return rows(len(ad_ids)), []

        gw = Gateway(features, pool, Fallback(table), "m", 1.0)
        ctx = {"hour": 1, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"}
        out = await gw.predict(PredictRequest.model_validate({"user_id": "u1", "ad_ids": ["a1"], "context": ctx}))
        assert out.fallback and out.degraded == ["model:breaker_open"]

    asyncio.run(go())


def test_consistent_hash_sends_a_user_to_one_replica() -> None:
    """With consistent_hash, one user's sequential requests all go to the same replica."""

    async def go() -> None:
        pool, reps, _ = make_pool(["a", "b", "c"], policy="consistent_hash")
        await pool.start(background=False)
        for _ in range(10):
            await pool.submit(rows(1), key="u42")
        assert sorted(len(r.calls) for r in reps.values()) == [0, 0, 10]

    asyncio.run(go())


def test_dns_changes_add_and_retire_replicas() -> None:
    """A name resolving to more addresses adds replicas (probed in first), fewer retires them."""

    async def go() -> None:
        answers = [["10.0.0.1", "10.0.0.2"]]

        async def resolver(host: str, port: int) -> list[str]:
            return answers[-1]

        source = UrlSource(parse_urls("http://ctr-model:3000"), resolver)
        pool, reps, _ = make_pool([], source=source)
        await pool.start(background=False)
        assert [m.url for m in pool.members] == ["http://10.0.0.1:3000", "http://10.0.0.2:3000"]
        pool._tasks.append(asyncio.create_task(asyncio.sleep(0)))  # as if the loops run: new ones probe first
        answers.append(["10.0.0.2", "10.0.0.3"])
        await pool.refresh()
        assert [(m.url, m.slot.index) for m in pool.members] == [("http://10.0.0.2:3000", 1),
                                                                 ("http://10.0.0.3:3000", 0)]  # fmt: skip
        assert pool.members[1].health.status is Status.PROBING
        await pool.close()
        assert reps["http://10.0.0.1:3000"].closed

    asyncio.run(go())


def test_dns_failure_keeps_the_known_addresses() -> None:
    """A resolution that fails keeps the last answer instead of emptying the pool."""

    async def go() -> None:
        calls = []

        async def resolver(host: str, port: int) -> list[str]:
            calls.append(host)
            if len(calls) > 1:
                raise OSError("no DNS")
            return ["10.0.0.7"]

        source = UrlSource(parse_urls("http://ctr-model:3000,http://127.0.0.1:3101", [2.0]), resolver)
        assert await source.resolve() == [("http://10.0.0.7:3000", 2.0), ("http://127.0.0.1:3101", 1.0)]
        assert await source.resolve() == [("http://10.0.0.7:3000", 2.0), ("http://127.0.0.1:3101", 1.0)]

    asyncio.run(go())


@pytest.mark.parametrize(
    ("spec", "weights", "message"),
    [("ctr-model:3000", [], "is not http://host:port"), ("http://a:1", [1.0, 2.0], "2 weights for 1"),
     ("http://a:1", [0.0], "must be > 0")],
)  # fmt: skip
def test_bad_urls_are_clear_errors(spec: str, weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_urls(spec, weights)


def test_hedging_sends_a_late_call_to_a_second_replica() -> None:
    """CTR_HEDGE: a call not answered by its replica's recent p95 (1 ms here) goes to another
    replica too; the second answer wins, the stuck call is cancelled, one budget token is spent."""

    async def go() -> None:
        budget = RetryBudget("model", 0.0, min_tokens=3)
        pool, reps, clock = make_pool(["a", "b"], budget=budget)
        pool.config = PoolConfig(policy="round_robin", health=HEALTH, deadline_s=1.0, hedge=True)
        await pool.start(background=False)
        for _ in range(10):
            pool.members[0].health.record(clock(), True, 0.001)
        pool.evaluate()
        assert pool.members[0].health.p95_s == pytest.approx(0.001)
        stuck = asyncio.Event()

        async def hang(x: np.ndarray) -> np.ndarray:
            await stuck.wait()
            raise AssertionError("never answers")

        reps["a"].infer = hang  # type: ignore[method-assign]
        member = pool.members[0]
        y = await member.coalescer.submit(rows(2, 7))
        assert list(y) == [7.0, 7.0] and reps["b"].calls == [2]
        assert budget.tokens == 2
        assert (pool.members[1].slot.picks, pool.members[1].slot.outstanding) == (1, 0)  # the hedge's lease, released

    asyncio.run(go())


def test_a_second_pool_is_built_from_its_own_urls() -> None:
    """root.model_pool with `urls` (a canary arm) ignores CTR_MODEL_URLS and its weights."""
    from ctr.serving import root
    from ctr.settings import Settings

    s = Settings(model_urls="http://10.0.0.1:3000,http://10.0.0.2:3000", model_weights=[3.0, 1.0],
                 lb_policy="weighted")  # fmt: skip

    async def go() -> None:
        stable = root.model_pool(s)
        canary = root.model_pool(s, urls="http://10.0.1.1:3000", name="model-canary")
        await stable.start(background=False)
        await canary.start(background=False)
        assert [(m.url, m.slot.weight) for m in stable.members] == [("http://10.0.0.1:3000", 3.0),
                                                                    ("http://10.0.0.2:3000", 1.0)]  # fmt: skip
        assert [m.url for m in canary.members] == ["http://10.0.1.1:3000"]
        assert canary.members[0].breaker.name == "model-canary:0"
        await stable.close()
        await canary.close()

    asyncio.run(go())
