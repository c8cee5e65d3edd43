"""Coalescing of concurrent requests into one model call per batch.

Each request submits its input matrix and awaits its slice of the result. At most
`max_inflight` calls to the model are outstanding; whatever arrives while they are busy
is concatenated into the next call (up to `max_rows`). Nothing is ever dropped: a full
batch just waits for the next free slot. When a slot is free, the window decides:

- `fixed` (CTR_BATCH_WINDOW=fixed): with `window_s` = 0 the requests go out at once; a
  positive window waits that long for company first (Triton and Ray Serve batch this way).
- `deadline`: the waiting requests go out at once when the batch is full, or when no other
  request of the gateway is on its way (`Upstream`: requests still in their feature
  stage), so a lone request never waits; else they wait for company, but never past the
  earliest waiting deadline (`DEADLINE`, set by the gateway) minus the estimated cost of
  the call (`BatchCost`, measured online), nor longer after the first of them arrived
  than the setup cost of a call, what sharing one saves (waiting longer costs the waiting
  requests more than a call of their own would; it also idles the slot, which at
  saturation is throughput lost). `dispatch_delay` is the rule.

(No library coalesces calls for a BentoML client, and BentoML's own target-latency batching
proposal was never merged, hence this class.)
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Literal

import numpy as np

from ctr import metrics
from ctr.degraded import Reason

ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]
Window = Literal["fixed", "deadline"]
# The current request's deadline (time.perf_counter seconds), set by the gateway before it submits.
DEADLINE: ContextVar[float | None] = ContextVar("ctr_deadline", default=None)


class Upstream:
    """Requests of a gateway between admission and the model call (in their feature stage):
    the company a coalescer may wait for. One per gateway, made by the composition root and
    shared by the gateway (which counts) and its pools' coalescers (which read)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> int:
        return self.n

    def __enter__(self) -> None:
        self.n += 1

    def __exit__(self, *exc: object) -> None:
        self.n -= 1


class BatchCost:
    """The measured time of a model call by rows: an EWMA of (rows, seconds) per power-of-two
    bucket of rows, and through the smallest and largest buckets a line, time = setup + rows x
    per-row: the setup is what a request saves by sharing a call instead of making its own."""

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._ewma: dict[int, tuple[float, float]] = {}  # bucket -> (rows, seconds)

    def observe(self, rows: int, seconds: float) -> None:
        b = max(rows, 1).bit_length()
        prev = self._ewma.get(b)
        a = self.alpha
        self._ewma[b] = (
            (rows, seconds) if prev is None else (prev[0] + a * (rows - prev[0]), prev[1] + a * (seconds - prev[1]))
        )

    def _line(self) -> tuple[float, float] | None:
        """(setup, per-row) seconds, from two or more buckets."""
        if len(self._ewma) < 2:
            return None
        (n0, c0), (n1, c1) = self._ewma[min(self._ewma)], self._ewma[max(self._ewma)]
        per_row = max(0.0, (c1 - c0) / (n1 - n0)) if n1 > n0 else 0.0
        return min(c0, max(0.0, c0 - per_row * n0)), per_row

    def setup_s(self) -> float:
        """What one shared call saves over two (0 until two sizes were measured)."""
        line = self._line()
        return 0.0 if line is None else line[0]

    def estimate(self, rows: int) -> float | None:
        """Seconds for a call of `rows`, or None before any call was measured."""
        if not self._ewma:
            return None
        b = max(rows, 1).bit_length()
        if b in self._ewma:
            return self._ewma[b][1]
        line = self._line()
        if line is not None:
            return line[0] + line[1] * rows
        ((n, c),) = self._ewma.values()
        return c * max(1.0, rows / n)


def dispatch_delay(
    now: float, earliest_deadline: float, first_arrival: float, cost_s: float | None, gain_s: float
) -> float:
    """Seconds the waiting requests may still wait for company (<= 0: go now): never past the
    earliest deadline minus the call's cost, nor longer after the first arrived than what a
    shared call saves (`gain_s`, the setup cost of a call)."""
    if cost_s is None:
        return 0.0
    return min(earliest_deadline - cost_s, first_arrival + gain_s) - now


Pending = tuple[np.ndarray, "asyncio.Future[np.ndarray]", float, float]  # x, future, deadline, arrival


class ModelError(Exception):
    """A model call failed in a way the gateway answers with the fallback; `reason` is the
    `model:` degradation it reports."""

    reason: str = Reason.MODEL_ERROR

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Coalescer:
    def __init__(
        self,
        call: ModelCall,
        max_inflight: int = 2,
        max_rows: int = 8192,
        window_s: float = 0.0,
        window: Window = "fixed",
        *,
        clock: Callable[[], float] = time.perf_counter,
        expected: Callable[[], int] | None = None,
        cost: BatchCost | None = None,
    ) -> None:
        """`clock` reads the time base of DEADLINE; `expected()`: requests on their way (None:
        none are known, a free slot never waits)."""
        if window not in ("fixed", "deadline"):
            raise ValueError(f"window must be 'fixed' or 'deadline', got {window!r}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        self._call = call
        self.max_inflight = max_inflight
        self.max_rows = max_rows
        self.window_s = window_s
        self.window = window
        self.clock, self.expected = clock, expected
        self.cost = cost or BatchCost()
        self._pending: deque[Pending] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray:
        """The model's output for the rows of `x`, computed in a shared call (`key`, a routing
        hint for a pool, means nothing to one coalescer)."""
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        deadline = DEADLINE.get()
        self._pending.append((x, fut, math.inf if deadline is None else deadline, self.clock()))
        self._kick()
        return await fut

    def delay(self) -> float:
        """How much longer the waiting requests may wait for company (<= 0: go now)."""
        pending = self._pending
        rows = sum(len(p[0]) for p in pending)
        on_the_way = self.expected() if self.expected is not None else 0
        if self.window == "fixed" or rows >= self.max_rows or on_the_way <= 0:
            return 0.0
        rows_then = min(self.max_rows, rows + on_the_way * rows // len(pending))
        earliest = min(p[2] for p in pending)
        cost = self.cost
        return dispatch_delay(self.clock(), earliest, pending[0][3], cost.estimate(rows_then), cost.setup_s())

    def _kick(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._pending and self._inflight < self.max_inflight:
            wait_s = self.delay()
            if wait_s > 0:
                self._timer = asyncio.get_running_loop().call_later(wait_s, self._kick)
                return
            self._inflight += 1
            task = asyncio.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[Pending]:
        batch, rows = [], 0
        while self._pending and (not batch or rows + len(self._pending[0][0]) <= self.max_rows):
            item = self._pending.popleft()
            if item[1].done():  # its caller gave up (deadline): skip the work
                continue
            batch.append(item)
            rows += len(item[0])
        return batch

    async def _flush(self) -> None:
        batch: list[Pending] = []
        try:
            if self.window == "fixed" and self.window_s > 0 and sum(len(p[0]) for p in self._pending) < self.max_rows:
                await asyncio.sleep(self.window_s)
            batch = self._take()
            if not batch:
                return
            x = np.concatenate([b[0] for b in batch]) if len(batch) > 1 else batch[0][0]
            metrics.BATCH_ROWS.observe(len(x))
            metrics.BATCH_REQUESTS.observe(len(batch))
            t0 = self.clock()
            try:
                y = await self._call(x)
            except Exception as exc:  # the model call's own error, as it is
                _fail(batch, exc)
                return
            self.cost.observe(len(x), self.clock() - t0)
            start = 0
            for xi, fut, *_ in batch:
                if not fut.done():
                    fut.set_result(y[start : start + len(xi)])
                start += len(xi)
        except asyncio.CancelledError:
            _fail(batch, ModelError("the model call was cancelled", Reason.MODEL_CANCELLED))
            raise
        except Exception as exc:  # a batch that could not be made or split (mismatched rows)
            why = f"the coalesced call failed: {type(exc).__name__}: {exc}"
            _fail(batch, ModelError(why, Reason.MODEL_BATCH_FAILED))
        finally:
            if any(not p[1].done() for p in batch):  # cannot happen; if it does, no waiter hangs
                _fail(batch, ModelError("the model call ended without an answer"))
            self._inflight -= 1
            self._kick()


def _fail(batch: list[Pending], exc: BaseException) -> None:
    for _, fut, *_ in batch:
        if not fut.done():
            fut.set_exception(exc)
