"""Simulated traffic for whole canary rollouts, with the nuisance real traffic has, through
the real controller, gates and store interface under a fake clock.

What is in it (each one breaks a naive always-valid gate; notes/canary-statistics.md):
- users: a population (1 M by default), each with an activity (requests/s ~ lognormal,
  sd `activity_sd` of its log) and a click propensity (a logit offset ~ N(0,
  `propensity_sd`); the click generator's own spread is 0.335). Users are assigned to the
  arms by their bucket through the real `split.bucket_ranges`, and to the gates' units;
  a user's propensity stays with the user, so a heavy user's impressions are correlated;
- a daily cycle: traffic x (1 + 0.6 sin) and CTR logit + 0.25 sin (the generator's),
  median latency rising with load; any start hour;
- bursts: traffic x3 for one interval, and latency stalls (1 s of an arm's requests at
  +1 s) at random times on either arm;
- a held rollout keeps running (harm still rolls it back) and a person resumes it after
  `resume_after_s`, until the horizon.

Per interval and arm, counts are drawn per unit: requests ~ Poisson(rate x the unit's
summed activity), errors ~ Binomial, clicks ~ Binomial(impressions, the unit's
activity-weighted click probability at that hour), the predicted-CTR sum around the arm's
mean prediction (tracking the hour, not the user), a latency histogram ~ Multinomial.
The arm's CTR is stable's per-user probability times the arm's ratio, so a canary can sit
exactly at a margin.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import expit, logit, ndtr

from ctr.serving.canary.controller import Controller
from ctr.serving.canary.counts import FIELD, LATENCY_EDGES_MS, N_UNITS, Counts, stratum_key
from ctr.serving.canary.plan import Plan
from ctr.serving.canary.split import bucket_ranges
from ctr.serving.canary.state import Arm, MemoryStore, Rollout
from ctr.serving.canary.stats import DEFAULT_GATES, GateConfig

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class ArmProfile:
    """What serving one request looks like on an arm (means over the fixed request set)."""

    name: str
    p_true: float  # mean true click probability of the shown ad
    pred_mean: float  # mean predicted CTR of the shown ad
    pred_var: float
    error_rate: float = 0.0  # added to the base error rate
    extra_latency_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Traffic:
    rps: float = 10_000.0
    population: int = 1_000_000
    base_error: float = 0.0005
    latency_median_ms: float = 3.0
    latency_sigma: float = 0.35
    activity_sd: float = 1.0  # sd of log(user's request rate)
    propensity_sd: float = 0.335  # sd of the user's click-logit offset (the generator's spread)
    start_hour: float = 0.0
    daily_traffic: float = 0.6  # traffic x (1 + a sin(2 pi (h - 14) / 24))
    daily_logit: float = 0.25  # CTR logit + b sin(...)
    latency_load: float = 0.3  # median latency x (1 + c (load - 1))
    bursts_per_h: float = 0.1  # traffic x3 for one interval
    stalls_per_h: float = 0.1  # per arm: 1 s of its requests at +stall_ms
    stall_ms: float = 1000.0
    resume_after_s: float = 3600.0  # a held rollout is resumed by a person this long after the hold


DEFAULT_TRAFFIC = Traffic()


@dataclass(frozen=True, slots=True)
class Outcome:
    canary: str
    seed: int
    status: str  # promoted | rolled_back | held | running (out of time)
    gate: str | None  # the gate that rolled it back (or held it)
    phase: int
    peak_share: float
    sim_time_s: float
    canary_requests: int
    users_reached: int
    reason: str
    start_hour: float = 0.0
    ever_ok: tuple[str, ...] = ()  # gates that read "ok" at some look
    ever_harm: tuple[str, ...] = ()  # gates that read "harm" at some look
    holds: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _daily(t_s: float) -> float:
    return math.sin(2 * math.pi * ((t_s % DAY_S) / 3600.0 - 14.0) / 24.0)


@functools.lru_cache(maxsize=4096)
def _latency_probs(t: Traffic, extra_ms: float, load: float) -> np.ndarray:
    median = t.latency_median_ms * (1 + t.latency_load * (load - 1))
    edges = np.asarray(LATENCY_EDGES_MS) - extra_ms
    z = (np.log(np.maximum(edges, 1e-12)) - math.log(median)) / t.latency_sigma
    cdf = np.where(edges > 0, ndtr(z), 0.0)
    probs = np.clip(np.diff(np.concatenate([[0.0], cdf, [1.0]])), 0, None)
    return probs / probs.sum()


def latency_probs(t: Traffic, extra_ms: float, load: float = 1.0) -> np.ndarray:
    """P(latency in each histogram bucket) for lognormal(median x load factor, sigma) + extra_ms."""
    return _latency_probs(t, extra_ms, round(load, 3))


@dataclass(slots=True)
class Population:
    """One seed's users: activity, click propensity, arm bucket and unit."""

    activity: np.ndarray  # users sorted by bucket
    weighted_p: np.ndarray  # activity x click probability on stable
    bucket: np.ndarray  # sorted
    unit: np.ndarray
    p_stable: float
    total_activity: float = 0.0
    totals: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))  # per unit: activity, weighted p
    groups: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # arm -> (activity, p) per unit
    share: float = -1.0

    @classmethod
    def draw(cls, rng: np.random.Generator, t: Traffic, p_stable: float) -> Population:
        a = rng.lognormal(-(t.activity_sd**2) / 2, t.activity_sd, t.population)
        p = expit(logit(p_stable) + rng.normal(0.0, t.propensity_sd, t.population))
        # Buckets are uniform in [0, 1) and independent of the user (tests/test_canary_split.py);
        # drawn here rather than hashed, for speed. Sorted, so an arm's range is a slice.
        b = np.sort(rng.random(t.population))
        unit = rng.integers(0, N_UNITS, t.population)
        pop = cls(a, a * p, b, unit, p_stable, float(a.sum()))
        pop.totals = (np.bincount(unit, a, N_UNITS), np.bincount(unit, a * p, N_UNITS))
        return pop

    def regroup(self, share: float) -> None:
        """Per unit of each arm: summed activity and activity-weighted click probability."""
        if share == self.share:
            return
        act, wp = np.zeros(N_UNITS), np.zeros(N_UNITS)
        for lo, hi in bucket_ranges(min(1.0, share)):
            i, j = np.searchsorted(self.bucket, (lo, hi))
            act += np.bincount(self.unit[i:j], self.activity[i:j], N_UNITS)
            wp += np.bincount(self.unit[i:j], self.weighted_p[i:j], N_UNITS)
        for arm, (a, w) in (("canary", (act, wp)), ("stable", (self.totals[0] - act, self.totals[1] - wp))):
            a = np.maximum(a, 0.0)
            self.groups[arm] = (a, np.where(a > 1e-9, w / np.maximum(a, 1e-9), self.p_stable))
        self.share = share


def _draw_arm(
    rng: np.random.Generator,
    cell_counts: np.ndarray,
    arm: ArmProfile,
    stable: ArmProfile,
    group: tuple[np.ndarray, np.ndarray],
    rate: float,
    shift: float,
    t: Traffic,
) -> int:
    act, p_unit = group
    req = rng.poisson(rate * act)
    err = rng.binomial(req, min(1.0, t.base_error + arm.error_rate))
    imp = req - err
    p = np.clip(arm.p_true / stable.p_true * expit(logit(p_unit) + shift), 0, 1)
    clicks = rng.binomial(imp, p)
    pred_scale = float(expit(logit(stable.p_true) + shift) / stable.p_true)
    pred = imp * arm.pred_mean * pred_scale + rng.normal(0, 1, N_UNITS) * np.sqrt(imp * arm.pred_var)
    for name, v in (
        ("requests", req),
        ("errors", err),
        ("impressions", imp),
        ("clicks", clicks),
        ("scored", imp),
        ("scored_clicks", clicks),
        ("pred_sum", np.maximum(pred, 0.0)),
    ):
        cell_counts[FIELD[name]] += v
    return int(req.sum())


def _latency(rng: np.random.Generator, n: int, arm: ArmProfile, t: Traffic, load: float, dt: float) -> np.ndarray:
    hist = rng.multinomial(n, latency_probs(t, arm.extra_latency_ms, load))
    if rng.random() < t.stalls_per_h * dt / 3600.0:  # 1 s of this arm's requests stall
        stalled = int(rng.binomial(n, min(1.0, 1.0 / dt)))
        hist = hist - rng.multivariate_hypergeometric(hist, stalled)
        hist += rng.multinomial(stalled, latency_probs(t, arm.extra_latency_ms + t.stall_ms, load))
    return hist


def horizon_s(plan: Plan) -> float:
    """Every phase at its maximum time, plus one resumed window per phase, plus a look."""
    return sum(plan.min_duration_s(i) * (plan.max_phase_factor + 1) for i in range(plan.n_phases())) + plan.interval_s


async def rollout(
    arms: dict[str, ArmProfile],
    canary: str,
    seed: int,
    plan: Plan,
    traffic: Traffic = DEFAULT_TRAFFIC,
    gates: GateConfig = DEFAULT_GATES,
    max_time_s: float | None = None,
) -> Outcome:
    """One whole rollout of `canary` against `stable`, stepped every plan interval."""
    rng = np.random.default_rng(seed)
    day0 = 100 * DAY_S
    clock = FakeClock(day0 + traffic.start_hour * 3600.0)
    store = MemoryStore(clock)
    counter = iter(range(1_000_000))
    ctl = Controller(store, gates, clock=clock, owner=f"sim-{seed}", new_id=lambda: f"sim{seed}-{next(counter)}")
    r = await ctl.start(Arm("stable"), Arm(canary), plan, by="simulator")
    stable, prof = arms["stable"], arms[canary]
    pop = Population.draw(rng, traffic, stable.p_true)
    horizon, dt = max_time_s or horizon_s(plan), plan.interval_s
    start, served, top_share, holds = clock.t, 0, 0.0, 0
    ever_ok: set[str] = set()
    ever_harm: set[str] = set()
    held_at: float | None = None
    while r.status in ("running", "held") and clock.t - start < horizon:
        if r.status == "held":
            held_at = clock.t if held_at is None else held_at
            if clock.t - held_at >= traffic.resume_after_s:
                r, held_at = await ctl.resume(by="simulator", reason="another window"), None
        pop.regroup(r.share)
        top_share = max(top_share, r.share)
        load = 1 + traffic.daily_traffic * _daily(clock.t)
        burst = 3.0 if rng.random() < traffic.bursts_per_h * dt / 3600.0 else 1.0
        rate = traffic.rps * dt * load * burst / pop.total_activity
        shift = traffic.daily_logit * _daily(clock.t)
        delta = Counts()
        stratum = stratum_key(r.phase, clock.t, gates.stratum_s)
        for name, p in (("canary", prof), ("stable", stable)):
            cell = delta.cell(name, stratum)
            n = _draw_arm(rng, cell.counts, p, stable, pop.groups[name], rate, shift, traffic)
            cell.latency += _latency(rng, n, p, traffic, load, dt)
            served += n if name == "canary" else 0
        await store.add(r.id, delta)
        clock.t += dt
        await ctl.step()
        ever_ok |= {g for g, v in ctl.last_gates.items() if v.verdict == "ok"}
        ever_harm |= {g for g, v in ctl.last_gates.items() if v.verdict == "harm"}
        loaded = await store.load()
        assert loaded is not None
        holds += loaded.status == "held" and r.status != "held"
        r = loaded
    return _outcome(r, canary, seed, traffic, top_share, clock.t - start, served, ever_ok, ever_harm, holds)


def _outcome(
    r: Rollout,
    canary: str,
    seed: int,
    traffic: Traffic,
    top_share: float,
    elapsed_s: float,
    served: int,
    ever_ok: set[str],
    ever_harm: set[str],
    holds: int,
) -> Outcome:
    last = r.history[-1] if r.history else {}
    gate = last.get("gate", {}).get("gate") if r.status in ("rolled_back", "held") else None
    users = int(top_share * traffic.population)
    return Outcome(
        canary,
        seed,
        r.status,
        gate,
        r.phase,
        top_share,
        elapsed_s,
        served,
        users,
        r.reason,
        traffic.start_hour,
        tuple(sorted(ever_ok)),
        tuple(sorted(ever_harm)),
        holds,
    )
