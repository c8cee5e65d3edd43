"""The shadow phase: the paired gate on joined pairs, plans that begin with a shadow phase,
the controller deciding it, and the tap that scores off the response path and joins feedback
at most once (in memory here; in a real Redis in test_canary_shadow_redis.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from ctr.bench.canary_sim import FakeClock
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.paired import PairedConfig, PairedCounts, auc, paired_gate, summary
from ctr.serving.canary.plan import Phase, Plan, default_plan
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.shadow import MemoryShadowStore, Shadow, keyed_draw
from ctr.serving.canary.state import Arm, MemoryStore

CFG = PairedConfig(min_pairs=2000, min_clicks=50)
SHADOW_PLAN = Plan((Phase(0.0, 60, shadow=True), Phase(0.05, 60), Phase(0.5, 60)), interval_s=10)


def pairs(n: int, scale: float = 1.0, seed: int = 0, noise: float = 0.0) -> PairedCounts:
    """n impressions with true CTR p (calibrated stable) and the canary's p x scale (+ logit noise)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(2, 38, n)
    q = np.clip(p * scale, 1e-6, 1 - 1e-6)
    if noise:
        z = np.log(q / (1 - q)) + rng.normal(0, noise, n)
        q = 1 / (1 + np.exp(-z))
    y = (rng.random(n) < p).astype(float)
    pc = PairedCounts()
    pc.record(p, q, y, rng.integers(0, 64, n))
    return pc


def test_identical_scores_are_ok_and_a_miscalibrated_canary_is_harm() -> None:
    """Same scores: the difference is 0 exactly (ok); scores x 3: far worse log loss (harm)."""
    assert paired_gate(pairs(1000), CFG).verdict == "insufficient"
    same = paired_gate(pairs(20_000), CFG)
    assert same.verdict == "ok" and same.estimate == 0.0
    bad = paired_gate(pairs(20_000, scale=3.0), CFG)
    assert bad.verdict == "harm" and bad.lo > CFG.margin


def test_a_small_difference_is_seen_paired_that_an_unpaired_variance_misses() -> None:
    """Scores x 1.5 (3 % more log loss) on 30 k pairs: the paired interval excludes the margin,
    the same data read as two independent samples does not (the mutation check's principle)."""
    from ctr.serving.canary import paired

    pc = pairs(30_000, scale=1.5, seed=1)
    assert paired_gate(pc, CFG).verdict == "harm"
    unpaired = dataclasses.replace(CFG, variance=paired.unpaired_variance)
    assert paired_gate(pc, unpaired).verdict == "inconclusive"


def test_summary_reports_calibration_and_auc() -> None:
    s = summary(pairs(20_000, scale=2.0), CFG)
    assert s["pairs_joined"] == 20_000 and s["verdict"] == "harm"
    assert s["calibration_canary"] == pytest.approx(s["calibration_stable"] / 2, rel=1e-6)
    assert s["auc_stable"] == pytest.approx(s["auc_canary"], abs=0.01)  # x 2 keeps the ranking
    assert "salt" not in s and "urls" not in s


def test_auc_from_histograms() -> None:
    h = np.zeros((2, 200), np.int64)
    h[0, 10], h[1, 20] = 5, 5  # every click above every non-click
    assert auc(h) == 1.0
    h[1, 20], h[1, 10] = 0, 5  # ties: half
    assert auc(h) == 0.5


@pytest.mark.parametrize(
    "phases, message",
    [
        ((Phase(0.0, 60, shadow=True),), "split phases must follow"),
        ((Phase(0.01, 60), Phase(0.0, 60, shadow=True)), "rise strictly"),
    ],
)
def test_a_shadow_phase_only_comes_first(phases: tuple[Phase, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Plan(phases)


def test_shadow_plans_round_trip_and_route_no_user() -> None:
    with pytest.raises(ValueError, match="share is 0"):
        Phase(0.01, 60, shadow=True)
    with pytest.raises(ValueError, match="unknown gates"):
        Phase(0.01, 60, ("paired",))
    plan = default_plan(0.01, shadow_s=600)
    assert plan.is_shadow(0) and not plan.is_shadow(1) and plan.required(0) == ("paired",)
    assert plan.min_duration_s(0) == 6.0 and plan.share(0, 0, 0) == 0.0
    assert Plan.from_dict(plan.to_dict()) == plan
    assert not default_plan().is_shadow(0)


class Pool:
    """A canary pool whose answers the test releases (or fails)."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale, self.gate, self.calls = scale, asyncio.Event(), 0

    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray:
        self.calls += 1
        await self.gate.wait()
        return np.full(len(x), 0.05 * self.scale)


class Arms:
    def __init__(self, runtime: CanaryRuntime, pool: Pool | None) -> None:
        self.runtime, self.canary, self.shadow_pool = runtime, pool, pool


async def _rig(scale: float = 1.0, max_inflight: int = 2) -> tuple[Controller, Shadow, Pool, FakeClock]:
    clock = FakeClock(1000.0)
    store = MemoryStore(clock)
    ctl = Controller(store, clock=clock)
    runtime = CanaryRuntime(store, ctl, clock=clock)
    pool = Pool(scale)
    tap = Shadow(Arms(runtime, pool), MemoryShadowStore(clock), sample=1.0, max_inflight=max_inflight,
                 cfg=CFG)  # fmt: skip
    ctl.paired = tap.gate
    await ctl.start(Arm("ctr_model:a"), Arm("ctr_model:b", ("http://c",)), SHADOW_PLAN)
    await runtime.sync()
    tap.refresh()
    return ctl, tap, pool, clock


def test_the_tap_scores_off_the_response_path_drops_when_full_and_joins_once() -> None:
    """offer() returns at once (the canary's answer still pending); a third offer over the cap of 2
    is dropped and counted; a pair joins its feedback once, a replay or an unserved ad not at all."""

    async def go() -> None:
        ctl, tap, pool, _ = await _rig()
        x = np.zeros((2, 3), np.int64)
        for rid in ("r1", "r2", "r3"):
            tap.offer(rid, "u1", ["a1", "a2"], x, [0.04, 0.06])
        assert len(tap.tasks) == 2 and tap.delta.ops["dropped"] == 1 and tap.delta.ops["offered"] == 3
        pool.gate.set()
        await asyncio.gather(*tap.tasks)
        assert tap.delta.ops["stored"] == 2
        assert await tap.join("r1", "a1", True)
        assert not await tap.join("r1", "a1", True)  # replayed
        assert not await tap.join("r1", "a9", False)  # not served
        assert not await tap.join("r3", "a1", False)  # dropped: never scored
        assert tap.delta.total("n") == 1 and tap.delta.ops["joined"] == 1
        await tap.flush()
        status = await tap.status()
        assert status is not None and status["pairs_joined"] == 1 and status["shadow_calls"]["dropped"] == 1
        assert ctl.store.rollout is not None and ctl.store.rollout.share == 0.0  # no user sees the canary

    asyncio.run(go())


@pytest.mark.parametrize("scale, action, share", [(1.0, "advance", 0.05), (10.0, "rollback", 0.0)])
def test_the_controller_decides_the_shadow_phase_by_the_paired_gate(scale: float, action: str, share: float) -> None:
    """Same scores: the paired gate shows non-inferiority and the split's first phase follows;
    scores x 10: rolled back from the shadow phase by the paired gate, before any user saw it."""

    async def go() -> None:
        ctl, tap, pool, clock = await _rig(scale, max_inflight=10_000)
        pool.gate.set()
        rng = np.random.default_rng(0)
        for i in range(3000):
            tap.offer(f"r{i}", f"u{i}", ["a1"], np.zeros((1, 3), np.int64), [0.05])
        await asyncio.gather(*tap.tasks)
        for i in range(3000):
            await tap.join(f"r{i}", "a1", bool(rng.random() < 0.05))
        await tap.flush()
        clock.t += 61
        d = await ctl.step()
        assert d is not None and d.action == action, d
        r = ctl.store.rollout
        assert r is not None and r.share == share and math.isclose(share, r.share)
        if action == "rollback":
            assert "paired gate" in r.reason

    asyncio.run(go())


def test_without_paired_evidence_the_shadow_phase_never_advances() -> None:
    async def go() -> None:
        clock = FakeClock(0.0)
        ctl = Controller(MemoryStore(clock), clock=clock)
        await ctl.start(Arm("a"), Arm("b"), SHADOW_PLAN)
        clock.t += 61
        d = await ctl.step()
        assert d is not None and d.action == "wait" and "paired insufficient" in d.reason

    asyncio.run(go())


@pytest.mark.parametrize("shadow_s, ok", [(600, True), (0, True), (-1, False), ("1h", False), (True, False)])
def test_the_admin_api_takes_a_shadow_phase(shadow_s: object, ok: bool) -> None:
    """POST /admin/canary/start {"plan_scale": x, "shadow_s": s}: a shadow phase of s x scale first."""
    from ctr.api.canary import _plan

    if not ok:
        with pytest.raises(ValueError, match="shadow_s"):
            _plan({"plan_scale": 0.5, "shadow_s": shadow_s})
        return
    plan = _plan({"plan_scale": 0.5, "shadow_s": shadow_s})
    assert plan.is_shadow(0) == bool(shadow_s) and (not shadow_s or plan.min_duration_s(0) == 300)


def test_ctr_canary_status_shows_the_shadow_phase() -> None:
    from ctr.cli.canary import _summary

    s = {"id": "r1", "status": "running", "phase": 0, "share": 0.0, "stable": {"tag": "a"},
         "canary": {"tag": "b", "urls": []}, "store": "ok",
         "shadow": {"pairs_joined": 2400, "verdict": "harm", "logloss_diff_rel": 0.066,
                    "logloss_diff_interval": [0.03, 0.1]}}  # fmt: skip
    assert "shadow 2,400 pairs joined, harm: log loss +6.60 % [+3.00 %, +10.00 %]" in _summary(s)


def test_a_failed_flush_across_a_new_rollout_keeps_each_rollouts_pairs_apart() -> None:
    """Pairs joined in rollout A, a flush that fails, then rollout B: A's pairs land in A, none in
    B (one pooled delta used to be written to whichever rollout was current); a bad sync round
    does not end the loop."""

    async def go() -> None:
        ctl, tap, pool, _ = await _rig()
        a = tap.rollout_id
        assert a is not None
        pool.gate.set()
        tap.offer("r1", "u1", ["a1"], np.zeros((1, 3), np.int64), [0.05])
        await asyncio.gather(*tap.tasks)
        assert await tap.join("r1", "a1", True)
        real_add = tap.store.add

        async def down(rollout_id: str, delta: Any) -> None:
            raise ConnectionError("store down")

        tap.store.add = down  # type: ignore[method-assign]
        await tap.flush()  # kept for the next try
        await ctl.rollback(by="test", reason="next")
        await ctl.start(Arm("ctr_model:a"), Arm("ctr_model:c", ("http://c",)), SHADOW_PLAN)
        await tap.arms.runtime.sync()
        tap.refresh()
        b = tap.rollout_id
        assert b is not None and b != a
        tap.store.add = real_add  # type: ignore[method-assign]
        await tap.flush()
        assert (await tap.store.load(a)).total("n") == 1 and (await tap.store.load(b)).total("n") == 0

        calls = 0

        async def broken() -> None:
            nonlocal calls
            calls += 1
            raise ValueError("a corrupt plan")

        tap.sync = broken  # type: ignore[method-assign]
        stop = asyncio.Event()
        loop = asyncio.create_task(tap.run(stop, 0.001))
        while calls < 3:
            await asyncio.sleep(0.001)
        stop.set()
        await loop

    asyncio.run(go())


class CountingStore(MemoryShadowStore):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.takes = 0

    async def take(self, rollout_id: str, request_id: str, ad_id: str) -> Any:
        self.takes += 1
        return await super().take(rollout_id, request_id, ad_id)


def test_feedback_on_an_id_not_sampled_costs_the_store_nothing_in_any_process() -> None:
    """The sample is drawn from the request id, keyed: two taps with the request-id key (two
    gateway processes) draw alike, so feedback reaching either process joins the pairs of the
    sampled ids and looks up no other (the old code's random draw made every feedback of a shadow
    phase a store round trip: 400 of 400 here, now only the sampled share's)."""

    async def go() -> None:
        _, first, pool, clock = await _rig()
        store = CountingStore(clock)
        draw = keyed_draw(b"k" * 32)
        taps = [Shadow(first.arms, store, sample=0.25, max_inflight=1000, cfg=CFG, draw=draw) for _ in range(2)]
        for tap in taps:
            tap.refresh()
        x = np.zeros((1, 3), np.int64)
        ids = [f"id{i}" for i in range(400)]
        for i, rid in enumerate(ids):
            taps[i % 2].offer(rid, "u1", ["a1"], x, [0.05])
        pool.gate.set()
        await asyncio.gather(*taps[0].tasks, *taps[1].tasks)
        sampled = [rid for rid in ids if draw(rid) < 0.25]
        assert 60 < len(sampled) < 140 and len(store.pairs) == len(sampled)
        joined = [await taps[(i + 1) % 2].join(rid, "a1", True) for i, rid in enumerate(ids)]  # the other process
        assert sum(joined) == len(sampled) and store.takes == len(sampled)
        assert keyed_draw(b"j" * 32)("id1") != draw("id1")  # another key, another draw

    asyncio.run(go())
