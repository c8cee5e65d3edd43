"""Whole canary rollouts through the real canary code, under a fake clock, with real models.

World: a small generated click log (models/data.py) and DeepFM models trained on it with
models/train.py: `stable`, `good` (same data, another seed), `shuffled` (labels permuted),
`tenth` (a tenth of the impressions); `miscalibrated` is stable's scores x 3 (same ranking),
`errors` is stable failing 1 % of calls, `slow` is stable 10 ms slower.

Impressions (notes/canary-statistics.md): a fixed set of simulated requests (a log user,
a context, K candidate ads drawn by popularity) is scored once per model in batched forward
passes; the arm shows the candidate its model ranks first, whose click probability is the
generator's true one. Per interval, each arm's counts are drawn with numpy from those fixed
per-request values: requests ~ Binomial(traffic, arm share), clicks ~ Binomial(impressions,
mean true p of the shown ads), predicted-CTR sum, errors, latency histogram (lognormal).
Each draw is exactly the sum of per-request Bernoulli draws with requests picked uniformly
from the fixed set, so hundreds of seeds over millions of impressions cost seconds.

Through the real code: the arm shares come from `split.bucket` over a sample of user ids
(each seed a new salt from `Controller.start`); counters go through the `Store` interface;
`Controller.step` evaluates the real gates and applies the plan's decisions.

Traffic assumptions (stated, not measured): `rps` requests/s (default 10,000), one shown
ad each; a large user population (users reached = the canary's share of `population`)
whose features are independent of their hash bucket, so impressions are independent within
an arm (user-level clustering is not modelled); stable latency lognormal, median 3 ms,
sigma 0.35; base error rate 0.05 % on both arms.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ctr.serving.canary.controller import Controller
from ctr.serving.canary.plan import Plan, default_plan
from ctr.serving.canary.split import bucket, bucket_ranges
from ctr.serving.canary.state import Arm, Delta, MemoryStore
from ctr.serving.canary.stats import DEFAULT_GATES, LATENCY_EDGES_MS, N_LATENCY_BUCKETS, ArmStats, GateConfig
from models import data as clicklog

BAD = ("shuffled", "tenth", "miscalibrated", "errors", "slow")
EXPECTED_GATE = {
    "shuffled": "ctr",
    "tenth": "ctr",
    "miscalibrated": "calibration",
    "errors": "errors",
    "slow": "latency",
}


@dataclass(frozen=True, slots=True)
class WorldConfig:
    users: int = 2000
    ads: int = 300
    impressions: int = 60_000
    max_epochs: int = 10
    batch_size: int = 1024  # small batches: the small log's models come out calibrated (ECE < 0.01)
    requests: int = 20_000  # fixed simulated requests scored by every model
    candidates: int = 8
    seed: int = 7
    # The good canary: stable's recipe with another seed. Seeds 1..4 of the default world put
    # the shown-ad CTR at -0.8 %, -0.8 %, +0.2 %, -0.7 % of stable's: only seed 3 is as good
    # as stable; the others are (correctly) not promoted, as a 1 % margin cannot be proven.
    good_seed: int = 3


DEFAULT_WORLD = WorldConfig()


@dataclass(frozen=True, slots=True)
class Traffic:
    rps: float = 10_000.0
    population: int = 1_000_000
    base_error: float = 0.0005
    latency_median_ms: float = 3.0
    latency_sigma: float = 0.35
    id_sample: int = 20_000  # user ids hashed per seed to measure the realized share


DEFAULT_TRAFFIC = Traffic()


@dataclass(frozen=True, slots=True)
class ArmProfile:
    """What serving one request looks like on an arm, over the fixed request set."""

    name: str
    p_true: float  # mean true click probability of the shown ad
    pred_mean: float  # mean predicted CTR of the shown ad
    pred_var: float
    error_rate: float = 0.0
    extra_latency_ms: float = 0.0


@dataclass(slots=True)
class World:
    cfg: WorldConfig
    arms: dict[str, ArmProfile]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def _derived_log(src: Path, dst: Path, kind: str, seed: int) -> Path:
    """A copy of the log with labels shuffled, or a tenth of its impressions."""
    arrays, _, _ = clicklog.load(src)
    rng = np.random.default_rng(seed)
    if kind == "shuffled":
        arrays["imp_label"] = rng.permutation(arrays["imp_label"])
    else:
        keep = np.sort(rng.choice(len(arrays["imp_label"]), len(arrays["imp_label"]) // 10, replace=False))
        arrays = {k: (v[keep] if k.startswith("imp_") else v) for k, v in arrays.items()}
    dst.mkdir(parents=True, exist_ok=True)
    np.savez(dst / clicklog.CLICKLOG, **arrays)
    meta = clicklog.read_meta(src)
    assert meta is not None
    meta["config"]["n_impressions"] = len(arrays["imp_label"])
    (dst / clicklog.META).write_text(__import__("json").dumps(meta))
    return dst


def _requests(cfg: WorldConfig, arrays: dict[str, np.ndarray], w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fixed request set: test-split users and contexts, candidates drawn by ad popularity."""
    rng = np.random.default_rng(cfg.seed + 1)
    n = len(arrays["imp_label"])
    rows = rng.integers(int(n * 0.8), n, cfg.requests)
    k = cfg.candidates
    req = {
        f"imp_{c}": np.repeat(arrays[f"imp_{c}"][rows], k) for c in ("user", "hour", "device", "site", "banner", "conn")
    }
    req["imp_ad"] = rng.choice(cfg.ads, cfg.requests * k, p=w["a_w"])
    return req


def build_world(cfg: WorldConfig = DEFAULT_WORLD, workdir: Path | None = None) -> World:
    """Generate the log, train the models, score the fixed requests: the expensive part, once."""
    from models.train import TrainConfig, feature_matrix, predict, train

    tmp = Path(workdir or tempfile.mkdtemp(prefix="ctr-canary-sim-"))
    dcfg = clicklog.DataConfig(n_users=cfg.users, n_ads=cfg.ads, n_impressions=cfg.impressions, seed=cfg.seed)
    log_dir = tmp / "log"
    if clicklog.read_meta(log_dir) is None:
        clicklog.write(log_dir, dcfg)
    arrays, _, _ = clicklog.load(log_dir)
    w = clicklog.world(dcfg)
    req = _requests(cfg, arrays, w)
    p_true = clicklog.true_p(
        w,
        dcfg.base_logit,
        req["imp_user"],
        req["imp_ad"],
        req["imp_hour"],
        req["imp_device"],
        req["imp_site"],
        req["imp_banner"],
        req["imp_conn"],
    )
    p_true = p_true.reshape(cfg.requests, cfg.candidates)
    tc = TrainConfig(max_epochs=cfg.max_epochs, batch_size=cfg.batch_size)
    runs = {
        "stable": (log_dir, tc),
        "good": (log_dir, TrainConfig(max_epochs=cfg.max_epochs, batch_size=cfg.batch_size, seed=cfg.good_seed)),
        "shuffled": (_derived_log(log_dir, tmp / "shuffled", "shuffled", 1), tc),
        "tenth": (_derived_log(log_dir, tmp / "tenth", "tenth", 1), tc),
    }
    world = World(cfg, {})
    rows = np.arange(cfg.requests)
    for name, (d, c) in runs.items():
        res = train(d, c)
        x = feature_matrix({**arrays, **req}, res.spec)
        scores = predict(res.model, x).astype(np.float64).reshape(cfg.requests, cfg.candidates)
        variants = [(name, scores, 0.0, 0.0)]
        if name == "stable":
            variants += [
                ("miscalibrated", np.minimum(scores * 3, 1 - 1e-6), 0.0, 0.0),
                ("errors", scores, 0.01, 0.0),
                ("slow", scores, 0.0, 10.0),
            ]
        for vname, s, err, slow in variants:
            shown = s.argmax(axis=1)
            pred = s[rows, shown]
            world.arms[vname] = ArmProfile(
                vname, float(p_true[rows, shown].mean()), float(pred.mean()), float(pred.var()), err, slow
            )
        world.metrics[name] = {"test_auc": res.metrics["test_auc"], "ctr_shown": world.arms[name].p_true}
    return world


def _latency_probs(t: Traffic, extra_ms: float) -> np.ndarray:
    """P(latency in each histogram bucket) for lognormal(median, sigma) + extra_ms."""
    edges = np.asarray(LATENCY_EDGES_MS) - extra_ms
    z = np.where(
        edges > 0, (np.log(np.maximum(edges, 1e-12)) - math.log(t.latency_median_ms)) / t.latency_sigma, -np.inf
    )
    cdf = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    probs = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    assert len(probs) == N_LATENCY_BUCKETS
    return np.clip(probs, 0, None) / probs.clip(0, None).sum()


def _draw(rng: np.random.Generator, arm: ArmProfile, n: int, t: Traffic, lat: np.ndarray) -> ArmStats:
    s = ArmStats()
    s.requests = n
    s.errors = int(rng.binomial(n, min(1.0, t.base_error + arm.error_rate)))
    s.impressions = n - s.errors
    s.clicks = int(rng.binomial(s.impressions, arm.p_true))
    s.scored, s.scored_clicks = s.impressions, s.clicks  # every feedback carries its score
    s.pred_sum = max(0.0, float(rng.normal(s.impressions * arm.pred_mean, math.sqrt(s.impressions * arm.pred_var))))
    s.latency = rng.multinomial(n, lat).tolist()
    return s


@dataclass(frozen=True, slots=True)
class Outcome:
    canary: str
    seed: int
    status: str  # promoted | rolled_back | held | running (out of time)
    gate: str | None
    phase: int
    peak_share: float  # the largest share of users the canary had
    sim_time_s: float
    canary_requests: int
    users_reached: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


class FakeClock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def rollout(
    world: World,
    canary: str,
    seed: int,
    plan: Plan,
    traffic: Traffic = DEFAULT_TRAFFIC,
    gates: GateConfig = DEFAULT_GATES,
    max_time_s: float | None = None,
) -> Outcome:
    """One whole rollout of `canary` against `stable`, stepped every plan interval."""
    rng = np.random.default_rng(seed)
    clock = FakeClock(1_000_000.0)
    store = MemoryStore(clock)
    counter = iter(range(1_000_000))
    ctl = Controller(store, gates, clock=clock, owner=f"sim-{seed}", new_id=lambda: f"sim{seed}-{next(counter)}")
    r = await ctl.start(Arm("stable"), Arm(canary), plan, by="simulator")
    ids = [f"u{seed}-{i}" for i in range(traffic.id_sample)]
    buckets = np.fromiter((bucket(u, r.salt) for u in ids), float, len(ids))
    stable_arm, canary_arm = world.arms["stable"], world.arms[canary]
    lat = {a.name: _latency_probs(traffic, a.extra_latency_ms) for a in (stable_arm, canary_arm)}
    horizon = max_time_s or _horizon(plan)
    start, dt, served, top_share = clock.t, plan.interval_s, 0, 0.0
    while r.status == "running" and clock.t - start < horizon:  # held: a person decides from here
        mask = np.zeros(len(buckets), bool)
        for lo, hi in bucket_ranges(r.share):
            mask |= (buckets >= lo) & (buckets < hi)
        realized = float(mask.mean())
        top_share = max(top_share, realized)
        n = int(rng.poisson(traffic.rps * dt))
        n_c = int(rng.binomial(n, realized))
        delta = Delta()
        delta.arms["canary"] = _draw(rng, canary_arm, n_c, traffic, lat[canary_arm.name])
        delta.arms["stable"] = _draw(rng, stable_arm, n - n_c, traffic, lat[stable_arm.name])
        await store.add(r.id, delta)
        served += n_c
        clock.t += dt
        await ctl.step()
        loaded = await store.load()
        assert loaded is not None
        r = loaded
    last = r.history[-1] if r.history else {}
    gate = last.get("gate", {}).get("gate") if r.status in ("rolled_back", "held") else None
    return Outcome(
        canary,
        seed,
        r.status,
        gate,
        r.phase,
        top_share,
        clock.t - start,
        served,
        int(top_share * traffic.population),
        r.reason,
    )


def _horizon(plan: Plan) -> float:
    return sum(plan.min_duration_s(i) * plan.max_phase_factor for i in range(plan.n_phases())) + plan.interval_s


@dataclass(frozen=True, slots=True)
class Report:
    bad: list[Outcome]
    good: list[Outcome]
    aa: list[Outcome]
    world: dict[str, dict[str, float]]
    seconds: float

    @property
    def aa_false_rollback_rate(self) -> float:
        return sum(o.status == "rolled_back" for o in self.aa) / max(1, len(self.aa))

    def lines(self) -> Iterator[str]:
        yield "models (true CTR of the ad each ranks first, test AUC):"
        for k, v in self.world.items():
            yield f"  {k:9s} ctr_shown {v['ctr_shown']:.4f}  auc {v['test_auc']:.4f}"
        yield "bad canaries:"
        for o in self.bad:
            ok = "right gate" if o.gate == EXPECTED_GATE[o.canary] and o.status == "rolled_back" else "WRONG"
            yield (
                f"  {o.canary:13s} {o.status:11s} gate {o.gate!s:11s} phase {o.phase + 1} "
                f"(peak share {o.peak_share:.1%}) after {o.sim_time_s / 60:.0f} min, "
                f"{o.canary_requests:,} canary requests, {o.users_reached:,} users reached  [{ok}]"
            )
        for o in self.good:
            lift = self.world["good"]["ctr_shown"] / self.world["stable"]["ctr_shown"] - 1
            where = f"through {o.phase} phases" if o.status == "promoted" else f"in phase {o.phase + 1}: {o.reason}"
            yield (
                f"good canary ({lift:+.2%} CTR): {o.status} after {o.sim_time_s / 3600:.2f} h {where}, "
                f"{o.canary_requests:,} canary requests"
            )
        n_rb = sum(o.status == "rolled_back" for o in self.aa)
        yield (
            f"A/A: {n_rb} of {len(self.aa)} seeds rolled back (false-rollback rate "
            f"{self.aa_false_rollback_rate:.1%}); promoted {sum(o.status == 'promoted' for o in self.aa)}, "
            f"held for a person {sum(o.status == 'held' for o in self.aa)}"
        )
        promoted = sorted(o.sim_time_s for o in self.aa if o.status == "promoted")
        if promoted:
            median_h, max_h = promoted[len(promoted) // 2] / 3600, promoted[-1] / 3600
            yield f"A/A time to promote: median {median_h:.2f} h, max {max_h:.2f} h"
        for o in [o for o in self.aa if o.status != "promoted"][:5]:
            yield f"  e.g. A/A seed {o.seed}: {o.status} in phase {o.phase + 1}: {o.reason}"
        yield f"({self.seconds:.1f} s of rollouts)"


async def run_all(
    world: World,
    plan: Plan,
    aa_seeds: int,
    traffic: Traffic = DEFAULT_TRAFFIC,
    gates: GateConfig = DEFAULT_GATES,
    seed: int = 0,
) -> Report:
    t0 = time.perf_counter()
    bad = [await rollout(world, name, seed + i, plan, traffic, gates) for i, name in enumerate(BAD)]
    good = [await rollout(world, "good", seed + 100, plan, traffic, gates)]
    aa_world = World(world.cfg, {**world.arms, "aa": world.arms["stable"]}, world.metrics)
    aa = [await rollout(aa_world, "aa", seed + 1000 + i, plan, traffic, gates) for i in range(aa_seeds)]
    return Report(bad, good, aa, world.metrics, time.perf_counter() - t0)


def simulate(
    aa_seeds: int = 100,
    plan: Plan | None = None,
    traffic: Traffic = DEFAULT_TRAFFIC,
    world_cfg: WorldConfig = DEFAULT_WORLD,
    workdir: Path | None = None,
) -> Report:
    world = build_world(world_cfg, workdir)
    return asyncio.run(run_all(world, plan or default_plan(), aa_seeds, traffic))
