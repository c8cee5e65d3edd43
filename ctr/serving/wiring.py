"""Builds the gateway's request path from the settings and a stored model."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ctr.features.stack import FeatureStack
from ctr.features.transform import Transformer
from ctr.model.store import ModelArtifacts
from ctr.resilience.breaker import CircuitBreaker
from ctr.resilience.deadline import REMOTE_ERRORS, guarded, retried
from ctr.resilience.limit import AimdLimit
from ctr.resilience.retry import Retrier, RetryBudget
from ctr.serving.coalesce import Coalescer, ModelCall
from ctr.serving.fallback import Fallback, RemoteFallback
from ctr.serving.features import FeatureProvider, local_features, remote_features
from ctr.serving.gateway import Gateway
from ctr.serving.model_client import checked
from ctr.serving.overload import Admission
from ctr.settings import Settings

log = logging.getLogger(__name__)


def gateway(
    settings: Settings,
    art: ModelArtifacts,
    model_call: ModelCall,
    stack: FeatureStack,
    features_call: Callable[..., Awaitable[Any]] | None = None,
    fallback_call: RemoteFallback | None = None,
) -> Gateway:
    """The gateway core. Features come from this process, or from FeatureService through
    `features_call` with CTR_FEATURES_REMOTE; fallback scores from the in-process table, or
    from FallbackService through `fallback_call` with CTR_FALLBACK_REMOTE. Every remote call
    is guarded by its breaker and a timeout; the model call's timeout is the deadline."""
    transformer = Transformer(art.spec)
    provider: FeatureProvider = local_features(stack.lookup, transformer)
    if settings.features_remote and features_call is not None:
        provider = remote_features(features_call, CircuitBreaker.from_settings(settings, "features"), transformer)
    remote_fallback = None
    if settings.fallback_remote and fallback_call is not None:
        remote_fallback = guarded(
            fallback_call, CircuitBreaker.from_settings(settings, "fallback"), settings.fallback_timeout_ms / 1000.0
        )
    deadline_s = settings.deadline_ms / 1000.0
    retrier = Retrier(
        "model", REMOTE_ERRORS, RetryBudget("model", settings.retry_budget_ratio), settings.retry_attempts
    )
    breaker = CircuitBreaker.from_settings(settings, "model")
    coalescer = Coalescer(
        checked(retried(guarded(model_call, breaker, deadline_s), retrier, deadline_s)),
        max_inflight=settings.batch_max_inflight,
        max_rows=settings.batch_max_rows,
        window_s=settings.batch_window_ms / 1000.0,
    )
    return Gateway(provider, coalescer, Fallback(art.segments, remote_fallback), art.tag, deadline_s)


def admission(settings: Settings, gw: Gateway) -> Admission:
    """The edge of /predict: the adaptive concurrency limit (CTR_LIMIT) and what a shed request gets."""
    limiter = AimdLimit.from_settings(settings) if settings.limit == "aimd" else None
    return Admission(gw, limiter, settings.overload)


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
    The gateway's /readyz stays 503 until this returned True (see `keep_warming`).
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
        except (*REMOTE_ERRORS, AttributeError) as exc:  # AttributeError: BentoML's client not set up yet
            streak, why = 0, f"the model call failed: {type(exc).__name__}: {exc}"
            await sleep(0.2)
        calls += 4
    if streak >= 20:
        log.info("model warm after %d calls in %.1f s", calls, clock() - start)
        return True
    log.warning("model not ready after %.0f s and %d calls (stays not ready): %s", timeout_s, calls, why)
    return False


async def keep_warming(call: ModelCall, width: int, deadline_s: float, round_s: float = 180.0) -> None:
    """Warm the model in rounds of `round_s` until it is ready (each failed round logs why)."""
    while not await warm_model(call, width, deadline_s, round_s):
        pass


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight and collect less often.

    The L1 cache and the model hold ~10^5 long-lived objects; full collections over them
    stalled requests for tens of ms (measured: p99 at 16 concurrent requests 230 ms
    before, 53 ms after).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
