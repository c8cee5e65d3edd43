"""The gateway's request path: features -> transform -> coalesced model call -> response.

Every request has a deadline (CTR_DEADLINE_MS); each stage gets what is left of it.
The model call is guarded by a circuit breaker and a per-call timeout, and retried
(idempotent) with jittered backoff inside the deadline and a retry budget (see
`ctr.serving.wiring`). When the model cannot answer, the fallback answers (the segment
table, in this process or from FallbackService, then the global CTR). Every substitution
is named in `degraded`, starting with the part substituted (`model:`, `features:`, `cache:`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ctr import metrics
from ctr.api.contract import PredictRequest
from ctr.observe import log as obslog
from ctr.observe import sli
from ctr.resilience.breaker import BreakerOpen
from ctr.resilience.deadline import REMOTE_ERRORS
from ctr.serving.coalesce import ModelError
from ctr.serving.fallback import Fallback
from ctr.serving.features import FeatureProvider

# Less budget than this left after features: the model is not even tried.
MIN_MODEL_BUDGET_S = 0.001


@dataclass(frozen=True, slots=True)
class Prediction:
    """The /predict answer (orjson serializes it as is)."""

    request_id: str
    scores: list[float]
    model_version: str
    arm: str
    fallback: bool
    degraded: list[str]


class Model(Protocol):
    """Where the gateway sends a request's matrix: the model pool (`ctr.serving.pool`), or one
    coalescer; `key` (the user id) is the routing key of consistent hashing."""

    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray: ...


class ArmRouter(Protocol):
    """The canary's arms (`ctr.serving.canary.arms`): which pool and version serve a user, and
    the per-arm counters the canary's gates read."""

    def route(self, user_id: str) -> tuple[str, Model, str]: ...
    def record(self, arm: str, latency_s: float, failed: bool, user_id: str = "") -> None: ...


class IdIssuer(Protocol):
    """Issues an answer's request id (the edge's `request_id.Signer.issue`): the arm and version that
    answered, the user's canary unit, the rollout whose split chose the arm ("" outside one), and
    what was served (kept for /feedback)."""

    def __call__(
        self,
        arm: str,
        model_version: str,
        unit: int = 0,
        rollout: str = "",
        ad_ids: Sequence[str] = (),
        scores: Sequence[float] = (),
    ) -> str: ...


def _random_id(arm: str, model_version: str, unit: int = 0, rollout: str = "",
               ad_ids: Sequence[str] = (), scores: Sequence[float] = ()) -> str:  # fmt: skip
    return uuid.uuid4().hex


class ModelFailed(Exception):
    """The model gave no scores in time; `reason` names why (a `model:` degradation)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Gateway:
    def __init__(
        self,
        features: FeatureProvider,
        model: Model,
        fallback: Fallback,
        model_version: str,
        deadline_s: float,
        arms: ArmRouter | None = None,
        new_id: IdIssuer | None = None,
    ) -> None:
        """`new_id` issues each request's one id (the edge's signer; default a random hex id)."""
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.features = features
        self.model = model
        self.fallback = fallback
        self.model_version = model_version
        self.deadline_s = deadline_s
        self.arms = arms
        self.new_id = new_id or _random_id
        self._inference_h = sli.stage("inference")
        self._request_h = sli.stage("request")
        self.sli = sli.RECORDER  # SLIs of this process (the status page reads them)
        self.bursts = obslog.BURSTS  # one log line per burst of fallbacks

    @property
    def pool(self) -> Model | None:
        """The model pool, when the model is one (its status() feeds the status page)."""
        return self.model if hasattr(self.model, "status") else None

    @property
    def canary(self) -> Any:
        """The canary's runtime when there are two arms (its status() feeds the status page)."""
        return None if self.arms is None else getattr(self.arms, "runtime", None)

    async def _infer(
        self, x: np.ndarray, deadline: float, key: str | None = None, model: Model | None = None
    ) -> list[float]:
        """The model's scores for the rows of `x`, or ModelFailed."""
        t0 = time.perf_counter()
        if deadline - t0 < MIN_MODEL_BUDGET_S:
            raise ModelFailed("model:deadline")
        try:
            async with asyncio.timeout(deadline - t0):
                y = await (model or self.model).submit(x, key)
        except TimeoutError:
            raise ModelFailed("model:timeout") from None
        except BreakerOpen:
            raise ModelFailed("model:breaker_open") from None
        except REMOTE_ERRORS:
            raise ModelFailed("model:unavailable") from None
        except ModelError as exc:  # an invalid answer, a batch that failed in the coalescer
            raise ModelFailed(exc.reason) from None
        self._inference_h.observe(time.perf_counter() - t0)
        return np.clip(y.astype(np.float64), 1e-6, 1 - 1e-6).tolist()

    async def predict(self, req: PredictRequest, client_id: str | None = None) -> Prediction:
        """The scores of one request; `client_id` (the caller's X-Request-ID) is logged beside
        the request's own id."""
        t0 = time.perf_counter()
        deadline = t0 + self.deadline_s
        context = req.context.model_dump()
        x, degraded = await self.features(req.user_id, req.ad_ids, context, deadline)
        arm, model, version = self.arms.route(req.user_id) if self.arms else ("stable", self.model, self.model_version)
        canary = self.canary
        rollout = canary.active_id() if canary is not None else ""  # read with the route: the same view
        failed = None
        try:
            scores = await self._infer(x, deadline, req.user_id, model)
        except ModelFailed as exc:
            failed = exc.reason
            metrics.FALLBACKS.labels(failed).inc()
            degraded = [*degraded, failed]
            scores = await self.fallback.scores(req.ad_ids, context, degraded)
            version = f"fallback:{self.model_version}"
        elapsed = time.perf_counter() - t0
        outcome = "ok" if failed is None else "fallback"
        self._request_h.observe(elapsed)
        metrics.REQUESTS.labels(outcome).inc()
        metrics.REQUEST_LATENCY.labels(outcome).observe(elapsed)
        if self.arms is not None:
            self.arms.record(arm, elapsed, failed is not None, req.user_id)  # a fallback is its arm's error
        unit = canary.unit(req.user_id) if canary is not None else 0
        rid = self.new_id(arm, version, unit, rollout, req.ad_ids, scores)
        pred = Prediction(rid, scores, version, arm, failed is not None, degraded)
        self.observe(pred, failed, elapsed, client_id)
        return pred

    def observe(self, pred: Prediction, failed: str | None, elapsed_s: float, client_id: str | None = None) -> None:
        """The request's SLIs (recorder and ctr_sli_* metrics; also of a request shed at the edge),
        the fallback-burst log, and
        at DEBUG only its own log line."""
        if not self.sli.enabled:
            return
        result = "model" if failed is None else "fallback"
        self.sli.record(pred.arm, result, elapsed_s, failed)
        sli.count(pred.arm, result, elapsed_s)
        if failed is not None:
            self.bursts.record(failed, pred.request_id, pred.arm, pred.model_version, pred.degraded)
        if obslog.request_logging():
            obslog.request(pred.request_id, pred.arm, pred.model_version, pred.degraded, elapsed_s * 1000, client_id)

    def failed(self, elapsed_s: float) -> None:
        """A request that raised (its answer is a 5xx): an error against availability."""
        if self.sli.enabled:
            self.sli.record(sli.NO_ARM, "error", elapsed_s)
            sli.count(sli.NO_ARM, "error", elapsed_s)
