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
- with `work` (a reading of the loop thread's busy seconds: on a CPU or waiting for one),
  given when all of a request's work runs on that thread, the limit never falls below what
  the loop can work off within `latency_target_s`: the target over the measured seconds of
  work per request (an EWMA, read every `cost_every_s`).
  Fewer requests in flight than that cannot be what made a request late (a stall of the
  machine's scheduler did), and shedding them only turns answers the model would have scored
  in time into fallbacks. Without it, a limit cut by one saturating burst regrew only while
  half of it was in use: at half load it hovered near the usual in-flight count, and the next
  10-20 ms stall shed the requests that queued behind it (`ctr bench steady`).

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
from ctr.observe.pauses import thread_busy_s

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
        work: Clock | None = None,
        cost_every_s: float = 0.25,
    ) -> None:
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError(f"need 1 <= min_limit <= initial <= max_limit, got {min_limit}, {initial}, {max_limit}")
        if not 0.5 <= backoff_ratio < 1:
            raise ValueError(f"backoff_ratio must be in [0.5, 1), got {backoff_ratio}")
        if latency_target_s <= 0:
            raise ValueError(f"latency_target_s must be > 0, got {latency_target_s}")
        self.min_limit, self.max_limit = min_limit, max_limit
        self.backoff_ratio = backoff_ratio
        self.latency_target_s = latency_target_s
        self.decrease_interval_s = latency_target_s if decrease_interval_s is None else decrease_interval_s
        self.clock = clock
        self._limit = float(initial)
        self.inflight = 0
        self._last_decrease = -math.inf
        self.work, self.cost_every_s = work, cost_every_s
        self.cost_s: float | None = None  # EWMA of the work per request (seconds)
        self.floor = min_limit
        self._done = 0
        self._cost_mark = (-math.inf, 0.0, 0)  # (clock, work, done) at the last reading
        metrics.CONCURRENCY_LIMIT.set(initial)

    @classmethod
    def from_settings(cls, s: Settings, loop_bound: bool = False) -> AimdLimit:
        """`loop_bound`: all of a request's work runs on the calling event loop's thread (the
        forward pass and the features in the gateway process), so its busy time is the cost
        the floor needs; otherwise plain AIMD (work elsewhere, a remote model's say, would read
        as cheap requests and hold the limit high while the model saturates)."""
        return cls(s.limit_initial, s.limit_min, s.limit_max, latency_target_s=s.limit_latency_ms / 1000.0,
                   work=thread_busy_s if loop_bound else None)  # fmt: skip

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
        """Every `cost_every_s`: the work per request since the last reading, into the floor."""
        self._done += 1
        at, was, done = self._cost_mark
        if now - at < self.cost_every_s or self.work is None:
            return
        busy = self.work()
        if at > -math.inf and self._done > done:
            cost = (busy - was) / (self._done - done)
            self.cost_s = cost if self.cost_s is None else self.cost_s + 0.3 * (cost - self.cost_s)
            if self.cost_s > 0:
                self.floor = int(min(self.max_limit, max(self.min_limit, self.latency_target_s / self.cost_s + 1e-6)))
                self._limit = max(self._limit, float(self.floor))
        self._cost_mark = (now, busy, self._done)

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
