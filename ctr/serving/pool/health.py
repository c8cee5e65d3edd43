"""Health of each model replica: passive checks over a sliding window, active probes, and
ejection with a growing, capped ejection time (Envoy's outlier detection, whose latency
ejection has been an open wish since envoyproxy/envoy#288).

A replica is healthy while, over the last `window_s` (once it made `min_calls` calls):
- its success rate is above `min_success`;
- the p99 of its call latency is under `p99_s` (or not above the others' median p99: when
  every replica is slow, ejecting one only piles its share onto the rest);
- its p99 is not an outlier: at most `outlier_factor` x the median p99 of the other judged
  replicas, or within `outlier_min_s` of it (sub-millisecond jitter is not an outlier);
- and its last `probe_failures` active probes did not all fail.

An ejection lasts `ejection_base_s` x (its number of recent ejections), capped at
`ejection_max_s`; the count drops by one for every `ejection_max_s` spent healthy. Once the
time is served the replica is PROBING: it comes back only after `probe_passes` passing
probes in a row. At most `max_ejected_percent` of the pool is out at once (always at
least one may be), and the last healthy replica is never ejected.

Pure: every method takes `now` (monotonic seconds); nothing here sleeps or reads a clock.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ctr.settings import Settings


class Status(enum.Enum):
    HEALTHY = 0
    EJECTED = 1
    PROBING = 2  # ejection time served; back after `probe_passes` passing probes


@dataclass(frozen=True, slots=True)
class HealthConfig:
    window_s: float = 5.0
    min_calls: int = 20
    min_success: float = 0.8
    p99_s: float = 0.040
    outlier_factor: float = 3.0
    outlier_min_s: float = 0.005
    max_ejected_percent: float = 50.0
    ejection_base_s: float = 5.0
    ejection_max_s: float = 60.0
    probe_passes: int = 2
    probe_failures: int = 3

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.p99_s <= 0 or self.ejection_base_s <= 0 or self.ejection_max_s <= 0:
            raise ValueError("window_s, p99_s, ejection_base_s and ejection_max_s must be > 0")
        if not 0 < self.min_success < 1:
            raise ValueError(f"min_success must be in (0, 1), got {self.min_success}")
        if self.outlier_factor <= 1:
            raise ValueError(f"outlier_factor must be > 1, got {self.outlier_factor}")
        if not 0 <= self.max_ejected_percent <= 100:
            raise ValueError(f"max_ejected_percent must be in [0, 100], got {self.max_ejected_percent}")
        if self.min_calls < 1 or self.probe_passes < 1 or self.probe_failures < 1:
            raise ValueError("min_calls, probe_passes and probe_failures must be >= 1")

    @classmethod
    def from_settings(cls, s: Settings) -> HealthConfig:
        return cls(
            window_s=s.health_window_s, min_calls=s.health_min_calls, min_success=s.replica_min_success,
            p99_s=s.replica_p99_ms / 1000, outlier_factor=s.outlier_factor, outlier_min_s=s.outlier_min_ms / 1000,
            max_ejected_percent=s.max_ejected_percent, ejection_base_s=s.ejection_base_s,
            ejection_max_s=s.ejection_max_s, probe_passes=s.probe_passes, probe_failures=s.probe_failures,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class WindowStats:
    calls: int
    success_rate: float
    p99_s: float
    p95_s: float = 0.0


class ReplicaHealth:
    """One replica's window of calls, probe streaks and ejection state."""

    def __init__(self, config: HealthConfig, status: Status = Status.HEALTHY) -> None:
        self.config = config
        self.status = status
        self.ejections = 0  # recent ejections: the multiplier of the next ejection time
        self.ejected_until = 0.0
        self.healthy_since = 0.0
        self.probe_streak = 0  # HEALTHY: failed probes in a row; PROBING: passed probes in a row
        self.reason = ""
        self.p95_s = 0.0  # of the window, as last judged (0 until it holds min_calls): the hedging delay
        self._calls: deque[tuple[float, bool, float]] = deque()  # (time, ok, latency_s)

    def record(self, now: float, ok: bool, latency_s: float) -> None:
        """One call's outcome (counted only while the replica takes traffic)."""
        if self.status is Status.HEALTHY:
            self._calls.append((now, ok, latency_s))

    def probe(self, ok: bool) -> None:
        """One active probe's outcome."""
        if self.status is Status.HEALTHY:
            self.probe_streak = 0 if ok else self.probe_streak + 1
        elif self.status is Status.PROBING:
            self.probe_streak = self.probe_streak + 1 if ok else 0

    def stats(self, now: float) -> WindowStats:
        while self._calls and now - self._calls[0][0] > self.config.window_s:
            self._calls.popleft()
        n = len(self._calls)
        if n == 0:
            return WindowStats(0, 1.0, 0.0)
        ok = sum(1 for _, good, _ in self._calls if good)
        p95, p99 = np.percentile(np.fromiter((lat for _, _, lat in self._calls), float, n), [95, 99])
        self.p95_s = float(p95) if n >= self.config.min_calls else 0.0
        return WindowStats(n, ok / n, float(p99), float(p95))

    def eject(self, now: float, reason: str) -> float:
        """Out of traffic for the next ejection time; returns it."""
        self.ejections += 1
        duration = min(self.config.ejection_base_s * self.ejections, self.config.ejection_max_s)
        self.status, self.ejected_until, self.reason = Status.EJECTED, now + duration, reason
        self.probe_streak = 0
        self._calls.clear()
        return duration

    def advance(self, now: float) -> bool:
        """Time-driven transitions (EJECTED -> PROBING -> HEALTHY, decay); True when it came back."""
        c = self.config
        if self.status is Status.EJECTED and now >= self.ejected_until:
            self.status, self.probe_streak = Status.PROBING, 0
        if self.status is Status.PROBING and self.probe_streak >= c.probe_passes:
            self.status, self.healthy_since, self.probe_streak, self.reason = Status.HEALTHY, now, 0, ""
            return True
        if self.status is Status.HEALTHY and self.ejections and now - self.healthy_since >= c.ejection_max_s:
            self.ejections -= 1
            self.healthy_since = now
        return False


def _verdict(h: ReplicaHealth, st: WindowStats, others_p99: list[float]) -> str:
    """Why this healthy replica should go out now ("" when it should not)."""
    c = h.config
    if h.probe_streak >= c.probe_failures:
        return "probe"
    if st.calls < c.min_calls:
        return ""
    if st.success_rate <= c.min_success:
        return "errors"
    median = float(np.median(others_p99)) if others_p99 else 0.0
    # over the threshold AND slower than its peers: when every replica is slow, the load (not a
    # replica) is the problem, and ejecting one would only pile its share onto the others
    if st.p99_s > c.p99_s and st.p99_s > median:
        return "p99"
    if others_p99 and st.p99_s > c.outlier_factor * median and st.p99_s - median > c.outlier_min_s:
        return "outlier"
    return ""


def max_ejected(config: HealthConfig, n: int) -> int:
    """How many of `n` replicas may be out at once: the percentage, at least one, never all."""
    if config.max_ejected_percent <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(config.max_ejected_percent / 100 * n)))


_SEVERITY = {"probe": 0, "errors": 1, "p99": 2, "outlier": 3}


def evaluate(now: float, healths: Sequence[ReplicaHealth]) -> tuple[list[int], list[tuple[int, str]]]:
    """Advance every replica's state; eject what the checks and the cap allow.
    Returns (indexes that came back, [(index, reason) ejected now])."""
    returned = [i for i, h in enumerate(healths) if h.advance(now)]
    if not healths:
        return returned, []
    stats = {i: h.stats(now) for i, h in enumerate(healths) if h.status is Status.HEALTHY}
    judged = {i: st.p99_s for i, st in stats.items() if st.calls >= healths[i].config.min_calls}
    candidates = []
    for i, st in stats.items():
        reason = _verdict(healths[i], st, [p for j, p in judged.items() if j != i])
        if reason:
            candidates.append((_SEVERITY[reason], -st.p99_s, i, reason))
    out = sum(1 for h in healths if h.status is not Status.HEALTHY)
    healthy = len(healths) - out
    cap = max_ejected(healths[0].config, len(healths))
    ejected = []
    for _, _, i, reason in sorted(candidates):
        if out >= cap or healthy <= 1:
            break
        healths[i].eject(now, reason)
        out, healthy = out + 1, healthy - 1
        ejected.append((i, reason))
    return returned, ejected
