"""The shadow phase under simulated traffic: the paired gate's verdict and detection time for
the simulator's bad canaries, beside the split gates', and its false alarms on good canaries
under the same nuisances (daily cycle, heavy users, bursts), through the real controller,
plan and paired gate under a fake clock.

World. `canary_sim.build_world` scores a fixed set of requests with every model; users are
shown stable's first-ranked ad, whose true click probability the generator knows. A shadow
pair is (stable's score of that ad, the canary's score of the same ad, a click drawn from
its true probability), so the pairing is real: both models judged on the very impressions
users saw. The traffic is `canary_traffic`'s: per interval, stable's requests (the daily
cycle x bursts) x the shadow sample become pairs; each pair's user unit is drawn by the
units' activity (heavy users: a unit's click propensity offset, the users' activity-weighted
one, stays with it for the whole rollout), its click logit moved by the unit's offset and the
hour's.

Mutation. `PairedConfig(variance=paired.unpaired_variance)` reads the same pairs as two
independent samples (the covariance the pairing brings dropped): the bounded check
(tests/test_canary_shadow_sim.py) must then fail to reject the bad canaries in time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit, logit

from ctr.bench.canary_traffic import DAY_S, DEFAULT_TRAFFIC, FakeClock, Population, Traffic, _daily
from ctr.serving.canary import paired
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.counts import N_UNITS
from ctr.serving.canary.paired import PairedConfig, PairedCounts, paired_gate
from ctr.serving.canary.plan import Plan, default_plan
from ctr.serving.canary.shadow import MemoryShadowStore
from ctr.serving.canary.state import Arm, MemoryStore

SHADOW_PLAN = default_plan(shadow_s=3600.0)  # a 1 h shadow phase, then 1 / 5 / 20 / 50 %
MODEL_BAD = ("shuffled", "tenth", "miscalibrated")  # bad in their scores (errors, slow: the split's gates)


def expected_log_loss(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    s = np.clip(s, 1e-6, 1 - 1e-6)
    return -(t * np.log(s) + (1 - t) * np.log1p(-s))


@dataclass(frozen=True, slots=True)
class PairedArm:
    """A canary in the shadow phase: per fixed request, stable's score `p` of the ad shown, the
    canary's score `q` of that same ad, its true click probability `t`."""

    name: str
    p: np.ndarray
    q: np.ndarray
    t: np.ndarray

    def true_increase(self) -> float:
        """The canary's relative log-loss increase on these impressions, in expectation."""
        return float(expected_log_loss(self.q, self.t).sum() / expected_log_loss(self.p, self.t).sum() - 1)


def paired_arms(scores: dict[str, np.ndarray], p_true: np.ndarray) -> dict[str, PairedArm]:
    """Each model's PairedArm from a world's score matrices (users see stable's first choice)."""
    st = scores["stable"]
    rows, shown = np.arange(len(st)), st.argmax(axis=1)
    p, t = st[rows, shown], p_true[rows, shown]
    return {n: PairedArm(n, p, s[rows, shown], t) for n, s in scores.items() if n != "stable"}


def at_margin(base: PairedArm, margin: float, name: str = "margin", seed: int = 0) -> PairedArm:
    """Stable's scores with noise on the logit scale (fixed per request), its size set so that the
    expected log loss is exactly `margin` worse. Noise rather than a shift: a shifted canary's
    log loss would move with the daily cycle's CTR (better at some hours, worse at others)."""
    eps = np.random.default_rng(seed).standard_normal(len(base.p))
    z = logit(np.clip(base.p, 1e-6, 1 - 1e-6))
    lo, hi = 0.0, 4.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (
            (mid, hi) if PairedArm(name, base.p, expit(z + mid * eps), base.t).true_increase() < margin else (lo, mid)
        )
    return PairedArm(name, base.p, expit(z + (lo + hi) / 2 * eps), base.t)


def synthetic_paired(n: int = 20_000, seed: int = 0) -> dict[str, PairedArm]:
    """Without training: a calibrated stable (true CTR = its score) and canaries with stable's
    scores x 3 (`miscalibrated`), with noise on the logit (`noisy`), and exactly at the margin."""
    rng = np.random.default_rng(seed)
    p = expit(rng.normal(logit(0.05), 0.8, n))
    z = logit(p)
    arms = {
        "miscalibrated": PairedArm("miscalibrated", p, np.minimum(p * 3, 1 - 1e-6), p),
        "noisy": PairedArm("noisy", p, expit(z + rng.normal(0, 0.5, n)), p),
        "same": PairedArm("same", p, p, p),
    }
    arms["margin"] = at_margin(arms["same"], PairedConfig().margin)
    return arms


@dataclass(frozen=True, slots=True)
class ShadowOutcome:
    canary: str
    seed: int
    status: str  # rejected (rolled back by the paired gate) | passed (the split follows) | held | running
    sim_time_s: float
    pairs: int
    estimate: float
    lo: float
    hi: float
    start_hour: float
    ever_ok: bool
    ever_harm: bool
    true_increase: float  # the expected relative log-loss increase on the pairs drawn (their true click probability)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


async def shadow_rollout(
    arm: PairedArm,
    seed: int,
    plan: Plan = SHADOW_PLAN,
    traffic: Traffic = DEFAULT_TRAFFIC,
    sample: float = 0.01,
    cfg: PairedConfig = paired.DEFAULT_PAIRED,
    max_time_s: float | None = None,
) -> ShadowOutcome:
    """The shadow phase of one rollout of `arm`, stepped every plan interval, until it passes,
    is rolled back, held, or `max_time_s` (default: the phase's maximum time, then one look)."""
    rng = np.random.default_rng(seed)
    clock = FakeClock(100 * DAY_S + traffic.start_hour * 3600.0)
    store, pairs = MemoryStore(clock), MemoryShadowStore(clock)

    async def gate(rollout_id: str) -> Any:
        return paired_gate(await pairs.load(rollout_id), cfg)

    ids = iter(range(1_000_000))
    ctl = Controller(store, clock=clock, owner=f"shadow-{seed}", new_id=lambda: f"sh{seed}-{next(ids)}", paired=gate)
    r = await ctl.start(Arm("stable"), Arm(arm.name), plan, by="simulator")
    pop = Population.draw(rng, traffic, float(arm.t.mean()))
    act, weighted = pop.totals
    offset = logit(np.clip(weighted / np.maximum(act, 1e-12), 1e-6, 1 - 1e-6)) - logit(pop.p_stable)
    unit_share = act / act.sum()
    logit_t = logit(np.clip(arm.t, 1e-9, 1 - 1e-9))
    dt = plan.interval_s
    horizon = max_time_s or plan.min_duration_s(0) * plan.max_phase_factor + dt
    start, ever_ok, ever_harm, exp_ll = clock.t, False, False, np.zeros(2)
    while r.status == "running" and plan.is_shadow(r.phase) and clock.t - start < horizon:
        load = 1 + traffic.daily_traffic * _daily(clock.t)
        burst = 3.0 if rng.random() < traffic.bursts_per_h * dt / 3600.0 else 1.0
        n = int(rng.poisson(traffic.rps * dt * load * burst * sample * (1 - traffic.base_error)))
        units = np.repeat(np.arange(N_UNITS), rng.multinomial(n, unit_share))
        idx = rng.integers(0, len(arm.p), n)
        t = expit(logit_t[idx] + offset[units] + traffic.daily_logit * _daily(clock.t))
        y = (rng.random(n) < t).astype(float)
        exp_ll += (expected_log_loss(arm.p[idx], t).sum(), expected_log_loss(arm.q[idx], t).sum())
        delta = PairedCounts()
        delta.record(arm.p[idx], arm.q[idx], y, units)
        await pairs.add(r.id, delta)
        clock.t += dt
        await ctl.step()
        g = ctl.last_gates.get("paired")
        ever_ok |= g is not None and g.verdict == "ok"
        ever_harm |= g is not None and g.verdict == "harm"
        loaded = await store.load()
        assert loaded is not None
        r = loaded
    g = paired_gate(await pairs.load(r.id), cfg)
    status = "rejected" if r.status == "rolled_back" else "passed" if r.phase > 0 else r.status
    return ShadowOutcome(arm.name, seed, status, clock.t - start, g.n, g.estimate, g.lo, g.hi, traffic.start_hour,
                         ever_ok, ever_harm, float(exp_ll[1] / exp_ll[0] - 1) if exp_ll[0] else math.nan)  # fmt: skip


def run(
    arm: PairedArm, seed: int, plan: Plan, traffic: Traffic, sample: float, cfg: PairedConfig = paired.DEFAULT_PAIRED
) -> ShadowOutcome:
    return asyncio.run(shadow_rollout(arm, seed, plan, traffic, sample, cfg))


def split_bad(arms: dict[str, Any], rps: float, interval_s: float, workers: int = 1, seed: int = 0) -> list[Any]:
    """The split gates' outcomes for the bad canaries (as `canary_suite.full` runs them: default plan,
    start hour 0, the same seeds), for the table beside the shadow phase's."""
    from ctr.bench import canary_suite as suite
    from ctr.bench.canary_sim import BAD

    plan = dataclasses.replace(default_plan(), interval_s=interval_s)
    return suite.run_jobs([suite.Job(arms, n, seed + i, plan, Traffic(rps=rps)) for i, n in enumerate(BAD)], workers)


def detection_line(split: Any, shadow: ShadowOutcome, true_increase: float) -> str:
    """One bad canary: the split gates' outcome beside the shadow phase's."""
    est = f"{shadow.estimate:+.3f}" if math.isfinite(shadow.estimate) else "n/a"
    return (
        f"  {shadow.canary:13s} split: {split.status} by {split.gate} after {split.sim_time_s / 60:.0f} min, "
        f"{split.canary_requests:,} canary requests | shadow: {shadow.status} after {shadow.sim_time_s / 60:.0f} min, "
        f"{shadow.pairs:,} pairs (log loss {est}, true {true_increase:+.3f})"
    )


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    rps: tuple[float, ...] = (10_000.0, 1_000.0)
    sample: float = 0.01  # as much canary traffic as the split's first phase (1 % of users)
    per_hour: int = 2  # good / margin canaries per start hour and spread
    interval_s: float = 60.0
    seed: int = 0


def full(world: Any, split_outcomes: dict[float, list[Any]], cfg: ShadowConfig) -> dict[str, Any]:
    """Bad canaries beside the split's (`split_outcomes`: rps -> canary_traffic outcomes), false alarms of
    the good canary and of one exactly at the margin, and the unpaired mutation: {"lines", "outcomes"}."""
    arms = paired_arms(world.scores, world.p_true)
    same = PairedArm("same", arms["good"].p, arms["good"].p, arms["good"].t)
    arms["margin"] = at_margin(same, paired.DEFAULT_PAIRED.margin)
    plan = dataclasses.replace(SHADOW_PLAN, interval_s=cfg.interval_s)
    lines: list[str] = []
    outcomes: dict[str, list[dict[str, Any]]] = {}
    for rps in cfg.rps:
        lines.append(
            f"shadow phase at {rps:,.0f} req/s, sample {cfg.sample:.0%} (start hour 0; split: its phase 1 at 1 %):"
        )
        splits = {o.canary: o for o in split_outcomes.get(rps, [])}
        outs = [run(arms[n], cfg.seed + i, plan, Traffic(rps=rps), cfg.sample) for i, n in enumerate((*splits, "good"))
                if n in arms]  # fmt: skip
        for o in outs:
            split = splits.get(o.canary)
            lines.append(detection_line(split, o, arms[o.canary].true_increase()) if split else
                         f"  {o.canary:13s} shadow: {o.status} after {o.sim_time_s / 60:.0f} min, {o.pairs:,} pairs "
                         f"(true {arms[o.canary].true_increase():+.3f})")  # fmt: skip
        outcomes[f"shadow-bad@{rps:g}"] = [o.to_dict() for o in outs]
    lines += list(false_alarms(arms, plan, cfg, outcomes))
    lines += list(mutation(arms, plan, cfg, outcomes))
    return {"lines": lines, "outcomes": outcomes}


def false_alarms(arms: dict[str, PairedArm], plan: Plan, cfg: ShadowConfig, outcomes: dict) -> Iterator[str]:
    """The good canary and one exactly at the margin, `per_hour` seeds x 24 start hours x two spreads."""
    for name in ("good", "margin"):
        for spread in (0.335, 0.67):
            outs = [
                run(arms[name], cfg.seed + 1000 + 100 * h + i, plan,
                    Traffic(rps=cfg.rps[0], propensity_sd=spread, start_hour=float(h)), cfg.sample)
                for h in range(24) for i in range(cfg.per_hour)
            ]  # fmt: skip
            outcomes[f"shadow-{name}/{spread}"] = [o.to_dict() for o in outs]
            yield rates_line(f"shadow {name:6s} at {cfg.rps[0]:,.0f} req/s, spread {spread}", outs)


def rates_line(label: str, outs: list[ShadowOutcome], margin: float = paired.DEFAULT_PAIRED.margin) -> str:
    """False alarms against the truth each run had: its canary's expected log-loss increase on the
    pairs drawn (the nuisances move it: a daily CTR shift or a user mix favours one model's
    calibration), which is what the always-valid interval covers."""
    n = len(outs)
    false_alarm = sum(o.status == "rejected" and o.true_increase <= margin for o in outs)
    wrong_ok = sum(o.ever_ok and o.true_increase >= margin for o in outs)
    truth = sorted(o.true_increase for o in outs)
    return (
        f"{label}: rejected {sum(o.status == 'rejected' for o in outs)}/{n} (false alarms, truth <= margin: "
        f"{false_alarm}), passed {sum(o.status == 'passed' for o in outs)}/{n}, wrongly ok (truth >= margin) "
        f"{wrong_ok}/{n}; true increase {truth[0]:+.4f} .. {truth[-1]:+.4f}"
    )


def mutation(arms: dict[str, PairedArm], plan: Plan, cfg: ShadowConfig, outcomes: dict) -> Iterator[str]:
    """The same bad canaries judged by a gate that ignores the pairing."""
    unpaired = dataclasses.replace(paired.DEFAULT_PAIRED, variance=paired.unpaired_variance)
    outs = [run(arms[n], cfg.seed + i, plan, Traffic(rps=cfg.rps[0]), cfg.sample, unpaired)
            for i, n in enumerate(MODEL_BAD)]  # fmt: skip
    outcomes["shadow-mutation-unpaired"] = [o.to_dict() for o in outs]
    yield f"mutation (pairing ignored) at {cfg.rps[0]:,.0f} req/s:"
    for o in outs:
        yield f"  {o.canary:13s} {o.status} after {o.sim_time_s / 60:.0f} min, {o.pairs:,} pairs"
