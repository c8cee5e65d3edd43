"""The rollout controller under a fake clock: phases advance only on evidence, harm rolls
back at once and says why, timeouts roll back or hold, manual actions, a ramp plan."""

from __future__ import annotations

import asyncio

import pytest

from ctr.bench.canary_sim import FakeClock
from ctr.serving.canary.controller import CanaryError, Controller
from ctr.serving.canary.counts import Counts
from ctr.serving.canary.plan import Phase, Plan, default_plan, ramp_plan
from ctr.serving.canary.state import Arm, MemoryStore

STABLE, CANARY = Arm("ctr_model:a", ("http://s:3000",)), Arm("ctr_model:b", ("http://c:3000",))
PLAN = Plan((Phase(0.01, 60, ("errors", "latency")), Phase(0.5, 120)), interval_s=10)


def stats(
    n: int, error_rate: float = 0.0005, ctr: float = 0.05, calib: float = 1.0, lat_ms: float = 3.0
) -> dict[str, float]:
    return dict(
        requests=n,
        errors=int(n * error_rate),
        impressions=n,
        clicks=int(n * ctr),
        scored=n,
        scored_clicks=int(n * ctr),
        pred_sum=n * ctr / calib,
        latency_ms=lat_ms,
    )


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def feed(store: MemoryStore, rid: str, canary: dict[str, float], stable: dict[str, float]) -> None:
    """One interval's counts, in the current phase's stratum (what a gateway records)."""
    stratum = f"{store.rollout.phase if store.rollout else 0}:0"
    await store.add(rid, Counts().put("canary", stratum, **canary).put("stable", stratum, **stable))


def test_good_canary_walks_every_phase_to_promotion() -> None:
    """Evidence of non-inferiority plus the minimum time advance each phase; the last promotes."""

    async def go() -> list[str]:
        clock = FakeClock(1000.0)
        store = MemoryStore(clock)
        ctl = Controller(store, clock=clock)
        r = await ctl.start(STABLE, CANARY, PLAN)
        assert (r.share, r.phase, r.status) == (0.01, 0, "running")
        actions = []
        for _ in range(40):
            await feed(store, r.id, stats(400_000), stats(4_000_000))
            clock.t += 10
            d = await ctl.step()
            actions.append(d.action if d else "-")
            r = await store.load()
            if not r.active:
                break
        assert r.status == "promoted" and r.share == 1.0
        return actions

    actions = run(go())
    assert actions.count("advance") == 1 and actions[-1] == "promote"
    assert actions.index("advance") == 5  # phase 0 lasts its 60 s minimum, not less


def test_harm_rolls_back_at_once_and_records_the_gate_and_interval() -> None:
    """1 % errors: rolled back on the first look with enough data, share 0, reason names the gate."""

    async def go() -> None:
        clock = FakeClock(0.0)
        store = MemoryStore(clock)
        ctl = Controller(store, clock=clock)
        r = await ctl.start(STABLE, CANARY, PLAN)
        await feed(store, r.id, stats(50_000, error_rate=0.01), stats(5_000_000))
        clock.t += 10
        d = await ctl.step()
        assert d is not None and d.action == "rollback" and d.gate is not None and d.gate.gate == "errors"
        r = await store.load()
        assert r.status == "rolled_back" and r.share == 0.0 and "errors gate" in r.reason
        last = r.history[-1]
        assert last["gate"]["gate"] == "errors" and len(last["gate"]["interval"]) == 2
        assert last["gate"]["interval"][0] > 0.001  # the whole interval beyond the margin

    run(go())


@pytest.mark.parametrize(("on_timeout", "status"), [("rollback", "rolled_back"), ("hold", "held")])
def test_inconclusive_past_the_maximum_phase_time(on_timeout: str, status: str) -> None:
    """Too little traffic to prove anything: waits, then rolls back or holds at max_phase_factor x duration."""

    async def go() -> tuple[str, float]:
        clock = FakeClock(0.0)
        store = MemoryStore(clock)
        plan = Plan((Phase(0.01, 60),), interval_s=10, max_phase_factor=2, on_timeout=on_timeout)  # type: ignore[arg-type]
        ctl = Controller(store, clock=clock)
        r = await ctl.start(STABLE, CANARY, plan)
        while r.status == "running":
            await feed(store, r.id, stats(500), stats(50_000))
            clock.t += 10
            await ctl.step()
            r = await store.load()
        return r.status, clock.t

    assert run(go()) == (status, 120.0)


def test_manual_pause_stops_the_phase_clock_and_promote_rollback_end_it() -> None:
    async def go() -> None:
        clock = FakeClock(0.0)
        store = MemoryStore(clock)
        ctl = Controller(store, clock=clock)
        r = await ctl.start(STABLE, CANARY, PLAN)
        with pytest.raises(CanaryError, match="is running"):
            await ctl.start(STABLE, CANARY, PLAN)
        clock.t = 30
        r = await ctl.pause(by="alice")
        assert r.status == "paused" and await ctl.step() is None  # a paused rollout is not evaluated
        clock.t = 530
        r = await ctl.resume()
        assert r.phase_started_at == 500.0  # 30 s of the phase were spent before the pause
        r = await ctl.promote()
        assert r.status == "promoted" and r.share == 1.0
        with pytest.raises(CanaryError, match="cannot rollback"):
            await ctl.rollback()
        assert [h["action"] for h in r.history] == ["start", "pause", "resume", "promote"]

    run(go())


def test_default_plan_and_ramp() -> None:
    """The reference design's phases; a ramp grows linearly and holds until the gates pass."""
    plan = default_plan()
    assert [(p.share, p.duration_s) for p in plan.phases] == [(0.01, 3600), (0.05, 7200), (0.2, 14400), (0.5, 28800)]
    assert default_plan(scale=1 / 60).phases[0].duration_s == 60
    assert Plan.from_dict(plan.to_dict()) == plan
    ramp = ramp_plan(0.01, 0.1)
    assert ramp.share(0, 0, 0) == 0.01 and ramp.share(0, 0, 3600) == pytest.approx(0.11)
    assert ramp.share(0, 0, 100 * 3600) == 0.5 and ramp.share(1, 0, 0) == 1.0
    with pytest.raises(ValueError, match="rise strictly"):
        Plan((Phase(0.2, 1), Phase(0.1, 1)))


def test_a_held_rollout_still_rolls_back_on_harm_and_resume_gives_a_new_window() -> None:
    """Held (inconclusive past the maximum time) does not advance, but harm still rolls it back."""

    async def go() -> None:
        clock = FakeClock(0.0)
        store = MemoryStore(clock)
        ctl = Controller(store, clock=clock)
        plan = Plan((Phase(0.01, 60),), interval_s=10, max_phase_factor=2)
        r = await ctl.start(STABLE, CANARY, plan)
        assert plan.on_timeout == "hold"
        while r.status == "running":
            await feed(store, r.id, stats(500), stats(50_000))
            clock.t += 10
            await ctl.step()
            r = await store.load()
        assert r.status == "held"
        r = await ctl.resume()
        assert (r.status, r.phase_started_at) == ("running", clock.t)
        r = await ctl.pause()
        r = await store.transition(lambda cur: cur.with_(status="held"))  # type: ignore[union-attr]
        await feed(store, r.id, stats(50_000, error_rate=0.02), stats(50_000))
        clock.t += 10
        d = await ctl.step()
        assert d is not None and d.action == "rollback" and (await store.load()).status == "rolled_back"

    run(go())


def test_a_ramp_grows_linearly_then_promotes_on_evidence() -> None:
    """Traffic(t) = min(hold share, p0 + r t) while ramping; promotion once the gates pass."""

    async def go() -> list[float]:
        clock = FakeClock(0.0)
        store = MemoryStore(clock)
        ctl = Controller(store, clock=clock)
        r = await ctl.start(STABLE, CANARY, ramp_plan(0.1, 0.2 * 60, interval_s=60))  # +20 pp a minute
        shares = [r.share]
        while r.status == "running":
            await feed(store, r.id, stats(4_000_000), stats(40_000_000))
            clock.t += 60
            await ctl.step()
            r = await store.load()
            shares.append(r.share)
        assert r.status == "promoted"
        return shares

    shares = run(go())
    assert shares == [0.1, pytest.approx(0.3), 1.0]  # at 120 s it would reach its 50 % hold: the gates pass


def test_one_stall_in_the_first_minute_does_not_roll_back_but_a_slow_canary_does() -> None:
    """Defect 3: one 1-second stall (1 s of canary requests at +1 s) in the first minute at 1 %
    rolled the old gate back; latency harm must now last `latency_persist_s` (3 looks here),
    while a canary slow at every request is still rolled back by the latency gate."""

    async def go(stall_only: bool) -> tuple[str, float]:
        clock = FakeClock(0.0)
        store = MemoryStore(clock)
        ctl = Controller(store, clock=clock)
        plan = Plan((Phase(0.01, 600, ("errors", "latency")), Phase(0.5, 600)), interval_s=60)
        r = await ctl.start(STABLE, CANARY, plan)
        for look in range(10):
            canary = stats(6_000)
            if stall_only and look == 0:
                canary = dict(stats(5_900), latency_ms=3.0)
                await feed(store, r.id, stats(100, lat_ms=1003.0), stats(0))
            elif not stall_only:
                canary = stats(6_000, lat_ms=30.0)
            await feed(store, r.id, canary, stats(594_000))
            clock.t += 60
            await ctl.step()
            r = await store.load()
            if not r.active:
                break
        return r.status, clock.t

    assert run(go(stall_only=True))[0] == "running"
    status, t = run(go(stall_only=False))
    assert status == "rolled_back" and t == 240.0  # harm from the first look, persisting 180 s
