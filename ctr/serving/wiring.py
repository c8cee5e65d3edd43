"""Builds the gateway's request path from the settings and a stored model."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable
from typing import Any

from ctr.features.stack import FeatureStack
from ctr.features.transform import Transformer
from ctr.model.store import ModelArtifacts
from ctr.observe import log as obslog
from ctr.observe import sli
from ctr.resilience.breaker import CircuitBreaker
from ctr.resilience.deadline import REMOTE_ERRORS, guarded, retried
from ctr.resilience.retry import Retrier, RetryBudget
from ctr.serving.coalesce import Coalescer, ModelCall
from ctr.serving.fallback import Fallback, RemoteFallback
from ctr.serving.features import FeatureProvider, local_features, remote_features
from ctr.serving.gateway import Gateway
from ctr.serving.status import Sources, StatusBoard
from ctr.settings import Settings


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
    coalescer = Coalescer(
        retried(guarded(model_call, CircuitBreaker.from_settings(settings, "model"), deadline_s), retrier, deadline_s),
        max_inflight=settings.batch_max_inflight,
        max_rows=settings.batch_max_rows,
        window_s=settings.batch_window_ms / 1000.0,
    )
    return Gateway(provider, coalescer, Fallback(art.segments, remote_fallback), art.tag, deadline_s)


def observability(settings: Settings) -> None:
    """Logs in CTR_LOG_FORMAT at CTR_LOG_LEVEL; the process's SLO objectives and fallback bursts."""
    obslog.configure(settings.log_format, settings.log_level)
    sli.RECORDER.configure(
        sli.Objectives(
            settings.slo_availability, settings.slo_model_scored, settings.slo_p99_ms, settings.slo_burn_page
        )
    )
    sli.RECORDER.enabled = settings.sli
    obslog.BURSTS.gap_s = settings.fallback_burst_gap_s


def status_board(gw: Gateway, stack: FeatureStack | None, workers: int = 1) -> StatusBoard:
    """The status page's panels over this process's gateway, feature store and write-behind stream."""
    store = None if stack is None else stack.store
    stream = None if stack is None else stack.writer.redis
    return StatusBoard(Sources(gw.sli, gw, store, stream, workers))


def start_ticker(board: StatusBoard) -> asyncio.Task[None]:
    """Once a second: the SLI gauges, the cache-rate samples, the end of fallback bursts."""
    gw = board.sources.gateway
    bursts = getattr(gw, "bursts", obslog.BURSTS)
    return asyncio.create_task(sli.run_ticker(board.sources.recorder, board.tick, bursts.tick))


async def warm_model(call: ModelCall, width: int, deadline_s: float, timeout_s: float = 180.0) -> int:
    """Call the model until it answers 20 bursts in a row within the deadline; returns calls made.

    Right after start-up CTRModel is slow (torch's first passes, BentoML's batcher training
    its latency model on the first requests): measured, without this the first seconds of
    traffic timed out, opened the model breaker and were answered by the fallback.
    The gateway's /readyz stays 503 until this is done.
    """
    import asyncio
    import time

    import numpy as np

    x = np.zeros((100, width), dtype=np.int64)
    end, streak, calls = time.monotonic() + timeout_s, 0, 0
    while streak < 20 and time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(2.0):
                await asyncio.gather(*(call(x) for _ in range(4)))
            streak = streak + 1 if time.perf_counter() - t0 < deadline_s else 0
        except (*REMOTE_ERRORS, AttributeError):  # AttributeError: BentoML's client not set up yet
            streak = 0
            await asyncio.sleep(0.2)
        calls += 4
    return calls


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight and collect less often.

    The L1 cache and the model hold ~10^5 long-lived objects; full collections over them
    stalled requests for tens of ms (measured: p99 at 16 concurrent requests 230 ms
    before, 53 ms after).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
