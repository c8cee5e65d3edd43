"""An error-rate-windowed circuit breaker with an injected clock.

Written here because no maintained async Python library has these semantics (pybreaker
and aiobreaker count consecutive failures and read the wall clock; purgatory likewise):

- CLOSED -> OPEN when, within the last `window_s`, at least `min_calls` calls were
  recorded and failures / calls > `failure_ratio`;
- OPEN -> HALF_OPEN after `cooldown_s`;
- HALF_OPEN admits at most `half_open_max_calls` trial calls; a trial that has not
  reported within `trial_timeout_s` frees its slot (a half-open state without a trial
  deadline can hang forever: resilience4j #903);
- HALF_OPEN -> CLOSED on a trial success, -> OPEN again on a trial failure.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from ctr import metrics
from ctr.observe import log

if TYPE_CHECKING:
    from ctr.settings import Settings

T = TypeVar("T")
Clock = Callable[[], float]


class State(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class BreakerOpen(Exception):
    """The breaker refused the call without trying it."""


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        failure_ratio: float = 0.5,
        window_s: float = 10.0,
        min_calls: int = 10,
        cooldown_s: float = 5.0,
        half_open_max_calls: int = 1,
        trial_timeout_s: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 < failure_ratio < 1:
            raise ValueError(f"failure_ratio must be in (0, 1), got {failure_ratio}")
        if window_s <= 0 or cooldown_s < 0 or trial_timeout_s <= 0:
            raise ValueError("window_s and trial_timeout_s must be > 0 and cooldown_s >= 0")
        if min_calls < 1 or half_open_max_calls < 1:
            raise ValueError("min_calls and half_open_max_calls must be >= 1")
        self.name = name
        self.failure_ratio = failure_ratio
        self.window_s = window_s
        self.min_calls = min_calls
        self.cooldown_s = cooldown_s
        self.half_open_max_calls = half_open_max_calls
        self.trial_timeout_s = trial_timeout_s
        self.clock = clock
        self._events: deque[tuple[float, bool]] = deque()  # (time, failed)
        self._failures = 0
        self._opened_at = 0.0
        self._trials: list[float] = []  # start times of outstanding half-open trials
        self._state = State.CLOSED
        self.transitions = 0
        self.created = time.monotonic()
        metrics.BREAKER_STATE.labels(name).set(State.CLOSED.value)

    @classmethod
    def from_settings(cls, settings: Settings, name: str) -> CircuitBreaker:
        """A breaker with the configured ε, T, minimum calls and cooldown (CTR_BREAKER_*);
        a half-open trial may take two request deadlines."""
        return cls(
            name,
            failure_ratio=settings.breaker_failure_ratio,
            window_s=settings.breaker_window_s,
            min_calls=settings.breaker_min_calls,
            cooldown_s=settings.breaker_cooldown_s,
            trial_timeout_s=max(0.05, 2 * settings.deadline_ms / 1000.0),
        )

    @property
    def state(self) -> State:
        if self._state is State.OPEN and self.clock() - self._opened_at >= self.cooldown_s:
            self._transition(State.HALF_OPEN)
        return self._state

    def window(self) -> tuple[int, int]:
        """(calls, failures) recorded in the current window."""
        return len(self._events), self._failures

    def _transition(self, to: State) -> None:
        if to is self._state:
            return
        log.breaker_transition(self.name, self._state.name.lower(), to.name.lower(), *self.window())
        self.transitions += 1
        self._state = to
        self._trials.clear()
        if to is State.OPEN:
            self._opened_at = self.clock()
        if to is State.CLOSED:
            self._events.clear()
            self._failures = 0
        metrics.BREAKER_STATE.labels(self.name).set(to.value)
        metrics.BREAKER_TRANSITIONS.labels(self.name, to.name.lower()).inc()

    def allow(self) -> bool:
        """Whether a call may go ahead now (a half-open admission takes a trial slot)."""
        state = self.state
        if state is State.CLOSED:
            return True
        if state is State.OPEN:
            return False
        now = self.clock()
        self._trials = [t for t in self._trials if now - t < self.trial_timeout_s]
        if len(self._trials) >= self.half_open_max_calls:
            return False
        self._trials.append(now)
        return True

    def _record(self, failed: bool) -> None:
        now = self.clock()
        self._events.append((now, failed))
        self._failures += failed
        while self._events and now - self._events[0][0] > self.window_s:
            _, old_failed = self._events.popleft()
            self._failures -= old_failed

    def record_success(self) -> None:
        if self._state is State.HALF_OPEN:
            self._transition(State.CLOSED)
            return
        if self._state is State.CLOSED:
            self._record(False)

    def record_failure(self) -> None:
        if self._state is State.HALF_OPEN:
            self._transition(State.OPEN)
            return
        if self._state is State.CLOSED:
            self._record(True)
            calls = len(self._events)
            if calls >= self.min_calls and self._failures / calls > self.failure_ratio:
                self._transition(State.OPEN)

    async def call(self, fn: Callable[[], Awaitable[T]], failures: tuple[type[BaseException], ...]) -> T:
        """Run `fn` if allowed; record its outcome (only `failures` count against it)."""
        if not self.allow():
            raise BreakerOpen(self.name)
        try:
            result = await fn()
        except failures:
            self.record_failure()
            raise
        self.record_success()
        return result


class Breakers:
    """The breakers of one gateway, made by its composition root (ctr.serving.root): each is
    built from the settings (CTR_BREAKER_*) and listed, by name, on the status page. Held
    weakly: a pool's breaker of a replica that left goes with it."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings
        self._live: weakref.WeakSet[CircuitBreaker] = weakref.WeakSet()

    def make(self, name: str) -> CircuitBreaker:
        b = CircuitBreaker(name) if self.settings is None else CircuitBreaker.from_settings(self.settings, name)
        return self.add(b)

    def add(self, breaker: CircuitBreaker) -> CircuitBreaker:
        self._live.add(breaker)
        return breaker

    def live(self) -> list[CircuitBreaker]:
        """The live breakers by name (the newest of a name wins)."""
        out = {b.name: b for b in sorted(self._live, key=lambda b: b.created)}
        return [out[k] for k in sorted(out)]
