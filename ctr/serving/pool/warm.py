"""Warming the model replicas before the gateway reports ready."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import numpy as np

from ctr.resilience.deadline import REMOTE_ERRORS
from ctr.serving.coalesce import ModelCall
from ctr.serving.pool.pool import ModelPool

log = logging.getLogger(__name__)


async def warm_pool(pool: ModelPool, width: int, deadline_s: float, round_s: float = 180.0) -> None:
    """Warm every replica of the pool at once, in rounds of `round_s`, until at least one
    answered in time (`warm_model` logs why each failed round did not): /readyz waits for
    this, and a replica that never answers does not keep the gateway from serving."""
    while True:
        if not pool.members:  # nothing discovered yet
            await asyncio.sleep(1.0)
            continue
        done = await asyncio.gather(*(warm_model(m.replica.infer, width, deadline_s, round_s) for m in pool.members))
        if any(done):
            return


async def warm_model(
    call: ModelCall,
    width: int,
    deadline_s: float,
    timeout_s: float = 180.0,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> bool:
    """Call the model until it answers 20 bursts in a row within the deadline: True; False
    (and a log line saying why) when `timeout_s` passes first.

    Right after start-up CTRModel is slow (torch's first passes, BentoML's batcher training
    its latency model on the first requests): measured, without this the first seconds of
    traffic timed out, opened the model breaker and were answered by the fallback.
    The gateway's /readyz stays 503 until this returned True for a replica (see `warm_pool`).
    """
    x = np.zeros((100, width), dtype=np.int64)
    start = clock()
    end, streak, calls, why = start + timeout_s, 0, 0, "no answer yet"
    while streak < 20 and clock() < end:
        t0 = clock()
        try:
            async with asyncio.timeout(2.0):
                answers = await asyncio.gather(*(call(x) for _ in range(4)))
            took = clock() - t0
            if any(len(y) != len(x) or not np.isfinite(y).all() for y in answers):
                streak, why = 0, "the model answered without one finite score per row"
            elif took < deadline_s:
                streak += 1
            else:
                streak, why = 0, f"a burst took {took * 1000:.1f} ms, over the {deadline_s * 1000:.1f} ms deadline"
        # AttributeError: BentoML's client not set up yet; ValueError: a malformed answer body
        except (*REMOTE_ERRORS, AttributeError, ValueError) as exc:
            streak, why = 0, f"the model call failed: {type(exc).__name__}: {exc}"
            await sleep(0.2)
        calls += 4
    if streak >= 20:
        log.info("model warm after %d calls in %.1f s", calls, clock() - start)
        return True
    log.warning("model not ready after %.0f s and %d calls (stays not ready): %s", timeout_s, calls, why)
    return False
