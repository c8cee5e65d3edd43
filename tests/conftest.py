"""Shared fixtures. The test process gets its own BentoML home and data directory, so
tests never touch (or depend on) the developer's model store."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import servers
from servers import free_port

_TMP = Path(tempfile.mkdtemp(prefix="ctr-tests-"))
os.environ["BENTOML_HOME"] = str(_TMP / "bentoml")
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
os.environ["CTR_DATA_DIR"] = str(_TMP / "data")
os.environ.pop("CTR_DATABASE_URL", None)
os.environ["CTR_REDIS_URL"] = ""  # tests name the Redis they use

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A small log: big enough for a model that beats chance clearly, small enough to train in seconds.
GATEWAY_INTERNAL_TOKEN = "gateway-fixture-internal-token"
SMALL = ["--users", "2000", "--ads", "300", "--impressions", "60000", "--max-epochs", "3"]


# Integration tests start real servers (Redis, PostgreSQL, `bentoml serve`, a container, a
# browser) or train models: a test needing one of these fixtures, a test of these modules (each
# about running servers), a tier test run against Redis, or one marked by hand. The rest are
# unit tests: `make test-fast` runs them alone (`-m "not integration"`), `make test` runs all.
SERVER_FIXTURES = {"redis_url", "cluster_url", "pg_url", "served_redis_url", "small_setup", "gateway"}
SERVER_MODULES = {"test_container", "test_soak", "test_fuzz", "test_status_browser", "test_canary_sim",
                  "test_canary_e2e", "test_canary_redis", "test_e2e", "test_faults", "test_pool_faults",
                  "test_internal", "test_writer_faults", "test_writes", "test_private_redis", "test_coherence",
                  "test_consistency", "test_canary_shadow_redis", "test_canary_shadow_e2e"}  # fmt: skip


def _integration(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(
        SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
        or item.module.__name__ in SERVER_MODULES  # type: ignore[attr-defined]
        or params.get("cache") in ("redis", "cluster")  # test_tiers' shared suite, against a real Redis
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _integration(item):
            item.add_marker(pytest.mark.integration)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with servers.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    with servers.redis_cluster() as url:
        yield url


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with servers.postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
def served_redis_url() -> Iterator[str]:
    """The served graphs' own Redis: their FeatureService runs a supervised write-behind
    writer on the stream, which would take entries meant for the writer tests' own writers
    if they shared the `redis_url` Redis."""
    with servers.redis_server() as url:
        yield url


@pytest.fixture(scope="session")
def small_setup(served_redis_url: str) -> dict[str, str]:
    """Generate a small click log, train a model into the test model store, load features;
    the environment the served processes get (with a private Redis as L2)."""
    redis_url = served_redis_url
    env = {**os.environ, "BENTOML_HOME": str(_TMP / "bentoml-e2e"), "CTR_DATA_DIR": str(_TMP / "data-e2e"),
           "CTR_REDIS_URL": redis_url, "CTR_ADMIN_TOKEN": "test-token"}  # fmt: skip
    subprocess.run([str(BIN / "ctr"), "setup", *SMALL], check=True, env=env, cwd=ROOT, capture_output=True)
    return env


def feedback_when_written(url: str, body: dict[str, Any], timeout_s: float = 5.0) -> httpx.Response:
    """POST /feedback, sent again while the answer is 503 `not_written_yet`: the documented
    answer when another gateway process takes the feedback before the serving one wrote the
    answer's record (within NOT_WRITTEN_YET_S); a client sends it again, as this does."""
    end = time.monotonic() + timeout_s
    while True:
        r = httpx.post(url + "/feedback", json=body, timeout=10)
        if r.status_code != 503 or "not_written_yet" not in r.text or time.monotonic() > end:
            return r
        time.sleep(0.1)


class Server:
    def __init__(self, target: str, env: dict[str, str], timeout_s: float = 90.0, wait: bool = True) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Each server gets its own BENTOML_HOME (a copy of the model store): servers sharing
        # one also share, and wipe at start-up, BentoML's Prometheus multiprocess directory.
        self.home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
        shutil.copytree(Path(env["BENTOML_HOME"]) / "models", self.home / "models")
        env = {**env, "BENTOML_HOME": str(self.home)}
        self.log = tempfile.NamedTemporaryFile(prefix="bentoml-serve-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        if wait:  # until /readyz answers 200
            self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready in {timeout_s} s: {Path(self.log.name).read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        import psutil

        if self.proc.poll() is None:
            try:  # BentoML's workers may leave the process group: remember them all first
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.Error:
                tree = []
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            _, alive = psutil.wait_procs(tree, timeout=5)
            for p in alive:  # a worker that did not stop (once: one hung in a deadlock) is killed
                p.kill()
        if not os.environ.get("CTR_TEST_KEEP_LOGS"):  # set it to keep the servers' logs for a post-mortem
            Path(self.log.name).unlink(missing_ok=True)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="session")
def gateway(small_setup: dict[str, str]) -> Iterator[Server]:
    """The real `bentoml serve service:CTRGateway` (every service of the graph) on a free port; its
    internal token is GATEWAY_INTERNAL_TOKEN, so a test can start a canary replica it may call."""
    env = {**small_setup, "CTR_MAX_ADS": "50", "CTR_INTERNAL_TOKEN": GATEWAY_INTERNAL_TOKEN}
    server = Server("service:CTRGateway", env)
    yield server
    server.stop()
