"""Retries of idempotent calls: exponential backoff with jitter (tenacity), bounded by the
request's deadline and by a retry budget, so retries cannot multiply an outage.

    T_wait = min(T_max, T_base * 2^attempt) + rand(0, T_jitter)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential, wait_random

from ctr import metrics

T = TypeVar("T")


class RetryBudget:
    """A token bucket: every call deposits `ratio` tokens, every retry spends one, so
    retries stay at about `ratio` of calls (Finagle's and gRPC's retry budgets)."""

    def __init__(self, name: str, ratio: float = 0.1, min_tokens: float = 3.0, max_tokens: float = 20.0) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.name = name
        self.ratio = ratio
        self.max_tokens = max_tokens
        self.tokens = min_tokens  # a few retries are allowed before any call has been seen

    def deposit(self) -> None:
        self.tokens = min(self.max_tokens, self.tokens + self.ratio)

    def withdraw(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        metrics.RETRY_BUDGET_EXHAUSTED.labels(self.name).inc()
        return False


class Retrier:
    def __init__(
        self,
        name: str,
        errors: tuple[type[BaseException], ...],
        budget: RetryBudget,
        attempts: int = 3,
        base_s: float = 0.002,
        max_s: float = 0.02,
        jitter_s: float = 0.002,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.name, self.errors, self.budget = name, errors, budget
        self.attempts = attempts
        self.wait = wait_exponential(multiplier=base_s, min=base_s, max=max_s) + wait_random(0, jitter_s)

    async def call(self, fn: Callable[[], Awaitable[T]], deadline: float) -> T:
        """`fn()` with retries while attempts, the budget and the deadline (perf_counter
        seconds) allow; the last error is raised when they do not."""
        self.budget.deposit()
        try:  # the common case, a first try that succeeds, skips tenacity's machinery (~25 us a call)
            return await fn()
        except self.errors as exc:
            first: BaseException = exc
        replayed = False

        async def again() -> T:  # tenacity decides on the first failure as if it had made that try
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first
            return await fn()

        def give_up(state: RetryCallState) -> bool:
            if stop_after_attempt(self.attempts)(state):
                return True
            # tenacity computes the wait before asking to stop: check the sleep it will take
            if time.perf_counter() + state.upcoming_sleep >= deadline or not self.budget.withdraw():
                return True
            metrics.RETRIES.labels(self.name).inc()
            return False

        retrying = AsyncRetrying(stop=give_up, wait=self.wait, retry=retry_if_exception_type(self.errors), reraise=True)
        async for attempt in retrying:
            with attempt:
                return await again()
        raise AssertionError("unreachable")  # pragma: no cover
