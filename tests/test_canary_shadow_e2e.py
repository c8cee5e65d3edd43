"""The shadow phase on real servers: a gateway run alone with two processes, a stable CTRModel
and two canary CTRModel replicas (one scoring x 3, one as stable does), the canary's state in a
private Redis. Users see only stable (every answer's arm and model version); the shadow scores
are joined to the feedback on the same ids; the paired gate rolls the miscalibrated canary
back from the shadow phase and passes the good one to the split; /status.json shows it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from servers import RedisProcess

from ctr.bench.shadow_rig import Rig, rig

CTX = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"}
ADS = [f"a{i}" for i in range(1, 21)]
GATEWAY_ENV = {"CTR_GATEWAY_WORKERS": "2", "CTR_WARM": "false", "CTR_CANARY_SHADOW_SAMPLE": "1",
               "CTR_CANARY_SHADOW_MIN_PAIRS": "1000", "CTR_DEADLINE_MS": "500"}  # fmt: skip


@pytest.fixture(scope="module")
def shadow_rig(small_setup: dict[str, str]) -> Iterator[Rig]:
    redis = RedisProcess()
    try:
        canaries = {"bad": {"CTR_MODEL_SCORE_SCALE": "3"}, "good": {}}
        with rig(small_setup, redis.url, canaries, GATEWAY_ENV) as r:
            yield r
    finally:
        redis.close()


def _wait(r: Rig, done: object, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = r.admin("/admin/canary")
        if done(s):  # type: ignore[operator]
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.3)


def _traffic(r: Rig, n: int, seed: int) -> int:
    """n requests of 20 ads; feedback on every ad, clicked with stable's served score (stable is
    calibrated by construction); returns how many answers there were, all checked stable."""
    rng = np.random.default_rng(seed)
    stable_tag = httpx.get(r.url + "/model_info", timeout=10).json()["model_version"]
    answers = []
    with httpx.Client(base_url=r.url, timeout=10) as c:
        for i in range(n):
            body = {"user_id": f"u{seed}-{i}", "ad_ids": ADS, "context": CTX}
            a = c.post("/predict", json=body).json()
            assert a["arm"] == "stable" and a["model_version"] == stable_tag and not a["fallback"], a
            answers.append(a)
        time.sleep(1.0)  # the shadow calls finish in the background (feedback comes later than that)
        for a in answers:
            for ad, score in zip(ADS, a["scores"], strict=True):
                fb = {"request_id": a["request_id"], "ad_id": ad, "clicked": bool(rng.random() < score)}
                assert c.post("/feedback", json=fb).status_code == 202
    return len(answers)


def test_the_paired_gate_rolls_back_a_miscalibrated_canary_before_any_user_sees_it(shadow_rig: Rig) -> None:
    r = shadow_rig
    r.start_shadow("bad", shadow_s=2.0)
    _wait(r, lambda s: s.get("status") == "running" and s.get("phase") == 0)
    time.sleep(1.0)  # every gateway process builds the canary's pool
    _traffic(r, 100, seed=1)
    s = _wait(r, lambda s: s.get("status") != "running")
    assert s["status"] == "rolled_back" and s["reason"].startswith("paired gate"), s
    assert s["share"] == 0.0 and all(h["share"] == 0.0 for h in s["history"])  # never a user on the canary
    rolled = [h for h in s["history"] if h["action"] in ("rollback", "roll_back")]
    assert rolled and rolled[-1]["gates"]["paired"]["verdict"] == "harm"  # the decision, as it was taken
    assert s["shadow"]["pairs_joined"] >= 1000  # GET /admin/canary (more pairs may join after the decision)
    panel = httpx.get(r.url + "/status.json", timeout=10).json()
    shadow = next(p for p in panel["panels"] if p["id"] == "shadow")["data"]
    assert shadow["pairs_joined"] >= 1000 and shadow["verdict"] and shadow["logloss_diff_rel"] > 0.01
    assert shadow["shadow_calls"]["joined"] == shadow["pairs_joined"]
    assert "salt" not in str(shadow) and "127.0.0.1" not in str(shadow)
    page = httpx.get(r.url + "/status", timeout=10).text
    assert 'data-field="shadow.pairs_joined"' in page and 'data-field="shadow.verdict"' in page


def test_a_canary_scoring_as_stable_passes_the_shadow_phase_to_the_split(shadow_rig: Rig) -> None:
    r = shadow_rig
    r.start_shadow("good", shadow_s=2.0, split_share=0.5)
    _wait(r, lambda s: s.get("status") == "running" and s.get("phase") == 0)
    time.sleep(1.0)
    try:
        _traffic(r, 100, seed=2)
        s = _wait(r, lambda s: s.get("phase", 0) >= 1 or s.get("status") != "running")
        assert s["status"] == "running" and s["share"] == 0.5, s
        advance = [h for h in s["history"] if h["action"] == "advance"]
        assert advance and advance[0]["gates"]["paired"]["verdict"] == "ok"
    finally:
        r.admin("/admin/canary/rollback", {"reason": "end of test"})
