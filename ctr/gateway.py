"""The gateway's request path: features -> transform -> coalesced model call -> response,
with the fallback table answering when the model cannot within the deadline."""

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
from ctr.coalesce import Coalescer
from ctr.fallback import SegmentTable
from ctr.features.store import FeatureLookup
from ctr.transform import Transformer

# What a failing or unreachable model process raises through BentoML's client.
MODEL_ERRORS: tuple[type[BaseException], ...] = (BentoMLException, aiohttp.ClientError, OSError)

# (user_id, ad_ids, context) -> (input matrix, degraded reasons)
FeatureProvider = Callable[[str, list[str], dict[str, Any]], Awaitable[tuple[np.ndarray, list[str]]]]


def local_features(lookup: FeatureLookup, transformer: Transformer) -> FeatureProvider:
    """Feature lookup and transform in this process (the hot path), each stage timed."""
    features_h = metrics.STAGE_LATENCY.labels("features")
    transform_h = metrics.STAGE_LATENCY.labels("transform")

    async def provide(user_id: str, ad_ids: list[str], context: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
        t0 = time.perf_counter()
        f = await lookup.lookup(user_id, ad_ids)
        t1 = time.perf_counter()
        x = transformer.matrix(f.user_static, f.user_behavioral, f.ad_meta, f.ad_stats, context)
        features_h.observe(t1 - t0)
        transform_h.observe(time.perf_counter() - t1)
        return x, f.degraded

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
    ) -> None:
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.features = features
        self.coalescer = coalescer
        self.fallback = fallback
        self.model_version = model_version
        self.deadline_s = deadline_s
        self._inference_h = metrics.STAGE_LATENCY.labels("inference")
        self._request_h = metrics.STAGE_LATENCY.labels("request")

    async def predict(self, req: PredictRequest, request_id: str | None = None) -> Prediction:
        t0 = time.perf_counter()
        context = req.context.model_dump()
        x, degraded = await self.features(req.user_id, req.ad_ids, context)
        t1 = time.perf_counter()
        reason = None
        try:
            async with asyncio.timeout(max(0.0, self.deadline_s - (t1 - t0))):
                y = await self.coalescer.submit(x)
            scores = np.clip(y.astype(np.float64), 1e-6, 1 - 1e-6).tolist()
            self._inference_h.observe(time.perf_counter() - t1)
        except TimeoutError:
            reason = "model:timeout"
        except MODEL_ERRORS:
            reason = "model:unavailable"
        if reason is not None:
            metrics.FALLBACKS.labels(reason).inc()
            scores = self.fallback.scores(context, len(req.ad_ids))
            degraded = [*degraded, reason]
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
