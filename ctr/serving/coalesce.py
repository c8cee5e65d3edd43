"""Coalescing of concurrent requests into one model call per batch.

Each request submits its input matrix and awaits its slice of the result. At most
`max_inflight` calls to the model are outstanding; whatever arrives while they are busy
is concatenated into the next call (up to `max_rows`). With `window_s` = 0 a request
that finds a free slot goes out at once (no added latency at low load); a positive
window waits that long for company first. Nothing is ever dropped: a full batch just
waits for the next free slot. (No library coalesces calls for a BentoML client, hence
this ~70-line class.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from ctr import metrics
from ctr.degraded import Reason

ModelCall = Callable[[np.ndarray], Awaitable[np.ndarray]]


class ModelError(Exception):
    """A model call failed in a way the gateway answers with the fallback; `reason` is the
    `model:` degradation it reports."""

    reason: str = Reason.MODEL_ERROR

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class Coalescer:
    def __init__(self, call: ModelCall, max_inflight: int = 2, max_rows: int = 8192, window_s: float = 0.0) -> None:
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
        self._pending: deque[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray:
        """The model's output for the rows of `x`, computed in a shared call (`key`, a routing
        hint for a pool, means nothing to one coalescer)."""
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((x, fut))
        self._kick()
        return await fut

    def _kick(self) -> None:
        while self._pending and self._inflight < self.max_inflight:
            self._inflight += 1
            task = asyncio.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _take(self) -> list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]:
        batch, rows = [], 0
        while self._pending and (not batch or rows + len(self._pending[0][0]) <= self.max_rows):
            item = self._pending.popleft()
            if item[1].done():  # its caller gave up (deadline): skip the work
                continue
            batch.append(item)
            rows += len(item[0])
        return batch

    async def _flush(self) -> None:
        batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        try:
            if self.window_s > 0 and sum(len(x) for x, _ in self._pending) < self.max_rows:
                await asyncio.sleep(self.window_s)
            batch = self._take()
            if not batch:
                return
            x = np.concatenate([b[0] for b in batch]) if len(batch) > 1 else batch[0][0]
            metrics.BATCH_ROWS.observe(len(x))
            metrics.BATCH_REQUESTS.observe(len(batch))
            try:
                y = await self._call(x)
            except Exception as exc:  # the model call's own error, as it is
                _fail(batch, exc)
                return
            start = 0
            for xi, fut in batch:
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
            if any(not fut.done() for _, fut in batch):  # cannot happen; if it does, no waiter hangs
                _fail(batch, ModelError("the model call ended without an answer"))
            self._inflight -= 1
            self._kick()


def _fail(batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
