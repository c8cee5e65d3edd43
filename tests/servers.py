"""Private Redis, Redis Cluster and PostgreSQL servers for the tests, started from the
binaries on PATH (or PostgreSQL's usual Debian location) and stopped afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ctr.bench.local_server import free_port


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    import random

    while True:
        p = random.randint(20000, 50000)
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
            except OSError:
                continue
            return p


def _wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _redis_server(port: int, workdir: Path, *extra: str) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not on PATH (make test installs it: apt-get install redis-server)")
    cmd = [
        exe,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port)
    return proc


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()


@contextmanager
def redis_server() -> Iterator[str]:
    """A private Redis; yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        proc = _redis_server(port, Path(d))
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            _stop([proc])


@contextmanager
def redis_cluster(masters: int = 3) -> Iterator[str]:
    """A private Redis Cluster of `masters` masters on loopback; yields a redis+cluster:// URL."""
    ports = [cluster_port() for _ in range(masters)]
    with tempfile.TemporaryDirectory() as d:
        procs = []
        try:
            for p in ports:
                work = Path(d) / str(p)
                work.mkdir()
                procs.append(_redis_server(p, work, "--cluster-enabled", "yes", "--cluster-config-file",
                                           str(work / "nodes.conf"), "--cluster-node-timeout", "5000"))  # fmt: skip
            subprocess.run(
                ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            _wait_cluster_ok(ports[0])
            yield f"redis+cluster://127.0.0.1:{ports[0]}"
        finally:
            _stop(procs)


def _wait_cluster_ok(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True).stdout
        if "cluster_state:ok" in out:
            return
        time.sleep(0.1)
    raise TimeoutError("redis cluster did not reach cluster_state:ok")


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise RuntimeError(f"{name} not found (make test installs PostgreSQL: apt-get install postgresql)")
    return found


def _answers(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@contextmanager
def postgres_database() -> Iterator[str]:
    """A throw-away database: on the local server at 127.0.0.1:5432 when one answers, else
    on a private server started with initdb + pg_ctl. Yields its postgresql:// URL."""
    import asyncio

    import asyncpg

    if _answers("127.0.0.1", 5432):
        admin, own = "postgresql://postgres@127.0.0.1:5432/postgres", None
    else:
        own = _start_postgres()
        admin = f"postgresql://postgres@127.0.0.1:{own[1]}/postgres"
    name = f"ctr_test_{uuid.uuid4().hex[:10]}"

    async def sql(q: str) -> None:
        con = await asyncpg.connect(admin)
        try:
            await con.execute(q)
        finally:
            await con.close()

    asyncio.run(sql(f"CREATE DATABASE {name}"))
    try:
        yield admin.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        if own is not None:
            _stop_postgres(own[0])


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _start_postgres() -> tuple[str, int]:
    d = tempfile.mkdtemp(prefix="ctr-pg-")
    if os.geteuid() == 0:
        shutil.chown(d, "postgres")
    port = free_port()
    subprocess.run(_as_postgres([_pg_bin("initdb"), "-D", d, "-U", "postgres", "--auth=trust"]), check=True,
                   capture_output=True)  # fmt: skip
    _pg_start(d, port)
    return d, port


def _pg_start(d: str, port: int) -> None:
    opts = f"-p {port} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", d, "-o", opts, "-w", "start", "-l", f"{d}/log"]), check=True,
                   capture_output=True)  # fmt: skip


def _stop_postgres(d: str) -> None:
    subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", d, "-m", "immediate", "stop"]), capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


class RedisProcess:
    """A private Redis that can be killed and started again on the same port."""

    def __init__(self, *extra: str) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra = extra  # e.g. "--appendonly", "yes": later options override the defaults
        self._dir = tempfile.TemporaryDirectory()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = _redis_server(self.port, Path(self._dir.name), *self.extra)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def close(self) -> None:
        self.kill()
        self._dir.cleanup()


class PostgresProcess:
    """A private PostgreSQL that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.dir, self.port = _start_postgres()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", self.dir, "-m", "fast", "-w", "stop"]),
                       check=True, capture_output=True)  # fmt: skip

    def start(self) -> None:
        _pg_start(self.dir, self.port)

    def close(self) -> None:
        _stop_postgres(self.dir)
