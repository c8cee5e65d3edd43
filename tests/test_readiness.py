"""Readiness means the model answered in time: warm_model on a fake clock."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import Server
from helpers import FakeClock

from ctr.serving.pool.warm import warm_model


def model(clock: FakeClock, took_s: float, fail: BaseException | None = None, rows: int | None = None):  # type: ignore[no-untyped-def]
    async def call(x: np.ndarray) -> np.ndarray:
        clock.t += took_s
        if fail is not None:
            raise fail
        return np.full(len(x) if rows is None else rows, 0.1, dtype=np.float32)

    return call


def test_a_model_that_answers_in_time_is_ready() -> None:
    """20 bursts in a row within the deadline: ready."""
    clock = FakeClock()
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
    clock = FakeClock()
    with caplog.at_level(logging.WARNING, logger="ctr.serving.pool.warm"):
        ready = asyncio.run(warm_model(model(clock, took_s, fail, rows), 4, 0.05, 180, clock, clock.sleep))
    assert ready is False
    assert clock.t >= 180
    assert any("model not ready" in r.message and why in r.message for r in caplog.records), caplog.text


def test_the_served_gateway_stays_unready_while_the_model_misses_the_deadline(small_setup: dict[str, str]) -> None:
    """Under `bentoml serve`, a deadline the model can never meet: /readyz stays 503 while
    the gateway answers, and the log says why, round after round (the old gateway turned
    ready after 180 s regardless)."""
    env = {**small_setup, "CTR_DEADLINE_MS": "0.001", "CTR_WARM_MODEL_ROUND_S": "1", "CTR_WARM": "false"}
    server = Server("service:CTRGateway", env, wait=False)
    try:

        def seen() -> bool:  # rounds before CTRModel is up fail on the call instead
            log = Path(server.log.name).read_text()
            return log.count("model not ready after 1 s") >= 2 and "over the 0.0 ms deadline" in log

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not seen():
            assert server.proc.poll() is None, Path(server.log.name).read_text()[-3000:]
            time.sleep(0.2)
        assert seen(), Path(server.log.name).read_text()[-3000:]
        assert httpx.get(server.url + "/livez", timeout=5).status_code == 200
        assert httpx.get(server.url + "/readyz", timeout=5).status_code == 503
    finally:
        server.stop()
