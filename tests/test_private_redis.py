"""`make serve` on a bare machine: with CTR_REDIS_URL at its default and nothing answering
there, a private Redis (append-only, files under the data directory) runs for the command's
lifetime; an explicit CTR_REDIS_URL (empty too) is left alone."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from servers import free_port

from ctr.cli import private_redis

# The child prints what it was given and asks the Redis it got for its append-only setting.
CHILD = """
import os, redis
url = os.environ.get("CTR_REDIS_URL")
print("URL", repr(url))
if url:
    r = redis.Redis.from_url(url)
    r.set("k", "v")
    print("AOF", r.config_get("appendonly")["appendonly"], r.config_get("dir")["dir"])
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CTR_REDIS_URL"}
    return {**env, "CTR_DATA_DIR": str(tmp_path), **extra}


def test_a_private_redis_runs_with_the_command_and_stops_after(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Nothing at the default URL: the command gets a private Redis with appendonly yes under
    <data>/redis, and it is gone when the command ends."""
    default = f"redis://127.0.0.1:{free_port()}/0"
    rc = private_redis.run([sys.executable, "-c", CHILD], _env(tmp_path), default_url=default)
    out, err = capfd.readouterr()
    assert rc == 0
    assert f"URL '{default}'" in out  # the default port was free: the default URL now answers
    assert f"AOF yes {tmp_path / 'redis'}" in out
    assert "started a private Redis" in err
    assert (tmp_path / "redis" / "redis.log").exists()
    assert not private_redis.answers(default)


def test_an_empty_url_runs_without_l2(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """CTR_REDIS_URL= (empty) is a choice: no Redis is started."""
    default = f"redis://127.0.0.1:{free_port()}/0"
    rc = private_redis.run([sys.executable, "-c", CHILD], _env(tmp_path, CTR_REDIS_URL=""), default_url=default)
    out, err = capfd.readouterr()
    assert rc == 0 and "URL ''" in out and "L2: off" in err
    assert not (tmp_path / "redis").exists()


def test_a_redis_already_answering_is_used(tmp_path: Path, redis_url: str, capfd: pytest.CaptureFixture[str]) -> None:
    """A Redis at the default URL: nothing is started, the command keeps the default."""
    rc = private_redis.run([sys.executable, "-c", "import os; print(os.environ.get('CTR_REDIS_URL'))"],
                           _env(tmp_path), default_url=redis_url)  # fmt: skip
    out, err = capfd.readouterr()
    assert rc == 0 and out.strip() == "None" and "answering" in err
    assert not (tmp_path / "redis").exists()


def test_the_command_exit_status_is_passed_on(tmp_path: Path) -> None:
    default = f"redis://127.0.0.1:{free_port()}/0"
    assert private_redis.run([sys.executable, "-c", "raise SystemExit(3)"], _env(tmp_path), default) == 3


def test_make_serve_on_a_machine_without_redis_answers_without_degradation(small_setup: dict[str, str]) -> None:
    """The serve target's wrapper around the real `bentoml serve`, with no Redis at the
    default URL: the service's first answer for a known user carries no degradation (no
    cache:l2:bypassed), and SIGTERM stops the service and then the private Redis."""
    import json
    import shutil
    import signal
    import subprocess
    import tempfile
    import time
    import urllib.request

    from conftest import BIN, ROOT

    default = f"redis://127.0.0.1:{free_port()}/0"
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    shutil.copytree(Path(small_setup["BENTOML_HOME"]) / "models", home / "models")
    env = {k: v for k, v in small_setup.items() if k != "CTR_REDIS_URL"}
    env.update(BENTOML_HOME=str(home))
    cmd = [str(BIN / "python"), "-m", "ctr.cli.private_redis", "--default-url", default, str(BIN / "bentoml"),
           "serve", "service:CTRGateway", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "not ready in 90 s"
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        assert private_redis.answers(default)
        body = {"user_id": "u3", "ad_ids": ["a1", "a2", "a3"],
                "context": {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1,
                            "conn_type": "wifi"}}  # fmt: skip
        req = urllib.request.Request(url + "/predict", json.dumps(body).encode(), {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            out = json.loads(r.read())
        assert out["degraded"] == [] and out["fallback"] is False
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(home, ignore_errors=True)
    err = proc.stderr.read() if proc.stderr else ""
    assert "started a private Redis" in err
    assert not private_redis.answers(default)
    assert (Path(small_setup["CTR_DATA_DIR"]) / "redis" / "appendonly.aof").exists() or any(
        (Path(small_setup["CTR_DATA_DIR"]) / "redis").glob("appendonly*")
    )
