"""Structured logs: JSON or text lines with their fields; one line per fallback burst and per
breaker transition; no line per request at INFO, one at DEBUG with request id, arm, model
version and degradation reasons."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import CTX, FakeClock

from ctr.api.contract import PredictRequest
from ctr.model.segments import SegmentTable
from ctr.observe import log as obslog
from ctr.resilience.breaker import CircuitBreaker
from ctr.serving.coalesce import Coalescer
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway

REQ = PredictRequest.model_validate({"user_id": "u1", "ad_ids": ["a1", "a2"], "context": CTX})
TABLE = SegmentTable({"mobile|news": 30.0}, {"mobile|news": 1000.0}, 400.0, 10_000.0)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    out = io.StringIO()
    obslog.configure("json", "INFO", stream=out)
    yield out
    obslog.configure("text", "INFO")


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(x) for x in out.getvalue().splitlines() if x.strip()]


def test_breaker_transitions_are_one_json_line_each(captured: io.StringIO) -> None:
    """Open at WARNING, half-open and closed at INFO, each with the breaker's name and counts."""
    clock = FakeClock(100.0)
    b = CircuitBreaker("logtest", min_calls=2, cooldown_s=1.0, clock=clock)
    b.record_failure()
    b.record_failure()
    clock.t += 1.5
    assert b.allow()
    b.record_success()
    got = [(x["event"], x["to"], x["level"]) for x in lines(captured) if x.get("breaker") == "logtest"]
    assert got == [("breaker transition", "open", "warning"), ("breaker transition", "half_open", "info"),
                   ("breaker transition", "closed", "info")]  # fmt: skip
    assert all("timestamp" in x for x in lines(captured))


def test_a_fallback_burst_is_two_lines_not_one_per_fallback(captured: io.StringIO) -> None:
    """100 fallbacks in a burst: one line when it starts, one when it has been quiet for gap_s."""
    clock = FakeClock(100.0)
    bursts = obslog.FallbackBursts(gap_s=10, clock=clock)
    for i in range(100):
        bursts.record("model:timeout" if i % 2 else "model:unavailable", f"r{i}", "stable", "m:1", ["model:timeout"])
        clock.t += 0.05
    bursts.tick()
    assert len(lines(captured)) == 1 and bursts.active
    clock.t += 10
    bursts.tick()
    start, end = lines(captured)
    assert start["event"] == "fallback burst started" and start["request_id"] == "r0" and start["arm"] == "stable"
    assert start["model_version"] == "m:1" and start["level"] == "warning"
    assert end["event"] == "fallback burst ended" and end["fallbacks"] == 100
    assert end["reasons"] == {"model:timeout": 50, "model:unavailable": 50}
    assert not bursts.active


def test_text_format_carries_the_same_fields() -> None:
    """CTR_LOG_FORMAT=text: key=value on one line."""
    out = io.StringIO()
    obslog.configure("text", "INFO", stream=out)
    obslog.rollout_decision("10%", 0.1, "advance", "gates passed", auc_delta=0.001)
    obslog.ejection("replica-1", True, "5 consecutive failures", 30.0)
    obslog.configure("text", "INFO")
    text = out.getvalue().splitlines()
    assert len(text) == 2
    assert "rollout decision" in text[0] and "decision=advance" in text[0] and "auc_delta=0.001" in text[0]
    assert "replica ejected" in text[1] and "replica=replica-1" in text[1]


def test_bad_log_format_is_refused() -> None:
    with pytest.raises(ValueError, match="json or text"):
        obslog.configure("yaml", "INFO")  # type: ignore[arg-type]


async def _features(user_id: str, ad_ids: list[str], context: dict, deadline: float) -> tuple[np.ndarray, list[str]]:
    return np.zeros((len(ad_ids), 2), dtype=np.int64), ["features:user:default"]


async def _model(x: np.ndarray) -> np.ndarray:
    return np.full(len(x), 0.1, dtype=np.float32)


def _predict(n: int) -> list[str]:
    """`n` requests, the i-th with the caller's id `client-i`; the ids the gateway issued."""
    ids = iter(f"req-{i}" for i in range(n))
    gw = Gateway(_features, Coalescer(_model), Fallback(TABLE), "ctr_model:logtest", 1.0,
                 new_id=lambda *_: next(ids))  # fmt: skip

    async def go() -> list[str]:
        return [(await gw.predict(REQ, f"client-{i}")).request_id for i in range(n)]

    return asyncio.run(go())


def test_no_line_per_request_at_info(captured: io.StringIO) -> None:
    """At the default level the request path writes nothing for a normal request."""
    _predict(20)
    assert [x for x in lines(captured) if x.get("event") == "predict"] == []


def test_debug_has_a_line_per_request_with_its_fields() -> None:
    """At DEBUG each request's line has its id, arm, model version and degradation reasons."""
    out = io.StringIO()
    obslog.configure("json", "DEBUG", stream=out)
    try:
        _predict(3)
    finally:
        obslog.configure("text", "INFO")
    reqs = [x for x in lines(out) if x.get("event") == "predict"]
    assert [x["request_id"] for x in reqs] == ["req-0", "req-1", "req-2"]
    assert [x["client_request_id"] for x in reqs] == ["client-0", "client-1", "client-2"]
    assert reqs[0]["arm"] == "stable" and reqs[0]["model_version"] == "ctr_model:logtest"
    assert reqs[0]["degraded"] == ["features:user:default"] and reqs[0]["level"] == "debug"


def test_the_logged_request_id_is_the_one_the_client_holds() -> None:
    """One id from edge to logs: /predict's answer carries the signed id the gateway issued
    and logged (the old code logged a uuid and signed another id for the response), the
    caller's X-Request-ID is echoed and logged beside it, and /feedback accepts the id."""
    import httpx

    from ctr.api import request_id
    from ctr.api.edge import Edge
    from ctr.api.routes import make_app
    from ctr.serving.canary.feedback import FeedbackDesk

    key = b"k" * 32
    gw = Gateway(_features, Coalescer(_model), Fallback(TABLE), "ctr_model:logtest", 1.0,
                 new_id=request_id.Signer(key).issue)  # fmt: skip
    app = make_app(Edge(gw, max_ads=10, request_id_key=key, feedback=FeedbackDesk(None, None, 900.0)))
    body = {"user_id": "u1", "ad_ids": ["a1"], "context": REQ.context.model_dump()}
    out = io.StringIO()
    obslog.configure("json", "DEBUG", stream=out)

    async def go() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            r = await c.post("/predict", json=body, headers={"x-request-id": "client-7"})
            fb = await c.post("/feedback", json={"request_id": r.json()["request_id"], "ad_id": "a1", "clicked": True})
            return r, fb

    try:
        r, fb = asyncio.run(go())
    finally:
        obslog.configure("text", "INFO")
    [line] = [x for x in lines(out) if x.get("event") == "predict"]
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-7"
    assert line["request_id"] == r.json()["request_id"] and line["client_request_id"] == "client-7"
    assert request_id.verify(line["request_id"], key) is not None and fb.status_code == 202
