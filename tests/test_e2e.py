"""End to end: the real `bentoml serve` with a freshly trained model, over HTTP."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import httpx
import pytest
from conftest import Server, feedback_when_written
from helpers import CTX

from ctr import buffered_metrics

T = TypeVar("T")


def predict(server: Server, body: object, **kw: object) -> httpx.Response:
    return httpx.post(server.url + "/predict", json=body, timeout=10, **kw)  # type: ignore[arg-type]


def test_predict_returns_a_calibrated_score_per_ad(gateway: Server) -> None:
    """A known user and ads get one score in (0, 1) per ad, from the model, undegraded."""
    r = predict(gateway, {"user_id": "u1", "ad_ids": ["a7", "a19", "a3"], "context": CTX})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["scores"]) == 3 and all(0 < s < 1 for s in body["scores"])
    assert len(set(body["scores"])) > 1  # a model, not a constant
    assert body["model_version"].startswith("ctr_model:")
    assert body["arm"] == "stable" and body["fallback"] is False and body["degraded"] == []
    assert body["request_id"]


def test_request_id_is_signed_and_the_callers_is_echoed(gateway: Server) -> None:
    """The body's request_id is the service's signed id; a caller's X-Request-ID comes back
    as a header, so logs can be joined."""
    r = predict(gateway, {"user_id": "u1", "ad_ids": ["a1"], "context": CTX}, headers={"x-request-id": "abc-1"})
    assert r.headers["x-request-id"] == "abc-1"
    assert r.json()["request_id"] != "abc-1" and "." in r.json()["request_id"]


def test_unknown_user_and_ads_get_defaults_and_say_so(gateway: Server) -> None:
    """Cold start is not an error: default features, flagged in `degraded`."""
    r = predict(gateway, {"user_id": "nobody", "ad_ids": ["a1", "zz-new"], "context": CTX})
    assert r.status_code == 200
    body = r.json()
    assert body["fallback"] is False
    assert set(body["degraded"]) == {"features:user:default", "features:ad:default"}
    assert all(0 < s < 1 for s in body["scores"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ("not json", 400, "not valid JSON"),
        ([1, 2], 400, "JSON object"),
        ({"ad_ids": ["a1"], "context": CTX}, 422, "user_id: Field required"),
        ({"user_id": 42, "ad_ids": ["a1"], "context": CTX}, 422, "user_id: Input should be a valid string"),
        ({"user_id": "u1", "ad_ids": "a1", "context": CTX}, 422, "ad_ids"),
        ({"user_id": "u1", "ad_ids": [], "context": CTX}, 422, "at least 1 item"),
        ({"user_id": "u1", "ad_ids": [f"a{i}" for i in range(51)], "context": CTX}, 422, "at most 50 (CTR_MAX_ADS)"),
        ({"user_id": "u1", "ad_ids": ["a1"], "context": {**CTX, "hour": 24}}, 422, "context.hour"),
        ({"user_id": "u1", "ad_ids": ["a1"], "context": {**CTX, "banner_pos": -1}}, 422, "context.banner_pos"),
        ({"user_id": "u1", "ad_ids": ["a1"], "context": {**CTX, "device_type": "fridge"}}, 422, "context.device_type"),
        ({"user_id": "u1", "ad_ids": ["a1"], "context": {**CTX, "hour": "14"}}, 422, "context.hour"),
        ({"user_id": "u1", "ad_ids": ["a1"]}, 422, "context: Field required"),
    ],
)
def test_bad_input_gets_a_readable_4xx(gateway: Server, body: object, status: int, needle: str) -> None:
    """Each kind of bad input is refused with its status and a message naming the problem."""
    if isinstance(body, str):
        r = httpx.post(gateway.url + "/predict", content=body, timeout=10)
    else:
        r = predict(gateway, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def _ok_requests(text: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('ctr_requests_total{outcome="ok"}'))  # fmt: skip


def test_predict_takes_the_fast_path_and_metrics_still_count_it(gateway: Server) -> None:
    """POST /predict skips BentoML's per-request middlewares (its traffic metrics never see it,
    ctr/api/bentoml_compat.py) while the gateway's own counters do; other routes keep BentoML's."""
    time.sleep(3 * buffered_metrics.FLUSH_S)  # earlier tests' counts are in the files
    before = _ok_requests(httpx.get(gateway.url + "/metrics").text)
    for _ in range(3):
        assert predict(gateway, {"user_id": "u3", "ad_ids": ["a3"], "context": CTX}).status_code == 200
    assert httpx.get(gateway.url + "/model_info").status_code == 200

    def bento(text: str) -> list[str]:
        head = "bentoml_service_request_total{"
        return [line for line in text.splitlines() if line.startswith(head) and 'runner_name="ctr_gateway"' in line]

    def counted(t: str) -> bool:
        return _ok_requests(t) >= before + 3 and any('endpoint="/model_info"' in line for line in bento(t))

    text = scrape_until(gateway.url, counted)
    assert _ok_requests(text) >= before + 3
    assert any('endpoint="/model_info"' in line for line in bento(text)), bento(text)
    time.sleep(3 * buffered_metrics.FLUSH_S)  # every process's BentoML counters are in the files too
    text = httpx.get(gateway.url + "/metrics").text
    assert not any('endpoint="/predict"' in line for line in bento(text)), bento(text)


def test_health_and_metrics(gateway: Server) -> None:
    """BentoML's probes answer, and the project's ctr_* metrics are exported."""
    assert httpx.get(gateway.url + "/livez").status_code == 200
    assert httpx.get(gateway.url + "/readyz").status_code == 200
    predict(gateway, {"user_id": "u2", "ad_ids": ["a2"], "context": CTX})
    text = httpx.get(gateway.url + "/metrics").text
    for name in (
        'ctr_requests_total{outcome="ok"}',
        'ctr_requests_total{outcome="bad_request"}',
        'ctr_request_latency_seconds_bucket{le="0.005",outcome="ok"}',
        'ctr_stage_latency_seconds_count{stage="features"}',
        'ctr_stage_latency_seconds_count{stage="transform"}',
        'ctr_stage_latency_seconds_count{stage="inference"}',
        'ctr_stage_latency_seconds_count{stage="request"}',
        "ctr_model_batch_rows_count",
    ):
        assert name in text, name


def test_model_info_reports_metrics(gateway: Server) -> None:
    """The gateway tells which model it serves and how it scored on test."""
    r = httpx.post(gateway.url + "/model_info", json={}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"].startswith("ctr_model:")
    assert 0.5 < body["metrics"]["test_auc"] <= body["metrics"]["bayes_auc"] + 0.02


@pytest.mark.parametrize(
    ("target", "path", "body", "key"),
    [
        ("service:FallbackService", "/predict", {"ad_ids": ["a1", "a2"], "context": CTX}, "scores"),
        ("service:FeatureService", "/features", {"user_id": "u1", "ad_ids": ["a1"]}, "ads"),
    ],
)
def test_side_services_serve_on_their_own(
    small_setup: dict[str, str], target: str, path: str, body: dict, key: str
) -> None:
    """FallbackService and FeatureService each start alone and answer their API to a caller
    holding the internal token (CTR_INTERNAL_TOKEN), and 401 to one without it."""
    server = Server(target, {**small_setup, "CTR_INTERNAL_TOKEN": "side-token"})
    try:
        assert httpx.post(server.url + path, json=body, timeout=10).status_code == 401
        r = httpx.post(server.url + path, json=body, headers={"x-ctr-internal-token": "side-token"}, timeout=10)
        assert r.status_code == 200, r.text
        assert key in r.json()
    finally:
        server.stop()


def test_remote_features_give_the_same_scores(small_setup: dict[str, str], gateway: Server) -> None:
    """With CTR_FEATURES_REMOTE the gateway asks FeatureService over HTTP, with the same result."""
    body = {"user_id": "u3", "ad_ids": ["a1", "a2", "a5", "nope"], "context": CTX}
    remote = Server("service:CTRGateway", {**small_setup, "CTR_FEATURES_REMOTE": "true"})
    try:
        got = predict(remote, body).json()
    finally:
        remote.stop()
    want = predict(gateway, body).json()
    assert got["scores"] == pytest.approx(want["scores"], abs=1e-6)
    # (an L2 read past its 20 ms budget on a loaded machine adds cache:l2:bypassed to either)
    assert "features:ad:default" in got["degraded"] and "features:ad:default" in want["degraded"]


def scrape_until(url: str, cond: Callable[[str], bool], timeout_s: float = 5.0) -> str:
    """/metrics once `cond` holds of it (or the last scrape): each process writes its updates
    to the multiprocess files every FLUSH_S (ctr/buffered_metrics.py), not at once."""
    deadline = time.monotonic() + timeout_s
    while not cond(text := httpx.get(url + "/metrics").text) and time.monotonic() < deadline:
        time.sleep(buffered_metrics.FLUSH_S / 2)
    return text


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_caches_were_warmed_before_ready(gateway: Server) -> None:
    """Start-up read the warm set (every user of the small log, the active ads) through L3."""
    warmed = 'ctr_cache_lookups_total{result="hit",tier="l3"}'
    text = scrape_until(gateway.url, lambda t: _metric(t, warmed) >= 2 * 2000)
    assert _metric(text, warmed) >= 2 * 2000


@pytest.mark.parametrize(
    ("headers", "body", "status", "needle"),
    [
        ({}, {"group": "ad_meta", "rows": []}, 401, "bearer token"),
        ({"authorization": "Bearer wrong"}, {"group": "ad_meta", "rows": []}, 401, "bearer token"),
        ({"authorization": "Bearer test-token"}, {"group": "ad_meta", "rows": []}, 422, "non-empty"),
        ({"authorization": "Bearer test-token"}, {"group": "x", "rows": [{"id": "a", "values": [1]}]}, 422, "unknown"),
    ],
)
def test_admin_write_refusals(gateway: Server, headers: dict[str, str], body: dict, status: int, needle: str) -> None:
    """The admin endpoint wants the token and a valid body."""
    r = httpx.post(gateway.url + "/admin/features", json=body, headers=headers, timeout=10)
    assert r.status_code == status and needle in r.json()["error"]


AUTH = {"authorization": "Bearer test-token"}


def each_process(server: Server, call: Callable[[httpx.Client], T], tries: int = 400) -> dict[int, T]:
    """`call` on a connection to each gateway process (a keep-alive connection stays with the
    process that accepted it; its pid comes from /admin/features/read): {pid: result}."""
    from ctr.serving.placement import gateway_workers
    from ctr.settings import Settings

    want = gateway_workers(Settings())
    out: dict[int, T] = {}
    for _ in range(tries):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as c:
            r = c.post("/admin/features/read", json={"group": "ad_meta", "ids": ["a1"]})
            assert r.status_code == 200, r.text
            pid = r.json()["pid"]
            if pid not in out:
                out[pid] = call(c)
        if len(out) == want:
            return out
    raise AssertionError(f"reached {len(out)} of {want} gateway processes in {tries} connections")


def test_admin_write_makes_a_new_ad_known_in_every_process(gateway: Server) -> None:
    """A new ad is cold (default features, remembered as unknown) in every gateway process
    until its features are written to one of them; then it is known in every process within
    the stated bound (docs/feature-store.md: 3 s for write-through; the old code kept it unknown in the other
    process for CTR_NEGATIVE_TTL_S, 60 s, and this test passed or failed by which process
    answered)."""
    ad = "a-brand-new"
    body = {"user_id": "u1", "ad_ids": [ad], "context": CTX}
    cold = each_process(gateway, lambda c: c.post("/predict", json=body).json()["degraded"])
    assert all("features:ad:default" in d for d in cold.values())
    for group, values, mode in (("ad_meta", [3, 4, "video"], "through"), ("ad_stats", [900, 40], "behind")):
        r = httpx.post(gateway.url + "/admin/features", headers=AUTH, timeout=10,
                       json={"group": group, "rows": [{"id": ad, "values": values}]})  # fmt: skip
        assert r.status_code == 200 and r.json() == {"group": group, "written": 1, "mode": mode}
    acked = time.monotonic()

    def known_within_bound(c: httpx.Client) -> float:
        while time.monotonic() - acked < 3.0:
            if "features:ad:default" not in c.post("/predict", json=body).json()["degraded"]:
                return time.monotonic() - acked
            time.sleep(0.02)
        raise AssertionError("the written ad is still unknown in this process 3 s after the write")

    assert set(each_process(gateway, known_within_bound)) == set(cold)


def test_feedback_is_counted_and_validated(gateway: Server) -> None:
    """Feedback on a shown ad is accepted (202) and counted once (again: 409); an ad the answer did
    not serve is a 409, a malformed one a 422, one with an id the service did not issue a 403."""
    rid = predict(gateway, {"user_id": "u1", "ad_ids": ["a1"], "context": CTX}).json()["request_id"]
    ok = {"request_id": rid, "ad_id": "a1", "clicked": True}
    assert feedback_when_written(gateway.url, ok).status_code == 202  # /predict may have gone to the other process
    assert httpx.post(gateway.url + "/feedback", json=ok, timeout=10).status_code == 409
    assert httpx.post(gateway.url + "/feedback", json={**ok, "ad_id": "a2"}, timeout=10).status_code == 409
    forged = httpx.post(gateway.url + "/feedback", json={**ok, "request_id": "r1"}, timeout=10)
    assert forged.status_code == 403
    bad = httpx.post(gateway.url + "/feedback", json={**ok, "clicked": "maybe"}, timeout=10)
    assert bad.status_code == 422 and "clicked" in bad.json()["error"]
    text = scrape_until(gateway.url, lambda t: _metric(t, 'ctr_feedback_total{arm="stable",event="click"}') >= 1)
    assert _metric(text, 'ctr_feedback_total{arm="stable",event="click"}') >= 1
