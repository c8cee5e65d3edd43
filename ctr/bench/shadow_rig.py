"""The shadow phase on real servers: a gateway run alone (`ctr serve --service CTRGateway`, its
processes sharing a private Redis for the canary), a stable CTRModel and canary CTRModel
replicas on loopback; and the benchmark of /predict's latency with the shadow phase on and off.

`python -m ctr.bench.shadow_rig --rate 150 --duration-s 15 --rounds 3` starts the rig (the
repository's model store and data, `make setup`), then alternates open-loop runs at a fixed
arrival rate, in ABBA order: off (no rollout), on (a rollout in its shadow phase, `--sample` of
the requests shadowed, 1 % by default), and prints each run's p50/p99 and the medians. On one
machine the canary replica shares the gateway's cores: at `--sample 1` its work competes with
stable's (in a deployment it runs on its own pods). Used by
tests/test_canary_shadow_e2e.py for the rig alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctr.bench.cluster import Cluster
from ctr.bench.local_server import free_port

TOKEN = "shadow-rig-token"


@dataclass
class Rig:
    cluster: Cluster
    url: str  # the gateway
    stable_url: str
    canary_urls: dict[str, str]  # name -> CTRModel URL
    token: str

    def admin(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """GET (no body) or POST an admin endpoint with the bearer token."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data, {"authorization": f"Bearer {self.token}",
                                                              "content-type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            out: dict[str, Any] = json.loads(r.read())
            return out

    def start_shadow(self, canary: str, shadow_s: float, interval_s: float = 1.0, split_share: float = 0.5) -> str:
        """A rollout of `canary` whose plan begins with a shadow phase of `shadow_s`; its id."""
        plan = {
            "phases": [
                {"share": 0, "duration_s": shadow_s, "shadow": True},
                {"share": split_share, "duration_s": 3600},
            ],
            "interval_s": interval_s,
            "max_phase_factor": 1000,
        }  # fmt: skip  (no hold while a test's traffic is slow)
        body = {"model_tag": f"ctr_model:{canary}", "urls": [self.canary_urls[canary]], "plan": plan}
        return str(self.admin("/admin/canary/start", body)["id"])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server on a free port (no persistence), stopped after."""
    port, d = free_port(), tempfile.mkdtemp(prefix="shadow-redis-")
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                          "no", "--dir", d], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            if time.monotonic() > deadline:
                raise TimeoutError("private redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        p.terminate()
        p.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def rig(env: Mapping[str, str], canary_redis_url: str, canaries: Mapping[str, Mapping[str, str]],
        gateway_env: Mapping[str, str] | None = None) -> Iterator[Rig]:  # fmt: skip
    """A stable CTRModel, one CTRModel per entry of `canaries` (its extra settings), and a gateway
    run alone over them; every process stopped after."""
    c = Cluster()
    token = env.get("CTR_ADMIN_TOKEN") or TOKEN
    try:
        stable = c.start("CTRModel", free_port(), env)
        urls = {name: c.start("CTRModel", free_port(), {**env, **extra}).url for name, extra in canaries.items()}
        c.wait()
        gw_env = {**env, "CTR_MODEL_URLS": stable.url, "CTR_CANARY_REDIS_URL": canary_redis_url,
                  "CTR_ADMIN_TOKEN": token, "CTR_CANARY_SYNC_S": "0.2", **(gateway_env or {})}  # fmt: skip
        gw = c.start("CTRGateway", free_port(), gw_env)
        c.wait()
        yield Rig(c, gw.url, stable.url, urls, token)
    finally:
        c.stop()


def latency_runs(r: Rig, rate: float, duration_s: float, rounds: int, data_dir: Path) -> list[tuple[str, float, float]]:
    """Alternated open-loop runs, off then on, `rounds` times: (mode, p50 ms, p99 ms) each."""
    from ctr.bench.loadgen import Traffic, check_loopback, open_level

    check_loopback(r.url)
    bodies = Traffic(data_dir, 10).bodies(2000)
    out: list[tuple[str, float, float]] = []
    asyncio.run(open_level(r.url, rate, 5.0, bodies))  # warm-up
    for i in range(rounds):
        for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):  # ABBA: drift of a shared machine cancels
            if mode == "on":
                r.start_shadow("canary", shadow_s=3600.0)
                time.sleep(1.0)  # every process syncs the rollout (CTR_CANARY_SYNC_S) and builds the canary pool
            res = asyncio.run(open_level(r.url, rate, duration_s, bodies))
            if mode == "on":
                r.admin("/admin/canary/rollback", {"reason": f"benchmark round {i} done"})
                time.sleep(1.0)
            out.append((mode, res.p50_ms, res.p99_ms))
            print(f"round {i} shadow {mode:3s}: {res.requests} requests, p50 {res.p50_ms:.2f} ms, "
                  f"p99 {res.p99_ms:.2f} ms, fallback {res.fallback}, non-200 {res.non_200}", flush=True)  # fmt: skip
    return out


def offer_cost(n: int = 100_000) -> dict[str, float]:
    """What the shadow phase adds to a request's own path, in process: microseconds per
    `Shadow.offer` with no shadow phase, in one with the request not sampled, and sampled (the
    background task created; its work runs after the answer)."""
    import numpy as np

    from ctr.serving.canary.controller import Controller
    from ctr.serving.canary.plan import default_plan
    from ctr.serving.canary.runtime import CanaryRuntime
    from ctr.serving.canary.shadow import MemoryShadowStore, Shadow
    from ctr.serving.canary.state import Arm, MemoryStore

    class Pool:
        async def submit(self, x: np.ndarray, key: str | None = None) -> np.ndarray:
            return np.full(len(x), 0.05)

    async def go() -> dict[str, float]:
        store = MemoryStore()
        runtime = CanaryRuntime(store, Controller(store))
        arms = type("Arms", (), {"runtime": runtime, "canary": Pool()})()
        x, ads, scores = np.zeros((10, 27), np.int64), [f"a{i}" for i in range(10)], [0.05] * 10
        out: dict[str, float] = {}
        for label, sample, active in (("no shadow phase", 1.0, False), ("not sampled", 0.0, True),
                                      ("sampled", 1.0, True)):  # fmt: skip
            tap = Shadow(arms, MemoryShadowStore(), sample, max_inflight=2000)  # type: ignore[arg-type]
            if active and runtime.rollout is None:
                await runtime.controller.start(Arm("a"), Arm("b", ("http://c",)), default_plan(shadow_s=3600))
                await runtime.sync()
            tap.refresh()
            took = 0.0
            for i in range(0, n, 1000):
                t0 = time.perf_counter()
                for j in range(i, i + 1000):
                    tap.offer(f"r{j}", f"u{j}", ads, x, scores)
                took += time.perf_counter() - t0
                if tap.tasks:
                    await asyncio.gather(*tap.tasks)
            out[label] = took / n * 1e6
        return out

    return asyncio.run(go())


def main() -> None:
    import argparse

    from ctr.settings import PROJECT_ROOT

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=150.0, help="Requests/s (open loop).")
    ap.add_argument("--duration-s", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="Gateway processes.")
    ap.add_argument("--sample", type=float, default=0.01, help="CTR_CANARY_SHADOW_SAMPLE while on.")
    ap.add_argument("--offer-cost", action="store_true", help="Only time Shadow.offer in process (no servers).")
    a = ap.parse_args()
    if a.offer_cost:
        for label, us in offer_cost().items():
            print(f"Shadow.offer, {label}: {us:.2f} us per request")
        return
    env = {**os.environ}
    env.setdefault("BENTOML_HOME", str(PROJECT_ROOT / "bentoml_home"))
    data_dir = Path(env.get("CTR_DATA_DIR", PROJECT_ROOT / "data"))
    gateway_env = {"CTR_CANARY_SHADOW_SAMPLE": str(a.sample), "CTR_GATEWAY_WORKERS": str(a.workers),
                   "CTR_WARM": "false"}  # fmt: skip
    with redis_server() as redis_url, rig(env, redis_url, {"canary": {}}, gateway_env) as r:
        runs = latency_runs(r, a.rate, a.duration_s, a.rounds, data_dir)
        r.admin("/admin/canary")  # the rig still answers
    for mode in ("off", "on"):
        p50s = [p50 for m, p50, _ in runs if m == mode]
        p99s = [p99 for m, _, p99 in runs if m == mode]
        med50, med99 = statistics.median(p50s), statistics.median(p99s)
        runs_99 = ", ".join(f"{x:.2f}" for x in p99s)
        print(f"shadow {mode}: median p50 {med50:.2f} ms, median p99 {med99:.2f} ms (p99 per run: {runs_99})")


if __name__ == "__main__":
    main()
