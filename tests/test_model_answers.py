"""The model's answer is checked, and the coalescer answers every waiter on every path."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from test_gateway import REQ, TABLE, features

from ctr.serving.coalesce import Coalescer, ModelError
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway
from ctr.serving.model_client import InvalidAnswer, checked


def gateway(model: Any) -> Gateway:
    return Gateway(features, Coalescer(checked(model)), Fallback(TABLE), "ctr_model:test", 1.0)


@pytest.mark.parametrize(
    "answer",
    [
        np.array([0.3], dtype=np.float32),  # one score for two rows
        np.array([0.3, 0.2, 0.1], dtype=np.float32),  # three
        np.array([0.3, np.nan], dtype=np.float32),
        np.array([np.inf, 0.2], dtype=np.float32),
        np.array([[0.3], [0.2]], dtype=np.float32),  # a column, not one score per row
        [0.3, 0.2],  # not an array
    ],
)
def test_an_invalid_answer_is_a_model_failure(answer: Any) -> None:
    """Not exactly one finite score per row: the fallback answers, flagged model:invalid_answer
    (the old gateway returned the wrong number of scores, or NaN as null)."""

    async def model(x: np.ndarray) -> Any:
        return answer

    p = asyncio.run(gateway(model).predict(REQ))
    assert p.fallback is True and p.degraded == ["model:invalid_answer"]
    assert p.scores == [TABLE.score("mobile", "news")] * 2


def test_a_valid_answer_passes_the_check() -> None:
    """One finite score per row goes through unchanged."""

    async def model(x: np.ndarray) -> np.ndarray:
        return np.array([0.25, 0.5], dtype=np.float32)

    p = asyncio.run(gateway(model).predict(REQ))
    assert p.fallback is False and p.scores == [0.25, 0.5]


def test_checked_names_the_problem() -> None:
    """The exception says what was wrong, and carries the reason the gateway reports."""

    async def model(x: np.ndarray) -> np.ndarray:
        return np.zeros(1, dtype=np.float32)

    with pytest.raises(InvalidAnswer, match="answered \\[1\\] for 3 rows") as err:
        asyncio.run(checked(model)(np.zeros((3, 2), dtype=np.int64)))
    assert err.value.reason == "model:invalid_answer"


async def _bounded(aw: Any) -> Any:
    """The old coalescer left waiters unresolved: bound the wait so that shows as a failure."""
    return await asyncio.wait_for(aw, 2.0)


def test_a_batch_that_cannot_be_concatenated_fails_every_waiter() -> None:
    """Requests of different widths in one batch: every waiter gets a ModelError (the old
    coalescer's np.concatenate raised outside its try and left them all hanging)."""

    async def go() -> None:
        release = asyncio.Event()

        async def model(x: np.ndarray) -> np.ndarray:
            await release.wait()
            return np.zeros(len(x), dtype=np.float32)

        c = Coalescer(model, max_inflight=1)
        first = asyncio.create_task(c.submit(np.zeros((1, 3), dtype=np.int64)))
        await asyncio.sleep(0)
        narrow = asyncio.create_task(c.submit(np.zeros((2, 3), dtype=np.int64)))
        wide = asyncio.create_task(c.submit(np.zeros((2, 5), dtype=np.int64)))
        await asyncio.sleep(0)
        release.set()
        assert len(await _bounded(first)) == 1
        for t in (narrow, wide):
            with pytest.raises(ModelError) as err:
                await _bounded(t)
            assert err.value.reason == "model:batch_failed"

    asyncio.run(go())


def test_a_cancelled_model_call_fails_every_waiter() -> None:
    """A model call that ends in CancelledError (not an Exception): every waiter is answered
    with a ModelError, and the coalescer serves the next call."""

    async def go() -> None:
        calls = 0

        async def model(x: np.ndarray) -> np.ndarray:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise asyncio.CancelledError
            return np.ones(len(x), dtype=np.float32)

        c = Coalescer(model, max_inflight=1)
        with pytest.raises(ModelError) as err:
            await _bounded(c.submit(np.zeros((2, 3), dtype=np.int64)))
        assert err.value.reason == "model:cancelled"
        assert list(await _bounded(c.submit(np.zeros((2, 3), dtype=np.int64)))) == [1.0, 1.0]

    asyncio.run(go())


def test_the_gateway_answers_a_cancelled_model_call_from_the_fallback() -> None:
    """Through the gateway the cancelled call becomes a fallback answer, not an error."""

    async def model(x: np.ndarray) -> np.ndarray:
        raise asyncio.CancelledError

    p = asyncio.run(gateway(model).predict(REQ))
    assert p.fallback is True and p.degraded == ["model:cancelled"]
