"""The gates: always-valid intervals, harm / non-inferiority / inconclusive verdicts, and
how often an A/A canary is falsely called harmful when looked at every interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ctr.serving.canary.stats import (
    LATENCY_EDGES_MS,
    ArmStats,
    GateConfig,
    calibration_gate,
    ctr_gate,
    errors_gate,
    halfwidth,
    latency_bucket,
    latency_gate,
)

CFG = GateConfig()


def arm(
    requests: int = 0,
    errors: int = 0,
    impressions: int = 0,
    clicks: int = 0,
    pred: float = 0.0,
    latency_ms: float | None = None,
) -> ArmStats:
    s = ArmStats(requests, errors, impressions, clicks, impressions, clicks, pred)
    if latency_ms is not None:
        s.latency[latency_bucket(latency_ms)] = requests
    return s


def test_the_interval_shrinks_with_data_and_is_wider_than_fixed_horizon() -> None:
    """Half-width falls with the variance, and exceeds the fixed-horizon 1.96 sigma (the price of peeking)."""
    widths = [halfwidth(1 / n, 0.01, 0.0125) for n in (1e3, 1e5, 1e7)]
    assert widths == sorted(widths, reverse=True)
    assert all(w > 1.96 * math.sqrt(1 / n) for w, n in zip(widths, (1e3, 1e5, 1e7), strict=True))
    assert halfwidth(0.0, 0.01, 0.05) == 0.0


def test_too_little_data_is_insufficient_not_a_verdict() -> None:
    """Below the minimum samples every gate says insufficient."""
    small = arm(100, 0, 100, 3, 3.0, 3.0)
    for gate in (errors_gate, latency_gate, ctr_gate, calibration_gate):
        assert gate(small, small, CFG).verdict == "insufficient"


@pytest.mark.parametrize(
    ("canary", "verdict"),
    [
        (arm(50_000, 500), "harm"),  # 1 % errors against 0.05 %
        (arm(200_000, 100), "ok"),  # same rate, lots of data
        (arm(3_000, 4), "inconclusive"),  # same rate, too little data to prove < +0.1 pp
    ],
)
def test_errors_gate(canary: ArmStats, verdict: str) -> None:
    """Roll back beyond stable + 0.1 pp; advance only when proven inside it."""
    stable = arm(2_000_000, 1000)
    assert errors_gate(canary, stable, CFG).verdict == verdict


def test_latency_gate_compares_against_stables_p99_plus_margin() -> None:
    """10 ms slower at every request is harm; the same distribution is ok."""
    rng = np.random.default_rng(0)
    stable, same, slow = ArmStats(), ArmStats(), ArmStats()
    for s, shift in ((stable, 0.0), (same, 0.0), (slow, 10.0)):
        for x in rng.lognormal(math.log(3), 0.35, 20_000) + shift:
            s.latency[latency_bucket(float(x))] += 1
    assert stable.quantile_ms(0.99) in LATENCY_EDGES_MS
    assert latency_gate(slow, stable, CFG).verdict == "harm"
    assert latency_gate(same, stable, CFG).verdict == "ok"


@pytest.mark.parametrize(
    ("clicks", "verdict"),
    [(3_000, "harm"), (4_000, "ok"), (3_985, "inconclusive")],  # -25 %, 0 %, -0.4 % at 100 k impressions
)
def test_ctr_gate(clicks: int, verdict: str) -> None:
    """Canary CTR below stable x 0.99 with evidence is harm; proven above it is ok."""
    stable = arm(impressions=50_000_000, clicks=2_000_000, pred=2_000_000.0)
    canary = arm(impressions=100_000 if verdict != "ok" else 20_000_000, clicks=clicks if verdict != "ok" else 800_000)
    assert ctr_gate(canary, stable, CFG).verdict == verdict


def test_calibration_gate_catches_scores_times_three_that_the_ctr_gate_passes() -> None:
    """Same clicks, predicted sum x 3: CTR gate ok, calibration gate harm (and the interval says by how much)."""
    stable = arm(impressions=20_000_000, clicks=800_000, pred=800_000.0)
    canary = arm(impressions=20_000_000, clicks=800_000, pred=2_400_000.0)
    assert ctr_gate(canary, stable, CFG).verdict == "ok"
    g = calibration_gate(canary, stable, CFG)
    assert g.verdict == "harm" and g.lo < -math.log(3) < g.hi


def test_aa_canary_watched_every_interval_is_rarely_called_harmful() -> None:
    """2,000 A/A rollouts, each looked at 300 times, with the CTR gate tuned to a tight margin:
    harm verdicts stay under alpha (the point of an always-valid test)."""
    rng = np.random.default_rng(1)
    cfg = GateConfig(ctr_ratio=0.999, min_clicks=100)
    p, n_step, steps, runs = 0.05, 2_000, 300, 2_000
    c = rng.binomial(n_step, p, (runs, steps)).cumsum(1)
    s = rng.binomial(n_step * 20, p, (runs, steps)).cumsum(1)
    harmed = 0
    for r in range(runs):
        for t in range(0, steps, 3):
            n = (t + 1) * n_step
            g = ctr_gate(arm(impressions=n, clicks=int(c[r, t])), arm(impressions=20 * n, clicks=int(s[r, t])), cfg)
            if g.verdict == "harm":
                harmed += 1
                break
    assert harmed / runs <= cfg.alpha
