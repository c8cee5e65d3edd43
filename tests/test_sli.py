"""SLIs over sliding windows, the error-budget burn rates and the multi-window page
condition, on a fake clock (no test sleeps)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FakeClock
from prometheus_client import REGISTRY

from ctr.observe import sli
from ctr.observe.sli import Objectives, SliRecorder


def traffic(rec: SliRecorder, clock: FakeClock, seconds: int, rps: int, result: str = "model", arm: str = "stable",
            latency_s: float = 0.002, reason: str | None = None) -> None:  # fmt: skip
    """`rps` requests a second for `seconds`, advancing the clock."""
    for _ in range(seconds):
        for _ in range(rps):
            rec.record(arm, result, latency_s, reason)
        clock.t += 1


def test_availability_and_model_scored_follow_the_reference_definitions() -> None:
    """availability = successful / requests; model-scored = answers not from the fallback / requests."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(clock=clock)
    for _ in range(90):
        rec.record("stable", "model", 0.002)
    for _ in range(8):
        rec.record("stable", "fallback", 0.002, "model:timeout")
    for _ in range(2):
        rec.record("none", "error", 0.002)
    w = rec.window(60)
    assert (w.requests, w.model, w.fallback, w.errors) == (100, 90, 8, 2)
    assert w.availability == pytest.approx(0.98)
    assert w.model_scored == pytest.approx(0.90)
    assert w.reasons == {"model:timeout": 8}
    assert rec.window(60, "stable").availability == 1.0  # errors before an arm was chosen are not stable's


def test_quantiles_are_within_the_bucket_resolution() -> None:
    """p50 and p99 from the log buckets are within 10 % of the exact quantiles."""
    rng = np.random.default_rng(1)
    lat = rng.lognormal(np.log(0.002), 0.6, 20_000)
    rec = SliRecorder(clock=FakeClock(10_000.0))
    for x in lat:
        rec.record("stable", "model", float(x))
    w = rec.window(60)
    assert w.p50_ms == pytest.approx(np.quantile(lat, 0.5) * 1000, rel=0.1)
    assert w.p99_ms == pytest.approx(np.quantile(lat, 0.99) * 1000, rel=0.1)


def test_windows_slide_with_the_clock() -> None:
    """A request 61 s old has left the 1-minute window (60 whole seconds and the current one)
    and is still in the 5-minute one."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(clock=clock)
    rec.record("stable", "model", 0.001)
    clock.t += 61
    rec.record("stable", "model", 0.001)
    assert rec.window(60).requests == 1
    assert rec.window(300).requests == 2
    clock.t += 3601
    assert rec.window(3600).requests == 0
    assert sum(rec.totals["stable"].values()) == 2  # totals since start stay


def test_qps_counts_requests_over_the_window() -> None:
    """Throughput is requests per second over the window; model-scored throughput apart."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(clock=clock)
    clock.t += 600
    traffic(rec, clock, 60, 20)
    traffic(rec, clock, 60, 5, result="fallback", reason="model:unavailable")
    w = rec.window(60)
    assert w.qps == pytest.approx(5, rel=0.05) and w.model_qps == 0
    w5 = rec.window(300)
    assert w5.qps == pytest.approx(25 * 60 / 300, rel=0.05)


def test_burn_rate_is_the_bad_share_over_the_budget() -> None:
    """1 % fallbacks against a 99 % model-scored objective burns the budget at rate 1."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(Objectives(model_scored=0.99), clock=clock)
    for _ in range(300):
        for i in range(100):
            rec.record("stable", "fallback" if i == 0 else "model", 0.002, "model:timeout" if i == 0 else None)
        clock.t += 1
    b = rec.burn_rates()
    assert b["model_scored"]["burn_5m"] == pytest.approx(1.0, rel=0.02)
    assert b["availability"]["burn_5m"] == 0.0 and b["model_scored"]["page"] is False


def test_page_needs_both_windows_above_the_threshold() -> None:
    """An outage of the last 5 minutes after a clean hour pages; the same outage over for
    5 minutes does not (the short window resets the alert), though the hour still burns."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(Objectives(availability=0.999), clock=clock)
    traffic(rec, clock, 3300, 2)
    traffic(rec, clock, 300, 2, result="error", arm="none")
    b = rec.burn_rates()["availability"]
    assert b["burn_5m"] > 14.4 and b["burn_1h"] > 14.4 and b["page"] is True
    traffic(rec, clock, 300, 2)
    b = rec.burn_rates()["availability"]
    assert b["burn_5m"] == 0.0 and b["burn_1h"] > 14.4 and b["page"] is False


def test_a_short_blip_does_not_page() -> None:
    """Ten bad seconds in an hour: the 5-minute window burns fast, the hour does not: no page."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(Objectives(availability=0.999), clock=clock)
    traffic(rec, clock, 3580, 10)
    traffic(rec, clock, 10, 10, result="error", arm="none")
    b = rec.burn_rates()["availability"]
    assert b["burn_5m"] > 14.4 and b["burn_1h"] < 14.4 and b["page"] is False


def test_latency_slo_counts_requests_slower_than_the_objective() -> None:
    """Requests above CTR_SLO_P99_MS are the latency SLO's bad events (budget 1 %)."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(Objectives(p99_ms=10), clock=clock)
    for i in range(1000):
        rec.record("stable", "model", 0.02 if i < 20 else 0.002)
    assert rec.window(60).slow == 20
    assert rec.burn_rates()["latency"]["burn_5m"] == pytest.approx(2.0)


def test_arms_are_a_bounded_label_set() -> None:
    """Arms are stable and canary; anything else is counted as none (no unbounded labels)."""
    rec = SliRecorder(clock=FakeClock(10_000.0))
    rec.record("canary", "model", 0.001)
    rec.record("stable", "model", 0.001)
    rec.record("user-42", "model", 0.001)
    assert rec.arms() == ["stable", "canary", "none"]
    assert rec.window(60, "canary").requests == 1


def test_stages_and_series() -> None:
    """Stage means over the window; the chart series has one point per step, oldest first."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(clock=clock)
    for _ in range(120):
        rec.stage("features", 0.001)
        rec.stage("features", 0.003)
        rec.record("stable", "model", 0.004)
        clock.t += 1
    st = rec.stages(60)["features"]
    assert st["n"] == 120 and st["mean_ms"] == pytest.approx(2.0)
    s = rec.series(600, 10)
    assert len(s) == 60 and s[0]["t"] < s[-1]["t"] <= 0
    assert s[-1]["qps"] == pytest.approx(0.9, abs=0.11) and s[0]["qps"] == 0.0


def test_a_disabled_recorder_records_nothing() -> None:
    """CTR_SLI=false: no bookkeeping (used to measure its cost)."""
    rec = SliRecorder(clock=FakeClock(10_000.0))
    rec.enabled = False
    rec.record("stable", "model", 0.001)
    rec.stage("features", 0.001)
    assert rec.window(60).requests == 0 and rec.stages(60) == {}


@pytest.mark.parametrize("kwargs", [{"availability": 1.0}, {"model_scored": 0.0}, {"p99_ms": 0}, {"burn_page": -1}])
def test_objectives_are_validated(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Objectives(**kwargs)


def test_export_sets_the_gauges() -> None:
    """The windows and burn rates land on /metrics as ctr_sli_* and ctr_slo_* gauges."""
    clock = FakeClock(10_000.0)
    rec = SliRecorder(Objectives(model_scored=0.99), clock=clock)
    traffic(rec, clock, 10, 9)
    traffic(rec, clock, 10, 1, result="fallback", reason="model:timeout")
    sli.export(rec)

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    assert sample("ctr_sli_model_scored_share", arm="stable", window="1m") == pytest.approx(0.9)
    assert sample("ctr_slo_burn_rate", slo="model_scored", arm="all", window="5m") == pytest.approx(10.0)
    assert sample("ctr_slo_target", slo="availability") == pytest.approx(0.999)
    assert sample("ctr_slo_page", slo="model_scored", arm="all") == 0.0
