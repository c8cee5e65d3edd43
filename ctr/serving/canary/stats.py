"""Canary gates: always-valid confidence sequences (mSPRT, normal mixture) per metric.

Why this test. The controller looks at the data every interval for hours; a fixed-horizon
test (Kayenta's Mann-Whitney, or a t-test) looked at that often rolls back A/A canaries far
more often than its alpha says, and Flagger/Argo compare raw thresholds with no test at
all. The mixture sequential probability ratio test (Robbins 1970; Johari, Pekelis and
Walsh, "Always valid inference", 2017, the test behind Optimizely's stats engine) gives a
confidence sequence: with probability >= 1 - alpha the true difference lies inside EVERY
interval ever computed, however often one looks and whenever one stops. For an estimate
with variance V and a N(0, tau^2) mixture the interval is

    estimate +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) + 2 log(1 / alpha)))

(a normal approximation of each arm's mean: valid once each arm has the minimum sample
size below; tau is the gate's margin, the effect size the test is tuned for).

Each gate then reads one interval two ways (one-sided, against the reference design's
thresholds):
- harm: the whole interval lies beyond the margin -> roll back now (fast for big regressions);
- non-inferior: the whole interval lies inside the margin -> the phase may advance;
- anything else is inconclusive (wait; past the phase's maximum time, `on_timeout`).

False rollbacks. A harm verdict needs the true difference to lie beyond the margin, which
an A/A canary's (0) does not, so each gate falsely rolls back with probability <= alpha
(0.0125 by default) over the whole rollout, whatever the number of looks; the four gates
together <= 5 % (Bonferroni). The same bound holds for promoting a canary worse than a
margin. The simulator (`ctr canary simulate`) measures both.

The gates:
- errors: canary error rate - stable's (margin +0.1 percentage points);
- latency: share of canary requests slower than stable's p99 + 5 ms, against 1 %
  (binomial: under "canary p99 <= stable p99 + 5 ms" it is <= 1 %);
- ctr: log(canary CTR / stable CTR) (margin log 0.99: canary < stable x 0.99 is harm);
- calibration: log of (clicks / sum of predicted CTR), canary over stable (margin +-log 1.2):
  a model whose scores are off by a factor ranks the same ads, earns the same CTR, and
  passes the CTR gate while it breaks bidding.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Literal

# Latency histogram upper edges (ms): 0.5 ms steps to 20 ms, 1 ms to 50, 5 ms to 200; then +inf.
LATENCY_EDGES_MS: tuple[float, ...] = (
    *(0.5 * i for i in range(1, 41)),
    *(20.0 + i for i in range(1, 31)),
    *(50.0 + 5 * i for i in range(1, 31)),
)
N_LATENCY_BUCKETS = len(LATENCY_EDGES_MS) + 1

Verdict = Literal["harm", "ok", "inconclusive", "insufficient"]


def latency_bucket(latency_ms: float) -> int:
    """Index of the histogram bucket holding `latency_ms` (the last is overflow)."""
    return bisect.bisect_left(LATENCY_EDGES_MS, latency_ms)


@dataclass(slots=True)
class ArmStats:
    """One arm's counters since the rollout started (what Redis holds per arm)."""

    requests: int = 0
    errors: int = 0
    impressions: int = 0
    clicks: int = 0
    scored: int = 0  # impressions whose predicted CTR came back with the feedback
    scored_clicks: int = 0
    pred_sum: float = 0.0  # sum of the predicted CTR of the scored impressions
    latency: list[int] = field(default_factory=lambda: [0] * N_LATENCY_BUCKETS)

    def add(self, other: ArmStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.impressions += other.impressions
        self.clicks += other.clicks
        self.scored += other.scored
        self.scored_clicks += other.scored_clicks
        self.pred_sum += other.pred_sum
        self.latency = [a + b for a, b in zip(self.latency, other.latency, strict=True)]

    def quantile_ms(self, q: float) -> float:
        """The upper edge of the bucket holding quantile q (conservative: never below the truth)."""
        total = sum(self.latency)
        if total == 0:
            return math.nan
        need, seen = q * total, 0
        for i, c in enumerate(self.latency):
            seen += c
            if seen >= need:
                return LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else math.inf
        return math.inf

    def slower_than(self, threshold_ms: float) -> int:
        """Requests in buckets whose lower edge is >= threshold_ms (surely slower)."""
        first = bisect.bisect_left(LATENCY_EDGES_MS, threshold_ms) + 1
        return sum(self.latency[first:])

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "impressions": self.impressions,
            "clicks": self.clicks,
            "scored": self.scored,
            "scored_clicks": self.scored_clicks,
            "pred_sum": self.pred_sum,
            "p50_ms": self.quantile_ms(0.5),
            "p99_ms": self.quantile_ms(0.99),
        }


@dataclass(frozen=True, slots=True)
class GateConfig:
    alpha: float = 0.0125  # per gate; 4 gates -> <= 5 % false rollbacks
    error_margin: float = 0.001  # +0.1 percentage points
    latency_margin_ms: float = 5.0
    latency_quantile: float = 0.99
    ctr_ratio: float = 0.99
    calibration_ratio: float = 1.2  # |log(canary/stable)| <= log 1.2
    min_requests: int = 2000
    min_clicks: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.ctr_ratio < 1 or self.calibration_ratio <= 1:
            raise ValueError("ctr_ratio must be in (0, 1) and calibration_ratio > 1")


DEFAULT_GATES = GateConfig()


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    verdict: Verdict
    estimate: float
    lo: float
    hi: float
    margin: str  # readable: what harm means
    n: int  # canary sample behind it

    def to_dict(self) -> dict[str, object]:
        return {
            "gate": self.gate,
            "verdict": self.verdict,
            "estimate": _finite(self.estimate),
            "interval": [_finite(self.lo), _finite(self.hi)],
            "margin": self.margin,
            "n": self.n,
        }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def halfwidth(var: float, tau: float, alpha: float) -> float:
    """Half-width of the normal-mixture confidence sequence at variance `var` (always valid)."""
    if var <= 0:
        return 0.0
    t2 = tau * tau
    return math.sqrt(var * (var + t2) / t2 * (math.log((var + t2) / var) + 2 * math.log(1 / alpha)))


def _smoothed(x: float, n: float) -> float:
    """(x + 1) / (n + 2): keeps the variance above 0 when an arm has no events yet."""
    return (x + 1.0) / (n + 2.0)


def _upper_bad(
    gate: str, est: float, var: float, margin: float, tau: float, alpha: float, n: int, what: str
) -> GateResult:
    """Larger is worse: harm when lo > margin, ok when hi < margin."""
    h = halfwidth(var, tau, alpha)
    lo, hi = est - h, est + h
    verdict: Verdict = "harm" if lo > margin else "ok" if hi < margin else "inconclusive"
    return GateResult(gate, verdict, est, lo, hi, what, n)


def errors_gate(c: ArmStats, s: ArmStats, cfg: GateConfig) -> GateResult:
    what = f"canary error rate > stable + {cfg.error_margin * 100:g} pp"
    if c.requests < cfg.min_requests or s.requests < cfg.min_requests:
        return GateResult("errors", "insufficient", math.nan, -math.inf, math.inf, what, c.requests)
    pc, ps = _smoothed(c.errors, c.requests), _smoothed(s.errors, s.requests)
    var = pc * (1 - pc) / c.requests + ps * (1 - ps) / s.requests
    est = c.errors / c.requests - s.errors / s.requests
    return _upper_bad("errors", est, var, cfg.error_margin, cfg.error_margin, cfg.alpha, c.requests, what)


def latency_gate(c: ArmStats, s: ArmStats, cfg: GateConfig) -> GateResult:
    q = cfg.latency_quantile
    what = f"canary p{q * 100:g} > stable p{q * 100:g} + {cfg.latency_margin_ms:g} ms (share slower, vs {1 - q:g})"
    nc, ns = sum(c.latency), sum(s.latency)
    if nc < cfg.min_requests or ns < cfg.min_requests:
        return GateResult("latency", "insufficient", math.nan, -math.inf, math.inf, what, nc)
    threshold = s.quantile_ms(q) + cfg.latency_margin_ms
    slow = c.slower_than(threshold)
    p = _smoothed(slow, nc)
    r = _upper_bad("latency", slow / nc, p * (1 - p) / nc, 1 - q, 1 - q, cfg.alpha, nc, what)
    return r


def _log_ratio_var(clicks: float, rate: float) -> float:
    """Variance of log(observed rate): (1 - rate) / clicks (binomial, delta method)."""
    return (1 - rate) / (clicks + 1.0)


def ctr_gate(c: ArmStats, s: ArmStats, cfg: GateConfig) -> GateResult:
    what = f"canary CTR < stable x {cfg.ctr_ratio:g} (log ratio)"
    if c.clicks < cfg.min_clicks or s.clicks < cfg.min_clicks:
        return GateResult("ctr", "insufficient", math.nan, -math.inf, math.inf, what, c.impressions)
    rc, rs = c.clicks / c.impressions, s.clicks / s.impressions
    var = _log_ratio_var(c.clicks, rc) + _log_ratio_var(s.clicks, rs)
    # Smaller is worse: negate and reuse the larger-is-worse reading.
    m = -math.log(cfg.ctr_ratio)
    r = _upper_bad("ctr", -math.log(rc / rs), var, m, m, cfg.alpha, c.impressions, what)
    return GateResult("ctr", r.verdict, -r.estimate, -r.hi, -r.lo, what, r.n)


def calibration_gate(c: ArmStats, s: ArmStats, cfg: GateConfig) -> GateResult:
    what = f"|log((clicks/sum predicted) canary / stable)| > log {cfg.calibration_ratio:g}"
    if c.scored_clicks < cfg.min_clicks or s.scored_clicks < cfg.min_clicks or c.pred_sum <= 0 or s.pred_sum <= 0:
        return GateResult("calibration", "insufficient", math.nan, -math.inf, math.inf, what, c.scored)
    rc, rs = c.scored_clicks / c.scored, s.scored_clicks / s.scored
    est = math.log((c.scored_clicks / c.pred_sum) / (s.scored_clicks / s.pred_sum))
    var = _log_ratio_var(c.scored_clicks, rc) + _log_ratio_var(s.scored_clicks, rs)
    m = math.log(cfg.calibration_ratio)
    h = halfwidth(var, m, cfg.alpha)
    lo, hi = est - h, est + h
    verdict: Verdict = "harm" if lo > m or hi < -m else "ok" if -m < lo and hi < m else "inconclusive"
    return GateResult("calibration", verdict, est, lo, hi, what, c.scored)


GATE_FUNCS = {"errors": errors_gate, "latency": latency_gate, "ctr": ctr_gate, "calibration": calibration_gate}


def evaluate(canary: ArmStats, stable: ArmStats, cfg: GateConfig) -> dict[str, GateResult]:
    """Every gate's verdict, canary against stable over the same period."""
    return {name: f(canary, stable, cfg) for name, f in GATE_FUNCS.items()}
