"""Coalescing concurrent requests into shared model calls."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ctr.serving.coalesce import Coalescer


class Model:
    """Doubles its input; each call blocks until released, so batching is observable."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.release = asyncio.Event()
        self.active = 0
        self.max_active = 0

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        await self.release.wait()
        self.active -= 1
        return x[:, 0] * 2.0


def rows(i: int, n: int) -> np.ndarray:
    return np.full((n, 3), i, dtype=np.int64)


def test_requests_arriving_while_busy_share_one_call() -> None:
    """With one call in flight, the next eight requests go out together in one call."""

    async def go() -> None:
        model = Model()
        c = Coalescer(model, max_inflight=1)
        first = asyncio.create_task(c.submit(rows(0, 2)))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(c.submit(rows(i, 3))) for i in range(1, 9)]
        await asyncio.sleep(0)
        model.release.set()
        results = await asyncio.gather(first, *rest)
        assert model.calls == [2, 24]
        for i, r in enumerate(results):  # each caller gets exactly its own rows back
            assert list(r) == [2.0 * i] * (2 if i == 0 else 3)

    asyncio.run(go())


def test_inflight_limit_and_max_rows() -> None:
    """Never more than max_inflight calls at once, never more than max_rows per call."""

    async def go() -> None:
        model = Model()
        c = Coalescer(model, max_inflight=2, max_rows=10)
        tasks = [asyncio.create_task(c.submit(rows(i, 4))) for i in range(10)]
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(*tasks)
        assert model.max_active <= 2
        assert max(model.calls) <= 10 and sum(model.calls) == 40

    asyncio.run(go())


def test_model_errors_reach_every_caller_of_the_batch() -> None:
    """A failing call fails its callers (who fall back); the coalescer keeps working."""

    async def go() -> None:
        fail = True

        async def model(x: np.ndarray) -> np.ndarray:
            if fail:
                raise OSError("model down")
            return x[:, 0].astype(float)

        c = Coalescer(model, max_inflight=1)
        results = await asyncio.gather(c.submit(rows(1, 1)), c.submit(rows(2, 1)), return_exceptions=True)
        assert all(isinstance(r, OSError) for r in results)
        fail = False
        assert list(await c.submit(rows(3, 1))) == [3.0]

    asyncio.run(go())


def test_abandoned_requests_are_skipped() -> None:
    """A request whose caller gave up (deadline) is not sent to the model."""

    async def go() -> None:
        model = Model()
        c = Coalescer(model, max_inflight=1)
        first = asyncio.create_task(c.submit(rows(0, 1)))
        await asyncio.sleep(0)
        late = asyncio.create_task(c.submit(rows(1, 5)))
        await asyncio.sleep(0)
        late.cancel()
        kept = asyncio.create_task(c.submit(rows(2, 1)))
        await asyncio.sleep(0)
        model.release.set()
        await asyncio.gather(first, kept)
        assert model.calls == [1, 1]

    asyncio.run(go())


@pytest.mark.parametrize("kwargs", [{"max_inflight": 0}, {"max_rows": 0}, {"window_s": -1.0}])
def test_rejects_bad_config(kwargs: dict[str, float]) -> None:
    """Impossible settings are refused with a message naming the setting."""
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        Coalescer(Model(), **kwargs)  # type: ignore[arg-type]
