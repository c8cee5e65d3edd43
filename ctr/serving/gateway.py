"""The gateway's request path: admission -> features -> transform -> coalesced model call -> response.

Admission first: past the adaptive concurrency limit (CTR_LIMIT, ctr.resilience.limit) a
request gets no features and no model call. Without that bound, past saturation every
request waited out its deadline inside the gateway before the fallback answered it. With
CTR_OVERLOAD=fallback (default) a shed request is answered from the segment table held in
this process (200, `fallback: true`, `degraded: ["overload:shed"]`); with
CTR_OVERLOAD=reject it raises `Overloaded` (the route answers 503 with Retry-After). The
requests admitted stay inside the deadline, and their outcomes steer the limit.

Every request has a deadline (CTR_DEADLINE_MS); each stage gets what is left of it.
The model call is guarded by a circuit breaker and a per-call timeout, and retried
(idempotent) with jittered backoff inside the deadline and a retry budget (see
`ctr.serving.root`). When the model cannot answer, the fallback answers (the segment
table, in this process or from FallbackService, then the global CTR). Every substitution
is named in `degraded` (ctr.degraded.Reason), starting with the part substituted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from ctr import metrics
from ctr.api.contract import PredictRequest
from ctr.degraded import LATE, Reason
from ctr.observe import log as obslog
from ctr.observe import sli
from ctr.observe.telemetry import Telemetry
from ctr.resilience.breaker import BreakerOpen
from ctr.resilience.deadline import REMOTE_ERRORS
from ctr.resilience.limit import AimdLimit
from ctr.serving.coalesce import DEADLINE, ModelError, Upstream
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


class ShadowTap(Protocol):
    """The canary's shadow phase (`ctr.serving.canary.shadow`): offered each stable answer, no I/O."""

    def offer(self, request_id: str, user_id: str, ad_ids: list[str], x: np.ndarray, scores: list[float]) -> None: ...


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


class Overloaded(Exception):
    """Shed with CTR_OVERLOAD=reject: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"overloaded; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


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
        *,
        telemetry: Telemetry | None = None,
        limiter: AimdLimit | None = None,
        overload: Literal["fallback", "reject"] = "fallback",
        retry_after_s: int = 1,
        shadow: ShadowTap | None = None,
        upstream: Upstream | None = None,
    ) -> None:
        """`new_id` issues each request's one id (the edge's signer; default a random hex id).
        `limiter` (None: no
        limit) and `overload` are the admission stage; `shadow` is offered each stable answer
        (a sample is scored on the canary in the background)."""
        if deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        if overload not in ("fallback", "reject"):
            raise ValueError(f"overload must be 'fallback' or 'reject', got {overload!r}")
        self.features = features
        self.model = model
        self.fallback = fallback
        self.model_version = model_version
        self.deadline_s = deadline_s
        self.arms = arms
        self.new_id = new_id or _random_id
        self.telemetry = telemetry or Telemetry()
        self.limiter, self.overload, self.retry_after_s = limiter, overload, retry_after_s
        self.shadow = shadow
        self.upstream = upstream or Upstream()  # counted here, read by the pool's coalescers
        self._inference_h = self.telemetry.stage("inference")
        self._request_h = self.telemetry.stage("request")
        self.sli = self.telemetry.sli  # SLIs of this process (the status page reads them)
        self.bursts = self.telemetry.bursts  # one log line per burst of fallbacks

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
            raise ModelFailed(Reason.MODEL_DEADLINE)
        DEADLINE.set(deadline)  # the coalescer's deadline-aware window reads it
        try:
            async with asyncio.timeout(deadline - t0):
                y = await (model or self.model).submit(x, key)
        except TimeoutError:
            raise ModelFailed(Reason.MODEL_TIMEOUT) from None
        except BreakerOpen:
            raise ModelFailed(Reason.MODEL_BREAKER_OPEN) from None
        except REMOTE_ERRORS:
            raise ModelFailed(Reason.MODEL_UNAVAILABLE) from None
        except ModelError as exc:  # an invalid answer, a batch that failed in the coalescer
            raise ModelFailed(exc.reason) from None
        self._inference_h.observe(time.perf_counter() - t0)
        return np.clip(y.astype(np.float64), 1e-6, 1 - 1e-6).tolist()

    async def predict(self, req: PredictRequest, client_id: str | None = None) -> Prediction:
        """The scores of one request, admitted or shed; `client_id` (the caller's
        X-Request-ID) is logged beside the request's own id."""
        if self.limiter is None:
            return (await self._serve(req, client_id))[0]
        lease = self.limiter.try_acquire()
        if lease is None:
            return self.shed(req, client_id)
        try:
            pred, failed = await self._serve(req, client_id)
        except BaseException:
            lease.ignore()
            raise
        if failed in LATE or Reason.FEATURES_TIMEOUT in pred.degraded:  # ran out of time: congestion
            lease.dropped()
        elif failed is not None:  # failed fast (unreachable, breaker, bad answer): says nothing of load
            lease.ignore()
        else:
            lease.success()
        return pred

    def shed(self, req: PredictRequest, client_id: str | None) -> Prediction:
        """The answer to a request above the limit: the segment table, or Overloaded."""
        if self.overload == "reject":
            metrics.REQUESTS.labels("rejected").inc()
            raise Overloaded(self.retry_after_s)
        metrics.REQUESTS.labels("shed").inc()
        metrics.FALLBACKS.labels(Reason.SHED).inc()
        scores = self.fallback.local_scores(req.context.model_dump(), len(req.ad_ids))
        version = f"fallback:{self.model_version}"
        # The user's own arm (a shed answer is labelled as every other answer of that user); its
        # fallback version keeps its feedback out of the gates. Not counted in the arms' requests:
        # shedding happens before routing, to both arms' users alike, and says nothing of either model.
        canary = self.canary
        arm, unit, rollout = (
            ("stable", 0, "")
            if canary is None
            else (canary.arm(req.user_id), canary.unit(req.user_id), canary.active_id())
        )
        rid = self.new_id(arm, version, unit, rollout, req.ad_ids, scores)
        pred = Prediction(rid, scores, version, arm, True, [Reason.SHED])
        self.observe(pred, Reason.SHED, 0.0, client_id)  # a shed answer is a fallback in the SLIs too
        return pred

    async def _serve(self, req: PredictRequest, client_id: str | None) -> tuple[Prediction, str | None]:
        """An admitted request's answer, and why the model failed (None: it scored)."""
        t0 = time.perf_counter()
        deadline = t0 + self.deadline_s
        context = req.context.model_dump()
        with self.upstream:  # on its way to the model: a coalescer may wait for it
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
        if self.shadow is not None and failed is None and arm == "stable":
            self.shadow.offer(pred.request_id, req.user_id, req.ad_ids, x, scores)
        return pred, failed

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
