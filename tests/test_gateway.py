"""The gateway core: scores from the model, or from the fallback table when the model
fails or misses the deadline; request parsing and its error messages."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest
from helpers import CTX, TABLE, fake_features

from ctr.api.contract import BadRequest, PredictRequest, parse_predict
from ctr.features.transform import Transformer, TransformSpec
from ctr.observe.telemetry import Telemetry
from ctr.resilience.breaker import CircuitBreaker
from ctr.resilience.deadline import REMOTE_ERRORS, guarded, retried
from ctr.resilience.retry import Retrier, RetryBudget
from ctr.serving.coalesce import Coalescer
from ctr.serving.fallback import Fallback
from ctr.serving.features import local_features
from ctr.serving.gateway import Gateway

SPEC = TransformSpec(0.04, tuple(np.linspace(0.02, 0.06, 19)), tuple(np.linspace(0.02, 0.06, 19)))

REQ = PredictRequest.model_validate({"user_id": "u1", "ad_ids": ["a1", "a2"], "context": CTX})
features = fake_features


def gateway(model: Any, deadline_s: float = 1.0, remote_fallback: Any = None, **admission: Any) -> Gateway:
    """A gateway over `model`; `admission`: its limiter and overload mode."""
    return Gateway(
        features, Coalescer(model), Fallback(TABLE, remote_fallback), "ctr_model:test", deadline_s, **admission
    )


def test_scores_come_from_the_model() -> None:
    """The model's outputs, in ad order, clipped into (0, 1)."""

    async def model(x: np.ndarray) -> np.ndarray:
        return np.array([0.2, 1.0], dtype=np.float32)

    p = asyncio.run(gateway(model).predict(REQ))
    assert p.scores[0] == pytest.approx(0.2) and 0.999 < p.scores[1] < 1
    assert (p.fallback, p.degraded, p.model_version) == (False, [], "ctr_model:test") and p.request_id


def test_model_failure_answers_from_fallback() -> None:
    """An unreachable model gives the segment blend, flagged model:unavailable."""

    async def model(x: np.ndarray) -> np.ndarray:
        raise ConnectionRefusedError("no model process")

    p = asyncio.run(gateway(model).predict(REQ))
    assert p.fallback is True and p.degraded == ["model:unavailable"]
    assert p.scores == [TABLE.score("mobile", "news")] * 2
    assert p.model_version == "fallback:ctr_model:test"


def test_deadline_answers_from_fallback() -> None:
    """A model slower than the deadline is not waited for."""

    async def model(x: np.ndarray) -> np.ndarray:
        await asyncio.Event().wait()  # never answers
        raise AssertionError

    p = asyncio.run(gateway(model, deadline_s=0.005).predict(REQ))
    assert p.fallback is True and p.degraded == ["model:timeout"]


def test_rejects_bad_deadline() -> None:
    """A non-positive deadline is refused."""
    with pytest.raises(ValueError, match="deadline_s"):
        gateway(None, deadline_s=0)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{", 400, "not valid JSON"),
        (b'"x"', 400, "JSON object"),
        (b'{"user_id": "", "ad_ids": ["a"], "context": {}}', 422, "user_id: String should have at least 1 character"),
        (b'{"user_id": "u", "ad_ids": ["a", 3], "context": {}}', 422, "ad_ids.1: Input should be a valid string"),
    ],
)
def test_parse_errors_name_the_field(body: bytes, status: int, needle: str) -> None:
    """Parsing errors carry the HTTP status and the offending field."""
    with pytest.raises(BadRequest) as err:
        parse_predict(body, max_ads=10)
    assert err.value.status == status and needle in err.value.message


def test_parse_accepts_max_ads_exactly() -> None:
    """The limit is inclusive."""
    import orjson

    body = orjson.dumps({"user_id": "u", "ad_ids": ["a"] * 3, "context": CTX})
    assert len(parse_predict(body, max_ads=3).ad_ids) == 3
    with pytest.raises(BadRequest, match="at most 2"):
        parse_predict(body, max_ads=2)


def test_a_failed_model_call_is_retried_within_the_deadline() -> None:
    """One connection error, then an answer: the caller gets model scores, not the fallback."""
    calls = 0

    async def model(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("blip")
        return np.array([0.3, 0.4])

    retrier = Retrier("test", REMOTE_ERRORS, RetryBudget("test"), attempts=3, base_s=0.0001, jitter_s=0.0001)
    p = asyncio.run(gateway(retried(model, retrier, 1.0)).predict(REQ))
    assert p.fallback is False and p.scores == pytest.approx([0.3, 0.4]) and calls == 2


def test_a_failed_batch_is_retried_once_for_all_its_requests() -> None:
    """Eight requests coalesced into one failing call cost one retry (one budget token),
    not eight: retries are per model call."""
    calls: list[int] = []

    async def model(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 1:
            raise ConnectionResetError("blip")
        return np.full(len(x), 0.3)

    async def go() -> list[Any]:
        budget = RetryBudget("test", min_tokens=3.0)
        retrier = Retrier("test", REMOTE_ERRORS, budget, attempts=3, base_s=0.0001, jitter_s=0.0001)
        g = Gateway(features, Coalescer(retried(model, retrier, 1.0), max_inflight=1), Fallback(TABLE), "m", 1.0)
        out = await asyncio.gather(*(g.predict(REQ) for _ in range(8)))
        assert budget.tokens == pytest.approx(3.0 + 0.1 - 1.0)  # one call deposited, one retry spent
        return out

    preds = asyncio.run(go())
    assert all(not p.fallback for p in preds)
    assert calls == [16, 16]  # the batch of 8 requests, then its one retry


def test_open_breaker_answers_from_fallback_without_calling() -> None:
    """An open model breaker short-circuits to the fallback, flagged model:breaker_open."""
    calls = 0

    async def model(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        raise ConnectionRefusedError

    b = CircuitBreaker("model-test", min_calls=2, cooldown_s=60)
    gw = Gateway(features, Coalescer(guarded(model, b, 1.0)), Fallback(TABLE), "m", 1.0)
    reasons = [asyncio.run(gw.predict(REQ)).degraded for _ in range(4)]
    assert reasons == [["model:unavailable"]] * 2 + [["model:breaker_open"]] * 2 and calls == 2


def test_remote_fallback_down_gives_global_ctr() -> None:
    """Model and FallbackService both down: the global CTR held in the gateway."""

    async def model(x: np.ndarray) -> np.ndarray:
        raise ConnectionRefusedError

    async def remote(ad_ids: list[str], context: dict[str, Any]) -> list[float]:
        raise ConnectionRefusedError

    p = asyncio.run(gateway(model, remote_fallback=remote).predict(REQ))
    assert p.scores == [TABLE.global_ctr] * 2
    assert p.degraded == ["model:unavailable", "model:fallback:global"]


def test_slow_features_give_defaults_within_the_deadline() -> None:
    """A feature lookup slower than the deadline is abandoned for default features."""

    class Slow:
        async def lookup(self, user_id: str, ad_ids: list[str]) -> Any:
            await asyncio.Event().wait()

    provide = local_features(Slow(), Transformer(SPEC), Telemetry())  # type: ignore[arg-type]
    x, degraded = asyncio.run(provide("u1", ["a1"], CTX, time.perf_counter() + 0.005))
    assert degraded == ["features:timeout:default"] and (x[:, :11] == 0).all()
