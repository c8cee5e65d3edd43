"""Every command the README and docs/ show runs as written: each `ctr` command (with bounded
budgets, against real servers) and each `make` target. A documented command without an entry
in RUNS, MAKE or ELSEWHERE fails the first test, so a new one cannot go unrun.

What ran is listed in the pytest output (one case per command) and in
reports/documented-commands.md. Commands whose run is a test of its own elsewhere (an image
build, whole canary rollouts, a Locust run needing the `load` extra) name that test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from conftest import BIN, ROOT, SMALL, Server
from servers import free_port

from ctr.cli import main

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REPORT = ROOT / "reports" / "documented-commands.md"


@dataclass(frozen=True)
class Run:
    """How the test runs one documented command: `argv` after `ctr` ({url}, {port}, {tmp},
    {token} filled in); `until` "exit" (exit 0 within `timeout_s`), "ready" (a server: /readyz
    answers 200 on {port}, then it is stopped) or "alive" (a worker: still running after 3 s)."""

    argv: str
    until: str = "exit"
    timeout_s: float = 180.0


RUNS: dict[str, Run] = {
    "": Run("--help"),
    "setup": Run("setup " + " ".join(SMALL)),
    "data generate": Run("data generate " + " ".join(SMALL[:6])),
    "train": Run("train --max-epochs 3"),
    "features load": Run("features load"),
    "features put": Run("features put ad_stats a7 [5200,210]"),
    "features warm": Run("features warm --top-users 100"),
    "features writer": Run("features writer --consumer documented-commands", until="alive"),
    "features": Run("features --help"),
    "serve": Run("serve --service FallbackService --port {port}", until="ready", timeout_s=120),
    "status": Run("status --url {url} --width 120"),
    "cluster stop": Run("cluster stop"),
    "bench stages": Run("bench stages --requests 50"),
    "bench http": Run("bench http --requests 50 --rounds 1"),
    "bench features": Run("bench features --requests 50"),
    "bench precision": Run("bench precision --calls 20"),
    "bench batching": Run("bench batching --requests 20"),  # failed with 401 before its token fix
    "bench l1": Run("bench l1 --against HEAD --rounds 1 --requests 50"),
    "bench coalescing": Run("bench coalescing --concurrency 1,2 --duration 0.5 --passes 1"),
    "bench e2e": Run(
        "bench e2e --url {url} --concurrency 1 --duration 1 --ads 10 --no-peers --rates none --passes 1 "
        "--out {tmp}/bench_e2e.json"
    ),
    "bench api": Run("bench api --url {url} --concurrency 1 --duration 1 --ads 10 --passes 1"),
    "bench steady": Run("bench steady --url {url} --duration 2 --runs 1 --saturation 40 --out {tmp}/steady.md"),
    "bench pool": Run("bench pool --policies round_robin --concurrency 2 --duration 1 --ads 10 --ejection on"),
    "bench profile": Run(
        "bench profile --url http://127.0.0.1:{port} --concurrency 2 --duration 2 --ads 10 --out {tmp}/profile"
    ),
    "bench": Run("bench --help"),
    "capacity": Run("capacity --peak-qps 1000 --bench {tmp}/bench_e2e.json"),
    "canary status": Run("canary status --url {url} --token {token}"),
    "canary": Run("canary --help"),
    "eval degradation": Run("eval degradation"),
}
# Documented, run by a test of their own (or needing what `make test` does not install).
ELSEWHERE: dict[str, str] = {
    "cluster": "tests/test_pool_faults.py starts the same topology (ctr.bench.cluster)",
    "loadtest": "needs the `load` extra (Locust); `make loadtest` installs it",
    "bench overload": "starts the service four times over; its table is tests/test_profile.py's, its limit "
    "tests/test_limit.py's",
    "canary start": "tests/test_canary_e2e.py drives a rollout through the admin API",
    "canary pause": "tests/test_canary_e2e.py",
    "canary resume": "tests/test_canary_e2e.py",
    "canary promote": "tests/test_canary_e2e.py",
    "canary rollback": "tests/test_canary_e2e.py",
    "canary simulate": "tests/test_canary_sim.py (whole rollouts with trained models)",
    "canary attack": "tests/test_canary_attack.py (the same attacker against a real bentoml serve and a live canary)",
    "ship bento": "tests/test_container.py (make bento)",
    "ship image": "tests/test_container.py (make image: builds an OCI image)",
    "ship smoke": "tests/test_container.py (make smoke)",
    "ship": "tests/test_container.py",
}
# make targets: `lint` runs; the others are checked to exist and to run (make -n) the `ctr`
# commands above, or are the suites named here.
MAKE_RUN = {"lint"}
MAKE: dict[str, str] = {
    "serve": "the served fixtures run its `bentoml serve service:CTRGateway`",
    "test": "this suite",
    "setup": "`ctr setup` above",
    "install": "the venv this suite runs in",
    "lint": "run here",
    "bench": "`ctr bench e2e` above",
    "loadtest": "`ctr loadtest`, see above",
    "fuzz": "tests/test_fuzz.py (make test runs it bounded)",
    "soak": "tests/test_soak.py (make test runs it for 60 s)",
    "bento": "tests/test_container.py",
    "image": "tests/test_container.py",
    "smoke": "tests/test_container.py",
    "canary-sim": "tests/test_canary_sim.py",
    "test-fast": "the unit tests of this suite (-m 'not integration')",
    "consistency": "tests/test_consistency.py (make test runs it for 40 s)",
    "cluster": "tests/test_pool_faults.py",
    "cluster-stop": "`ctr cluster stop` above",
    "servers": "the servers this suite starts",
    "clean": "not run: it deletes the venv this suite runs in",
}
RESULTS: list[tuple[str, str, str]] = []


def _command_path(words: list[str]) -> str:
    """The longest prefix of `words` that names a `ctr` command or group."""
    cmd: click.Command = main
    path: list[str] = []
    for w in words:
        sub = cmd.commands.get(w) if isinstance(cmd, click.Group) else None
        if sub is None:
            break
        cmd, path = sub, [*path, w]
    return " ".join(path)


def documented() -> tuple[set[str], set[str]]:
    """The `ctr` commands and `make` targets the README and docs/ show (in code spans and blocks)."""
    ctr, make = set(), set()
    for page in PAGES:
        text = page.read_text()
        spans = re.findall(r"```.*?```|`[^`\n]+`", text, flags=re.S)
        for span in spans:
            for m in re.finditer(r"(?:^|[\s`(])ctr((?: [a-z][a-z0-9-]*)*)", span):
                ctr.add(_command_path(m.group(1).split()))
            make.update(re.findall(r"(?:^|[\s`(])make ([a-z][a-z-]*)", span))
    return ctr, make


def test_every_documented_command_has_a_run() -> None:
    """Each documented `ctr` command is run here or names the test that runs it; each make target too."""
    ctr, make = documented()
    assert ctr - RUNS.keys() - ELSEWHERE.keys() == set()
    assert make - MAKE.keys() == set()
    assert {"bench batching", "status", "bench api"} <= ctr


@pytest.fixture(scope="module")
def env(small_setup: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """small_setup's environment with a BentoML home of its own (servers wipe their home's
    Prometheus directory at start-up)."""
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-"))
    shutil.copytree(Path(small_setup["BENTOML_HOME"]) / "models", home / "models")
    yield {**small_setup, "BENTOML_HOME": str(home), "CTR_LOG_LEVEL": "WARNING"}
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("documented")


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _run(name: str, spec: Run, env: dict[str, str], url: str, tmp: Path) -> str:
    """Run one command as the spec says; what happened, in one line (raises on failure)."""
    port = free_port()
    argv = [a.format(url=url, port=port, tmp=tmp, token=env["CTR_ADMIN_TOKEN"]) for a in spec.argv.split()]
    cmd = [str(BIN / "ctr"), *argv]
    t0 = time.monotonic()
    if spec.until == "exit":
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=spec.timeout_s)
        tail = done.stdout[-2000:] + done.stderr[-2000:]
        assert done.returncode == 0, f"{' '.join(argv)}: exit {done.returncode}\n{tail}"
        return f"exit 0 in {time.monotonic() - t0:.1f} s"
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        end = t0 + (3.0 if spec.until == "alive" else spec.timeout_s)
        while time.monotonic() < end and proc.poll() is None:
            if spec.until == "ready" and _ready(port):
                return f"/readyz 200 after {time.monotonic() - t0:.1f} s, stopped"
            time.sleep(0.2)
        if spec.until == "alive" and proc.poll() is None:
            return "running after 3 s, stopped"
        exited = proc.poll() is not None
        out = proc.stdout.read() if exited and proc.stdout else ""
        state = f"exited {proc.returncode}" if exited else "not ready"
        raise AssertionError(f"{' '.join(argv)}: {state}\n{out[-2000:]}")
    finally:
        _stop(proc)


@pytest.mark.parametrize("name", list(RUNS), ids=lambda n: f"ctr {n}".strip())
def test_the_documented_ctr_command_runs(name: str, env: dict[str, str], gateway: Server, tmp: Path) -> None:
    """`ctr <name>`, with a bounded budget, against the shared gateway where it needs one."""
    spec = RUNS[name]
    try:
        what = _run(name, spec, env, gateway.url, tmp)
    except BaseException as exc:
        RESULTS.append((f"ctr {spec.argv}", "FAILED", str(exc).splitlines()[0][:120]))
        raise
    RESULTS.append((f"ctr {spec.argv}", "ran", what))


@pytest.mark.parametrize("target", list(MAKE), ids=lambda t: f"make {t}")
def test_the_documented_make_target_exists(target: str) -> None:
    """`make <target>` is in the Makefile (make -n); `make lint` runs."""
    args = ["make", target] if target in MAKE_RUN else ["make", "-n", target]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": "python3"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    RESULTS.append((" ".join(args), "ran" if target in MAKE_RUN else "dry-run", MAKE[target]))


def test_list_what_ran() -> None:
    """Print (and keep in reports/) what the cases above ran, and what runs elsewhere."""
    lines = ["| command | how | result |", "|---|---|---|"]
    lines += [f"| `{c}` | {how} | {what} |" for c, how, what in RESULTS]
    lines += [f"| `ctr {c}` | elsewhere | {why} |" for c, why in ELSEWHERE.items()]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
