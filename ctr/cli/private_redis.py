"""`make serve` on a bare machine: a private Redis (L2) when none answers at the default URL.

    python -m ctr.cli.private_redis [--default-url URL] COMMAND...   (the Makefile's serve target)

- `CTR_REDIS_URL` set (even empty): the command runs as it is; empty runs without L2.
- left at its default and a Redis answers there: the command uses it.
- left at its default and nothing answers: a private `redis-server` (installed with apt-get
  when missing, as `make servers` does) starts with its files under `<CTR_DATA_DIR>/redis`,
  append-only file on (write-behind's durability rests on it), on the default port when it
  is free (so `ctr features ...` in another shell finds it too), else on a free one; the
  command gets its URL in `CTR_REDIS_URL`, and the Redis is stopped after the command ends.

One line on stderr says which it did.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from ctr.settings import Settings

DEFAULT_URL: str = Settings.model_fields["redis_url"].default


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a Redis answers PING at `url`."""
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_redis_server() -> str:
    """The redis-server binary; installed with apt-get (as root) when missing."""
    exe = shutil.which("redis-server")
    if exe is None and shutil.which("apt-get") and os.geteuid() == 0:
        print("L2: installing redis-server with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)
        exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError(
            "redis-server is not installed (apt-get install redis-server); CTR_REDIS_URL= runs without L2"
        )
    return exe


@contextmanager
def private_redis(data_dir: Path, default_url: str = DEFAULT_URL, timeout_s: float = 10.0) -> Iterator[str]:
    """A redis-server with its files in `data_dir`/redis and append-only on; yields its URL, stops it after."""
    exe = ensure_redis_server()
    workdir = (data_dir / "redis").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    u = urlparse(default_url)
    port = u.port or 6379
    if not _port_free(port):
        port = _free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--appendonly", "yes",
           "--appendfsync", "everysec", "--save", "", "--logfile", str(workdir / "redis.log"),
           "--pidfile", str(workdir / "redis.pid")]  # fmt: skip
    # Its own session: Ctrl-C reaches the service, which stops first; then this stops Redis.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}{u.path or '/0'}"
    try:
        deadline = time.monotonic() + timeout_s
        while not answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = (workdir / "redis.log").read_text()[-1000:] if (workdir / "redis.log").exists() else ""
                raise RuntimeError(f"the private Redis did not start: {log}")
            time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: Redis flushes the append-only file and exits
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _run(cmd: list[str], env: Mapping[str, str]) -> int:
    """Run the service in the foreground; SIGTERM is passed on, Ctrl-C waits for it to stop."""
    child = subprocess.Popen(cmd, env=dict(env))

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # the terminal sent SIGINT to the service as well
                continue
    finally:
        signal.signal(signal.SIGTERM, old)


def run(cmd: list[str], env: Mapping[str, str] | None = None, default_url: str = DEFAULT_URL) -> int:
    """Run `cmd` with an L2 as the module docstring says; returns its exit status."""
    env = dict(os.environ if env is None else env)
    if "CTR_REDIS_URL" in env:
        given = env["CTR_REDIS_URL"]
        print(f"L2: {'off (CTR_REDIS_URL is empty)' if not given else f'CTR_REDIS_URL={given} (as set)'}",
              file=sys.stderr)  # fmt: skip
        return _run(cmd, env)
    if answers(default_url):
        print(f"L2: the Redis answering at {default_url}", file=sys.stderr)
        return _run(cmd, env)
    data_dir = Path(env.get("CTR_DATA_DIR") or Settings.model_fields["data_dir"].default)
    with private_redis(data_dir, default_url) as url:
        where = data_dir / "redis"
        print(f"L2: nothing answered at {default_url}: started a private Redis at {url} "
              f"(files in {where}, appendonly yes); it stops with the service", file=sys.stderr)  # fmt: skip
        return _run(cmd, {**env, "CTR_REDIS_URL": url})


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    default_url = DEFAULT_URL
    if args[:1] == ["--default-url"] and len(args) > 1:  # where to look (tests: a port nobody uses)
        default_url, args = args[1], args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        print("usage: python -m ctr.cli.private_redis [--default-url URL] COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        return run(args, default_url=default_url)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"L2: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
