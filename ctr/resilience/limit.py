"""An adaptive concurrency limit (AIMD), after Netflix's concurrency-limits `AIMDLimit`.

How many requests the gateway works on at once is bounded by `limit`, which adapts:
- a sample that was *dropped* (the request missed its deadline, or took longer than
  `latency_target_s`) cuts the limit multiplicatively (`limit * backoff_ratio`), at most
  once per `decrease_interval_s` (the cut answers one congestion event, as TCP cuts once
  per round trip: a burst of late requests from one stall must not collapse the limit to
  its floor);
- a sample that succeeded while the limit was in use (in flight * 2 >= limit, as
  concurrency-limits checks, so an idle service does not grow its limit without bound)
  raises it additively by one;
- a sample that says nothing about load (the model failed fast: unreachable, breaker
  open) is `ignore`d;
- the limit never falls below what the service completes within `latency_target_s` at its
  measured rate (Little's law: completions a second, read every `rate_every_s`, following a
  fall at once and a rise by an EWMA, times the target). That many in flight wait about the
  target on average, wherever the work runs (the loop, a model replica, a feature tier), and
  it is what arrives during a stall as long as the target: such a stall sheds little, while
  under overload the rate is the capacity and the floor the in-flight count that keeps mean
  latency near the target. Without it, one stall of the shared machine cut the limit of a
  process serving 550 requests a second to 9-12, which regrew only while half of it was in
  use (`ctr bench steady`, stop 29).

Written here because no maintained asyncio library implements an adaptive limit
(concurrency-limits is Java; aiolimiter is a rate limiter). It is a pure object: time
comes from the injected clock, nothing sleeps or awaits, so one event loop may call it
without locks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ctr import metrics

if TYPE_CHECKING:
    from ctr.settings import Settings

Clock = Callable[[], float]


class AimdLimit:
    def __init__(
        self,
        initial: int = 32,
        min_limit: int = 4,
        max_limit: int = 512,
        backoff_ratio: float = 0.9,
        latency_target_s: float = 0.025,
        decrease_interval_s: float | None = None,
        clock: Clock = time.monotonic,
        rate_every_s: float = 0.25,
    ) -> None:
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= initial <= max_limit, got {min_limit}, {initial}, {max_limit}")
        if not 0.5 <= backoff_ratio < 1:
            raise ValueError(f"backoff_ratio must be in [0.5, 1), got {backoff_ratio}")
        if latency_target_s <= 0 or rate_every_s <= 0:
            raise ValueError(f"latency_target_s and rate_every_s must be > 0, got {latency_target_s}, {rate_every_s}")
        self.min_limit, self.max_limit = min_limit, max_limit
        self.backoff_ratio = backoff_ratio
        self.latency_target_s = latency_target_s
        self.decrease_interval_s = latency_target_s if decrease_interval_s is None else decrease_interval_s
        self.clock = clock
        self._limit = float(initial)
        self.inflight = 0
        self._last_decrease = -math.inf
        self.rate_every_s = rate_every_s
        self.rate: float | None = None  # EWMA of completions a second
        self.floor = min_limit
        self._done = 0
        self._rate_mark = (-math.inf, 0)  # (clock, completions) at the last reading
        metrics.CONCURRENCY_LIMIT.set(initial)

    @classmethod
    def from_settings(cls, s: Settings) -> AimdLimit:
        return cls(s.limit_initial, s.limit_min, s.limit_max, latency_target_s=s.limit_latency_ms / 1000.0)

    @property
    def limit(self) -> int:
        return int(self._limit)

    def try_acquire(self) -> Lease | None:
        """A lease when fewer than `limit` requests are in flight, else None (shed it)."""
        if self.inflight >= self.limit:
            return None
        self.inflight += 1
        return Lease(self, self.clock(), self.inflight)

    def _measure(self, now: float) -> None:
        """Every `rate_every_s`: the completion rate since the last reading, into the floor."""
        self._done += 1
        at, done = self._rate_mark
        if now - at < self.rate_every_s:
            return
        if at > -math.inf:
            rate = (self._done - done) / (now - at)
            # down at once (capacity fell: the machine slowed, a dependency saturated, an idle
            # gap), up slowly (a stall's backlog completing in a burst is not capacity)
            self.rate = rate if self.rate is None or rate < self.rate else self.rate + 0.3 * (rate - self.rate)
            self.floor = int(min(self.max_limit, max(self.min_limit, self.rate * self.latency_target_s + 1e-6)))
            self._limit = max(self._limit, float(self.floor))
        self._rate_mark = (now, self._done)

    def _sample(self, rtt_s: float, inflight: int, dropped: bool) -> None:
        now = self.clock()
        self._measure(now)
        if dropped or rtt_s > self.latency_target_s:
            if now - self._last_decrease >= self.decrease_interval_s:
                self._last_decrease = now
                self._limit = max(float(self.floor), math.floor(self._limit * self.backoff_ratio))
        elif inflight * 2 >= self._limit:
            self._limit = min(float(self.max_limit), self._limit + 1)
        metrics.CONCURRENCY_LIMIT.set(self.limit)


class Lease:
    """One admitted request: report exactly one of `success`, `dropped`, `ignore`."""

    __slots__ = ("_done", "_inflight", "_limiter", "_start")

    def __init__(self, limiter: AimdLimit, start: float, inflight: int) -> None:
        self._limiter, self._start, self._inflight, self._done = limiter, start, inflight, False

    def _release(self) -> bool:
        if self._done:
            return False
        self._done = True
        self._limiter.inflight -= 1
        return True

    def success(self) -> None:
        """The request finished in time (a late finish still counts as a drop, by its latency)."""
        if self._release():
            self._limiter._sample(self._limiter.clock() - self._start, self._inflight, dropped=False)

    def dropped(self) -> None:
        """The request missed its deadline: the service is congested."""
        if self._release():
            self._limiter._sample(self._limiter.clock() - self._start, self._inflight, dropped=True)

    def ignore(self) -> None:
        """The request says nothing about load (e.g. a dependency failed fast)."""
        self._release()
