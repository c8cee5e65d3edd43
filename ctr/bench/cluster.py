"""The local topology: every service a process of its own on loopback, as each Kubernetes
Deployment runs it (`ctr serve --service NAME`): gateway, FeatureService, FallbackService and
N CTRModel replicas behind the gateway's pool. Used by `make cluster` and `ctr bench pool`.

Each process gets its own BENTOML_HOME (the model store linked in): BentoML wipes the
Prometheus multiprocess directory of its home at start-up, so servers sharing one would
erase each other's metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ctr.bench.local_server import wait_ready
from ctr.cli.launch import serve_command, service_name
from ctr.settings import PROJECT_ROOT

STATE = PROJECT_ROOT / "build" / "cluster.json"


@dataclass
class Proc:
    name: str
    url: str
    popen: subprocess.Popen[bytes]
    home: Path
    log: Path


@dataclass
class Cluster:
    """Processes started by `start`; `stop` ends them all (each its own process group)."""

    procs: list[Proc] = field(default_factory=list)
    # One internal token for every process (each would draw its own, and refuse the others').
    token: str = field(default_factory=lambda: os.environ.get("CTR_INTERNAL_TOKEN") or secrets.token_urlsafe(32))
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ctr-cluster-")))

    def start(self, name: str, port: int, env: Mapping[str, str] | None = None, host: str = "127.0.0.1") -> Proc:
        env = {**os.environ, "CTR_INTERNAL_TOKEN": self.token, **(env or {})}
        label = f"{service_name(name)}-{port}"
        home = self.base / label
        home.mkdir(parents=True, exist_ok=True)
        src = Path(env.get("BENTOML_HOME", PROJECT_ROOT / "bentoml_home")) / "models"
        if not (home / "models").exists():
            (home / "models").symlink_to(src.resolve())
        env["BENTOML_HOME"] = str(home)
        cmd, env = serve_command(name, host, port, env)
        log = self.base / f"{label}.log"
        with log.open("ab") as f:
            p = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
        proc = Proc(label, f"http://{host}:{port}", p, home, log)
        self.procs.append(proc)
        return proc

    def wait(self, timeout_s: float = 120.0) -> None:
        for p in self.procs:
            try:
                wait_ready(p.url, timeout_s, p.popen)
            except (RuntimeError, TimeoutError) as exc:
                raise RuntimeError(f"{exc}\n{p.log.read_text()[-3000:]}") from None

    def signal_tree(self, proc: Proc, sig: int) -> None:
        """Send `sig` to the server and every process under it (BentoML's worker is not in the
        arbiter's process group: a SIGKILL of the group alone leaves it serving)."""
        try:
            root = psutil.Process(proc.popen.pid)
            tree = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            return
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)

    def stop_one(self, proc: Proc, sig: int = signal.SIGTERM) -> None:
        if proc.popen.poll() is None:
            try:
                children = psutil.Process(proc.popen.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            self.signal_tree(proc, sig)
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.signal_tree(proc, signal.SIGKILL)
                proc.popen.wait(5)
            for c in children:  # anything the server left behind
                with contextlib.suppress(psutil.NoSuchProcess):
                    c.kill()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop(self) -> None:
        for p in list(self.procs):
            self.stop_one(p)

    def save(self, path: Path = STATE) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"name": p.name, "url": p.url, "pid": p.popen.pid} for p in self.procs]))


def topology(replicas: int, port: int, model_env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Ports and settings of a local cluster: gateway on `port`, features +1, fallback +2,
    model replicas from +101."""
    models = [port + 101 + i for i in range(replicas)]
    return {"gateway": port, "features": port + 1, "fallback": port + 2, "models": models,
            "urls": ",".join(f"http://127.0.0.1:{p}" for p in models)}  # fmt: skip


@contextlib.contextmanager
def running(replicas: int = 3, port: int = 3000, gateway_env: Mapping[str, str] | None = None,
            model_env: Mapping[str, Mapping[str, str]] | None = None) -> Iterator[Cluster]:  # fmt: skip
    """Gateway, FeatureService, FallbackService and `replicas` CTRModels, ready; all stopped after.
    `model_env[i]` adds settings to replica i (e.g. CTR_MODEL_DELAY_MS)."""
    t = topology(replicas, port)
    c = Cluster()
    try:
        for i, p in enumerate(t["models"]):  # type: ignore[arg-type]
            c.start("CTRModel", p, (model_env or {}).get(i, {}))  # type: ignore[arg-type]
        c.start("FeatureService", t["features"])  # type: ignore[arg-type]
        c.start("FallbackService", t["fallback"])  # type: ignore[arg-type]
        c.wait()
        env = {"CTR_MODEL_URLS": str(t["urls"]), "CTR_FEATURES_URL": f"http://127.0.0.1:{t['features']}",
               "CTR_FALLBACK_URL": f"http://127.0.0.1:{t['fallback']}", **(gateway_env or {})}  # fmt: skip
        c.start("CTRGateway", t["gateway"], env)  # type: ignore[arg-type]
        c.wait()
        yield c
    finally:
        c.stop()


def stop_saved(path: Path = STATE) -> list[str]:
    """Stop the processes a `make cluster` left (by their recorded process groups)."""
    if not path.exists():
        return []
    stopped = []
    for p in json.loads(path.read_text()):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p["pid"], signal.SIGTERM)
            stopped.append(f"{p['name']} ({p['url']})")
    path.unlink()
    return stopped
