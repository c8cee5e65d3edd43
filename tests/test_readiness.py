"""Readiness means the model answered in time: warm_model on a fake clock."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from ctr.serving.wiring import warm_model


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s


def model(clock: Clock, took_s: float, fail: BaseException | None = None, rows: int | None = None):  # type: ignore[no-untyped-def]
    async def call(x: np.ndarray) -> np.ndarray:
        clock.t += took_s
        if fail is not None:
            raise fail
        return np.full(len(x) if rows is None else rows, 0.1, dtype=np.float32)

    return call


def test_a_model_that_answers_in_time_is_ready() -> None:
    """20 bursts in a row within the deadline: ready."""
    clock = Clock()
    assert asyncio.run(warm_model(model(clock, 0.001), 4, 0.05, 180, clock, clock.sleep)) is True


@pytest.mark.parametrize(
    ("took_s", "fail", "rows", "why"),
    [
        (0.1, None, None, "over the 50.0 ms deadline"),  # always slower than the deadline
        (0.001, ConnectionRefusedError("no model process"), None, "ConnectionRefusedError"),
        (0.001, None, 3, "one finite score per row"),
    ],
)
def test_a_model_that_never_answers_in_time_is_not_ready(
    caplog: pytest.LogCaptureFixture, took_s: float, fail: BaseException | None, rows: int | None, why: str
) -> None:
    """Past the warm-up time without an answer in time: not ready, and the log says why
    (the old warm_model returned after 180 s all the same, and /readyz turned 200)."""
    clock = Clock()
    with caplog.at_level(logging.WARNING, logger="ctr.serving.wiring"):
        ready = asyncio.run(warm_model(model(clock, took_s, fail, rows), 4, 0.05, 180, clock, clock.sleep))
    assert ready is False
    assert clock.t >= 180
    assert any("model not ready" in r.message and why in r.message for r in caplog.records), caplog.text
