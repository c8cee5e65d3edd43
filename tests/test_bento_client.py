"""BentoML's own client against the real entry (`bentoml serve service:CTRGateway`): the
`predict` API answers the README's example with the same contract and the same scores as the
lean POST /predict mount, and refuses what /predict refuses."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import bentoml
import pytest
from bentoml.exceptions import BentoMLException
from conftest import Server

CTX = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"}
EXAMPLE = {"user_id": "u42", "ad_ids": ["a7", "a19", "a3"], "context": CTX}


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + "/predict", json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_the_sync_client_returns_the_scores_of_predict(gateway: Server) -> None:
    """`bentoml.SyncHTTPClient(url).predict(...)` answers the README's example like /predict."""
    with bentoml.SyncHTTPClient(gateway.url) as client:
        out = client.predict(**EXAMPLE)
    assert set(out) == {"request_id", "scores", "model_version", "arm", "fallback", "degraded"}
    assert len(out["scores"]) == 3 and all(0 < s < 1 for s in out["scores"])
    assert out["fallback"] is False and out["arm"] == "stable"
    plain = _post(gateway.url, EXAMPLE)
    assert out["scores"] == pytest.approx(plain["scores"], rel=1e-6) and out["model_version"] == plain["model_version"]


def test_bentoml_lists_the_api_and_predict_stays_the_mount(gateway: Server) -> None:
    """BentoML's schema lists the API at its own route; /predict answers as before."""
    with urllib.request.urlopen(gateway.url + "/schema.json", timeout=5) as r:
        routes = {e["route"] for e in json.loads(r.read())["routes"]}
    assert "/bentoml/predict" in routes
    with urllib.request.urlopen(gateway.url + "/docs.json", timeout=5) as r:
        assert "/bentoml/predict" in json.loads(r.read())["paths"]  # BentoML's OpenAPI, hence its UI
    assert len(_post(gateway.url, EXAMPLE)["scores"]) == 3


@pytest.mark.parametrize(
    "body",
    [
        {**EXAMPLE, "context": {**CTX, "hour": 24}},
        {**EXAMPLE, "ad_ids": []},
        {**EXAMPLE, "ad_ids": [f"a{i}" for i in range(51)]},  # over CTR_MAX_ADS=50
        {**EXAMPLE, "user_id": "u\x00"},
    ],
    ids=["hour", "no-ads", "too-many-ads", "control-char"],
)
def test_the_client_gets_a_client_error_for_bad_input(gateway: Server, body: dict[str, Any]) -> None:
    """What /predict refuses with a 4xx, the BentoML API refuses with a 4xx too (never a 5xx)."""
    with bentoml.SyncHTTPClient(gateway.url) as client, pytest.raises(BentoMLException) as err:
        client.predict(**body)
    assert 400 <= int(err.value.error_code) < 500, err.value
