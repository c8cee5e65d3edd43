"""Where the gateway gets a request's input matrix: the feature store in this process (the
hot path), or FeatureService over HTTP. Either way a failure or the deadline gives default
features, named in `degraded`, never an error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ctr import metrics
from ctr.degraded import Reason
from ctr.features.store import FeatureLookup
from ctr.features.transform import Transformer
from ctr.observe.telemetry import Telemetry
from ctr.resilience.breaker import BreakerOpen, CircuitBreaker
from ctr.resilience.deadline import REMOTE_ERRORS, guarded

# (user_id, ad_ids, context, deadline) -> (input matrix, degraded reasons)
FeatureProvider = Callable[[str, list[str], dict[str, Any], float], Awaitable[tuple[np.ndarray, list[str]]]]


def _defaults(transformer: Transformer, n: int, context: dict[str, Any], reason: str) -> tuple[np.ndarray, list[str]]:
    metrics.DEGRADED.labels(reason).inc()
    return transformer.defaults(n, context), [reason]


def local_features(lookup: FeatureLookup, transformer: Transformer, telemetry: Telemetry) -> FeatureProvider:
    """Lookup and transform in this process, each stage timed. Past the deadline the lookup
    is abandoned and default features are used."""
    features_h, transform_h = telemetry.stage("features"), telemetry.stage("transform")

    async def provide(
        user_id: str, ad_ids: list[str], context: dict[str, Any], deadline: float
    ) -> tuple[np.ndarray, list[str]]:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(max(0.0, deadline - t0)):
                f = await lookup.lookup(user_id, ad_ids)
        except TimeoutError:
            features_h.observe(time.perf_counter() - t0)
            return _defaults(transformer, len(ad_ids), context, Reason.FEATURES_TIMEOUT)
        t1 = time.perf_counter()
        features_h.observe(t1 - t0)
        x = transformer.matrix(f.user_static, f.user_behavioral, f.ad_meta, f.ad_stats, context)
        transform_h.observe(time.perf_counter() - t1)
        return x, f.degraded

    return provide


def remote_features(
    call: Callable[..., Awaitable[Any]], breaker: CircuitBreaker, transformer: Transformer, telemetry: Telemetry
) -> FeatureProvider:
    """The matrix from FeatureService over HTTP, behind its breaker; when it fails, defaults."""
    features_h = telemetry.stage("features")

    async def provide(
        user_id: str, ad_ids: list[str], context: dict[str, Any], deadline: float
    ) -> tuple[np.ndarray, list[str]]:
        t0 = time.perf_counter()
        try:
            out = await guarded(call, breaker, max(0.001, deadline - t0))(
                user_id=user_id, ad_ids=ad_ids, context=context
            )
        except (*REMOTE_ERRORS, BreakerOpen):
            return _defaults(transformer, len(ad_ids), context, Reason.FEATURES_REMOTE)
        finally:
            features_h.observe(time.perf_counter() - t0)
        return np.asarray(out["matrix"], dtype=np.int64), list(out["degraded"])

    return provide
