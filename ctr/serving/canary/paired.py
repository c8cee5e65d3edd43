"""The shadow phase's paired comparison: stable's served score and the canary's shadow score
of the very same impression, joined with that impression's click.

Why paired. A split compares two groups of users; the difference between the arms carries
the whole variance of users, hours and ads. Here both models score the same impression, so
the per-impression log-loss difference d = LL(canary) - LL(stable) cancels what the two
share (the user, the ad, the hour): its variance is that of the models' disagreement only,
typically far below that of either log loss (and a canary that scores as stable does has
d = 0 exactly). Log loss is a proper scoring rule: a worse ranking and a worse calibration
both raise it, so one gate covers what the split's CTR and calibration gates test.

The estimate is the relative log-loss increase R = sum d / sum LL(stable) (1 % = the canary
loses 1 % more per impression), its always-valid interval the normal-mixture confidence
sequence of `stats.halfwidth` (mSPRT, Robbins; Johari et al. 2017), its variance the bucket
method over the users' hash units (a heavy user's impressions are correlated), floored by
the impression-level variance of the linearised ratio. The mixture's increments are the
per-impression differences in arrival order; their conditional mean may drift with the daily
cycle, and the sequence then covers the running average of those means (a martingale
argument), which is the quantity the gate is about. No strata are needed: both scores of a
pair come from the same moment.

Harm (roll back): the interval (at alpha / 4: one more harm test beside the split's four)
lies wholly above the margin. Ok (may advance): the non-inferiority interval (at alpha)
lies wholly below it. Calibration (clicks / sum of scores) and AUC of each model on the
joined impressions are reported beside it, not gated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctr.serving.canary import stats
from ctr.serving.canary.counts import N_UNITS
from ctr.serving.canary.stats import GateResult, Verdict

# Per unit: pairs, clicks, sum d, d^2, LL stable, LL stable^2, LL canary, LL canary^2, d x LL stable,
# stable's scores, the canary's scores.
FIELDS = ("n", "clicks", "d", "d2", "ls", "ls2", "lc", "lc2", "dls", "p", "q")
FIELD = {name: i for i, name in enumerate(FIELDS)}
# What happened to shadow calls (summed over processes): sampled, dropped (the in-flight cap
# was full), failed (the canary did not answer in time), stored (a pair written), joined (a
# feedback found its pair), join_errors (the store did not answer a join).
OPS = ("offered", "dropped", "failed", "stored", "store_errors", "joined", "join_errors")
AUC_BINS = 200  # score histograms on the logit scale, for the AUC of each model
LOGIT_RANGE = 14.0  # scores are clipped to [1e-6, 1 - 1e-6]: logit within +-13.8
EPS = 1e-6


def _bins(s: np.ndarray) -> np.ndarray:
    z = np.log(s) - np.log1p(-s)
    return np.clip(((z + LOGIT_RANGE) / (2 * LOGIT_RANGE) * AUC_BINS).astype(np.int64), 0, AUC_BINS - 1)


def log_loss(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    s = np.clip(s, EPS, 1 - EPS)
    return -(y * np.log(s) + (1 - y) * np.log1p(-s))


@dataclass(slots=True)
class PairedCounts:
    """Sums of the joined pairs per user unit, score histograms per (model, click) for the AUC,
    and the shadow calls' outcomes. Additive: a process's delta and the store's totals."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros((len(FIELDS), N_UNITS)))
    hist: np.ndarray = field(default_factory=lambda: np.zeros((2, 2, AUC_BINS), np.int64))  # (stable|canary, y)
    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OPS, 0))

    def record(self, p: np.ndarray, q: np.ndarray, y: np.ndarray, unit: np.ndarray) -> None:
        """Joined pairs: stable's served scores `p`, the canary's shadow scores `q`, clicks `y` (0/1)."""
        p, q = np.clip(np.asarray(p, float), EPS, 1 - EPS), np.clip(np.asarray(q, float), EPS, 1 - EPS)
        y, unit = np.asarray(y, float), np.asarray(unit, np.int64) % N_UNITS
        ls, lc = log_loss(p, y), log_loss(q, y)
        d = lc - ls
        values = {"n": np.ones_like(d), "clicks": y, "d": d, "d2": d * d, "ls": ls, "ls2": ls * ls, "lc": lc,
                  "lc2": lc * lc, "dls": d * ls, "p": p, "q": q}  # fmt: skip
        for name, v in values.items():
            self.counts[FIELD[name]] += np.bincount(unit, v, N_UNITS)
        yi = y.astype(np.int64)
        for arm, s in ((0, p), (1, q)):
            np.add.at(self.hist[arm], (yi, _bins(s)), 1)

    def add(self, other: PairedCounts) -> None:
        self.counts += other.counts
        self.hist += other.hist
        for k, v in other.ops.items():
            self.ops[k] = self.ops.get(k, 0) + v

    def empty(self) -> bool:
        return not self.counts.any() and not any(self.ops.values())

    def total(self, name: str) -> float:
        return float(self.counts[FIELD[name]].sum())


def ratio_variance(c: np.ndarray, r: float) -> float:
    """Var of sum d - r sum LL(stable): between the units' sums (the bucket method), floored by
    the impression-level variance (pairs independent)."""
    resid = c[FIELD["d"]] - r * c[FIELD["ls"]]
    floor = float(c[FIELD["d2"]].sum() - 2 * r * c[FIELD["dls"]].sum() + r * r * c[FIELD["ls2"]].sum())
    return max(stats._units_var(resid), floor, 0.0)


def unpaired_variance(c: np.ndarray, r: float) -> float:
    """What a gate that ignores pairing would use (the mutation check): the two log losses as
    if from independent samples, their covariance dropped."""
    n = float(c[FIELD["n"]].sum())
    var_s = float(c[FIELD["ls2"]].sum()) - float(c[FIELD["ls"]].sum()) ** 2 / n
    var_c = float(c[FIELD["lc2"]].sum()) - float(c[FIELD["lc"]].sum()) ** 2 / n
    return max(var_s, 0.0) + max(var_c, 0.0)


@dataclass(frozen=True, slots=True)
class PairedConfig:
    alpha: float = 0.05  # harm at alpha / 4 (one more harm test beside the split's four), ok at alpha
    margin: float = 0.01  # relative log-loss increase the canary may have (1 %)
    min_pairs: int = 2000
    min_clicks: int = 50
    # The mixture's scale (the normal prior on R): the sequence is tightest for effects near it.
    # At tau = the margin (the split gates' choice) a gross regression, whose per-pair variance
    # is large, waited for thousands of pairs more; ten times the margin costs a near-margin
    # effect a log factor only (halfwidth ~ sqrt(V (log(tau^2 / V) + 2 log(1 / alpha)))).
    tau: float = 0.1
    # Var of the paired sum; the mutation check swaps in `unpaired_variance` (tests, ctr canary simulate)
    variance: Callable[[np.ndarray, float], float] = ratio_variance

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.margin <= 0:
            raise ValueError(f"margin must be > 0 (a relative log-loss increase), got {self.margin}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.min_pairs < 2:
            raise ValueError(f"min_pairs must be >= 2, got {self.min_pairs}")


DEFAULT_PAIRED = PairedConfig()


def paired_gate(pc: PairedCounts, cfg: PairedConfig = DEFAULT_PAIRED) -> GateResult:
    """The shadow phase's gate: relative log-loss increase of the canary on the same impressions."""
    what = f"canary log loss > stable's x {1 + cfg.margin:g} on the same impressions (paired)"
    n, clicks, ls = pc.total("n"), pc.total("clicks"), pc.total("ls")
    if n < cfg.min_pairs or clicks < cfg.min_clicks or ls <= 0:
        return GateResult("paired", "insufficient", math.nan, -math.inf, math.inf, what, int(n))
    r = pc.total("d") / ls
    var = cfg.variance(pc.counts, r) / ls**2
    m = cfg.margin
    h_harm = stats.halfwidth(var, cfg.tau, cfg.alpha / 4)
    h_ok = stats.halfwidth(var, cfg.tau, cfg.alpha)
    verdict: Verdict = "harm" if r - h_harm > m else "ok" if r + h_ok < m else "inconclusive"
    return GateResult("paired", verdict, r, r - h_harm, r + h_harm, what, int(n), (r - h_ok, r + h_ok))


def auc(hist: np.ndarray) -> float | None:
    """AUC from a (click, bin) histogram: P(score of a click > score of a non-click), ties half."""
    neg, pos = hist[0].astype(float), hist[1].astype(float)
    if neg.sum() == 0 or pos.sum() == 0:
        return None
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def summary(pc: PairedCounts, cfg: PairedConfig = DEFAULT_PAIRED) -> dict[str, Any]:
    """What the status page shows of the shadow phase (no salt, no URL)."""
    g = paired_gate(pc, cfg)
    n, clicks = pc.total("n"), pc.total("clicks")

    def fin(x: float) -> float | None:
        return round(x, 6) if math.isfinite(x) else None

    out: dict[str, Any] = {
        "pairs_joined": int(n),
        "clicks": int(clicks),
        "verdict": g.verdict,
        "logloss_diff_rel": fin(g.estimate),
        "logloss_diff_interval": [fin(g.lo), fin(g.hi)],
        "margin": cfg.margin,
    }
    if n > 0:
        out["logloss_stable"] = fin(pc.total("ls") / n)
        out["logloss_canary"] = fin(pc.total("lc") / n)
        out["calibration_stable"] = fin(clicks / pc.total("p")) if pc.total("p") > 0 else None  # clicks / predicted
        out["calibration_canary"] = fin(clicks / pc.total("q")) if pc.total("q") > 0 else None
        out["auc_stable"], out["auc_canary"] = auc(pc.hist[0]), auc(pc.hist[1])
    out["shadow_calls"] = dict(pc.ops)
    return out
