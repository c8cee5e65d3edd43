"""The fallback answer: the segment table's blended CTR, from this process or from
FallbackService over HTTP, and the global CTR when even that fails."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ctr import metrics
from ctr.degraded import Reason
from ctr.model.segments import SegmentTable
from ctr.resilience.breaker import BreakerOpen
from ctr.resilience.deadline import REMOTE_ERRORS

# (ad_ids, context) -> scores
RemoteFallback = Callable[[list[str], dict[str, Any]], Awaitable[list[float]]]
GLOBAL = Reason.FALLBACK_GLOBAL


class Fallback:
    def __init__(self, table: SegmentTable, remote: RemoteFallback | None = None) -> None:
        self.table = table
        self.remote = remote

    def local_scores(self, context: dict[str, Any], n: int) -> list[float]:
        """The segment table held in this process: no call, nothing to wait for (shed answers)."""
        return self.table.scores(context, n)

    async def scores(self, ad_ids: list[str], context: dict[str, Any], degraded: list[str]) -> list[float]:
        """One score per ad; appends to `degraded` when the global CTR had to stand in."""
        if self.remote is None:
            return self.table.scores(context, len(ad_ids))
        try:
            return await self.remote(ad_ids, context)
        except (*REMOTE_ERRORS, BreakerOpen):
            degraded.append(GLOBAL)
            metrics.DEGRADED.labels(GLOBAL).inc()
            return [self.table.global_ctr] * len(ad_ids)
