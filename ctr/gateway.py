"""The gateway's request path: features -> transform -> coalesced model call -> response.

Every request has a deadline (CTR_DEADLINE_MS); each stage gets what is left of it.
The model call is guarded by a circuit breaker and a per-call timeout, and retried
(idempotent) with jittered backoff inside the deadline and a retry budget. When the
model cannot answer, the fallback answers: the segment table (in this process, or the
FallbackService over HTTP), and the global CTR if that fails too. Every substitution is
named in `degraded`, starting with the part substituted (`model:`, `features:`, `cache:`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from bentoml.exceptions import BentoMLException

from ctr import metrics
from ctr.api import PredictRequest
from ctr.breaker import BreakerOpen, CircuitBreaker
from ctr.coalesce import Coalescer, ModelCall
from ctr.fallback import SegmentTable
from ctr.features.store import FeatureLookup
from ctr.retry import Retrier
from ctr.transform import Transformer

# What a failing or unreachable service raises through BentoML's client.
REMOTE_ERRORS: tuple[type[BaseException], ...] = (BentoMLException, aiohttp.ClientError, OSError, TimeoutError)
MODEL_ERRORS = REMOTE_ERRORS

# Less budget than this left after features: the model is not even tried.
MIN_MODEL_BUDGET_S = 0.001

# (user_id, ad_ids, context, deadline) -> (input matrix, degraded reasons)
FeatureProvider = Callable[[str, list[str], dict[str, Any], float], Awaitable[tuple[np.ndarray, list[str]]]]
# (ad_ids, context) -> scores
RemoteFallback = Callable[[list[str], dict[str, Any]], Awaitable[list[float]]]


def guarded(call: Callable[..., Awaitable[Any]], breaker: CircuitBreaker, timeout_s: float) -> Callable[..., Any]:
    """`call` behind a breaker, each try bounded by `timeout_s` (a timeout counts as a failure)."""

    async def run(*args: Any, **kwargs: Any) -> Any:
        async def once() -> Any:
            async with asyncio.timeout(timeout_s):
                return await call(*args, **kwargs)

        return await breaker.call(once, REMOTE_ERRORS)

    return run


def retried(call: ModelCall, retrier: Retrier, deadline_s: float) -> ModelCall:
    """A model call retried as a whole within `deadline_s` of its start: retries are per
    coalesced call, so one failed batch spends one retry of the budget, not one per request."""

    async def run(x: np.ndarray) -> np.ndarray:
        y: np.ndarray = await retrier.call(lambda: call(x), time.perf_counter() + deadline_s)
        return y

    return run


def local_features(lookup: FeatureLookup, transformer: Transformer) -> FeatureProvider:
    """Feature lookup and transform in this process (the hot path), each stage timed.
    Past the deadline the lookup is abandoned and default features are used."""
    features_h = metrics.STAGE_LATENCY.labels("features")
    transform_h = metrics.STAGE_LATENCY.labels("transform")

    async def provide(
        user_id: str, ad_ids: list[str], context: dict[str, Any], deadline: float
    ) -> tuple[np.ndarray, list[str]]:
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(max(0.0, deadline - t0)):
                f = await lookup.lookup(user_id, ad_ids)
        except TimeoutError:
            metrics.DEGRADED.labels("features:timeout:default").inc()
            t1 = time.perf_counter()
            x, degraded = transformer.defaults(len(ad_ids), context), ["features:timeout:default"]
        else:
            t1 = time.perf_counter()
            x = transformer.matrix(f.user_static, f.user_behavioral, f.ad_meta, f.ad_stats, context)
            degraded = f.degraded
        features_h.observe(t1 - t0)
        transform_h.observe(time.perf_counter() - t1)
        return x, degraded

    return provide


def remote_features(
    call: Callable[..., Awaitable[Any]], breaker: CircuitBreaker, transformer: Transformer
) -> FeatureProvider:
    """Features from FeatureService over HTTP; when it fails, default features."""
    features_h = metrics.STAGE_LATENCY.labels("features")

    async def provide(
        user_id: str, ad_ids: list[str], context: dict[str, Any], deadline: float
    ) -> tuple[np.ndarray, list[str]]:
        t0 = time.perf_counter()
        try:
            out = await guarded(call, breaker, max(0.001, deadline - t0))(
                user_id=user_id, ad_ids=ad_ids, context=context
            )
            x, degraded = np.asarray(out["matrix"], dtype=np.int64), list(out["degraded"])
        except (*REMOTE_ERRORS, BreakerOpen):
            metrics.DEGRADED.labels("features:remote:default").inc()
            x, degraded = transformer.defaults(len(ad_ids), context), ["features:remote:default"]
        features_h.observe(time.perf_counter() - t0)
        return x, degraded

    return provide


@dataclass(frozen=True, slots=True)
class Prediction:
    request_id: str
    scores: list[float]
    model_version: str
    arm: str
    fallback: bool
    degraded: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "scores": self.scores,
            "model_version": self.model_version,
            "arm": self.arm,
            "fallback": self.fallback,
            "degraded": self.degraded,
        }


class Gateway:
    def __init__(
        self,
        features: FeatureProvider,
        coalescer: Coalescer,
        fallback: SegmentTable,
        model_version: str,
        deadline_s: float,
        remote_fallback: RemoteFallback | None = None,
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.features = features
        self.coalescer = coalescer
        self.fallback = fallback
        self.model_version = model_version
        self.deadline_s = deadline_s
        self.remote_fallback = remote_fallback
        self._inference_h = metrics.STAGE_LATENCY.labels("inference")
        self._request_h = metrics.STAGE_LATENCY.labels("request")

    async def _infer(self, x: np.ndarray, deadline: float) -> list[float]:
        async with asyncio.timeout(deadline - time.perf_counter()):
            y = await self.coalescer.submit(x)
        return np.clip(y.astype(np.float64), 1e-6, 1 - 1e-6).tolist()

    async def _fallback(self, req: PredictRequest, context: dict[str, Any], degraded: list[str]) -> list[float]:
        if self.remote_fallback is not None:
            try:
                return await self.remote_fallback(req.ad_ids, context)
            except (*REMOTE_ERRORS, BreakerOpen):
                degraded.append("model:fallback:global")
                metrics.DEGRADED.labels("model:fallback:global").inc()
                return [self.fallback.global_ctr] * len(req.ad_ids)
        return self.fallback.scores(context, len(req.ad_ids))

    async def predict(self, req: PredictRequest, request_id: str | None = None) -> Prediction:
        t0 = time.perf_counter()
        deadline = t0 + self.deadline_s
        context = req.context.model_dump()
        x, degraded = await self.features(req.user_id, req.ad_ids, context, deadline)
        t1 = time.perf_counter()
        reason = None
        if deadline - t1 < MIN_MODEL_BUDGET_S:
            reason = "model:deadline"
        else:
            try:
                scores = await self._infer(x, deadline)
                self._inference_h.observe(time.perf_counter() - t1)
            except TimeoutError:
                reason = "model:timeout"
            except BreakerOpen:
                reason = "model:breaker_open"
            except MODEL_ERRORS:
                reason = "model:unavailable"
        if reason is not None:
            metrics.FALLBACKS.labels(reason).inc()
            degraded = [*degraded, reason]
            scores = await self._fallback(req, context, degraded)
        elapsed = time.perf_counter() - t0
        outcome = "fallback" if reason else "ok"
        self._request_h.observe(elapsed)
        metrics.REQUESTS.labels(outcome).inc()
        metrics.REQUEST_LATENCY.labels(outcome).observe(elapsed)
        return Prediction(
            request_id=request_id or uuid.uuid4().hex,
            scores=scores,
            model_version=self.model_version if reason is None else f"fallback:{self.model_version}",
            arm="stable",
            fallback=reason is not None,
            degraded=degraded,
        )
