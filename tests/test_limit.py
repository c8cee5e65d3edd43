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
from ctr.resilience.limit import AimdLimit
from ctr.serving.gateway import Overloaded


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


def serve(lim: AimdLimit, clock: FakeClock, n: int, every_s: float, late: bool = False) -> None:
    """`n` requests one after another, one completing every `every_s` (late: each a drop)."""
    for _ in range(n):
        lease = lim.try_acquire()
        clock.t += every_s
        if late:
            lease.dropped()  # type: ignore[union-attr]
        else:
            lease.success()  # type: ignore[union-attr]


def test_a_stall_does_not_cut_below_what_completes_within_the_target() -> None:
    """At 1,000 completions a second and a 25 ms target, 25 in flight wait about the target:
    a stall that makes 25 answers late cuts the limit to about 25 (the stall lowers the rate
    it measures a little), not to min_limit, and a burst of 20 that follows is admitted whole.
    (Before: the limit stayed at its start, 4, one request at a time never growing it, and 16
    of the 20 were shed.)"""
    clock = FakeClock()
    lim = limiter(clock, initial=4, max_limit=64)
    serve(lim, clock, 1000, 0.001)
    assert lim.rate == pytest.approx(1000, rel=0.01) and lim.floor == 25 and lim.limit >= 25
    stalled = [lim.try_acquire() for _ in range(25)]
    clock.t += 0.030
    for lease in stalled:
        lease.dropped()  # type: ignore[union-attr]
    assert 20 <= lim.limit <= 25
    assert all(lim.try_acquire() for _ in range(20))


def test_a_slow_dependency_does_not_hold_the_limit_up() -> None:
    """Every answer late, 100 a second (a saturated feature tier or model replica, whatever
    the loop's own cost): the floor is 100 x 25 ms = 2.5, so the drops cut the limit down to
    min_limit, as plain AIMD does."""
    clock = FakeClock()
    lim = limiter(clock, initial=20)
    serve(lim, clock, 300, 0.01, late=True)
    assert lim.floor == 2 and lim.limit == 2


def test_the_floor_falls_at_once_with_the_rate_and_rises_slowly() -> None:
    """Capacity that falls (the machine slows, a dependency saturates) lowers the floor on the
    next reading, so the cuts it would block go through; a rise is followed by an EWMA."""
    clock = FakeClock()
    lim = limiter(clock, max_limit=64)
    serve(lim, clock, 1000, 0.001)
    assert lim.floor == 25
    serve(lim, clock, 30, 0.01)  # a third of a second at 100 a second
    assert lim.floor == 2
    serve(lim, clock, 260, 0.001)  # back at 1,000 a second: about 30 % of the way up a reading
    assert 2 < lim.floor < 25


def test_the_floor_follows_the_rate_within_the_bounds() -> None:
    """Few completions: the floor is min_limit; many: max_limit at most."""
    clock = FakeClock()
    lim = limiter(clock)
    serve(lim, clock, 100, 0.025)
    assert lim.floor == 2
    serve(lim, clock, 20_000, 0.0001)
    assert lim.floor == 20 and lim.limit == 20


@pytest.mark.parametrize(
    ("kw", "message"),
    [({"initial": 1, "min_limit": 2}, "min_limit <= initial"), ({"backoff_ratio": 1.0}, "backoff_ratio"),
     ({"latency_target_s": 0}, "latency_target_s"), ({"rate_every_s": 0}, "rate_every_s")],
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
