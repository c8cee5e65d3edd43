"""Service level indicators of this process over sliding windows, per arm and per stage;
SLOs and their error-budget burn rates (Google SRE workbook, "Alerting on SLOs").

Reference definitions (the same on the status page, in /status.json and on /metrics):

- availability = successful answers / requests (a successful answer is a 200 with scores,
  from the model or from the fallback; an error is a request that raised: a 5xx);
- model-scored share = answers scored by the model / requests (not from the fallback);
- latency: p50 / p99 of the gateway's own time per request, and the share of requests
  slower than the latency objective (`CTR_SLO_P99_MS`, held by 99 % of requests);
- throughput = requests per second, and model-scored answers per second apart.

Each objective has an error budget, 1 - target; the burn rate over a window is the share
of bad requests in it divided by that budget (1 = spending it exactly over the SLO period).
The page condition is the workbook's multi-window one: burn over 1 h AND over 5 min both
above `CTR_SLO_BURN_PAGE` (14.4: 2 % of a 30-day budget in one hour); the short window makes
the alert stop soon after the problem does.

Bookkeeping per request is a few integer increments into the current second's slot (a
bisect for the latency bucket); windows are summed when someone reads them (the status page,
the 1 Hz ticker that exports the gauges). Time is injected (`clock`), so tests never sleep.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ctr import metrics

Clock = Callable[[], float]

ARMS = ("stable", "canary")
NO_ARM = "none"  # a request that failed before it was given an arm
RESULTS = ("model", "fallback", "error")
# The reference design's stage budget (ms); "balancer" is the model pool's pick.
STAGE_BUDGET_MS = {"balancer": 0.3, "features": 2.0, "transform": 1.0, "inference": 3.0, "response": 0.5}
STAGE_TOTAL_MS = 7.0
WINDOWS_S = {"1m": 60, "5m": 300, "1h": 3600}
BURN_WINDOWS = ("5m", "1h")

# Log-spaced latency buckets, 12 a decade from 0.1 ms to 10 s: a quantile is read within
# about 10 % of its value.
BOUNDS_MS: tuple[float, ...] = tuple(0.1 * 10 ** (i / 12) for i in range(61))


def _arm(arm: str) -> str:
    """Arms are a bounded label set: anything else counts as NO_ARM."""
    return arm if arm in ARMS else NO_ARM


def quantile(hist: list[int], q: float) -> float | None:
    """The q-quantile (ms) of a bucketed latency histogram, linear within a bucket; None if empty."""
    n = sum(hist)
    if n == 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(hist):
        if c and seen + c >= rank:
            lo = BOUNDS_MS[i - 1] if i > 0 else 0.0
            hi = BOUNDS_MS[i] if i < len(BOUNDS_MS) else BOUNDS_MS[-1] * 10
            return lo + (hi - lo) * (rank - seen) / c
        seen += c
    return BOUNDS_MS[-1]


@dataclass(slots=True)
class _Arm:
    """One arm's requests within one second."""

    model: int = 0
    fallback: int = 0
    errors: int = 0
    slow: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.model + self.fallback + self.errors


@dataclass(slots=True)
class _Stage:
    n: int = 0
    sum_s: float = 0.0
    hist: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))


@dataclass(slots=True)
class _Second:
    t: int
    arms: dict[str, _Arm] = field(default_factory=dict)
    stages: dict[str, _Stage] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Objectives:
    """The SLO targets: availability and model-scored shares, and the latency objective
    (`p99_ms`: 99 % of requests at most this slow)."""

    availability: float = 0.999
    model_scored: float = 0.99
    p99_ms: float = 50.0
    burn_page: float = 14.4

    def __post_init__(self) -> None:
        for name in ("availability", "model_scored"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name} objective must be in (0, 1), got {getattr(self, name)}")
        if self.p99_ms <= 0 or self.burn_page <= 0:
            raise ValueError("p99_ms and burn_page must be > 0")

    def targets(self) -> dict[str, float]:
        return {"availability": self.availability, "model_scored": self.model_scored, "latency": 0.99}


@dataclass(frozen=True, slots=True)
class Window:
    """The SLIs of one arm (or all) over one window."""

    seconds: float
    requests: int
    model: int
    fallback: int
    errors: int
    slow: int
    p50_ms: float | None
    p99_ms: float | None
    reasons: dict[str, int]

    @property
    def qps(self) -> float:
        return self.requests / self.seconds

    @property
    def model_qps(self) -> float:
        return self.model / self.seconds

    @property
    def availability(self) -> float | None:
        return (self.model + self.fallback) / self.requests if self.requests else None

    @property
    def model_scored(self) -> float | None:
        return self.model / self.requests if self.requests else None

    def bad(self, slo: str) -> int:
        return {"availability": self.errors, "model_scored": self.requests - self.model, "latency": self.slow}[slo]

    def burn(self, slo: str, target: float) -> float:
        """Share of bad requests over the error budget (0 with no requests: nothing was spent)."""
        return self.bad(slo) / self.requests / (1 - target) if self.requests else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests, "qps": self.qps, "model_qps": self.model_qps,
            "availability": self.availability, "model_scored": self.model_scored,
            "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "fallbacks": self.fallback, "errors": self.errors,
            "slow": self.slow,
        }  # fmt: skip


class SliRecorder:
    """Per-second slots of requests (per arm) and stage timings (per stage), kept `horizon_s`."""

    def __init__(
        self, objectives: Objectives | None = None, clock: Clock = time.monotonic, horizon_s: int = 3600
    ) -> None:
        if horizon_s < max(WINDOWS_S.values()):
            raise ValueError(f"horizon_s must cover the longest window ({max(WINDOWS_S.values())} s)")
        self.objectives = objectives or Objectives()
        self.clock = clock
        self.enabled = True
        self.started = clock()
        self._slow_s = self.objectives.p99_ms / 1000.0
        self._past: deque[_Second] = deque(maxlen=horizon_s)
        self._cur = _Second(int(self.started))
        self.totals: dict[str, dict[str, int]] = {}  # since start, per arm and result

    def configure(self, objectives: Objectives) -> None:
        """New objectives (the process-wide recorder is made before the settings are read)."""
        self.objectives = objectives
        self._slow_s = objectives.p99_ms / 1000.0

    def _now_slot(self) -> _Second:
        t = int(self.clock())
        if t != self._cur.t:
            if self._cur.arms or self._cur.stages:
                self._past.append(self._cur)
            self._cur = _Second(t)
        return self._cur

    def record(self, arm: str, result: str, latency_s: float, reason: str | None = None) -> None:
        """One finished request: `result` is model, fallback or error; `reason` names a fallback."""
        if not self.enabled:
            return
        arm = _arm(arm)
        slot = self._now_slot()
        a = slot.arms.get(arm)
        if a is None:
            a = slot.arms[arm] = _Arm()
        if result == "model":
            a.model += 1
        elif result == "fallback":
            a.fallback += 1
            if reason is not None:
                a.reasons[reason] = a.reasons.get(reason, 0) + 1
        else:
            a.errors += 1
        if latency_s > self._slow_s:
            a.slow += 1
        a.hist[bisect.bisect_left(BOUNDS_MS, latency_s * 1000.0)] += 1
        per_arm = self.totals.get(arm)
        if per_arm is None:
            per_arm = self.totals[arm] = dict.fromkeys(RESULTS, 0)
        per_arm[result] = per_arm.get(result, 0) + 1

    def stage(self, name: str, seconds: float) -> None:
        """One stage's duration (features, transform, inference, request, balancer, ...)."""
        if not self.enabled:
            return
        slot = self._now_slot()
        s = slot.stages.get(name)
        if s is None:
            s = slot.stages[name] = _Stage()
        s.n += 1
        s.sum_s += seconds
        s.hist[bisect.bisect_left(BOUNDS_MS, seconds * 1000.0)] += 1

    def _slots(self, seconds: float) -> Iterator[_Second]:
        self._now_slot()
        since = int(self.clock()) - seconds  # `seconds` whole seconds before this one, and this one
        for s in reversed(self._past):
            if s.t < since:
                break
            yield s
        yield self._cur

    def window(self, seconds: float, arm: str | None = None, quantiles: bool = True) -> Window:
        """The SLIs over the last `seconds` whole seconds and the current one, for one arm or all
        (`quantiles=False` skips merging the latency histograms: counts only)."""
        model = fallback = errors = slow = 0
        hist = [0] * (len(BOUNDS_MS) + 1)
        reasons: dict[str, int] = {}
        for s in self._slots(seconds):
            for name, a in s.arms.items():
                if arm is not None and name != arm:
                    continue
                model, fallback, errors, slow = model + a.model, fallback + a.fallback, errors + a.errors, slow + a.slow
                if quantiles:
                    hist = [x + y for x, y in zip(hist, a.hist, strict=True)]
                for r, c in a.reasons.items():
                    reasons[r] = reasons.get(r, 0) + c
        now = self.clock()
        span = min(seconds + now % 1.0, max(1.0, now - self.started))
        total = model + fallback + errors
        return Window(span, total, model, fallback, errors, slow, quantile(hist, 0.5), quantile(hist, 0.99), reasons)

    def stages(self, seconds: float) -> dict[str, dict[str, float | int | None]]:
        """Per stage over the window: calls, mean, p50 and p99 (ms)."""
        acc: dict[str, _Stage] = {}
        for s in self._slots(seconds):
            for name, st in s.stages.items():
                a = acc.setdefault(name, _Stage())
                a.n, a.sum_s = a.n + st.n, a.sum_s + st.sum_s
                a.hist = [x + y for x, y in zip(a.hist, st.hist, strict=True)]
        return {
            name: {"n": a.n, "mean_ms": a.sum_s / a.n * 1000.0 if a.n else None,
                   "p50_ms": quantile(a.hist, 0.5), "p99_ms": quantile(a.hist, 0.99)}
            for name, a in acc.items()
        }  # fmt: skip

    def series(self, seconds: int, step_s: int, arm: str | None = None) -> list[dict[str, float | None]]:
        """Points every `step_s` over the last `seconds` (oldest first), for the page's charts."""
        now = int(self.clock())
        n = max(1, seconds // step_s)
        buckets = [(_Arm(), i) for i in range(n)]
        first = now - n * step_s + 1
        for s in self._slots(seconds):
            i = (s.t - first) // step_s
            if not 0 <= i < n:
                continue
            b = buckets[i][0]
            for name, a in s.arms.items():
                if arm is None or name == arm:
                    b.model, b.fallback, b.errors = b.model + a.model, b.fallback + a.fallback, b.errors + a.errors
                    b.hist = [x + y for x, y in zip(b.hist, a.hist, strict=True)]
        out = []
        for b, i in buckets:
            total = b.total
            out.append({
                "t": float(first + i * step_s - now), "qps": total / step_s,
                "p50_ms": quantile(b.hist, 0.5), "p99_ms": quantile(b.hist, 0.99),
                "availability": (b.model + b.fallback) / total if total else None,
                "model_scored": b.model / total if total else None,
                "fallback_share": b.fallback / total if total else None,
            })  # fmt: skip
        return out

    def arms(self) -> list[str]:
        """Arms seen since start (stable first)."""
        return sorted(self.totals, key=lambda a: (a not in ARMS, ARMS.index(a) if a in ARMS else 0, a))

    def burn_rates(self, arm: str | None = None) -> dict[str, dict[str, float | bool]]:
        """Per objective: target, burn over 5 min and 1 h, and whether the page condition holds."""
        wins = {w: self.window(WINDOWS_S[w], arm, quantiles=False) for w in BURN_WINDOWS}
        out: dict[str, dict[str, float | bool]] = {}
        for slo, target in self.objectives.targets().items():
            burns = {w: wins[w].burn(slo, target) for w in BURN_WINDOWS}
            page = all(b > self.objectives.burn_page for b in burns.values())
            out[slo] = {"target": target, **{f"burn_{w}": b for w, b in burns.items()}, "page": page}
        return out


def finite(x: float | None) -> float | None:
    """None for a missing or non-finite figure (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else x


# The process-wide recorder, like the Prometheus metrics: the gateway records requests into
# it, the stage timers their stages, the status page and the ticker read it.
RECORDER = SliRecorder()


class StageTimer:
    """A stage's Prometheus histogram (`ctr_stage_latency_seconds`) and the recorder, together."""

    __slots__ = ("_hist", "_name", "_recorder")

    def __init__(self, name: str, recorder: SliRecorder = RECORDER) -> None:
        self._name, self._recorder = name, recorder
        self._hist = metrics.STAGE_LATENCY.labels(name)

    def observe(self, seconds: float) -> None:
        self._hist.observe(seconds)
        self._recorder.stage(self._name, seconds)


def stage(name: str) -> StageTimer:
    return StageTimer(name)


def export(rec: SliRecorder) -> None:
    """The recorder's windows and burn rates as Prometheus gauges (called by the ticker)."""
    for arm in [*rec.arms(), "all"]:
        one = None if arm == "all" else arm
        for w, secs in WINDOWS_S.items():
            win = rec.window(secs, one, quantiles=w != "1h")
            metrics.SLI_QPS.labels(arm, w).set(win.qps)
            metrics.SLI_AVAILABILITY.labels(arm, w).set(_nan(win.availability))
            metrics.SLI_MODEL_SCORED.labels(arm, w).set(_nan(win.model_scored))
            if w != "1h":
                metrics.SLI_P99.labels(arm, w).set(_nan(win.p99_ms and win.p99_ms / 1000.0))
        for slo, b in rec.burn_rates(one).items():
            for w in BURN_WINDOWS:
                metrics.SLO_BURN_RATE.labels(slo, arm, w).set(float(b[f"burn_{w}"]))
            metrics.SLO_PAGE.labels(slo, arm).set(1.0 if b["page"] else 0.0)
    for slo, target in rec.objectives.targets().items():
        metrics.SLO_TARGET.labels(slo).set(target)


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


async def run_ticker(rec: SliRecorder, *also: Callable[[float], None], every_s: float = 1.0) -> None:
    """Export the gauges every `every_s` (and call each of `also` with the clock's time)
    until cancelled, so they follow the windows when traffic stops."""
    import asyncio

    while True:
        export(rec)
        for fn in also:
            fn(rec.clock())
        await asyncio.sleep(every_s)


_CHILDREN: dict[tuple[str, str], tuple[Any, Any]] = {}


def count(arm: str, result: str, latency_s: float) -> None:
    """The request in ctr_sli_requests_total{arm, result} and ctr_sli_latency_seconds{arm}."""
    key = (arm, result)
    children = _CHILDREN.get(key)
    if children is None:
        label = _arm(arm)
        children = _CHILDREN[key] = (metrics.SLI_REQUESTS.labels(label, result), metrics.SLI_LATENCY.labels(label))
    children[0].inc()
    children[1].observe(latency_s)
