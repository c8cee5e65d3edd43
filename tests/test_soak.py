"""The soak under faults, with real processes: open-loop /predict load at a steady rate and
a stream of write-behind feature writes while, on a schedule, Redis is restarted, the
CTRModel process is killed, PostgreSQL (L3) is restarted and the model is slowed.

`make test` runs a bounded version (SOAK_S=60 by default, a modest rate); `make soak`
runs 10 minutes at about 70 % of the capacity it measures first, and writes the report to
reports/soak.md. Asserted: every request answered (no 5xx, no connection error), and every
acknowledged feature write found in L3 at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest
from conftest import BIN, ROOT, Server
from servers import PostgresProcess, RedisProcess

from ctr.bench import loadgen, soak
from ctr.bench.profile import service_workers

DURATION_S = float(os.environ.get("SOAK_S", "60"))
RATE = os.environ.get("SOAK_RATE", "")  # requests/s; default 70 % of measured capacity (long runs) or 100
REPORT = os.environ.get("SOAK_REPORT", "")
N_ADS = 20


@pytest.fixture(scope="module")
def rig(small_setup: dict[str, str]) -> Iterator[tuple[Server, RedisProcess, PostgresProcess, dict[str, str]]]:
    """The whole graph over a private Redis (L2, write-behind stream) and PostgreSQL (L3).
    Redis fsyncs every write to its append-only file before answering: what the write-behind
    durability claim needs (README), so its SIGKILL loses no acknowledged write."""
    redis, pg = RedisProcess("--appendonly", "yes", "--appendfsync", "always"), PostgresProcess()
    env = {**small_setup, "CTR_REDIS_URL": redis.url, "CTR_DATABASE_URL": pg.url, "CTR_BREAKER_WINDOW_S": "2",
           "CTR_BREAKER_MIN_CALLS": "5", "CTR_BREAKER_COOLDOWN_S": "0.5",
           "CTR_MODEL_REPLICA": "in-graph"}  # the schedule kills the CTRModel process  # fmt: skip
    subprocess.run([str(BIN / "ctr"), "features", "load"], check=True, env=env, cwd=ROOT, capture_output=True)
    server = Server("service:CTRGateway", env)
    try:
        yield server, redis, pg, env
    finally:
        server.stop()
        redis.close()
        pg.close()


def rss_by_process(server: Server) -> dict[str, int]:
    out = {"bentoml serve (arbiter)": psutil.Process(server.proc.pid).memory_info().rss}
    for name, pid in service_workers(server.proc.pid).items():
        with contextlib.suppress(psutil.NoSuchProcess):
            out[name] = psutil.Process(pid).memory_info().rss
    return out


class Slowed:
    """The model slowed, not frozen: SIGSTOP/SIGCONT in turns of `period_s` (half stopped)."""

    def __init__(self, server: Server, period_s: float = 0.06) -> None:
        self.server, self.period_s = server, period_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        pid = service_workers(self.server.proc.pid)["ctr_model"]
        try:
            while not self._stop.is_set():
                os.kill(pid, signal.SIGSTOP)
                time.sleep(self.period_s / 2)
                os.kill(pid, signal.SIGCONT)
                time.sleep(self.period_s / 2)
        except ProcessLookupError:
            pass
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def schedule(server: Server, redis: RedisProcess, pg: PostgresProcess, duration_s: float) -> list[soak.Fault]:
    """Four faults spread over the run, each held for a while, with recovery time between."""
    hold = min(20.0, max(3.0, duration_s / 20))
    slowed = Slowed(server)

    def kill_model() -> None:
        psutil.Process(service_workers(server.proc.pid)["ctr_model"]).kill()

    def wait_model_back() -> None:  # BentoML restarts the worker by itself
        deadline = time.monotonic() + 30
        while "ctr_model" not in service_workers(server.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)

    def redis_restart() -> None:
        redis.start()

    return [
        soak.Fault(duration_s * 0.10, "redis restarted", redis.kill, redis_restart, hold),
        soak.Fault(duration_s * 0.30, "CTRModel killed", kill_model, wait_model_back, 0.0),
        soak.Fault(duration_s * 0.50, "PostgreSQL restarted", pg.stop, pg.start, hold),
        soak.Fault(duration_s * 0.70, "model slowed", slowed.start, slowed.stop, hold),
    ]


async def _count_in_l3(url: str, ids: list[str]) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(await con.fetchval("SELECT count(*) FROM features WHERE entity_id = ANY($1::text[])", ids))
    finally:
        await con.close()


def count_in_l3(url: str, ids: list[str], settle_s: float = 30.0) -> int:
    """Acknowledged ids found in L3, once the writer has caught up (or `settle_s` passed)."""
    deadline, found = time.monotonic() + settle_s, -1
    while time.monotonic() < deadline:
        try:
            found = asyncio.run(_count_in_l3(url, ids))
        except (OSError, asyncpg.PostgresError):
            found = -1
        if found == len(ids):
            break
        time.sleep(1)
    return found


def capacity(url: str, data_dir: Path) -> float:
    """Model-scored rps of a short closed-loop run at c=16 (the soak's 100 %)."""
    (row,) = loadgen.run_levels(url, [16], 5.0, N_ADS, data_dir)
    return row.model_rps


@pytest.mark.timeout(DURATION_S + 420)  # the run itself, plus start-up, capacity, the writer's catch-up
def test_soak_under_faults(rig: tuple[Server, RedisProcess, PostgresProcess, dict[str, str]]) -> None:
    """Through Redis and PostgreSQL restarts, a killed and a slowed model: every request is
    answered, and every acknowledged write-behind feature write reaches L3."""
    server, redis, pg, env = rig
    data_dir = Path(env["CTR_DATA_DIR"])
    if RATE:
        rate = float(RATE)
    elif DURATION_S >= 300:
        rate = 0.7 * capacity(server.url, data_dir)
    else:
        rate = 100.0
    bodies = loadgen.Traffic(data_dir, N_ADS, seed=3).bodies(2000)
    loadgen.run_levels(server.url, [4], 2.0, N_ADS, data_dir, warm_up=False)  # warm the caches
    rss_start = rss_by_process(server)
    prefix = f"soak-{uuid.uuid4().hex[:6]}-"
    traffic = soak.run(server.url, rate, DURATION_S, bodies, schedule(server, redis, pg, DURATION_S),
                       env["CTR_ADMIN_TOKEN"], prefix=prefix)  # fmt: skip
    rss_end = rss_by_process(server)
    in_l3 = count_in_l3(pg.url, traffic.acknowledged)
    bucket_s = 60.0 if DURATION_S >= 300 else 10.0
    text = soak.report(traffic, bucket_s, DURATION_S, rate, rss_start, rss_end, in_l3)
    print("\n" + text)
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(text + "\n")
    errors = [s for s in traffic.samples if s.outcome == "error"]
    assert len(traffic.samples) >= 0.95 * rate * DURATION_S
    assert errors == [], f"{len(errors)} requests not answered 200, first at {errors[0].t_s:.1f} s"
    assert len(traffic.acknowledged) > 0
    assert in_l3 == len(traffic.acknowledged), (
        f"{len(traffic.acknowledged)} writes acknowledged, {in_l3} in L3 (issue 15 item 1: the write-behind writer)"
    )
