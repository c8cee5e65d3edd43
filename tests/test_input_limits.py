"""Bad input stops at the door: body-size limit, id rules, signed request ids for /feedback."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY
from starlette.testclient import TestClient
from test_gateway import CTX, TABLE, features

from ctr.api import request_id
from ctr.api.routes import make_app
from ctr.features import schema
from ctr.features.sql import SqliteStore
from ctr.features.store import TieredStore
from ctr.features.tiers import MemoryTier
from ctr.features.writes import FeatureWriter
from ctr.serving.coalesce import Coalescer
from ctr.serving.fallback import Fallback
from ctr.serving.gateway import Gateway

KEY = b"k" * 32
LIMIT = 4096
AUTH = {"authorization": "Bearer tok"}


async def model(x: np.ndarray) -> np.ndarray:
    return np.full(len(x), 0.25, dtype=np.float32)


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    app = make_app()
    app.state.gateway = Gateway(features, Coalescer(model), Fallback(TABLE), "ctr_model:test", 1.0,
                                new_id=request_id.Signer(KEY).issue)  # fmt: skip
    app.state.max_ads = 1000
    app.state.max_body_bytes = LIMIT
    app.state.request_id_key = KEY
    app.state.admin_token = "tok"
    app.state.writer = FeatureWriter(TieredStore(MemoryTier(), SqliteStore(tmp_path / "f.db")), {})
    return TestClient(app)


def body(user: str = "u1", ads: list[str] | None = None) -> dict:
    return {"user_id": user, "ad_ids": ads or ["a1", "a2"], "context": CTX}


# --- signed request ids -------------------------------------------------------------------


def test_an_issued_id_verifies_to_its_claims() -> None:
    """issue -> verify gives back the arm, model version and time; ids are unique, compact, URL-safe."""
    rid = request_id.issue("canary", "ctr_model:abc123", KEY, 1_800_000_000.25)
    assert request_id.verify(rid, KEY) == request_id.Claims("canary", "ctr_model:abc123", 1_800_000_000.25)
    assert re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", rid) and len(rid) < 120
    assert rid != request_id.issue("canary", "ctr_model:abc123", KEY, 1_800_000_000.25)


def _flip(s: str, i: int) -> str:
    return s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1 :]


@pytest.mark.parametrize(
    "forge",
    [
        lambda rid: _flip(rid, 3),  # payload altered
        lambda rid: _flip(rid, len(rid) - 2),  # tag altered
        lambda rid: rid.split(".")[0],  # no tag
        lambda rid: rid + ".x",
        lambda rid: "",
        lambda rid: "r1",
        lambda rid: "é.é",
        lambda rid: "!!!.???",
        lambda rid: request_id.issue("stable", "v", b"another key", 1.0),
        lambda rid: rid.split(".")[0] + "." + request_id._b64(b"\x00" * 16),
    ],
)
def test_anything_not_issued_with_the_key_is_refused(forge: object) -> None:
    """Altered, truncated, malformed or signed with another key: None."""
    rid = request_id.issue("stable", "ctr_model:abc", KEY, 1.0)
    assert request_id.verify(forge(rid), KEY) is None  # type: ignore[operator]


def test_the_key_is_explicit_derived_or_shared_through_a_file(tmp_path: Path) -> None:
    """CTR_REQUEST_ID_KEY wins; else derived from the admin token (never the token itself);
    else one random key per data dir, the same for every process that reads it."""
    assert request_id.resolve_key("explicit", "tok", tmp_path) == b"explicit"
    derived = request_id.resolve_key("", "tok", tmp_path)
    assert derived == request_id.resolve_key("", "tok", tmp_path) and b"tok" not in derived and len(derived) == 32
    assert not (tmp_path / request_id.KEY_FILE).exists()
    a, b = request_id.resolve_key("", "", tmp_path), request_id.resolve_key("", "", tmp_path)
    assert a == b and len(a) == 32 and a != derived
    assert os.stat(tmp_path / request_id.KEY_FILE).st_mode & 0o777 == 0o600
    other = tmp_path / "other"
    other.mkdir()
    assert request_id.resolve_key("", "", other) != a


# --- the routes -------------------------------------------------------------------------


def _feedback(arm: str, event: str) -> float:
    return REGISTRY.get_sample_value("ctr_feedback_total", {"arm": arm, "event": event}) or 0.0


def test_predict_issues_a_signed_id_and_feedback_counts_under_its_arm(client: TestClient) -> None:
    """/predict's request_id verifies; /feedback with it is counted under the id's arm (not
    one the client names), and the client's X-Request-Id comes back as a header."""
    r = client.post("/predict", json=body(), headers={"x-request-id": "client-7"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-7"
    claims = request_id.verify(r.json()["request_id"], KEY)
    assert claims is not None and claims.arm == "stable" and claims.model_version == "ctr_model:test"
    before = _feedback("stable", "click"), _feedback("canary", "click")
    fb = {"request_id": r.json()["request_id"], "ad_id": "a1", "clicked": True, "arm": "canary"}
    ok = client.post("/feedback", json=fb)
    assert ok.status_code == 202 and ok.json() == {"accepted": True, "arm": "stable"}
    assert (_feedback("stable", "click"), _feedback("canary", "click")) == (before[0] + 1, before[1])


@pytest.mark.parametrize("rid", ["r1", "abc.def", request_id.issue("stable", "v", b"not the key", 1.0)])
def test_feedback_with_an_id_this_service_did_not_issue_is_refused(client: TestClient, rid: str) -> None:
    """An id the gateway never issued: 403, nothing counted (the old route accepted any id)."""
    before = _feedback("stable", "impression")
    r = client.post("/feedback", json={"request_id": rid, "ad_id": "a1", "clicked": False})
    assert r.status_code == 403 and "not issued by this service" in r.json()["error"]
    assert _feedback("stable", "impression") == before


@pytest.mark.parametrize("path", ["/predict", "/feedback", "/admin/features"])
@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_a_413(client: TestClient, path: str, chunked: bool) -> None:
    """Declared (Content-Length) or streamed without one, past CTR_MAX_BODY_BYTES: 413 (the
    old routes read and parsed any size)."""
    big = b'{"user_id": "' + b"x" * (LIMIT + 10) + b'"}'
    content = iter([big[:1000], big[1000:]]) if chunked else big
    r = client.post(path, content=content, headers=AUTH)
    assert r.status_code == 413 and "CTR_MAX_BODY_BYTES" in r.json()["error"]


def test_a_body_under_the_limit_of_1000_ads_is_accepted_by_default() -> None:
    """The default limit leaves room for 1000 ads of 128-character ids."""
    from ctr.settings import Settings

    payload = len(str(body("u" * 128, ["a" * 128] * 1000)).encode())
    assert Settings().max_body_bytes > 4 * payload


@pytest.mark.parametrize(
    "bad",
    [
        body("u\x001"),
        body("u1", ["a1", "a\x002"]),
        body("u1\n"),
        body("u\x7f"),
        body("u\x85"),
        body("u" * 129),
        body("u1", ["a" * 129]),
    ],
)
def test_ids_with_control_characters_or_too_long_are_a_422(client: TestClient, bad: dict) -> None:
    """NUL, newline, DEL, C1 controls, or over 128 characters: 422 naming the field (a NUL
    id used to reach PostgreSQL, fail there and count against the shared L3 breaker)."""
    r = client.post("/predict", json=bad)
    assert r.status_code == 422, r.text
    assert re.search(r"(user_id|ad_ids\.\d+): ", r.json()["error"])


def test_feedback_ad_id_with_a_nul_is_a_422(client: TestClient) -> None:
    """The same id rule holds on /feedback."""
    rid = request_id.issue("stable", "v", KEY, 1.0)
    r = client.post("/feedback", json={"request_id": rid, "ad_id": "a\x00", "clicked": True})
    assert r.status_code == 422 and "ad_id" in r.json()["error"]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ({"group": ["ad_stats"], "rows": [{"id": "a1", "values": [1, 2]}]}, "unknown feature group"),
        ({"group": {"x": 1}, "rows": [{"id": "a1", "values": [1, 2]}]}, "unknown feature group"),
        ({"group": "ad_stats", "rows": [{"id": "a\x00", "values": [1, 2]}]}, "control characters"),
        ({"group": "ad_meta", "rows": [{"id": "a1", "values": [1, 2, "t\x00"]}]}, "values.creative"),
        ({"group": "ad_stats", "rows": [{"id": "a1", "values": [2**63, 2]}]}, "below 2**53"),
        ({"group": "ad_stats", "rows": {"id": "a1"}}, "non-empty list"),
    ],
)
def test_admin_features_refuses_malformed_writes_with_a_422(client: TestClient, payload: dict, needle: str) -> None:
    """A list as `group`, control characters in an id or value, a huge int: 422, nothing written."""
    r = client.post("/admin/features", json=payload, headers=AUTH)
    assert r.status_code == 422 and needle in r.json()["error"], r.text


def test_openapi_lists_every_public_route(client: TestClient) -> None:
    """The gateway serves an OpenAPI document naming its routes and their statuses."""
    doc = client.get("/openapi.json").json()
    assert set(doc["paths"]) >= {"/predict", "/feedback", "/admin/features", "/model_info", "/livez", "/readyz"}
    assert "413" in doc["paths"]["/predict"]["post"]["responses"]
    assert "403" in doc["paths"]["/feedback"]["post"]["responses"]
    assert doc["components"]["schemas"]["PredictRequest"]["properties"]["user_id"]["maxLength"] == schema.MAX_ID_CHARS
