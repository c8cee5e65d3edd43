"""The gateway's two arms end to end in one process: real model pools over HTTP to two
model servers (uvicorn, CTRModel's /infer route), the rollout in a real private Redis.
Responses carry the arm and the version that scored them; counters reach Redis per arm;
/feedback attributes clicks to the arm; rollback sends everyone back to stable at once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from helpers import CTX, ThreadServer
from servers import free_port
from starlette.responses import Response
from starlette.routing import Route

from ctr.api.contract import PredictRequest
from ctr.model.app import make_model_app
from ctr.model.segments import SegmentTable
from ctr.serving.canary.arms import Arms
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.plan import Phase, Plan
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.state import Arm, RedisStore
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway
from ctr.serving.root import model_pool
from ctr.settings import Settings

TABLE = SegmentTable({"mobile|news": 30.0}, {"mobile|news": 1000.0}, 400.0, 10_000.0)


class ModelServer:
    """CTRModel's /infer route answering a constant score (which arm scored is then visible)."""

    def __init__(self, score: float) -> None:
        app = make_model_app(lambda x: np.full(len(x), score, dtype=np.float32))
        app.router.routes.append(Route("/readyz", lambda request: Response(b"ok")))
        self.served = ThreadServer(app)
        self.url = self.served.url

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture()
def model_servers() -> Any:
    servers = ModelServer(0.1), ModelServer(0.3)
    yield servers
    for s in servers:
        s.stop()


async def features(user_id: str, ad_ids: list[str], context: dict[str, Any], deadline: float) -> Any:
    return np.zeros((len(ad_ids), 16), dtype=np.int64), []


def request(user: str) -> PredictRequest:
    return PredictRequest.model_validate({"user_id": user, "ad_ids": ["a1", "a2"], "context": CTX})


def test_two_arms_split_score_count_and_roll_back(redis_url: str, model_servers: Any) -> None:
    stable_srv, canary_srv = model_servers
    settings = Settings(model_urls=stable_srv.url, deadline_ms=2000, probe_interval_s=0.2)

    async def go() -> None:
        store = RedisStore(aioredis.from_url(redis_url), prefix=f"test:{uuid.uuid4().hex[:8]}:")
        runtime = CanaryRuntime(store, Controller(store))
        stable = model_pool(settings, name="model")
        await stable.start()
        arms = Arms(
            runtime, stable, "ctr_model:v1", lambda urls: model_pool(settings, name="canary", urls=",".join(urls))
        )
        gw = Gateway(features, stable, Fallback(TABLE), "ctr_model:v1", 2.0, arms)
        plan = Plan((Phase(0.2, 3600),))
        await runtime.controller.start(Arm("ctr_model:v1"), Arm("ctr_model:v2", (canary_srv.url,)), plan)
        await arms.sync()  # this process builds the canary pool for the rollout

        users = [f"u{i}" for i in range(400)]
        out = [await gw.predict(request(u)) for u in users]
        canary = [p for p in out if p.arm == "canary"]
        assert 0.12 < len(canary) / len(out) < 0.28
        assert all(p.model_version == "ctr_model:v2" and p.scores[0] == pytest.approx(0.3) for p in canary)
        assert all(
            p.model_version == "ctr_model:v1" and p.scores[0] == pytest.approx(0.1) for p in out if p.arm == "stable"
        )
        again = [(await gw.predict(request(u))).arm for u in users]
        assert again == [p.arm for p in out]  # sticky

        for p in canary[:50]:
            runtime.record_feedback("canary", clicked=True, score=p.scores[0])
        await arms.sync()
        counts = await store.counters(runtime.rollout.id)  # type: ignore[union-attr]
        assert counts["canary"].requests == 2 * len(canary) and counts["stable"].requests == 2 * (400 - len(canary))
        assert counts["canary"].clicks == 50 and counts["canary"].pred_sum == pytest.approx(15.0)
        assert sum(counts["canary"].latency) == counts["canary"].requests

        await runtime.controller.rollback(reason="test")
        await arms.sync()
        assert arms.canary is None  # the canary pool is closed
        assert {(await gw.predict(request(u))).arm for u in users} == {"stable"}
        await arms.close()
        await stable.close()
        await store.r.aclose()

    asyncio.run(go())


def test_canary_failures_fall_back_to_the_same_table_and_count_as_canary_errors(
    redis_url: str, model_servers: Any
) -> None:
    """A canary whose replica is gone answers from the fallback table; the errors are the canary's."""
    stable_srv, _ = model_servers
    settings = Settings(model_urls=stable_srv.url, deadline_ms=500, retry_attempts=1)

    async def go() -> None:
        store = RedisStore(aioredis.from_url(redis_url), prefix=f"test:{uuid.uuid4().hex[:8]}:")
        runtime = CanaryRuntime(store, Controller(store))
        stable = model_pool(settings, name="model")
        await stable.start()
        arms = Arms(
            runtime, stable, "ctr_model:v1", lambda urls: model_pool(settings, name="canary", urls=",".join(urls))
        )
        gw = Gateway(features, stable, Fallback(TABLE), "ctr_model:v1", 0.5, arms)
        dead = f"http://127.0.0.1:{free_port()}"
        await runtime.controller.start(Arm("ctr_model:v1"), Arm("ctr_model:v2", (dead,)), Plan((Phase(0.5, 3600),)))
        await arms.sync()
        out = [await gw.predict(request(f"u{i}")) for i in range(100)]
        bad = [p for p in out if p.arm == "canary"]
        assert bad and all(p.fallback and p.model_version == "fallback:ctr_model:v1" for p in bad)
        assert all(p.scores == [TABLE.score("mobile", "news")] * 2 for p in bad)
        assert not any(p.fallback for p in out if p.arm == "stable")
        await arms.sync()
        counts = await store.counters(runtime.rollout.id)  # type: ignore[union-attr]
        assert counts["canary"].errors == len(bad) and counts["stable"].errors == 0
        await arms.close()
        await stable.close()
        await store.r.aclose()

    asyncio.run(go())


def test_a_baseline_of_the_canarys_size_serves_as_many_stable_users(redis_url: str, model_servers: Any) -> None:
    """Defect 3 (capacity): with CTR_CANARY_BASELINE_URLS, the stable users next to the canary's
    range, as many as the canary's, are served by the baseline replicas (stable's model at the
    canary's capacity), answer as `stable`, and count as `baseline`: the latency gate's reference."""
    stable_srv, canary_srv = model_servers
    baseline_srv = ModelServer(0.2)  # a distinct score only to see who answered
    settings = Settings(model_urls=stable_srv.url, deadline_ms=2000, probe_interval_s=0.2)

    async def go() -> None:
        store = RedisStore(aioredis.from_url(redis_url), prefix=f"test:{uuid.uuid4().hex[:8]}:")
        runtime = CanaryRuntime(store, Controller(store), baseline_urls=(baseline_srv.url,))
        stable = model_pool(settings, name="model")
        await stable.start()
        arms = Arms(runtime, stable, "ctr_model:v1", lambda u: model_pool(settings, name="canary", urls=",".join(u)))
        gw = Gateway(features, stable, Fallback(TABLE), "ctr_model:v1", 2.0, arms)
        await runtime.controller.start(
            Arm("ctr_model:v1"), Arm("ctr_model:v2", (canary_srv.url,)), Plan((Phase(0.2, 3600),))
        )
        await arms.sync()
        out = [await gw.predict(request(f"u{i}")) for i in range(400)]
        by_score = {s: sum(p.scores[0] == pytest.approx(s) for p in out) for s in (0.1, 0.2, 0.3)}
        assert 0.12 < by_score[0.3] / 400 < 0.28 and 0.12 < by_score[0.2] / 400 < 0.28
        assert {p.arm for p in out if p.scores[0] == pytest.approx(0.2)} == {"stable"}
        await arms.sync()
        counts = await store.counters(runtime.rollout.id)  # type: ignore[union-attr]
        assert counts["baseline"].requests == by_score[0.2] and counts["stable"].requests == by_score[0.1]
        await arms.close()
        await stable.close()
        await store.r.aclose()

    try:
        asyncio.run(go())
    finally:
        baseline_srv.stop()
