"""Issue 23's defects, each against the code that had it: the gateway's routes, arms, canary
runtime and feedback checks in one process, real model servers over HTTP, a real private
Redis (killed and restarted where the defect needs it).

1. one client steered the canary through /feedback (replays, unserved ads, its own scores);
2. the public status published the salt and replica URLs;
3. after a promotion the next rollout reverted stable to the gateway's start-up tag;
4. a rollback was undone when Redis came back empty;
5. fallback answers counted as CTR and calibration evidence; shed answers were `stable`;
6. the internal token went to any URL; with Redis down nothing could roll back and the
   last split was kept forever.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import CTX, TABLE, FakeClock, ThreadServer
from servers import RedisProcess, free_port
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from test_canary_arms import ModelServer, features

from ctr.api import request_id
from ctr.api.edge import Edge
from ctr.api.routes import make_app
from ctr.api.status import render
from ctr.resilience.limit import AimdLimit
from ctr.serving.canary.arms import Arms
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.feedback import FeedbackDesk
from ctr.serving.canary.hosts import HostPolicy
from ctr.serving.canary.plan import Phase, Plan
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.served import ServedLog
from ctr.serving.canary.state import Arm, RedisStore
from ctr.serving.canary.tombstones import Tombstones
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway
from ctr.serving.root import canary_redis, model_pool
from ctr.serving.status import Sources, StatusBoard
from ctr.settings import Settings

KEY = b"k" * 32
TOKEN = "admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PLAN = Plan((Phase(0.5, 3600),), interval_s=3600)  # no automatic decision during a test
ADS = ["a1", "a2", "a3"]


@pytest.fixture(scope="module")
def models() -> Iterator[tuple[ModelServer, ModelServer]]:
    servers = ModelServer(0.1), ModelServer(0.3)
    yield servers
    for s in servers:
        s.stop()


class Rig:
    """One gateway process as service.py builds it (routes, admission, arms, runtime, feedback
    desk, signer keeping receipts), over a Redis at `redis_url` and a clock the test moves."""

    def __init__(self, redis_url: str, stable_url: str, data_dir: Path, prefix: str, clock: FakeClock) -> None:
        self.clock = clock
        self.client = canary_redis(redis_url, timeout_s=0.5)
        self.store = RedisStore(self.client, prefix=prefix)
        self.served = ServedLog(canary_redis(redis_url, timeout_s=1.0), ttl_s=600, prefix=prefix)
        self.runtime = CanaryRuntime(self.store, Controller(self.store, clock=clock), clock=clock, stale_s=30,
                                     tombstones=Tombstones(data_dir), served=self.served,
                                     hosts=HostPolicy())  # fmt: skip
        self.settings = Settings(model_urls=stable_url, deadline_ms=2000, probe_interval_s=0.2, retry_attempts=1)
        self.stable = model_pool(self.settings, name="model")
        s = self.settings
        self.arms = Arms(self.runtime, self.stable, "ctr_model:v1",
                         lambda urls: model_pool(s, name="canary", urls=",".join(urls)))  # fmt: skip
        signer = request_id.Signer(KEY, clock=clock, receipts=self.served)
        self.gateway = Gateway(features, self.stable, Fallback(TABLE), "ctr_model:v1", 2.0, self.arms, signer.issue)
        self.desk = FeedbackDesk(self.runtime, self.served, max_age_s=600, clock=clock)
        app = make_app(
            Edge(
                self.gateway,
                max_ads=10,
                max_body_bytes=1 << 20,
                request_id_key=KEY,
                admin_token=TOKEN,
                canary=self.runtime,
                stable_arm=Arm("ctr_model:v1", (stable_url,)),
                feedback=self.desk,
            )
        )
        self.app = app
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

    async def predict(self, user: str, ads: list[str] = ADS) -> dict[str, Any]:
        r = await self.http.post("/predict", json={"user_id": user, "ad_ids": ads, "context": CTX})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    async def feedback(self, rid: str, ad: str = "a1", clicked: bool = True, **extra: Any) -> httpx.Response:
        return await self.http.post("/feedback", json={"request_id": rid, "ad_id": ad, "clicked": clicked, **extra})

    async def admin(self, action: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.http.post(f"/admin/canary/{action}", json=body or {}, headers=AUTH)

    async def counts(self) -> dict[str, Any]:
        await self.arms.sync()
        r = self.runtime.rollout
        assert r is not None
        c = await self.store.counters(r.id)
        return {a: c[a].to_dict() for a in ("stable", "canary")}

    async def close(self) -> None:
        await self.http.aclose()
        await self.arms.close()
        await self.stable.close()
        await self.client.aclose()
        await self.served.r.aclose()


@asynccontextmanager
async def rig(redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path,
              prefix: str | None = None, clock: FakeClock | None = None) -> AsyncIterator[Rig]:  # fmt: skip
    g = Rig(redis_url, models[0].url, tmp_path, prefix or f"test:{uuid.uuid4().hex[:8]}:", clock or FakeClock(1e9))
    await g.stable.start()
    try:
        yield g
    finally:
        await g.close()


async def started(g: Rig, canary_url: str, plan: Plan = PLAN, tag: str = "ctr_model:v2") -> dict[str, Any]:
    r = await g.admin("start", {"model_tag": tag, "urls": [canary_url], "plan": plan.to_dict()})
    assert r.status_code == 200, r.text
    await g.arms.sync()
    return r.json()  # type: ignore[no-any-return]


async def answers(g: Rig, n: int = 200, arm: str = "canary") -> list[dict[str, Any]]:
    out = [await g.predict(f"u{i}") for i in range(n)]
    return [p for p in out if p["arm"] == arm]


# ---- 1. feedback no client can steer ------------------------------------------------------


def test_defect_1_replays_unserved_ads_and_client_scores_move_no_counter(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """3,000 replays of one canary id count once (409 after the first; the old route counted
    all 3,000 and rolled a healthy canary back); an ad the answer did not serve is a 409; the
    calibration gate sums the served score (0.3), never the client's `score` (0.99)."""

    async def go() -> None:
        async with rig(redis_url, models, tmp_path) as g:
            await started(g, models[1].url)
            canary = await answers(g)
            assert canary and all(p["scores"] == pytest.approx([0.3] * 3) for p in canary)
            rid = canary[0]["request_id"]
            first = await g.feedback(rid, score=0.99)
            assert first.status_code == 202 and first.json() == {"accepted": True, "arm": "canary", "gates": True}
            replays = []
            for _ in range(30):  # 3,000 replays, 100 at a time (racing each other as well as the first)
                replays += await asyncio.gather(*(g.feedback(rid, score=0.99) for _ in range(100)))
            assert {r.status_code for r in replays} == {409}
            assert "counted already" in replays[0].json()["error"] and replays[0].json()["detail"] == ["duplicate"]
            unserved = await g.feedback(rid, ad="a999")
            assert unserved.status_code == 409 and "not among the ad_ids" in unserved.json()["error"]
            assert (await g.feedback(rid, ad="a2", clicked=False)).status_code == 202  # another served ad: counts
            got = (await g.counts())["canary"]
            assert (got["impressions"], got["clicks"], got["scored"]) == (2, 1, 2)
            assert got["pred_sum"] == pytest.approx(0.6, abs=1e-6)

    asyncio.run(go())


def test_defect_1_over_age_cross_rollout_forged_and_lost_ids_are_refused(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """An id past the maximum age is a 410; an id of a rollout that ended is a 409 under the next
    one; a forged id a 403; an id whose served record is gone a 410. None is counted."""

    async def go() -> None:
        async with rig(redis_url, models, tmp_path) as g:
            await started(g, models[1].url)
            old_rollout = (await answers(g))[0]["request_id"]
            assert (await g.admin("rollback")).status_code == 200
            await started(g, models[1].url)
            canary = await answers(g)
            too_old = canary[0]["request_id"]
            g.clock.advance(601)
            refused = await g.feedback(too_old)
            assert refused.status_code == 410 and "CTR_FEEDBACK_MAX_AGE_S" in refused.json()["error"]
            g.clock.advance(-601)
            cross = await g.feedback(old_rollout)
            assert cross.status_code == 409 and cross.json()["detail"] == ["other_rollout"]
            forged = request_id.issue("canary", "ctr_model:v2", b"x" * 32, g.clock(), 0, g.runtime.active_id())
            assert (await g.feedback(forged)).status_code == 403
            rid = canary[1]["request_id"]
            claims = request_id.verify(rid, KEY)
            assert claims is not None
            await g.served.flush()
            assert await g.client.hdel(g.served.bucket(claims.issued_at), claims.record) == 1  # lost with Redis
            assert (await g.feedback(rid)).status_code == 503  # under 2 s old: maybe not written yet
            g.clock.advance(3)
            assert (await g.feedback(rid)).status_code == 410
            got = (await g.counts())["canary"]
            assert got["impressions"] == 0 and got["clicks"] == 0

    asyncio.run(go())


# ---- 5. fallback answers are errors, never evidence; shed answers carry their arm ------------


def test_defect_5_fallback_answers_are_canary_errors_not_ctr_evidence(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """A canary whose replica is gone answers from the fallback table: each answer is a canary
    error, and feedback on it is accepted (online CTR) but reaches no gate (the old route
    counted its clicks and the table's scores as the canary's CTR and calibration)."""

    async def go() -> None:
        async with rig(redis_url, models, tmp_path) as g:
            await started(g, f"http://127.0.0.1:{free_port()}")
            bad = await answers(g, 100)
            assert bad and all(p["fallback"] for p in bad)
            for p in bad:
                ok = await g.feedback(p["request_id"])
                assert ok.status_code == 202 and ok.json()["gates"] is False
            got = (await g.counts())["canary"]
            assert got["errors"] == len(bad) and (got["impressions"], got["clicks"], got["pred_sum"]) == (0, 0, 0)

    asyncio.run(go())


def test_defect_5_shed_answers_carry_their_users_arm(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """Above the concurrency limit a canary user's shed answer says `canary` (the old one said
    `stable` for everyone), and its id names the rollout and a fallback version."""

    async def go() -> None:
        async with rig(redis_url, models, tmp_path) as g:
            await started(g, models[1].url)
            users = {p["arm"]: u for u, p in [(f"u{i}", await g.predict(f"u{i}")) for i in range(40)]}
            limiter = AimdLimit(initial=1, min_limit=1, max_limit=1)
            g.gateway.limiter = limiter  # the gateway's admission stage
            held = limiter.try_acquire()  # the limit is full: every request is shed
            assert held is not None
            for arm, user in users.items():
                p = await g.predict(user)
                assert p["arm"] == arm and p["degraded"] == ["overload:shed"]
                claims = request_id.verify(p["request_id"], KEY)
                assert claims is not None and claims.arm == arm and claims.fallback
                assert claims.rollout == g.runtime.active_id()
            assert set(users) == {"stable", "canary"}

    asyncio.run(go())


# ---- 2. the public status ---------------------------------------------------------------------


def test_defect_2_public_status_has_no_salt_url_or_store_error(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """/status.json and /status show the rollout's phase, share and gates, but not its salt (the
    split could be computed offline), no replica URL and no store error text; the admin API
    still shows all three."""

    async def go() -> None:
        async with rig(redis_url, models, tmp_path) as g:
            r = await started(g, models[1].url)
            await answers(g, 50)
            g.runtime.unavailable(ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused."))
            board = StatusBoard(Sources(g.gateway.sli, g.gateway, workers=1))
            doc = await board.document()
            text = render(doc) + str(doc)
            panel = next(p["data"] for p in doc["panels"] if p["id"] == "canary")
            assert panel["status"] == "running" and panel["share"] == 0.5 and "gates" in panel
            for secret in (r["salt"], models[1].url, models[0].url, "127.0.0.1", "10.1.2.3", "Connection refused"):
                assert secret not in text, secret
            admin = (await g.http.get("/admin/canary", headers=AUTH)).json()
            assert admin["salt"] == r["salt"] and admin["canary"]["urls"] == [models[1].url]

    asyncio.run(go())


# ---- 3. a promotion sticks ------------------------------------------------------------------


def test_defect_3_the_promoted_tag_is_the_next_rollouts_stable(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """After `promote`, every user is served by the promoted model as `stable`, and the next
    rollout is judged against it: its stable arm is the promoted tag (the old start reverted to
    the gateway's start-up tag, so the new canary was judged against the old model)."""

    async def go() -> None:
        async with rig(redis_url, models, tmp_path) as g:
            await started(g, models[1].url)
            assert (await g.admin("promote")).status_code == 200
            await g.arms.sync()
            served = [await g.predict(f"u{i}") for i in range(40)]
            assert {(p["arm"], p["model_version"]) for p in served} == {("stable", "ctr_model:v2")}
            assert all(p["scores"] == pytest.approx([0.3] * 3) for p in served)
            nxt = await started(g, models[0].url, tag="ctr_model:v3")
            assert nxt["stable"] == {"tag": "ctr_model:v2", "urls": [models[1].url]}
            assert nxt["history"][0]["reason"] == "canary ctr_model:v3 against ctr_model:v2"
            out = [await g.predict(f"u{i}") for i in range(100)]
            stable = [p for p in out if p["arm"] == "stable"]
            assert stable and {p["model_version"] for p in stable} == {"ctr_model:v2"}
            assert {p["model_version"] for p in out if p["arm"] == "canary"} == {"ctr_model:v3"}

    asyncio.run(go())


# ---- 4. an ended rollout is never restored -----------------------------------------------------


@pytest.fixture()
def redis_proc() -> Iterator[RedisProcess]:
    p = RedisProcess()
    yield p
    p.close()


@pytest.mark.parametrize("same_machine", [False, True])
def test_defect_4_a_rollback_is_not_undone_when_redis_comes_back_empty(
    redis_proc: RedisProcess, models: tuple[ModelServer, ModelServer], tmp_path: Path, same_machine: bool
) -> None:
    """Gateways A and B see a rollout running; A rolls it back; Redis restarts empty before B
    syncs. The old B restored the rollout (SET NX) and it ran again for everyone. Now: on the
    same machine B reads A's record of the end and restores nothing; on another machine B
    restores it, A puts the end back at its next sync, and B follows."""

    async def go() -> None:
        prefix, clock = f"test:{uuid.uuid4().hex[:8]}:", FakeClock(1e9)
        b_dir = tmp_path / ("a" if same_machine else "b")
        async with (
            rig(redis_proc.url, models, tmp_path / "a", prefix, clock) as a,
            rig(redis_proc.url, models, b_dir, prefix, clock) as b,
        ):
            await started(a, models[1].url)
            await b.arms.sync()
            assert b.runtime.current() is not None
            assert (await a.admin("rollback", {"reason": "bad canary"})).status_code == 200
            redis_proc.kill()
            redis_proc.start()
            for g in (b, a, b, a, b):  # the first round finds the old connections closed
                await g.arms.sync()
            state = await a.store.load()
            assert state is not None and state.status == "rolled_back" and state.reason == "bad canary"
            for g in (a, b):
                assert g.runtime.current() is None
                assert {(await g.predict(f"u{i}"))["arm"] for i in range(40)} == {"stable"}
            actions = [h["action"] for h in state.history]  # another machine: B restored it, A put the end back
            assert actions == (["start", "rollback"] if same_machine else ["start", "rollback", "rollback"])

    asyncio.run(go())


# ---- 6. the internal token, and decisions while Redis is down -------------------------------


class Capture:
    """A host that records every request it gets (with headers): where a token could leak."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []

        async def any_path(request: Request) -> Response:
            self.seen.append(dict(request.headers))
            return Response(b"ok")

        from starlette.applications import Starlette

        app = Starlette(routes=[Route("/{p:path}", any_path, methods=["GET", "POST"])])
        self.served = ThreadServer(app)
        self.url = self.served.url.replace("127.0.0.1", "localhost")


def test_defect_6_the_internal_token_goes_to_no_other_host(
    redis_url: str, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """A start naming a host CTR_CANARY_ALLOWED_HOSTS does not allow is a 422 and nothing is
    built; a rollout written straight into Redis with such a URL gets no pool: the host sees no
    request, so never the token (the old gateway probed it with the token at once)."""
    cap = Capture()
    try:

        async def go() -> None:
            async with rig(redis_url, models, tmp_path) as g:
                g.runtime.hosts = HostPolicy(["ctr-model-*"], loopback=False)  # the capture host is not allowed
                r = await g.admin("start", {"model_tag": "ctr_model:evil", "urls": [cap.url]})
                assert r.status_code == 422 and "allowed host" in r.json()["error"] and cap.url in r.json()["error"]
                assert await g.store.load() is None
                await g.runtime.controller.start(Arm("ctr_model:v1"), Arm("ctr_model:evil", (cap.url,)), PLAN)
                for _ in range(3):
                    await g.arms.sync()
                    await asyncio.sleep(0.3)
                assert g.arms.pools == {}
                assert {(await g.predict(f"u{i}"))["arm"] for i in range(20)} == {"stable"}

        asyncio.run(go())
    finally:
        cap.served.stop()
    assert cap.seen == []


def test_allowed_hosts_are_loopback_the_configured_ones_and_the_patterns() -> None:
    """CTR_CANARY_ALLOWED_HOSTS patterns, the hosts of the gateway's own URL settings, loopback."""
    s = Settings(model_urls="http://ctr-model:3000", canary_urls="http://ctr-model-canary:3000",
                 canary_allowed_hosts="*.ml.svc.cluster.local, Replica-7")  # fmt: skip
    p = HostPolicy.from_settings(s)
    ok = ["http://127.0.0.1:3101", "http://localhost:1", "http://[::1]:3000", "http://ctr-model-canary:3000",
          "https://a.ml.svc.cluster.local", "http://replica-7:3000", "http://ctr-model:3000"]  # fmt: skip
    bad = ["http://evil.example:3000", "http://ml.svc.cluster.local.evil:1", "ftp://127.0.0.1/", "http://10.0.0.1",
           "http://user@evil.example", "not a url"]  # fmt: skip
    assert [u for u in ok if not p.allows(u)] == [] and p.refused(bad) == bad


def test_defect_6_rollback_while_redis_is_down_and_everyone_stable_past_stale_s(
    redis_proc: RedisProcess, models: tuple[ModelServer, ModelServer], tmp_path: Path
) -> None:
    """Redis down: POST /admin/canary/rollback is answered (202) by the process that takes it
    (the old one answered 503: nothing could roll back); that process and the other of its
    machine send everyone to stable at once; a process of another machine keeps the split
    until CTR_CANARY_STALE_S, then sends everyone to stable (the old one kept it forever);
    when Redis answers, the decision is put into it and everyone sees it."""

    async def go() -> None:
        prefix, clock = f"test:{uuid.uuid4().hex[:8]}:", FakeClock(1e9)
        async with (
            rig(redis_proc.url, models, tmp_path / "m1", prefix, clock) as a,
            rig(redis_proc.url, models, tmp_path / "m1", prefix, clock) as a2,
            rig(redis_proc.url, models, tmp_path / "m2", prefix, clock) as b,
        ):
            await started(a, models[1].url)
            for g in (a2, b):
                await g.arms.sync()
            users = [f"u{i}" for i in range(60)]
            split = [(await b.predict(u))["arm"] for u in users]
            assert "canary" in split
            redis_proc.kill()
            r = await a.admin("rollback", {"reason": "pager at 3 am"})
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "rolled_back" and r.json()["decided"] == "here"
            for g in (a, a2, b):
                await g.arms.sync()
            assert [(await a.predict(u))["arm"] for u in users] == ["stable"] * 60
            assert [(await a2.predict(u))["arm"] for u in users] == ["stable"] * 60
            assert [(await b.predict(u))["arm"] for u in users] == split  # another machine: last split...
            clock.advance(31)
            await b.arms.sync()
            assert [(await b.predict(u))["arm"] for u in users] == ["stable"] * 60  # ...until CTR_CANARY_STALE_S
            assert b.runtime.status()["everyone_stable"] is True
            redis_proc.start()
            for g in (b, a2, b, a2, b):  # the first round finds the old connections closed
                await g.arms.sync()
            state = await b.store.load()
            assert state is not None and state.status == "rolled_back" and state.reason == "pager at 3 am"
            assert b.runtime.rollout is not None and b.runtime.rollout.status == "rolled_back"

    asyncio.run(go())
