"""The circuit breaker's state machine, on an injected clock."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from helpers import FakeClock

from ctr.resilience.breaker import BreakerOpen, CircuitBreaker, State


def breaker(clock: FakeClock, **kw: float) -> CircuitBreaker:
    opts = {"failure_ratio": 0.5, "window_s": 10.0, "min_calls": 4, "cooldown_s": 5.0, "trial_timeout_s": 1.0} | kw
    return CircuitBreaker("test", clock=clock, **opts)  # type: ignore[arg-type]


def test_opens_only_past_the_ratio_with_enough_calls() -> None:
    """One failure does not open it; more than half failing among >= min_calls does."""
    c = FakeClock()
    b = breaker(c)
    b.record_failure()
    assert b.state is State.CLOSED
    b.record_success()
    b.record_success()
    b.record_failure()  # 2 of 4 = 0.5, not > 0.5
    assert b.state is State.CLOSED
    b.record_failure()  # 3 of 5
    assert b.state is State.OPEN and not b.allow()


def test_failures_leave_the_window() -> None:
    """Failures older than the window no longer count."""
    c = FakeClock()
    b = breaker(c)
    for _ in range(3):
        b.record_failure()
    c.t = 11
    b.record_failure()
    b.record_success()
    b.record_success()
    b.record_success()
    assert b.state is State.CLOSED


def test_half_open_trials_close_or_reopen() -> None:
    """After the cooldown one trial is admitted; success closes, failure reopens."""
    c = FakeClock()
    b = breaker(c)
    for _ in range(4):
        b.record_failure()
    c.t = 4.9
    assert b.state is State.OPEN
    c.t = 5.0
    assert b.state is State.HALF_OPEN
    assert b.allow() and not b.allow()  # one trial slot
    b.record_failure()
    assert b.state is State.OPEN
    c.t = 10.0
    assert b.allow()
    b.record_success()
    assert b.state is State.CLOSED and b.allow()


def test_a_silent_trial_frees_its_slot_after_its_deadline() -> None:
    """A trial that never reports does not keep the breaker half-open forever."""
    c = FakeClock()
    b = breaker(c)
    for _ in range(4):
        b.record_failure()
    c.t = 5.0
    assert b.allow() and not b.allow()
    c.t = 6.0
    assert b.allow()


def test_concurrent_half_open_admits_exactly_the_trial_limit() -> None:
    """N tasks arrive together at a half-open breaker; exactly half_open_max_calls get through."""
    c = FakeClock()
    b = breaker(c, half_open_max_calls=2)
    for _ in range(4):
        b.record_failure()
    c.t = 5.0
    gate = asyncio.Event()
    admitted = 0

    async def call() -> None:
        nonlocal admitted

        async def work() -> None:
            nonlocal admitted
            admitted += 1
            await gate.wait()

        with contextlib.suppress(BreakerOpen):
            await b.call(work, (OSError,))

    async def go() -> None:
        tasks = [asyncio.create_task(call()) for _ in range(20)]
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(go())
    assert admitted == 2 and b.state is State.CLOSED


@pytest.mark.parametrize("kw", [{"failure_ratio": 1.0}, {"min_calls": 0}, {"window_s": 0.0}])
def test_rejects_bad_config(kw: dict[str, float]) -> None:
    """Impossible settings are refused."""
    with pytest.raises(ValueError):
        breaker(FakeClock(), **kw)
