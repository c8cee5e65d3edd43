"""Calls bounded by a breaker, a per-try timeout and a deadline: the two wrappers every
remote call of the gateway goes through.

- `guarded(call, breaker, timeout_s)`: each try behind the breaker, bounded by `timeout_s`
  (a timeout counts as a failure);
- `retried(call, retrier, deadline_s)`: the whole call retried within `deadline_s` of its
  start, so a coalesced call of N requests spends one retry of the budget, not N.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from bentoml.exceptions import BentoMLException

from ctr.resilience.breaker import CircuitBreaker
from ctr.resilience.retry import Retrier

X = TypeVar("X")
Y = TypeVar("Y")

# What a failing or unreachable service raises through BentoML's client or aiohttp.
REMOTE_ERRORS: tuple[type[BaseException], ...] = (BentoMLException, aiohttp.ClientError, OSError, TimeoutError)


def guarded(call: Callable[..., Awaitable[Any]], breaker: CircuitBreaker, timeout_s: float) -> Callable[..., Any]:
    """`call` behind a breaker, each try bounded by `timeout_s` (a timeout counts as a failure)."""

    async def run(*args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            async with asyncio.timeout(timeout_s):
                return await call(*args, **kwargs)

        return await breaker.call(once, REMOTE_ERRORS)

    return run


def retried(call: Callable[[X], Awaitable[Y]], retrier: Retrier, deadline_s: float) -> Callable[[X], Awaitable[Y]]:
    """`call` retried as a whole within `deadline_s` of its start."""

    async def run(x: X) -> Y:
        return await retrier.call(lambda: call(x), time.perf_counter() + deadline_s)

    return run
