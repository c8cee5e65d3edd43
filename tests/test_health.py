"""The replica health state machine under a fake clock: passive checks (errors, p99, latency
outliers), probe failures, growing and capped ejection time, the cap on the ejected share,
and the way back only through passing probes. Nothing sleeps: `now` is a number."""

from __future__ import annotations

import pytest

from ctr.serving.pool.health import HealthConfig, ReplicaHealth, Status, evaluate, max_ejected

CFG = HealthConfig(window_s=5.0, min_calls=20, p99_s=0.040, outlier_factor=3.0, outlier_min_s=0.005,
                   max_ejected_percent=50.0, ejection_base_s=5.0, ejection_max_s=12.0, probe_passes=2,
                   probe_failures=3)  # fmt: skip


def pool(n: int, cfg: HealthConfig = CFG) -> list[ReplicaHealth]:
    return [ReplicaHealth(cfg) for _ in range(n)]


def feed(h: ReplicaHealth, now: float, calls: int, latency_s: float = 0.002, fail_every: int = 0) -> None:
    for k in range(calls):
        h.record(now, not (fail_every and k % fail_every == 0), latency_s)


def healthy_traffic(hs: list[ReplicaHealth], now: float) -> None:
    for h in hs:
        feed(h, now, 30)


def test_errors_eject_a_replica() -> None:
    """Success rate at or under 0.8 over the window: ejected for errors; the others stay."""
    hs = pool(3)
    healthy_traffic(hs[1:], 0.0)
    feed(hs[0], 0.0, 30, fail_every=2)
    assert evaluate(1.0, hs) == ([], [(0, "errors")])
    assert [h.status for h in hs] == [Status.EJECTED, Status.HEALTHY, Status.HEALTHY]


def test_success_rate_above_the_threshold_is_healthy() -> None:
    """One failure in ten (0.9 > 0.8) is within health."""
    hs = pool(3)
    healthy_traffic(hs[1:], 0.0)
    feed(hs[0], 0.0, 30, fail_every=10)
    assert evaluate(1.0, hs) == ([], [])


def test_too_few_calls_are_not_judged() -> None:
    """Under min_calls in the window nothing is judged, however bad."""
    hs = pool(3)
    feed(hs[0], 0.0, 19, fail_every=1)
    assert evaluate(1.0, hs) == ([], [])


def test_old_calls_leave_the_window() -> None:
    """Failures older than the window no longer count."""
    hs = pool(3)
    feed(hs[0], 0.0, 30, fail_every=1)
    feed(hs[0], 6.0, 30)
    assert evaluate(6.0, hs) == ([], [])


def test_p99_over_the_threshold_ejects() -> None:
    """p99 above CTR_REPLICA_P99_MS (40 ms) and above its peers' ejects for p99 (60 ms is under
    3x the others' 30 ms, so this is not the outlier rule)."""
    hs = pool(3)
    for h, lat in zip(hs, (0.060, 0.030, 0.030), strict=True):
        feed(h, 0.0, 30, latency_s=lat)
    assert evaluate(1.0, hs)[1] == [(0, "p99")]


def test_every_replica_slow_ejects_none() -> None:
    """All three over the p99 threshold alike: the load is the problem, no replica is ejected."""
    hs = pool(3)
    for h in hs:
        feed(h, 0.0, 30, latency_s=0.060)
    assert evaluate(1.0, hs)[1] == []


@pytest.mark.parametrize(("slow_s", "ejected"), [(0.012, True), (0.006, False), (0.0045, False)])
def test_latency_outliers(slow_s: float, ejected: bool) -> None:
    """p99 above 3x the others' median p99 and 5 ms above it: an outlier (12 ms vs 2 ms); 6 ms is
    within 3x, and 4.5 ms is 2.25x but within 5 ms of the median: sub-ms jitter is not an outlier."""
    hs = pool(3)
    healthy_traffic(hs[1:], 0.0)
    feed(hs[0], 0.0, 30, latency_s=slow_s)
    for h in hs[1:]:
        feed(h, 0.0, 1, latency_s=0.0015)
    assert evaluate(1.0, hs)[1] == ([(0, "outlier")] if ejected else [])


def test_outlier_with_two_replicas() -> None:
    """With two replicas the slow one is the outlier (compared with the other), not the fast one."""
    hs = pool(2)
    feed(hs[0], 0.0, 30, latency_s=0.002)
    feed(hs[1], 0.0, 30, latency_s=0.020)
    assert evaluate(1.0, hs)[1] == [(1, "outlier")]


def test_failed_probes_eject_a_healthy_replica() -> None:
    """Three failed probes in a row eject it (no traffic needed); a pass in between resets the count."""
    hs = pool(3)
    for ok in (False, False, True, False, False):
        hs[0].probe(ok)
    assert evaluate(1.0, hs)[1] == []
    hs[0].probe(False)
    assert evaluate(2.0, hs)[1] == [(0, "probe")]


def test_an_ejected_replica_returns_only_after_passing_probes() -> None:
    """Ejection time served: PROBING, not HEALTHY; probes during the ejection do not count;
    back after two passes in a row (a failure restarts the count)."""
    hs = pool(3)
    hs[0].eject(0.0, "errors")
    hs[0].probe(True)
    hs[0].probe(True)
    evaluate(4.9, hs)
    assert hs[0].status is Status.EJECTED
    evaluate(5.0, hs)
    assert hs[0].status is Status.PROBING
    for ok in (True, False, True):
        hs[0].probe(ok)
    evaluate(6.0, hs)
    assert hs[0].status is Status.PROBING
    hs[0].probe(True)
    assert evaluate(7.0, hs)[0] == [0] and hs[0].status is Status.HEALTHY


def test_ejection_time_grows_with_repeats_and_is_capped() -> None:
    """5 s, then 10 s, then capped at 12 s; it shrinks again after a long healthy spell."""
    h = ReplicaHealth(CFG)
    durations, now = [], 0.0
    for _ in range(4):
        durations.append(h.eject(now, "errors"))
        now = h.ejected_until
        h.advance(now)
        h.probe(True)
        h.probe(True)
        assert h.advance(now)
    assert durations == [5.0, 10.0, 12.0, 12.0]
    h.advance(now + 12.0)
    h.advance(now + 24.0)
    assert h.ejections == 2  # one decay per 12 s healthy: 4 -> 2
    assert h.eject(now + 24.0, "errors") == 12.0  # the third: 3 x 5 s, capped
    h2 = ReplicaHealth(CFG)
    h2.eject(0.0, "errors")
    h2.advance(5.0)
    h2.probe(True)
    h2.probe(True)
    h2.advance(5.0)
    h2.advance(17.0)
    assert h2.ejections == 0 and h2.eject(17.0, "errors") == 5.0


def test_never_more_than_the_ejected_share() -> None:
    """Of four bad replicas with 50 %: two out at once; the others wait for the cap to free."""
    hs = pool(4)
    for h in hs:
        feed(h, 0.0, 30, fail_every=1)
    assert [i for i, _ in evaluate(1.0, hs)[1]] == [0, 1]
    for h in hs[2:]:
        feed(h, 1.5, 30, fail_every=1)
    assert evaluate(2.0, hs)[1] == []


def test_the_last_healthy_replica_is_never_ejected() -> None:
    """Even at 100 %, one replica of two stays in; a pool of one never ejects."""
    cfg = HealthConfig(max_ejected_percent=100.0)
    hs = pool(2, cfg)
    for h in hs:
        feed(h, 0.0, 30, fail_every=1)
    assert len(evaluate(1.0, hs)[1]) == 1
    one = pool(1, cfg)
    feed(one[0], 0.0, 30, fail_every=1)
    assert evaluate(1.0, one)[1] == []
    assert [max_ejected(CFG, n) for n in (1, 2, 3, 4, 10)] == [0, 1, 1, 2, 5]


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="min_success must be in"):
        HealthConfig(min_success=1.5)
