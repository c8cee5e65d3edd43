"""/feedback that no client can steer: each check, and what an accepted feedback counts in.

A feedback names a signed request id (ctr/api/request_id.py), an ad and whether it was
clicked. It counts only if, in this order (each refusal has its own status and reason):

1. the id was issued by this service (else 403, `forged`; checked by the route);
2. it is at most `max_age_s` old (CTR_FEEDBACK_MAX_AGE_S; else 410, `too_old`);
3. the rollout it was issued under is the one running now (else 409, `other_rollout`: an id
   of a rollout that ended, or of another, moves no gate of this one);
4. the answer it names is known (else 410, `unknown`: expired, or lost with Redis; 503,
   `not_written_yet`, when the id is under 2 s old: another process may not have written it);
5. that answer served the ad (else 409, `not_served`: 422 stays "the body fails the schema");
6. this (id, ad) was not counted before (else 409, `duplicate`; SET NX in Redis, shared by
   every process, with the id's remaining lifetime as expiry).

Checks 4-6 are one Lua script (`ServedLog.claim`), which also returns the score that was
served: the calibration gate sums that, never a client's. Without a served log (no Redis:
no canary either) only 1-2 apply and the feedback counts in `ctr_feedback_total` alone.

What it counts in: `ctr_feedback_total{arm, event}` always; the arm's gate counters only for
an id of the running rollout whose answer came from a model: a fallback answer (its model
version `fallback:…`, overload sheds included) is already its arm's error and says nothing
of that arm's CTR or calibration. Only an accepted feedback goes on to the shadow phase's
join (`Shadow.join`, which the route calls after `take`): a refused one joins nothing either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from ctr import metrics
from ctr.api.request_id import Claims
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.served import ServedLog

NOT_WRITTEN_YET_S = 2.0  # an unknown answer younger than this may still be in its process's buffer


class Refused(Exception):
    """A feedback that does not count: `status` is the HTTP answer, `reason` the metric label."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True, slots=True)
class Accepted:
    """One counted feedback."""

    claims: Claims  # the signed id's: arm, model version, issue time, unit, rollout, record key
    ad_id: str
    clicked: bool
    score: float | None  # the score served for this ad (None without a served log)
    gates: bool  # whether it reached the running rollout's gate counters


class FeedbackDesk:
    def __init__(
        self,
        runtime: CanaryRuntime | None,
        served: ServedLog | None,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        self.runtime, self.served, self.max_age_s, self.clock = runtime, served, max_age_s, clock

    async def take(self, claims: Claims, ad_id: str, clicked: bool) -> Accepted:
        """Count one verified id's feedback, or raise Refused. Store failures propagate (a 503)."""
        try:
            score = await self._check(claims, ad_id)
        except Refused as exc:
            metrics.FEEDBACK_REFUSED.labels(exc.reason).inc()
            raise
        metrics.FEEDBACK.labels(claims.arm, "impression").inc()
        if clicked:
            metrics.FEEDBACK.labels(claims.arm, "click").inc()
        rt = self.runtime
        gates = rt is not None and bool(claims.rollout) and not claims.fallback
        if gates:
            rt.record_feedback(claims.arm, clicked, score, claims.unit)  # type: ignore[union-attr]
        return Accepted(claims, ad_id, clicked, score, gates)

    async def _check(self, claims: Claims, ad_id: str) -> float | None:
        age_s = self.clock() - claims.issued_at
        if age_s > self.max_age_s:
            raise Refused(410, "too_old", f"request_id is {age_s:.0f} s old; feedback is taken for "
                          f"{self.max_age_s:.0f} s (CTR_FEEDBACK_MAX_AGE_S)")  # fmt: skip
        if self.runtime is not None and self.runtime.stale_since is not None:
            raise Refused(503, "store_unavailable", "the canary store is unavailable; send the feedback again later")
        running = self.runtime.active_id() if self.runtime is not None else ""
        if claims.rollout and claims.rollout != running:
            now = f"rollout {running} is running" if running else "no rollout is running"
            raise Refused(409, "other_rollout", f"request_id was issued under rollout {claims.rollout}; {now}")
        if self.served is None:
            return None
        if not claims.record:
            raise Refused(410, "unknown", "request_id names no served answer (issued by an older gateway)")
        claim = await self.served.claim(
            claims.record, claims.issued_at, ad_id, ttl_s=self.max_age_s - max(0.0, age_s) + 1.0
        )
        if claim.outcome == "unknown" and age_s < NOT_WRITTEN_YET_S:  # another process may not have written it
            raise Refused(503, "not_written_yet", "the answer's record is not written yet; send the feedback again")
        if claim.outcome == "unknown":
            raise Refused(410, "unknown", "no record of this answer: it expired or the feedback store lost it")
        if claim.outcome == "not_served":
            raise Refused(409, "not_served", f"ad_id {ad_id!r} is not among the ad_ids this request_id answered")
        if claim.outcome == "duplicate":
            raise Refused(409, "duplicate", f"feedback for this request_id and ad_id {ad_id!r} was counted already")
        return claim.score
