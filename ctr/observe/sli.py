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
from collections.abc import Callable
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


_NB = len(BOUNDS_MS) + 1
HIST_HORIZON_S = 600  # quantiles (p50, p99, the charts) over at most the last 10 minutes


@dataclass(slots=True)
class _Arm:
    """One arm's requests since start (cumulative; a window is the difference of two)."""

    model: int = 0
    fallback: int = 0
    errors: int = 0
    slow: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.model + self.fallback + self.errors


@dataclass(slots=True)
class _Stage:
    n: int = 0
    sum_s: float = 0.0


@dataclass(slots=True)
class _Snap:
    """The cumulative state at the end of second `t`."""

    t: int
    arms: dict[str, _Arm]
    stages: dict[str, _Stage]


@dataclass(slots=True)
class _HistSnap:
    t: int
    arms: dict[str, list[int]]
    stages: dict[str, list[int]]


def _minus(a: list[int], b: list[int] | None) -> list[int]:
    return list(a) if b is None else [x - y for x, y in zip(a, b, strict=True)]


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
    hist: list[int] | None = None  # the latency histogram (BOUNDS_MS buckets), when quantiles were read

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
    """Cumulative counts and latency histograms per arm and per stage, with a snapshot at the
    end of every second that had traffic (counts for `horizon_s`, histograms for
    HIST_HORIZON_S); a window is the live state minus the snapshot just before it, so reading
    one costs the same whatever the traffic (no summing of per-second slots)."""

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
        self._snaps: deque[_Snap] = deque(maxlen=horizon_s + 2)
        self._hsnaps: deque[_HistSnap] = deque(maxlen=HIST_HORIZON_S + 2)
        self._t = int(self.started)
        self._dirty = False
        self._arms: dict[str, _Arm] = {}
        self._hists: dict[str, list[int]] = {}
        self._stages: dict[str, _Stage] = {}
        self._stage_hists: dict[str, list[int]] = {}

    def configure(self, objectives: Objectives) -> None:
        """New objectives."""
        self.objectives = objectives
        self._slow_s = objectives.p99_ms / 1000.0

    @property
    def totals(self) -> dict[str, dict[str, int]]:
        """Requests since start, per arm and result."""
        return {arm: {"model": a.model, "fallback": a.fallback, "error": a.errors} for arm, a in self._arms.items()}

    def _roll(self) -> None:
        """Snapshot the state at the end of the last second that had traffic, when time moved on."""
        t = int(self.clock())
        if t == self._t:
            return
        if self._dirty:
            arms = {k: _Arm(a.model, a.fallback, a.errors, a.slow, dict(a.reasons)) for k, a in self._arms.items()}
            stages = {k: _Stage(s.n, s.sum_s) for k, s in self._stages.items()}
            self._snaps.append(_Snap(self._t, arms, stages))
            self._hsnaps.append(_HistSnap(self._t, {k: list(h) for k, h in self._hists.items()},
                                          {k: list(h) for k, h in self._stage_hists.items()}))  # fmt: skip
            self._dirty = False
        self._t = t

    def record(self, arm: str, result: str, latency_s: float, reason: str | None = None) -> None:
        """One finished request: `result` is model, fallback or error; `reason` names a fallback."""
        if not self.enabled:
            return
        if int(self.clock()) != self._t:
            self._roll()
        self._dirty = True
        arm = _arm(arm)
        a = self._arms.get(arm)
        if a is None:
            a = self._arms[arm] = _Arm()
            self._hists[arm] = [0] * _NB
        if result == "model":
            a.model += 1
        elif result == "fallback":
            a.fallback += 1
            if reason is not None:
                reason = str(reason)  # a plain str key (a StrEnum key is no JSON object key to orjson)
                a.reasons[reason] = a.reasons.get(reason, 0) + 1
        else:
            a.errors += 1
        if latency_s > self._slow_s:
            a.slow += 1
        self._hists[arm][bisect.bisect_left(BOUNDS_MS, latency_s * 1000.0)] += 1

    def stage(self, name: str, seconds: float) -> None:
        """One stage's duration (features, transform, inference, request, balancer, ...)."""
        if not self.enabled:
            return
        if int(self.clock()) != self._t:
            self._roll()
        self._dirty = True
        s = self._stages.get(name)
        if s is None:
            s = self._stages[name] = _Stage()
            self._stage_hists[name] = [0] * _NB
        s.n += 1
        s.sum_s += seconds
        self._stage_hists[name][bisect.bisect_left(BOUNDS_MS, seconds * 1000.0)] += 1

    @staticmethod
    def _before(snaps: deque[Any], t: int) -> Any:
        """The last snapshot of a second before `t` (None: nothing was recorded before it)."""
        for s in reversed(snaps):
            if s.t < t:
                return s
        return None

    def _span(self, seconds: float) -> float:
        now = self.clock()
        return min(seconds + now % 1.0, max(1.0, now - self.started))

    def window(self, seconds: float, arm: str | None = None, quantiles: bool = True) -> Window:
        """The SLIs over the last `seconds` whole seconds and the current one, for one arm or all
        (quantiles over at most HIST_HORIZON_S; `quantiles=False` skips them)."""
        self._roll()
        since = self._t - int(seconds)
        base = self._before(self._snaps, since)
        model = fallback = errors = slow = 0
        reasons: dict[str, int] = {}
        for name, a in self._arms.items():
            if arm is not None and name != arm:
                continue
            b = base.arms.get(name) if base is not None else None
            b = b or _Arm()
            model, fallback = model + a.model - b.model, fallback + a.fallback - b.fallback
            errors, slow = errors + a.errors - b.errors, slow + a.slow - b.slow
            for r, c in a.reasons.items():
                if c - b.reasons.get(r, 0):
                    reasons[r] = reasons.get(r, 0) + c - b.reasons.get(r, 0)
        p50 = p99 = hist = None
        if quantiles:
            hist = self._window_hist(self._hists, "arms", since, arm)
            p50, p99 = quantile(hist, 0.5), quantile(hist, 0.99)
        total = model + fallback + errors
        return Window(self._span(seconds), total, model, fallback, errors, slow, p50, p99, reasons, hist)

    def _window_hist(self, live: dict[str, list[int]], kind: str, since: int, key: str | None) -> list[int]:
        base = self._before(self._hsnaps, max(since, self._t - HIST_HORIZON_S))
        out = [0] * _NB
        for name, h in live.items():
            if key is None or name == key:
                b = getattr(base, kind).get(name) if base is not None else None
                out = [x + y for x, y in zip(out, _minus(h, b), strict=True)]
        return out

    def stages(self, seconds: float, hists: bool = False) -> dict[str, dict[str, Any]]:
        """Per stage over the window: calls, mean, p50 and p99 (ms); with `hists`, also the
        latency histogram (`hist`, BOUNDS_MS buckets) so windows of processes can be merged."""
        self._roll()
        since = self._t - int(seconds)
        base = self._before(self._snaps, since)
        out: dict[str, dict[str, Any]] = {}
        for name, s in self._stages.items():
            b = (base.stages.get(name) if base is not None else None) or _Stage()
            n, total_s = s.n - b.n, s.sum_s - b.sum_s
            if n == 0:
                continue
            hist = self._window_hist(self._stage_hists, "stages", since, name)
            out[name] = {"n": n, "mean_ms": total_s / n * 1000.0, "p50_ms": quantile(hist, 0.5),
                         "p99_ms": quantile(hist, 0.99)}  # fmt: skip
            if hists:
                out[name]["hist"] = hist
        return out

    def series(self, seconds: int, step_s: int, arm: str | None = None, raw: bool = False) -> list[dict[str, Any]]:
        """Points every `step_s` over the last `seconds` (oldest first, at most HIST_HORIZON_S),
        for the page's charts; with `raw`, each point also has its counts and latency histogram
        (`requests`, `model`, `fallback`, `hist`) so series of processes can be merged."""
        self._roll()
        seconds = min(seconds, HIST_HORIZON_S)
        n = max(1, seconds // step_s)
        first = self._t - n * step_s + 1
        snaps, hsnaps = list(self._snaps), list(self._hsnaps)
        ts, hts = [s.t for s in snaps], [s.t for s in hsnaps]

        def state(t: int) -> tuple[_Arm, list[int]]:
            """Cumulative counts and histogram (of `arm`, or all) at the end of second t."""
            live = t >= self._t
            i, j = bisect.bisect_right(ts, t) - 1, bisect.bisect_right(hts, t) - 1
            arms = self._arms if live else (snaps[i].arms if i >= 0 else {})
            hists = self._hists if live else (hsnaps[j].arms if j >= 0 else {})
            acc, hist = _Arm(), [0] * _NB
            for name, a in arms.items():
                if arm is None or name == arm:
                    acc.model, acc.fallback, acc.errors = (
                        acc.model + a.model,
                        acc.fallback + a.fallback,
                        acc.errors + a.errors,
                    )
            for name, h in hists.items():
                if arm is None or name == arm:
                    hist = [x + y for x, y in zip(hist, h, strict=True)]
            return acc, hist

        out = []
        prev = state(first - 1)
        for i in range(n):
            cur = state(first + (i + 1) * step_s - 1)
            model, fallback = cur[0].model - prev[0].model, cur[0].fallback - prev[0].fallback
            total = cur[0].total - prev[0].total
            hist = _minus(cur[1], prev[1])
            out.append({
                "t": float(first + i * step_s - self._t), "qps": total / step_s,
                "p50_ms": quantile(hist, 0.5), "p99_ms": quantile(hist, 0.99),
                "availability": (model + fallback) / total if total else None,
                "model_scored": model / total if total else None,
                "fallback_share": fallback / total if total else None,
            })  # fmt: skip
            if raw:
                out[-1].update(requests=total, model=model, fallback=fallback, hist=hist)
            prev = cur
        return out

    def arms(self) -> list[str]:
        """Arms seen since start (stable first)."""
        return sorted(self._arms, key=lambda a: (a not in ARMS, ARMS.index(a) if a in ARMS else 0, a))

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


class StageTimer:
    """A stage's Prometheus histogram (`ctr_stage_latency_seconds`) and the recorder, together."""

    __slots__ = ("_hist", "_name", "_recorder")

    def __init__(self, name: str, recorder: SliRecorder) -> None:
        self._name, self._recorder = name, recorder
        self._hist = metrics.STAGE_LATENCY.labels(name)

    def observe(self, seconds: float) -> None:
        self._hist.observe(seconds)
        self._recorder.stage(self._name, seconds)


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
    import logging

    while True:
        try:
            export(rec)
            for fn in also:
                fn(rec.clock())
        except Exception:  # one bad round must not freeze the gauges for good
            logging.getLogger(__name__).exception("SLI ticker round failed")
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
