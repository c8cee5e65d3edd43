"""The canary admin API and `ctr canary` over real HTTP (uvicorn on a free port) with a real
private Redis: tokens are checked in constant time, refused calls change nothing."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner
from helpers import ThreadServer

from ctr.api import request_id
from ctr.api.edge import Edge
from ctr.api.routes import make_app
from ctr.cli import main
from ctr.serving.canary.controller import Controller
from ctr.serving.canary.feedback import FeedbackDesk
from ctr.serving.canary.hosts import HostPolicy
from ctr.serving.canary.runtime import CanaryRuntime
from ctr.serving.canary.served import ServedLog
from ctr.serving.canary.state import Arm, RedisStore

TOKEN = "s3cret-token"
KEY = b"k" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Served:
    def __init__(self, redis_url: str | None, token: str = TOKEN) -> None:
        self.prefix = f"test:{uuid.uuid4().hex[:8]}:"
        self.redis_url = redis_url
        self.runtime = None
        desk = FeedbackDesk(None, None, 900.0)
        if redis_url is not None:
            store = RedisStore(aioredis.from_url(redis_url), prefix=self.prefix)
            served = ServedLog(aioredis.from_url(redis_url), 900.0, prefix=self.prefix)
            hosts = HostPolicy(["canary", "c"])  # the replica hosts these tests name
            self.runtime = CanaryRuntime(store, Controller(store), served=served, hosts=hosts)
            desk = FeedbackDesk(self.runtime, served, 900.0)
            self.signer = request_id.Signer(KEY, receipts=served)
        stable = Arm("ctr_model:stable", ("http://model:3000",))
        app = make_app(Edge(request_id_key=KEY, admin_token=token, canary=self.runtime, stable_arm=stable,
                            feedback=desk))  # fmt: skip
        self.served = ThreadServer(app)
        self.url, self.server = self.served.url, self.served.server

    def state(self) -> bytes | None:
        assert self.redis_url is not None
        return redis.Redis.from_url(self.redis_url).get(self.prefix + "state")

    def stop(self) -> None:
        self.served.stop()


@pytest.fixture()
def served(redis_url: str) -> Iterator[Served]:
    s = Served(redis_url)
    yield s
    s.stop()


START = {"model_tag": "ctr_model:canary", "urls": ["http://canary:3000"], "plan_scale": 0.01}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_missing_or_wrong_token_is_401_and_changes_nothing(served: Served, headers: dict[str, str]) -> None:
    """Every endpoint refuses; Redis holds no rollout afterwards, and a running one is untouched."""
    with httpx.Client(base_url=served.url) as c:
        assert c.get("/admin/canary", headers=headers).status_code == 401
        for action in ("start", "pause", "resume", "promote", "rollback"):
            assert c.post(f"/admin/canary/{action}", json=START, headers=headers).status_code == 401
        assert served.state() is None
        assert c.post("/admin/canary/start", json=START, headers=AUTH).status_code == 200
        before = served.state()
        for action in ("pause", "promote", "rollback"):
            assert c.post(f"/admin/canary/{action}", headers=headers).status_code == 401
        assert served.state() == before


def test_start_status_pause_resume_rollback(served: Served) -> None:
    """The whole manual life of a rollout over HTTP, with readable 4xx for bad input and bad states."""
    with httpx.Client(base_url=served.url, headers=AUTH) as c:
        assert c.get("/admin/canary").json()["status"] == "none"
        bad = c.post("/admin/canary/start", json={"urls": ["x"]})
        assert bad.status_code == 422 and "model_tag" in bad.json()["error"]
        bad = c.post("/admin/canary/start", json={"model_tag": "ctr_model:c"})
        assert bad.status_code == 422 and "CTR_CANARY_URLS" in bad.json()["error"]
        assert c.post("/admin/canary/start", content=b"{not json").status_code == 400
        for plan in ({"phases": [{"share": 0.1}]}, {"phases": [{"share": 2, "duration_s": 1}]}, {"phases": 3}, []):
            bad = c.post("/admin/canary/start", json={**START, "plan": plan})
            assert bad.status_code == 422 and ("plan" in bad.json()["error"] or "share" in bad.json()["error"])
        r = c.post("/admin/canary/start", json=START).json()
        assert (r["status"], r["share"], r["canary"]["urls"]) == ("running", 0.01, ["http://canary:3000"])
        assert r["stable"]["tag"] == "ctr_model:stable" and r["plan"]["phases"][0]["duration_s"] == 36.0
        again = c.post("/admin/canary/start", json=START)
        assert again.status_code == 409 and "is running" in again.json()["error"]
        assert c.post("/admin/canary/pause", json={"reason": "looking at a dashboard"}).json()["status"] == "paused"
        assert c.post("/admin/canary/resume").json()["status"] == "running"
        s = c.get("/admin/canary").json()
        assert s["store"] == "ok" and set(s["gates"]) == {"errors", "latency", "ctr", "calibration"}
        assert s["gates"]["ctr"]["verdict"] == "insufficient" and set(s["arms"]) == {"stable", "canary"}
        out = c.post("/admin/canary/rollback", json={"reason": "bad dashboard"}).json()
        assert (out["status"], out["share"], out["reason"]) == ("rolled_back", 0.0, "bad dashboard")
        assert [h["action"] for h in out["history"]] == ["start", "pause", "resume", "rollback"]
        assert c.post("/admin/canary/promote").status_code == 409


def test_admin_disabled_without_a_token_and_503_without_redis() -> None:
    """No CTR_ADMIN_TOKEN: 403; a token but no canary runtime (no Redis): 503 with the reason."""
    for token, status in (("", 403), (TOKEN, 503)):
        s = Served(None, token)
        try:
            r = httpx.get(s.url + "/admin/canary", headers=AUTH)
        finally:
            s.stop()
        assert r.status_code == status
        assert ("CTR_ADMIN_TOKEN" if status == 403 else "CTR_REDIS_URL") in r.json()["error"]


def test_cli_drives_the_api(served: Served) -> None:
    """`ctr canary start|status|promote` call the API; a wrong token is reported, not a traceback."""
    run = CliRunner().invoke
    base = ["--url", served.url, "--token", TOKEN]
    out = run(
        main,
        [
            "canary",
            "start",
            *base,
            "--model-tag",
            "ctr_model:c",
            "--canary-url",
            "http://c:3000",
            "--plan-scale",
            "0.01",
        ],
    )
    assert out.exit_code == 0, out.output
    assert "running, phase 0, canary share 1.0%" in out.output
    out = run(main, ["canary", "status", *base])
    assert out.exit_code == 0 and "gate ctr" in out.output
    out = run(main, ["canary", "promote", "--url", served.url, "--token", "nope"])
    assert out.exit_code != 0 and "401" in out.output
    out = run(main, ["canary", "promote", *base, "--reason", "looks fine"])
    assert out.exit_code == 0 and "promoted" in out.output


def test_feedback_is_attributed_to_the_arm(served: Served) -> None:
    """/feedback during a rollout lands in the arm its signed request id carries (impressions,
    clicks, and the predicted CTR that was served, not the client's); a forged id is refused and
    counted nowhere; a second feedback for the same (id, ad) is a 409."""
    with httpx.Client(base_url=served.url, headers=AUTH) as c:
        rollout = c.post("/admin/canary/start", json=START).json()["id"]
        canary_id = served.signer.issue("canary", "ctr_model:canary", 3, rollout, ["a7", "a8", "a9"], [0.25] * 3)
        stable_id = served.signer.issue("stable", "ctr_model:stable", 5, rollout, ["a7"], [0.5])
        for ad, clicked in (("a7", True), ("a8", False), ("a9", False)):
            fb = {"request_id": canary_id, "ad_id": ad, "clicked": clicked, "score": 0.9}
            assert c.post("/feedback", json=fb).json() == {"accepted": True, "arm": "canary", "gates": True}
        again = c.post("/feedback", json={"request_id": canary_id, "ad_id": "a7", "clicked": True})
        assert again.status_code == 409
        # the arm is the signed id's, not the body's
        fb = {"request_id": stable_id, "ad_id": "a7", "clicked": True, "arm": "canary"}
        assert c.post("/feedback", json=fb).status_code == 202
        forged = request_id.issue("canary", "x", b"another key" * 3, time.time())
        assert c.post("/feedback", json={"request_id": forged, "ad_id": "a7", "clicked": True}).status_code == 403
        bad = c.post("/feedback", json={"request_id": canary_id, "ad_id": "a7", "clicked": True, "score": 3})
        assert bad.status_code == 422
    runtime = served.runtime
    canary, stable = runtime._delta["canary"], runtime._delta["stable"]
    assert (canary.impressions, canary.clicks, canary.scored, canary.pred_sum) == (3, 1, 3, 0.75)
    assert (stable.impressions, stable.clicks, stable.scored, stable.pred_sum) == (1, 1, 1, 0.5)
