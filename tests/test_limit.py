"""The adaptive concurrency limit (AIMD, fake clock) and admission at the /predict edge:
above the limit a request is answered at once from the segment table, or refused with 503."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from helpers import FakeClock
from starlette.testclient import TestClient
from test_gateway import CTX, REQ, TABLE, gateway

from ctr.api.edge import Edge
from ctr.api.routes import make_app
from ctr.degraded import Reason
from ctr.observe.pauses import thread_busy_s
from ctr.resilience.limit import AimdLimit
from ctr.serving.gateway import Overloaded
from ctr.serving.placement import loop_bound
from ctr.settings import Settings


def limiter(clock: FakeClock, **kw: Any) -> AimdLimit:
    return AimdLimit(**{"initial": 10, "min_limit": 2, "max_limit": 20, "latency_target_s": 0.025,
                        "clock": clock, **kw})  # fmt: skip


def test_acquire_stops_at_the_limit_and_release_frees_a_slot() -> None:
    """Exactly `limit` leases are granted; the next is refused until one is released."""
    lim = limiter(FakeClock())
    leases = [lim.try_acquire() for _ in range(10)]
    assert all(leases) and lim.try_acquire() is None
    leases[0].ignore()  # type: ignore[union-attr]
    assert lim.inflight == 9 and lim.try_acquire() is not None


def test_fast_successes_under_load_raise_the_limit_by_one_each() -> None:
    """A success while the limit is in use (in flight * 2 >= limit) adds one, up to max_limit."""
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(30):
        leases = [lim.try_acquire() for _ in range(lim.limit)]
        clock.t += 0.005
        leases[-1].success()  # type: ignore[union-attr]  # acquired with the limit full
        for le in leases[:-1]:
            le.ignore()  # type: ignore[union-attr]
    assert lim.limit == 20


def test_an_idle_service_does_not_grow_its_limit() -> None:
    """One request at a time (in flight * 2 < limit) leaves the limit where it is."""
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(50):
        lease = lim.try_acquire()
        clock.t += 0.001
        lease.success()  # type: ignore[union-attr]
    assert lim.limit == 10


def test_a_drop_or_a_slow_success_cuts_the_limit_once_per_interval() -> None:
    """Late requests cut by 10 %, at most once per decrease interval, never below min_limit."""
    clock = FakeClock()
    lim = limiter(clock, initial=20)
    leases = [lim.try_acquire() for _ in range(5)]
    clock.t += 0.030  # slower than the 25 ms target
    for le in leases:
        le.success()  # type: ignore[union-attr]
    assert lim.limit == 18  # one cut for the burst, not five
    clock.t += 0.025
    lim.try_acquire().dropped()  # type: ignore[union-attr]
    assert lim.limit == 16
    for _ in range(40):
        clock.t += 0.025
        lim.try_acquire().dropped()  # type: ignore[union-attr]
    assert lim.limit == 2


def test_a_lease_reports_once() -> None:
    """A second report of the same lease changes nothing."""
    lim = limiter(FakeClock())
    lease = lim.try_acquire()
    lease.success()  # type: ignore[union-attr]
    lease.dropped()  # type: ignore[union-attr]
    assert lim.inflight == 0 and lim.limit == 10


class FakeWork:
    """The loop thread's busy seconds (`serve` adds `per_request` for each request it serves)."""

    def __init__(self, per_request: float) -> None:
        self.per_request, self.s = per_request, 0.0

    def __call__(self) -> float:
        return self.s


def serve(lim: AimdLimit, clock: FakeClock, work: FakeWork, n: int, every_s: float = 0.005) -> None:
    """`n` requests one after another, each `every_s` long and costing `work.per_request`."""
    for _ in range(n):
        lease = lim.try_acquire()
        clock.t += every_s
        work.s += work.per_request
        lease.success()  # type: ignore[union-attr]


def test_the_limit_never_falls_below_what_the_process_works_off_within_the_target() -> None:
    """At 1 ms of work a request and a 25 ms target, 25 requests in flight finish in time: a
    burst of late answers (a stall of the machine) cuts the limit to 25, not to min_limit, and
    a burst of 20 that follows is admitted whole. (Before: cut to min_limit 2, 18 of the 20
    shed, at a load the process works off in 20 ms.)"""
    clock, work = FakeClock(), FakeWork(0.001)
    lim = limiter(clock, initial=4, max_limit=64, work=work)
    serve(lim, clock, work, 200)  # a second at 200/s: the cost is measured
    assert lim.cost_s == pytest.approx(0.001) and lim.floor == 25 and lim.limit >= 25
    for _ in range(40):  # a long stall: every answer late
        clock.t += 0.030
        work.s += work.per_request
        lim.try_acquire().dropped()  # type: ignore[union-attr]
    assert lim.limit == 25
    burst = [lim.try_acquire() for _ in range(20)]
    assert all(burst)


def test_the_floor_follows_the_cost_and_stays_within_the_bounds() -> None:
    """Dearer requests lower the floor (never below min_limit); cheaper ones raise it (never
    above max_limit); with no work reading the floor is min_limit, as plain AIMD."""
    clock, work = FakeClock(), FakeWork(0.05)
    lim = limiter(clock, work=work)
    serve(lim, clock, work, 200)
    assert lim.floor == 2
    work.per_request = 0.0001
    serve(lim, clock, work, 2000)
    assert lim.floor == 20 and lim.limit == 20
    plain = limiter(clock)
    serve(plain, clock, work, 200)
    assert plain.floor == 2 and plain.cost_s is None


@pytest.mark.parametrize(
    ("env", "floored"),
    [({}, True), ({"CTR_LOCAL_FORWARD": "thread"}, False), ({"CTR_MODEL_URLS": "http://127.0.0.1:1"}, False),
     ({"CTR_MODEL_REPLICA": "in-graph"}, False), ({"CTR_FEATURES_REMOTE": "true"}, False)],
)  # fmt: skip
def test_the_floor_reads_the_loop_threads_work_only_where_all_work_runs_there(
    env: dict[str, str], floored: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU default (model and features in process, forward on the loop) measures the loop
    thread's busy time, which grows with work; where the model or the features run elsewhere
    their time is not the loop's, and the limit is plain AIMD."""
    monkeypatch.setenv("CTR_MODEL_REPLICA", "local")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings()
    lim = AimdLimit.from_settings(settings, loop_bound(settings))
    assert (lim.work is thread_busy_s) is floored and (lim.work is None) is not floored
    t0 = thread_busy_s()
    sum(i * i for i in range(200_000))
    assert thread_busy_s() > t0 > 0


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"initial": 1, "min_limit": 2}, "min_limit <= initial"), ({"backoff_ratio": 1.0}, "backoff_ratio"),
     ({"latency_target_s": 0}, "latency_target_s")],
)  # fmt: skip
def test_bad_config_is_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AimdLimit(**kw)


def slow_model(release: asyncio.Event) -> Any:
    async def model(x: np.ndarray) -> np.ndarray:
        await release.wait()
        return np.full(len(x), 0.3, dtype=np.float32)

    return model


def test_above_the_limit_the_segment_table_answers_at_once() -> None:
    """With 2 requests in flight and a limit of 2, a third is answered from the table, shed."""

    async def go() -> tuple[Any, list[Any]]:
        release = asyncio.Event()
        adm = gateway(slow_model(release), limiter=AimdLimit(2, 1, 4, clock=FakeClock()))
        held = [asyncio.create_task(adm.predict(REQ, f"r{i}")) for i in range(2)]
        await asyncio.sleep(0)
        shed = await adm.predict(REQ, "r3")  # does not wait for the model
        release.set()
        return shed, await asyncio.gather(*held)

    shed, held = asyncio.run(go())
    assert shed.fallback is True and shed.degraded == [Reason.SHED] and shed.arm == "stable" and shed.request_id
    assert shed.scores == [TABLE.score(CTX["device_type"], CTX["site_category"])] * 2
    assert all(not p.fallback for p in held)


def test_reject_mode_answers_503_with_retry_after() -> None:
    """CTR_OVERLOAD=reject: a shed request is a 503 with Retry-After, through the real route."""
    release = asyncio.Event()
    adm = gateway(slow_model(release), limiter=AimdLimit(1, 1, 4, clock=FakeClock()), overload="reject")
    adm.limiter.try_acquire()  # type: ignore[union-attr]  # the one slot is taken
    app = make_app(Edge(adm, max_ads=10))
    body = {"user_id": "u1", "ad_ids": ["a1"], "context": CTX}
    with TestClient(app) as client:
        r = client.post("/predict", json=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "overloaded" in r.json()["error"]
    with pytest.raises(Overloaded):
        adm.shed(REQ, None)


def test_late_answers_cut_the_limit() -> None:
    """A request that fell back on its deadline reports a drop: the limit shrinks."""

    async def never(x: np.ndarray) -> np.ndarray:
        await asyncio.Event().wait()  # never answers: the deadline decides
        raise AssertionError("unreachable")

    lim = AimdLimit(10, 2, 20, latency_target_s=0.5)
    adm = gateway(never, deadline_s=0.01, limiter=lim)
    p = asyncio.run(adm.predict(REQ))
    assert p.fallback and "model:timeout" in p.degraded and lim.limit == 9 and lim.inflight == 0
