"""Start the service for a benchmark or load test when it is not already running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import psutil

from ctr.bench.loadgen import check_loopback
from ctr.settings import PROJECT_ROOT


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, timeout_s: float = 240.0, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Seconds until `url`/readyz answers 200; an error when `proc` exits or time runs out."""
    t0 = time.monotonic()
    while not ready(url):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - t0


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` and its descendants so far: the live ones,
    and those that exited and were waited for (a restarted worker's seconds stay counted)."""
    total = 0.0
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return total
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


@contextmanager
def serving(
    url: str, timeout_s: float = 180.0, cmd: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes] | None]:
    """Yield the server process this started (None when one already answered); stop it,
    with its whole process group, after. `cmd` defaults to the whole service graph; `env`
    is added to this process's environment."""
    check_loopback(url)
    if ready(url):
        yield None
        return
    if cmd is None:
        u = urlparse(url)
        exe = Path(sys.executable).parent / "bentoml"
        cmd = [str(exe), "serve", "service:CTRGateway", "--host", u.hostname or "127.0.0.1",
               "--port", str(u.port or 80)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})})  # fmt: skip
    try:
        wait_ready(url, timeout_s, proc)
        yield proc
    finally:
        try:  # BentoML's workers may leave the process group: remember them all first
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        with contextlib.suppress(ProcessLookupError):  # it may have exited (a failed start)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:  # a worker left behind (seen: a FeatureService worker after `ctr bench profile`)
            with contextlib.suppress(psutil.Error):
                p.kill()


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class PeakRss:
    """Samples a process tree's RSS in a thread; `.peak` is the largest seen."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
