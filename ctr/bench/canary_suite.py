"""The simulator's checks: A/A canaries over every start hour and two levels of user
heterogeneity, canaries exactly at each gate's margin, the README's bad canaries, and what
counts as passing. `make canary-sim` runs the full grid; tests/test_canary_sim.py a
bounded one, and the mutation check (a fixed-horizon interval swapped in) must fail it.

Design of the grid: for each traffic level and heterogeneity (the click generator's
per-user spread, 0.335, and twice it; activity lognormal sd 1), `per_hour` seeds at each of
the 24 start hours; each rollout is a whole default plan (1 / 5 / 20 / 50 %, 15 h minimum),
held rollouts resumed by a person after an hour, to the horizon. Margins: the canary sits
exactly at one gate's margin (CTR x 0.99, errors + 0.1 pp, latency + 5 ms, calibration
x 1.2) on the harsher heterogeneity; "harm" is a rollback by that gate, "wrongly ok" that
gate reading non-inferior at some look.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from ctr.bench.canary_traffic import ArmProfile, Outcome, Traffic, rollout
from ctr.serving.canary.plan import Plan
from ctr.serving.canary.stats import DEFAULT_GATES, GateConfig

GATES = ("errors", "latency", "ctr", "calibration")
MARGIN_CANARY = {g: f"{g}_margin" for g in GATES}
SPREADS = (0.335, 0.67)


@dataclass(frozen=True, slots=True)
class Job:
    arms: dict[str, ArmProfile]
    canary: str
    seed: int
    plan: Plan
    traffic: Traffic
    gates: GateConfig = DEFAULT_GATES


def _run(job: Job) -> Outcome:
    return asyncio.run(rollout(job.arms, job.canary, job.seed, job.plan, job.traffic, job.gates))


def run_jobs(jobs: list[Job], workers: int = 1) -> list[Outcome]:
    """Every job's outcome, in order (processes when `workers` > 1; each rollout is seeded)."""
    if workers <= 1:
        return [_run(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_run, jobs, chunksize=4))


def grid(
    arms: dict[str, ArmProfile],
    canary: str,
    plan: Plan,
    traffic: Traffic,
    per_hour: int,
    seed: int,
    hours: Iterable[int] = range(24),
) -> list[Job]:
    """`per_hour` seeds at each start hour."""
    return [
        Job(arms, canary, seed + 100 * h + i, plan, dataclasses.replace(traffic, start_hour=float(h)))
        for h in hours
        for i in range(per_hour)
    ]


@dataclass(frozen=True, slots=True)
class Rates:
    n: int
    rolled_back: int
    promoted: int
    held: int
    by_gate: dict[str, int]  # rollbacks per gate

    @classmethod
    def of(cls, outs: list[Outcome]) -> Rates:
        rb = [o for o in outs if o.status == "rolled_back"]
        by_gate = {g: sum(o.gate == g for o in rb) for g in GATES}
        promoted = sum(o.status == "promoted" for o in outs)
        return cls(len(outs), len(rb), promoted, len(outs) - len(rb) - promoted, by_gate)

    @property
    def false_rollback_rate(self) -> float:
        return self.rolled_back / max(1, self.n)


@dataclass(frozen=True, slots=True)
class MarginRates:
    gate: str
    n: int
    harm: int  # rolled back by this gate
    wrongly_ok: int  # this gate read "ok" at some look

    @classmethod
    def of(cls, gate: str, outs: list[Outcome]) -> MarginRates:
        harm = sum(o.status == "rolled_back" and o.gate == gate for o in outs)
        return cls(gate, len(outs), harm, sum(gate in o.ever_ok for o in outs))


def upper95(k: int, n: int) -> float:
    """One-sided 95 % upper bound of a binomial rate (Clopper-Pearson)."""
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


def aa_ok(rates: Rates, bound: float = 0.05) -> bool:
    """A/A passes when the false-rollback rate is not above the bound beyond sampling noise:
    the two-sided 99 % lower bound of the rate stays below it."""
    from scipy.stats import beta

    if rates.rolled_back == 0:
        return True
    return float(beta.ppf(0.005, rates.rolled_back, rates.n - rates.rolled_back + 1)) <= bound


def margin_ok(m: MarginRates, cfg: GateConfig = DEFAULT_GATES) -> bool:
    """At the margin, harm <= alpha/4 per gate and wrongly-ok <= alpha, beyond sampling noise
    (the 99 % lower bound of each observed rate stays below its level)."""
    from scipy.stats import beta

    def low(k: int) -> float:
        return 0.0 if k == 0 else float(beta.ppf(0.005, k, m.n - k + 1))

    return low(m.harm) <= cfg.harm_alpha and low(m.wrongly_ok) <= cfg.alpha


def aa_lines(label: str, outs: list[Outcome]) -> Iterator[str]:
    r = Rates.of(outs)
    gates = ", ".join(f"{g} {k}" for g, k in r.by_gate.items() if k)
    yield (
        f"A/A {label}: {r.rolled_back} of {r.n} rolled back ({r.false_rollback_rate:.1%}, 95 % upper "
        f"{upper95(r.rolled_back, r.n):.1%}{'; ' + gates if gates else ''}); promoted {r.promoted}, "
        f"held/running {r.held}"
    )


def margin_lines(label: str, gate: str, outs: list[Outcome]) -> Iterator[str]:
    m = MarginRates.of(gate, outs)
    yield (
        f"margin {label} {gate:11s}: harm {m.harm}/{m.n} ({m.harm / max(1, m.n):.1%}), "
        f"wrongly ok {m.wrongly_ok}/{m.n} ({m.wrongly_ok / max(1, m.n):.1%})"
    )


def detection_line(o: Outcome) -> str:
    return (
        f"  {o.canary:13s} {o.status:11s} gate {o.gate!s:11s} phase {o.phase + 1} "
        f"(share {o.peak_share:.0%}) after {o.sim_time_s / 60:.0f} min, {o.canary_requests:,} canary requests, "
        f"{o.users_reached:,} users reached"
    )


@dataclass(frozen=True, slots=True)
class FullConfig:
    rps: tuple[float, ...] = (10_000.0, 1_000.0)
    aa_seeds: int = 240  # per (rps, spread), spread over the 24 start hours
    margin_seeds: int = 240  # per gate, at the first rps and the larger spread
    interval_s: float = 600.0  # looks of the A/A and margin grids
    bad_interval_s: float = 60.0  # looks of the bad canaries (detection times)
    workers: int = 2
    seed: int = 0


def full(plan: Plan, arms: dict[str, ArmProfile], trained: dict[str, ArmProfile] | None, cfg: FullConfig) -> dict:
    """Every check of `make canary-sim`: {"lines": [...], "outcomes": {...}}."""
    from ctr.bench.canary_sim import BAD

    lines: list[str] = []
    outcomes: dict[str, list[dict]] = {}
    per_hour = max(1, math.ceil(cfg.aa_seeds / 24))
    grid_plan = dataclasses.replace(plan, interval_s=cfg.interval_s)
    if trained is not None:
        for rps in cfg.rps:
            bad_plan = dataclasses.replace(plan, interval_s=cfg.bad_interval_s)
            jobs = [Job(trained, name, cfg.seed + i, bad_plan, Traffic(rps=rps)) for i, name in enumerate(BAD)]
            jobs.append(Job(trained, "good", cfg.seed + 100, bad_plan, Traffic(rps=rps)))
            outs = run_jobs(jobs, cfg.workers)
            lines.append(f"bad canaries at {rps:,.0f} req/s (looks every {cfg.bad_interval_s:g} s, start hour 0):")
            lines += [detection_line(o) for o in outs]
            outcomes[f"bad@{rps:g}"] = [o.to_dict() for o in outs]
    for rps in cfg.rps:
        for spread in SPREADS:
            t0 = time.perf_counter()
            traffic = Traffic(rps=rps, propensity_sd=spread)
            outs = run_jobs(grid({**arms}, "aa", grid_plan, traffic, per_hour, cfg.seed + 10_000), cfg.workers)
            label = f"{rps:,.0f} req/s, spread {spread}"
            lines += list(aa_lines(label, outs))
            lines.append(f"  ({per_hour} per start hour x 24; {time.perf_counter() - t0:.0f} s)")
            outcomes[f"aa@{rps:g}/{spread}"] = [o.to_dict() for o in outs]
    m_per_hour = max(1, math.ceil(cfg.margin_seeds / 24))
    traffic = Traffic(rps=cfg.rps[0], propensity_sd=SPREADS[-1])
    for gate, name in MARGIN_CANARY.items():
        outs = run_jobs(grid(arms, name, grid_plan, traffic, m_per_hour, cfg.seed + 20_000), cfg.workers)
        lines += list(margin_lines(f"{cfg.rps[0]:,.0f} req/s, spread {SPREADS[-1]}", gate, outs))
        outcomes[f"margin/{gate}"] = [o.to_dict() for o in outs]
    return {"lines": lines, "outcomes": outcomes}


# ---- the bounded suite (make test) and its mutation check -----------------------------------
BOUNDED_TRAFFIC = Traffic(rps=10_000.0, population=100_000)
MARGIN_BUDGET = 3  # harm + wrongly-ok readings allowed over the bounded margin rollouts


def bounded_margin_failures(
    arms: dict[str, ArmProfile], plan: Plan, per_gate: int = 16, horizon_s: float = 4 * 3600.0, seed: int = 500
) -> int:
    """Canaries exactly at each gate's margin, looked at every plan interval for `horizon_s`:
    how many were rolled back by that gate or read "ok" on it. Stops once over the budget."""
    failures = 0
    for gate, name in MARGIN_CANARY.items():
        for i in range(per_gate):
            traffic = dataclasses.replace(BOUNDED_TRAFFIC, start_hour=float((i * 7) % 24))
            o = asyncio.run(rollout(arms, name, seed + i, plan, traffic, max_time_s=horizon_s))
            failures += (o.status == "rolled_back" and o.gate == gate) + (gate in o.ever_ok)
            if failures > MARGIN_BUDGET:
                return failures
    return failures


def fixed_horizon_halfwidth(var: float, tau: float, alpha: float) -> float:
    """The mutation: a fixed-horizon z interval, looked at every interval (not always valid)."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - alpha / 2) * math.sqrt(max(var, 0.0))
