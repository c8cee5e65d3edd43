"""The canary through the real `bentoml serve service:CTRGateway` (all four services) and
its private Redis: the admin API starts a rollout, the split and `arm` show in /predict,
a failing canary answers from the fallback table (canary errors), /feedback on such an answer is
taken under the id's arm but reaches no gate."""

from __future__ import annotations

import time

import httpx
from conftest import Server, feedback_when_written
from servers import free_port

AUTH = {"Authorization": "Bearer test-token"}
CTX = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"}


def _predict(gateway: Server, user: str) -> dict:
    body = {"user_id": user, "ad_ids": ["a1", "a2"], "context": CTX}
    return httpx.post(gateway.url + "/predict", json=body, timeout=10).json()


def test_rollout_through_the_served_gateway(gateway: Server) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # a canary replica that is not there
    assert httpx.post(gateway.url + "/admin/canary/start", json={"model_tag": "ctr_model:x"}).status_code == 401
    start = {
        "model_tag": "ctr_model:canary-test",
        "urls": [dead],
        "plan": {"phases": [{"share": 0.3, "duration_s": 3600}]},
    }
    r = httpx.post(gateway.url + "/admin/canary/start", json=start, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    try:
        # Each gateway process's sync loop builds the canary arm within a second or so. Until
        # every process has, a canary user answered by one that has not is served stable: wait
        # until each user's arm is the same in two rounds (the first canary answer alone came
        # while one of two processes routed it: 12 of 100 users, in a fresh-clone CI run).
        deadline = time.monotonic() + 15
        arms: list[str] = []
        while True:
            out = [_predict(gateway, f"u{i}") for i in range(100)]
            canary = [p for p in out if p["arm"] == "canary"]
            if (canary and [p["arm"] for p in out] == arms) or time.monotonic() > deadline:
                break
            arms = [p["arm"] for p in out]
            time.sleep(0.3)
        assert 15 <= len(canary) <= 45
        assert all(p["fallback"] and p["model_version"].startswith("fallback:") for p in canary)
        assert not any(p["fallback"] for p in out if p["arm"] == "stable")
        fb = {"request_id": canary[0]["request_id"], "ad_id": "a1", "clicked": True, "arm": "stable"}
        answer = feedback_when_written(gateway.url, fb).json()
        assert answer == {"accepted": True, "arm": "canary", "gates": False}  # a fallback answer: no CTR evidence
        deadline = time.monotonic() + 15  # the counters reach Redis on the next sync (CTR_CANARY_SYNC_S)
        while True:
            status = httpx.get(gateway.url + "/admin/canary", headers=AUTH, timeout=10).json()
            if status["arms"]["canary"]["errors"] >= len(canary) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert status["status"] == "running" and status["store"] == "ok"
        assert status["arms"]["canary"]["errors"] >= len(canary) and status["arms"]["canary"]["clicks"] == 0
    finally:
        r = httpx.post(gateway.url + "/admin/canary/rollback", json={"reason": "end of test"}, headers=AUTH, timeout=10)
        assert r.status_code == 200 and r.json()["share"] == 0.0
    deadline = time.monotonic() + 15
    while any(_predict(gateway, f"u{i}")["arm"] == "canary" for i in range(50)):
        assert time.monotonic() < deadline, "rollback did not reach the gateway"
        time.sleep(0.3)
