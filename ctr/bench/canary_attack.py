"""A scripted attacker of the canary's gates through /feedback (issue 23), against a gateway
on loopback with a rollout running.

It plays a client that gets honest answers and then lies about them: it replays one canary
id thousands of times (clicked, to lift the canary's CTR; or not, to sink its calibration),
reports clicks on ads the answer never served, sends ids altered or signed with another key,
ids past the maximum age and ids of another rollout (the last two need the signing key: with
`key`, e.g. derived from the admin token, it makes them; `old_ids` are real ids of an ended
rollout), and claims a score of 0.99 for everything. Between an honest phase and the attack
it reads the gate counters (GET /admin/canary, after the gateways' sync): an attack that
moves no gate leaves them exactly as they were.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from ctr.api import request_id
from ctr.bench.loadgen import check_loopback

CTX = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"}
ADS = ["a1", "a2", "a3", "a4"]
COUNTED = ("impressions", "clicks", "scored", "scored_clicks", "pred_sum")  # what feedback adds to


@dataclass
class Report:
    honest: dict[str, int] = field(default_factory=dict)  # arm -> feedbacks counted in the honest phase
    served_sum: dict[str, float] = field(default_factory=dict)  # arm -> the served scores they carried
    attacks: dict[str, Counter[int]] = field(default_factory=dict)  # attack -> statuses
    before: dict[str, Any] = field(default_factory=dict)  # GET /admin/canary after the honest phase
    after: dict[str, Any] = field(default_factory=dict)  # ... and after the attack

    def moved(self) -> list[str]:
        """What the attack changed in the gates' counters or verdicts (empty: nothing)."""
        out = []
        for arm in ("stable", "canary"):
            a, b = self.before["arms"][arm], self.after["arms"][arm]
            out += [f"{arm}.{k}: {a[k]} -> {b[k]}" for k in COUNTED if a[k] != b[k]]
        for gate, g in self.before.get("gates", {}).items():
            h = self.after["gates"][gate]
            if (g["verdict"], g["estimate"], g["interval"]) != (h["verdict"], h["estimate"], h["interval"]):
                out.append(f"gate {gate}: {g['verdict']} {g['estimate']} -> {h['verdict']} {h['estimate']}")
        return out

    def lines(self) -> list[str]:
        out = ["| attack | sent | answers | counted |", "|---|---|---|---|"]
        for name, statuses in self.attacks.items():
            answers = ", ".join(f"{n} × {s}" for s, n in sorted(statuses.items()))
            out.append(f"| {name} | {sum(statuses.values()):,} | {answers} | {statuses.get(202, 0)} |")
        moved = self.moved()
        out.append("gates moved: " + ("; ".join(moved) if moved else "none (every counter and verdict as before)"))
        return out


def _altered(rid: str) -> list[str]:
    payload, tag = rid.split(".")
    flip = lambda s, i: s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1 :]  # noqa: E731
    fake = base64.urlsafe_b64encode(b'["canary","x",1.0,"n",0,"","x"]').rstrip(b"=").decode()
    return [flip(payload, 5) + "." + tag, payload + "." + flip(tag, 3), fake + "." + tag, payload, payload + ".x"]


class Attacker:
    def __init__(self, url: str, admin_token: str, key: bytes | None = None, concurrency: int = 32) -> None:
        check_loopback(url)
        self.url, self.key = url.rstrip("/"), key
        self.auth = {"Authorization": f"Bearer {admin_token}"}
        self.sem = asyncio.Semaphore(concurrency)
        self.predicting = asyncio.Semaphore(4)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=10)

    async def predict(self, user: str) -> dict[str, Any]:
        async with self.predicting:  # few at a time: past the gateway's concurrency limit answers are shed
            r = await self.http.post("/predict", json={"user_id": user, "ad_ids": ADS, "context": CTX})
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    async def feedback(self, rid: str, ad: str, clicked: bool, score: float = 0.99) -> int:
        async with self.sem:
            body = {"request_id": rid, "ad_id": ad, "clicked": clicked, "score": score}
            return (await self.http.post("/feedback", json=body)).status_code

    async def status(self) -> dict[str, Any]:
        r = await self.http.get("/admin/canary", headers=self.auth)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    async def settled(self, wait_s: float) -> dict[str, Any]:
        """GET /admin/canary once every gateway process has flushed (two syncs apart, equal)."""
        last = None
        for _ in range(20):
            await asyncio.sleep(wait_s)
            s = await self.status()
            key = {a: {k: s["arms"][a][k] for k in COUNTED} for a in ("stable", "canary")}
            if key == last:
                return s
            last = key
        raise TimeoutError("the canary's counters did not settle")

    async def answers(self, users: int) -> list[dict[str, Any]]:
        out = await asyncio.gather(*(self.predict(f"attack-u{i}") for i in range(users)))
        return [p for p in out if not p["fallback"]]

    async def run(self, users: int = 400, replays: int = 3000, old_ids: Sequence[str] = (),
                  sync_wait_s: float = 1.5) -> Report:  # fmt: skip
        """The honest phase, the counters, the attack, the counters again."""
        rep = Report()
        answers = await self.answers(users)
        await asyncio.sleep(2.0)  # every gateway process has written what its answers served
        for arm in ("stable", "canary"):
            mine = [p for p in answers if p["arm"] == arm]
            fbs = [self.feedback(p["request_id"], ADS[0], i % 10 == 0) for i, p in enumerate(mine)]
            counted = [p for p, code in zip(mine, await asyncio.gather(*fbs), strict=True) if code == 202]
            rep.honest[arm] = len(counted)
            rep.served_sum[arm] = sum(p["scores"][0] for p in counted)
        rep.before = await self.settled(sync_wait_s)
        canary = [p for p in answers if p["arm"] == "canary"]
        if not canary:
            raise RuntimeError("no model-scored canary answer: is a rollout running with a live canary?")
        rid, ids = canary[0]["request_id"], [p["request_id"] for p in canary]
        fb = self.feedback
        attacks: dict[str, list[Any]] = {
            "replay, clicked (lift the canary's CTR)": [fb(rid, ADS[0], True) for _ in range(replays)],
            "replay, not clicked (sink its calibration)": [fb(rid, ADS[0], False) for _ in range(replays // 3)],
            "ad not served": [fb(r, f"a{900 + i}", True) for i, r in enumerate(ids[:100])],
            "forged or altered id": [fb(f, ADS[1], True) for r in ids[:40] for f in _altered(r)],
            "id of an ended rollout": [fb(r, ADS[1], True) for r in old_ids],
        }
        if self.key is not None:
            now, rollout = time.time(), canary[0]["request_id"]
            claims = request_id.verify(rollout, self.key)
            if claims is None:
                raise ValueError("the key given does not verify the gateway's ids")
            old = [request_id.issue("canary", claims.model_version, self.key, now - 86_400, 0, claims.rollout,
                                    claims.ads, claims.nonce) for _ in range(100)]  # fmt: skip
            other = [request_id.issue("canary", claims.model_version, self.key, now, 0, "another-rollout", claims.ads,
                                      claims.nonce) for _ in range(100)]  # fmt: skip
            attacks["id past the maximum age (signed with the key)"] = [self.feedback(r, ADS[0], True) for r in old]
            attacks["id of another rollout (signed with the key)"] = [self.feedback(r, ADS[0], True) for r in other]
        for name, calls in attacks.items():
            if calls:
                rep.attacks[name] = Counter(await asyncio.gather(*calls))
        rep.after = await self.settled(sync_wait_s)
        return rep

    async def close(self) -> None:
        await self.http.aclose()


async def attack(url: str, admin_token: str, key: bytes | None = None, **kw: Any) -> Report:
    a = Attacker(url, admin_token, key)
    try:
        return await a.run(**kw)
    finally:
        await a.close()
