"""Helpers shared by the tests: one fake clock, one request context, one in-thread server."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

from ctr.model.segments import SegmentTable

# The context of a /predict request, valid for every model and the segment table.
CTX: dict[str, Any] = {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1,
                       "conn_type": "wifi"}  # fmt: skip


class FakeClock:
    """A monotonic clock the test moves by hand (the `clock` the code takes, a `() -> float`):
    set `t` or `advance(s)`; `sleep(s)` is an async sleep that only moves the clock."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        self.t += seconds


class _Server(uvicorn.Server):
    """uvicorn, telling the test when it listens (no polling)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class ThreadServer:
    """An ASGI app served by uvicorn (the server BentoML runs, same defaults) in a thread, on a
    loopback port of its own: `url` once constructed, `stop()` ends it."""

    def __init__(self, app: Any, timeout_s: float = 10.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        if not self.server.ready.wait(timeout_s):
            self.stop()
            raise RuntimeError(f"uvicorn did not start within {timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()


@contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """ThreadServer for the length of a block: its base URL."""
    server = ThreadServer(app)
    try:
        yield server.url
    finally:
        server.stop()


# A segment table with one known segment, and features that need no store.
TABLE = SegmentTable({"mobile|news": 30.0}, {"mobile|news": 1000.0}, 400.0, 10_000.0)


async def fake_features(
    user_id: str, ad_ids: list[str], context: dict[str, Any], deadline: float
) -> tuple[np.ndarray, list[str]]:
    return np.arange(len(ad_ids) * 2, dtype=np.int64).reshape(len(ad_ids), 2), []


def routes_app(
    tmp_path: Path, *, max_ads: int = 1000, max_body_bytes: int = 1_048_576, token: str = "tok", **edge: Any
) -> Any:
    """The gateway's routes (ctr.api.routes) over a constant model, no store but SQLite in
    `tmp_path`: what the contract tests and the in-process fuzzing call; `edge`: other fields
    of the Edge (ctr.api.edge)."""
    from ctr.api.routes import make_app
    from ctr.features.sql import SqliteStore
    from ctr.features.store import TieredStore
    from ctr.features.tiers import MemoryTier
    from ctr.features.writes import FeatureWriter
    from ctr.serving.canary.feedback import FeedbackDesk
    from ctr.serving.coalesce import Coalescer
    from ctr.serving.fallback import Fallback
    from ctr.serving.gateway import Gateway

    async def model(x: np.ndarray) -> np.ndarray:
        return np.full(len(x), 0.25, dtype=np.float32)

    from ctr.api.edge import Edge
    from ctr.api.request_id import Signer

    key = b"k" * 32
    gateway = Gateway(fake_features, Coalescer(model), Fallback(TABLE), "ctr_model:test", 1.0, new_id=Signer(key).issue)
    writer = FeatureWriter(TieredStore(MemoryTier(), SqliteStore(tmp_path / "f.db")), {})
    info = {"model_version": "ctr_model:test"}
    desk = FeedbackDesk(None, None, 900.0)  # no Redis: the id's signature and age only
    edge = {"feedback": desk, **edge}
    return make_app(Edge(gateway, max_ads, max_body_bytes, key, token, writer, model_info=info, **edge))
