"""A scripted attacker against the real `bentoml serve service:CTRGateway` with a live canary
(a second CTRModel replica, `bentoml serve service:CTRModel`): replayed, cross-rollout,
forged, over-age and unserved-ad feedback, and lying scores, move no gate (issue 23, defect 1;
on the old gateway 3,000 replays of one id rolled a healthy canary back). The public status
of the same server shows no salt and no replica URL (defect 2)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import GATEWAY_INTERNAL_TOKEN, Server

from ctr.api.request_id import resolve_key
from ctr.bench.canary_attack import Attacker, attack

ADMIN = "test-token"  # the gateway fixture's CTR_ADMIN_TOKEN (its request id key derives from it)
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PLAN = {"phases": [{"share": 0.5, "duration_s": 3600}], "interval_s": 3600}  # no automatic decision


@pytest.fixture(scope="module")
def canary_replica(small_setup: dict[str, str]) -> Iterator[Server]:
    server = Server("service:CTRModel", {**small_setup, "CTR_INTERNAL_TOKEN": GATEWAY_INTERNAL_TOKEN})
    yield server
    server.stop()


def _start(gateway: Server, replica: Server) -> dict:
    r = httpx.post(gateway.url + "/admin/canary/start", headers=AUTH, timeout=10,
                   json={"model_tag": "ctr_model:attacked", "urls": [replica.url], "plan": PLAN})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _canary_ids(gateway: Server, n: int = 200, timeout_s: float = 30.0) -> list[str]:
    """Model-scored canary answers' ids, once every gateway process built the canary's pool."""

    async def go() -> list[str]:
        a = Attacker(gateway.url, ADMIN)
        try:
            out = [p for p in await a.answers(n) if p["arm"] == "canary"]
            return [p["request_id"] for p in out]
        finally:
            await a.close()

    deadline = time.monotonic() + timeout_s
    while True:
        ids = asyncio.run(go())
        if len(ids) >= n // 4 or time.monotonic() > deadline:
            return ids
        time.sleep(0.5)


def _rollback(gateway: Server) -> None:
    r = httpx.post(gateway.url + "/admin/canary/rollback", headers=AUTH, json={"reason": "end of test"}, timeout=10)
    assert r.status_code in (200, 409), r.text  # 409: nothing running


def test_a_scripted_attacker_moves_no_gate(gateway: Server, canary_replica: Server) -> None:
    key = resolve_key("", ADMIN, gateway.home)  # derived from the admin token: no file is read
    _start(gateway, canary_replica)
    try:
        old = _canary_ids(gateway)
        assert old, "the canary never answered"
    finally:
        _rollback(gateway)
    rollout = _start(gateway, canary_replica)
    try:
        assert _canary_ids(gateway)
        public = httpx.get(gateway.url + "/status.json", timeout=10).text + httpx.get(gateway.url + "/status").text
        assert rollout["salt"] not in public and canary_replica.url not in public and "127.0.0.1" not in public
        rep = asyncio.run(attack(gateway.url, ADMIN, key, users=300, replays=3000, old_ids=old[:200]))
    finally:
        _rollback(gateway)
    print("\n".join(rep.lines()))
    assert rep.moved() == []
    assert all(s.get(202, 0) == 0 for s in rep.attacks.values()), rep.attacks
    assert set(rep.attacks["replay, clicked (lift the canary's CTR)"]) == {409}
    assert set(rep.attacks["ad not served"]) == {409}
    assert set(rep.attacks["forged or altered id"]) == {403}
    assert set(rep.attacks["id past the maximum age (signed with the key)"]) == {410}
    assert set(rep.attacks["id of another rollout (signed with the key)"]) == {409}
    assert set(rep.attacks["id of an ended rollout"]) == {409}
    canary = rep.after["arms"]["canary"]
    assert rep.honest["canary"] > 20 and canary["impressions"] == rep.honest["canary"]
    assert canary["pred_sum"] == pytest.approx(rep.served_sum["canary"], rel=1e-4)  # served scores, not 0.99
