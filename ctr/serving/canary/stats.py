"""Canary gates: always-valid confidence sequences (mSPRT, normal mixture), compared within
time strata, with the variance read between user units.

The interval. The controller looks every interval for hours; a fixed-horizon test looked
at that often errs far more often than its alpha. The mixture sequential probability ratio
test (Robbins 1970; Johari, Pekelis and Walsh, "Always valid inference", 2017) gives a
confidence sequence: with probability >= 1 - alpha the truth lies inside EVERY interval
ever computed. For an estimate with variance V and a N(0, tau^2) mixture:

    estimate +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) + 2 log(1 / alpha)))

What makes it hold under real traffic (notes/canary-statistics.md):
- Same time, same share. Counters are per stratum (phase x clock hour, `counts.py`). CTR,
  calibration and errors are indirectly standardised: the canary's observed total against
  what stable's rate IN EACH STRATUM predicts for the canary's own exposure there
  (sum_k n_k r_k), so a daily cycle or a growing share cancels out. The latency gate
  compares the arms within the current phase, where both see the same hours and share.
- Users, not impressions. The variance is the bucket method over `N_UNITS` hash sub-buckets
  of users (the estimate's linearisation summed per unit, its spread between units), which
  includes the design effect of heavy users; it is floored by the binomial variance, so a
  noisy between-unit estimate never makes the interval narrower than independence would.
- Small counts. The errors gate evaluates the canary's binomial variance at the margin's
  boundary (stable's rate + margin: a score-type variance), never at a handful of observed
  errors, which made the interval too narrow when only 3-9 errors were counted. Its unit
  residual is its difference's own linearisation (`standardize(difference=True)`): the
  ratio's, with stable at 0 errors, was the raw count per unit (the units' sizes, not the rate).
- The latency gate tests the p99 difference itself: a confidence sequence for each arm's
  p99 from the order statistics at ranks n q -+ g_n (g_n from the same mixture for the
  Binomial(n, q) count below the quantile; Howard and Ramdas 2022 build quantile sequences
  this way), read on the histogram's bucket edges (lower edges for a lower bound, upper for
  an upper; the overflow bucket's upper edge is +inf, so an overflowing arm is never "ok"
  and never hides harm). Harm: canary p99 lower bound > stable p99 upper bound + 5 ms.

Alpha. Rolling back is a union over gates ("harm on any"), so each gate's harm reading uses
alpha / 4 (<= alpha false rollbacks over the four). Promotion needs non-inferiority on
every gate: an intersection-union test, so each gate's "ok" reading is at alpha, no split.
The latency gate restarts each phase, so its harm alpha is split again over the phases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ctr.serving.canary.counts import LOWER_EDGES_MS, UPPER_EDGES_MS, ArmStats, Counts

Verdict = Literal["harm", "ok", "inconclusive", "insufficient"]


@dataclass(frozen=True, slots=True)
class GateConfig:
    alpha: float = 0.05  # false rollbacks over the 4 gates (alpha/4 each); each gate's "ok" at alpha
    error_margin: float = 0.001  # +0.1 percentage points
    latency_margin_ms: float = 5.0
    latency_quantile: float = 0.99
    ctr_ratio: float = 0.99
    calibration_ratio: float = 1.2  # |log(canary/stable)| <= log 1.2
    min_requests: int = 2000
    min_latency_tail: int = 50  # requests beyond the quantile, n (1 - q), before the latency gate reads
    min_clicks: int = 200
    stratum_s: float = 3600.0  # counters are split by phase and by this clock slot
    latency_persist_s: float = 180.0  # latency harm must last this long (one transient stall is not a regression)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.ctr_ratio < 1 or self.calibration_ratio <= 1:
            raise ValueError("ctr_ratio must be in (0, 1) and calibration_ratio > 1")
        if not 0 < self.latency_quantile < 1 or self.stratum_s <= 0 or self.latency_persist_s < 0:
            raise ValueError("latency_quantile must be in (0, 1), stratum_s > 0 and latency_persist_s >= 0")

    @property
    def harm_alpha(self) -> float:
        return self.alpha / 4


DEFAULT_GATES = GateConfig()


@dataclass(frozen=True, slots=True)
class GateResult:
    gate: str
    verdict: Verdict
    estimate: float
    lo: float  # the harm reading's interval (alpha / 4)
    hi: float
    margin: str  # readable: what harm means
    n: int  # canary sample behind it
    ni: tuple[float, float] = (-math.inf, math.inf)  # the non-inferiority reading's interval (alpha)

    def to_dict(self) -> dict[str, object]:
        return {
            "gate": self.gate,
            "verdict": self.verdict,
            "estimate": _finite(self.estimate),
            "interval": [_finite(self.lo), _finite(self.hi)],
            "ni_interval": [_finite(self.ni[0]), _finite(self.ni[1])],
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


def _interval(est: float, var: float, tau: float, alpha: float) -> tuple[float, float]:
    h = halfwidth(var, tau, alpha)  # looked up at call time: the mutation check swaps it
    return est - h, est + h


def _units_var(resid: np.ndarray) -> float:
    """Var of the sum over units from the between-unit spread (the residuals sum to ~0)."""
    u, total = resid.size, float(resid.sum())
    return u / (u - 1) * (float(resid @ resid) - total * total / u)


@dataclass(frozen=True, slots=True)
class Standardized:
    """The canary's total against stable's per-stratum rates applied to the canary's exposure."""

    observed: float  # sum of the canary's numerator
    expected: float  # sum_k (canary denominator)_k x (stable rate)_k
    exposure: float  # the canary's denominator
    var_c: float  # variance of the canary's part (units, floored by binomial)
    var_s: float  # variance of the expected total from stable's rates


def standardize(
    cn: np.ndarray,
    cd: np.ndarray,
    sn: np.ndarray,
    sd: np.ndarray,
    ct: np.ndarray,
    st: np.ndarray,
    difference: bool = False,
) -> Standardized:
    """cn/cd, sn/sd: numerator and denominator per (stratum, unit); ct/st the Bernoulli trials
    behind the numerator (impressions for clicks, requests for errors) for the binomial floor.
    `var_c` is the between-unit spread of the estimate's linearisation: of the ratio
    observed / expected (cn - theta e), or with `difference` of (observed - expected) / exposure
    (cn - e - d cd), the errors gate's estimate. The two agree in one stratum where stable's
    rate is positive (nearly, over several); where it is 0, e is 0 and the ratio's residual is
    the canary's raw count per unit, whose spread is that of the units' sizes (heavy users)."""
    sd_k, sn_k = sd.sum(1), sn.sum(1)
    keep = sd_k > 0  # a stratum stable has no data in cannot be matched
    if not keep.all():
        cn, cd, sn, sd, ct, st = cn[keep], cd[keep], sn[keep], sd[keep], ct[keep], st[keep]
        sd_k, sn_k = sd_k[keep], sn_k[keep]
    cd_k = cd.sum(1)
    r = sn_k / sd_k
    e = cd * r[:, None]
    observed, expected = float(cn.sum()), float(e.sum())
    theta = observed / expected if expected > 0 else 1.0
    w = cd_k / sd_k
    if difference:
        exposure = float(cd.sum())
        d = (observed - expected) / exposure if exposure > 0 else 0.0
        v_c = _units_var((cn - e - d * cd).sum(0))
    else:
        v_c = _units_var((cn - theta * e).sum(0))
    v_s = _units_var((w[:, None] * (sn - r[:, None] * sd)).sum(0))
    cn_k, ct_k, st_k = cn.sum(1), (cd_k if ct is cd else ct.sum(1)), (sd_k if st is sd else st.sum(1))
    floor_c = float(np.sum(cn_k * (1 - cn_k / np.maximum(ct_k, 1))))
    floor_s = float(np.sum(w**2 * sn_k * (1 - sn_k / np.maximum(st_k, 1))))
    return Standardized(observed, expected, float(cd.sum()), max(v_c, floor_c), max(v_s, floor_s))


def _mats(counts: Counts, strata: list[str], *names: str) -> list[np.ndarray]:
    return [counts.matrix(arm, n, strata) for n in names for arm in ("canary", "stable")]


def _insufficient(gate: str, what: str, n: float) -> GateResult:
    return GateResult(gate, "insufficient", math.nan, -math.inf, math.inf, what, int(n))


def errors_gate(counts: Counts, cfg: GateConfig, phase: int = 0, n_phases: int = 1) -> GateResult:
    what = f"canary error rate > stable + {cfg.error_margin * 100:g} pp (stratified)"
    strata = counts.strata()
    ce, se, cr, sr = _mats(counts, strata, "errors", "requests")
    nc, ns = cr.sum(), sr.sum()
    if nc < cfg.min_requests or ns < cfg.min_requests:
        return _insufficient("errors", what, nc)
    z = standardize(ce, cr, se, sr, cr, sr, difference=True)
    if z.exposure <= 0:  # no canary request in a stratum stable has data in: nothing to compare
        return _insufficient("errors", what, nc)
    est = (z.observed - z.expected) / z.exposure
    # The canary's variance at the boundary (stable's rate + margin), never below the observed spread.
    pb = min(1.0, (z.expected + 0.5) / (z.exposure + 1) + cfg.error_margin)
    var = (max(z.var_c, z.exposure * pb * (1 - pb)) + z.var_s) / z.exposure**2
    m = cfg.error_margin
    lo, hi = _interval(est, var, m, cfg.harm_alpha)
    nlo, nhi = _interval(est, var, m, cfg.alpha)
    verdict: Verdict = "harm" if lo > m else "ok" if nhi < m else "inconclusive"
    return GateResult("errors", verdict, est, lo, hi, what, int(nc), (nlo, nhi))


def _log_ratio(
    gate: str, counts: Counts, cfg: GateConfig, num: str, den: str, trials: str, what: str
) -> tuple[float, float, float] | GateResult:
    strata = counts.strata()
    cn, sn, cd, sd, ct, st = _mats(counts, strata, num, den, trials)
    if cn.sum() < cfg.min_clicks or sn.sum() < cfg.min_clicks or cd.sum() <= 0:
        return _insufficient(gate, what, ct.sum())
    z = standardize(cn, cd, sn, sd, ct, st)
    if z.expected <= 0 or z.observed <= 0:
        return _insufficient(gate, what, ct.sum())
    var = z.var_c / z.observed**2 + z.var_s / z.expected**2
    return math.log(z.observed / z.expected), var, float(ct.sum())


def ctr_gate(counts: Counts, cfg: GateConfig, phase: int = 0, n_phases: int = 1) -> GateResult:
    what = f"canary CTR < stable x {cfg.ctr_ratio:g} (log ratio, stratified)"
    r = _log_ratio("ctr", counts, cfg, "clicks", "impressions", "impressions", what)
    if isinstance(r, GateResult):
        return r
    est, var, n = r
    m = math.log(cfg.ctr_ratio)  # < 0: below it is harm
    lo, hi = _interval(est, var, -m, cfg.harm_alpha)
    nlo, nhi = _interval(est, var, -m, cfg.alpha)
    verdict: Verdict = "harm" if hi < m else "ok" if nlo > m else "inconclusive"
    return GateResult("ctr", verdict, est, lo, hi, what, int(n), (nlo, nhi))


def calibration_gate(counts: Counts, cfg: GateConfig, phase: int = 0, n_phases: int = 1) -> GateResult:
    what = f"|log((clicks/sum predicted) canary / stable)| > log {cfg.calibration_ratio:g} (stratified)"
    r = _log_ratio("calibration", counts, cfg, "scored_clicks", "pred_sum", "scored", what)
    if isinstance(r, GateResult):
        return r
    est, var, n = r
    m = math.log(cfg.calibration_ratio)
    lo, hi = _interval(est, var, m, cfg.harm_alpha)
    nlo, nhi = _interval(est, var, m, cfg.alpha)
    verdict: Verdict = "harm" if lo > m or hi < -m else "ok" if -m < nlo and nhi < m else "inconclusive"
    return GateResult("calibration", verdict, est, lo, hi, what, int(n), (nlo, nhi))


def quantile_bounds(hist: np.ndarray, q: float, alpha: float) -> tuple[float, float]:
    """An always-valid interval for the q-quantile from a latency histogram: the bucket edges
    around the order statistics at ranks n q -+ g (g: the mixture boundary of Binomial(n, q))."""
    n = int(hist.sum())
    tau = (1 - q) / 2  # the mixture is tuned to shifts of half the tail share
    g = n * halfwidth(q * (1 - q) / n, tau, alpha)
    cum = np.cumsum(hist)
    r_lo, r_hi = math.floor(n * q - g), math.ceil(n * q + g)
    lo = 0.0 if r_lo < 1 else float(LOWER_EDGES_MS[int(np.searchsorted(cum, r_lo))])
    hi = math.inf if r_hi > n else float(UPPER_EDGES_MS[int(np.searchsorted(cum, r_hi))])
    return lo, hi


def latency_gate(counts: Counts, cfg: GateConfig, phase: int = 0, n_phases: int = 1) -> GateResult:
    q, m = cfg.latency_quantile, cfg.latency_margin_ms
    what = f"canary p{q * 100:g} > stable p{q * 100:g} + {m:g} ms (this phase)"
    strata = counts.strata(phase)
    hc, hs = counts.latency("canary", strata), counts.latency("baseline", strata)
    if hs.sum() * (1 - q) < cfg.min_latency_tail:  # no baseline (of the canary's capacity): stable
        hs = counts.latency("stable", strata)
    nc, ns = int(hc.sum()), int(hs.sum())
    if min(nc, ns) * (1 - q) < cfg.min_latency_tail or min(nc, ns) < cfg.min_requests:
        return _insufficient("latency", what, nc)
    a_harm = cfg.harm_alpha / max(1, n_phases) / 2  # two bounds; a new sequence each phase
    c_lo, c_hi = quantile_bounds(hc, q, a_harm)
    s_lo, s_hi = quantile_bounds(hs, q, a_harm)
    nc_lo, nc_hi = quantile_bounds(hc, q, cfg.alpha / 2)
    ns_lo, ns_hi = quantile_bounds(hs, q, cfg.alpha / 2)
    est = ArmStats(latency=hc).quantile_ms(q) - ArmStats(latency=hs).quantile_ms(q)
    lo, hi = c_lo - s_hi, c_hi - s_lo  # the difference of p99s, in ms
    verdict: Verdict = "harm" if lo > m else "ok" if nc_hi - ns_lo < m else "inconclusive"
    est = est if math.isfinite(est) else (math.inf if lo > 0 else math.nan)
    return GateResult("latency", verdict, est, lo, hi, what, nc, (nc_lo - ns_hi, nc_hi - ns_lo))


Gate = Callable[[Counts, GateConfig, int, int], GateResult]
GATE_FUNCS: dict[str, Gate] = {
    "errors": errors_gate,
    "latency": latency_gate,
    "ctr": ctr_gate,
    "calibration": calibration_gate,
}


def evaluate(counts: Counts, cfg: GateConfig, phase: int = 0, n_phases: int = 1) -> dict[str, GateResult]:
    """Every gate's verdict, canary against stable, stratum by stratum (latency: this phase)."""
    return {name: f(counts, cfg, phase, n_phases) for name, f in GATE_FUNCS.items()}
