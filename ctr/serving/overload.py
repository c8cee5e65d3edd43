"""Admission at the edge: past the adaptive concurrency limit a request is answered at once.

Without a bound, past saturation every request waited out its deadline inside the gateway
before the fallback answered it: every answer was late and the queue grew. `Admission`
wraps `Gateway.predict`: a request above the limit (ctr.resilience.limit) gets no features
and no model call. With CTR_OVERLOAD=fallback (default) it is answered from the segment
table held in this process (200, `fallback: true`, `degraded: ["overload:shed"]`); with
CTR_OVERLOAD=reject it gets 503 and Retry-After (the route raises `Overloaded`'s answer).
The requests it admits stay inside the deadline, and their outcomes steer the limit.
"""

from __future__ import annotations

from typing import Literal

from ctr import metrics
from ctr.api.contract import PredictRequest
from ctr.resilience.limit import AimdLimit
from ctr.serving.gateway import Gateway, Prediction

SHED = "overload:shed"
# Degradations that mean "the request ran out of time": the congestion signal.
PAST_DEADLINE = frozenset({"model:timeout", "model:deadline"})  # the model's answer came too late
LATE = PAST_DEADLINE | {"features:timeout:default"}


class Overloaded(Exception):
    """Shed with CTR_OVERLOAD=reject: answer 503 with Retry-After."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"overloaded; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(
        self,
        gateway: Gateway,
        limiter: AimdLimit | None,
        mode: Literal["fallback", "reject"] = "fallback",
        retry_after_s: int = 1,
    ) -> None:
        if mode not in ("fallback", "reject"):
            raise ValueError(f"mode must be 'fallback' or 'reject', got {mode!r}")
        self.gateway, self.limiter, self.mode, self.retry_after_s = gateway, limiter, mode, retry_after_s

    async def predict(self, req: PredictRequest, client_id: str | None = None) -> Prediction:
        if self.limiter is None:
            return await self.gateway.predict(req, client_id)
        lease = self.limiter.try_acquire()
        if lease is None:
            return self.shed(req, client_id)
        try:
            result = await self.gateway.predict(req, client_id)
        except BaseException:
            lease.ignore()
            raise
        flags = set(result.degraded)
        if flags & LATE:
            lease.dropped()
        elif any(f.startswith("model:") for f in flags):  # failed fast (unreachable, breaker, bad answer)
            lease.ignore()
        else:
            lease.success()
        return result

    def shed(self, req: PredictRequest, client_id: str | None) -> Prediction:
        """The answer to a request above the limit: the segment table, or Overloaded."""
        if self.mode == "reject":
            metrics.REQUESTS.labels("rejected").inc()
            raise Overloaded(self.retry_after_s)
        metrics.REQUESTS.labels("shed").inc()
        metrics.FALLBACKS.labels(SHED).inc()
        gw = self.gateway
        scores = gw.fallback.table.scores(req.context.model_dump(), len(req.ad_ids))
        version = f"fallback:{gw.model_version}"
        # The user's own arm (a shed answer is labelled as every other answer of that user); its
        # fallback version keeps its feedback out of the gates. Not counted in the arms' requests:
        # shedding happens before routing, to both arms' users alike, and says nothing of either model.
        canary = gw.canary
        arm, unit, rollout = (
            ("stable", 0, "")
            if canary is None
            else (canary.arm(req.user_id), canary.unit(req.user_id), canary.active_id())
        )
        rid = gw.new_id(arm, version, unit, rollout, req.ad_ids, scores)
        pred = Prediction(rid, scores, version, arm, True, [SHED])
        gw.observe(pred, SHED, 0.0, client_id)  # a shed answer is a fallback in the SLIs too
        return pred

    def failed(self, elapsed_s: float) -> None:
        """A request that raised: counted against availability by the gateway."""
        self.gateway.failed(elapsed_s)
