"""Retries: backoff with jitter, a budget, never past the deadline."""

from __future__ import annotations

import asyncio
import time

import pytest

from ctr.resilience.retry import Retrier, RetryBudget


def flaky(failures: int) -> tuple[list[int], object]:
    calls: list[int] = []

    async def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise ConnectionResetError("blip")
        return "ok"

    return calls, fn


def test_retries_until_success_within_attempts() -> None:
    """Two failures then success, with three attempts allowed."""
    calls, fn = flaky(2)
    r = Retrier("t", (OSError,), RetryBudget("t"), attempts=3, base_s=0.0001, jitter_s=0.0001)
    assert asyncio.run(r.call(fn, time.perf_counter() + 1)) == "ok" and len(calls) == 3  # type: ignore[arg-type]


def test_gives_up_after_attempts_and_reraises() -> None:
    """Past the attempts the last error reaches the caller."""
    calls, fn = flaky(5)
    r = Retrier("t", (OSError,), RetryBudget("t"), attempts=2, base_s=0.0001, jitter_s=0.0001)
    with pytest.raises(ConnectionResetError):
        asyncio.run(r.call(fn, time.perf_counter() + 1))  # type: ignore[arg-type]
    assert len(calls) == 2


def test_never_waits_past_the_deadline() -> None:
    """A retry whose backoff would end after the deadline is not made."""
    calls, fn = flaky(5)
    r = Retrier("t", (OSError,), RetryBudget("t"), attempts=5, base_s=1.0, jitter_s=0.0)
    with pytest.raises(ConnectionResetError):
        asyncio.run(r.call(fn, time.perf_counter() + 0.5))  # type: ignore[arg-type]
    assert len(calls) == 1


def test_other_errors_are_not_retried() -> None:
    """Only the listed (idempotent-safe) errors are retried."""

    async def fn() -> None:
        raise ValueError("bad input")

    r = Retrier("t", (OSError,), RetryBudget("t"), attempts=3)
    with pytest.raises(ValueError):
        asyncio.run(r.call(fn, time.perf_counter() + 1))


def test_budget_caps_retries_at_about_a_tenth_of_calls() -> None:
    """In an outage, 100 calls make at most ~10 retries (plus the initial allowance)."""
    budget = RetryBudget("t", ratio=0.1, min_tokens=0.0)
    r = Retrier("t", (OSError,), budget, attempts=3, base_s=0.00001, jitter_s=0.0)
    total = 0
    for _ in range(100):
        calls, fn = flaky(100)
        with pytest.raises(ConnectionResetError):
            asyncio.run(r.call(fn, time.perf_counter() + 1))  # type: ignore[arg-type]
        total += len(calls)
    assert 100 <= total <= 111
