"""Helpers shared by the tests: one fake clock, one request context, one in-thread server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

# The context of a /predict request, valid for every model and the segment table.
CTX: dict[str, Any] = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1,
                       "conn_type": "wifi"}  # fmt: skip


class FakeClock:
    """A monotonic clock the test moves by hand: `now()` for the code, `advance(s)` for the test."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    __call__ = now

    def advance(self, seconds: float) -> None:
        self.t += seconds


class _Server(uvicorn.Server):
    """uvicorn, telling the test when it listens (no polling)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def serve_in_thread(app: Any, timeout_s: float = 10.0) -> Iterator[str]:
    """Serve an ASGI app with uvicorn (the server BentoML runs, same defaults) in a thread on a
    loopback port of its own; its base URL while the block runs, stopped afterwards."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        if not server.ready.wait(timeout_s):
            raise RuntimeError(f"uvicorn did not start within {timeout_s} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
