"""The gateway -> CTRModel hop without BentoML's per-call machinery.

BentoML's client and API wrapper cost ~4 ms a call here (pickled bodies, IO
descriptors, the adaptive batcher; notes/bentoml.md), ten times the forward pass of a
100-row batch. CTRModel also serves `/infer`: the raw int64 matrix in (shape in a header),
raw float32 scores out, on the same address BentoML gives the dependency (a Unix socket
under `bentoml serve`, a URL in a cluster). The gateway's coalescer already batches, so
nothing is lost by skipping BentoML's batcher.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlparse

import aiohttp
import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:  # torch is imported by CTRModel's process only
    from ctr.runner import ModelRunner

SHAPE = "x-ctr-shape"


class BinaryModelClient:
    """POST /infer over one keep-alive connection pool (made on first use, in the loop)."""

    def __init__(self, url: str) -> None:
        u = urlparse(url)
        self._unix = u.path if u.scheme == "file" else None
        self._base = f"http://{u.netloc}" if u.scheme in ("tcp", "http") else "http://127.0.0.1"
        if u.scheme == "https":
            self._base = url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    def _get(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            conn = aiohttp.UnixConnector(path=self._unix) if self._unix else aiohttp.TCPConnector(limit=64)
            self._session = aiohttp.ClientSession(self._base, connector=conn)
        return self._session

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype="<i8")
        headers = {SHAPE: f"{x.shape[0]},{x.shape[1]}", "content-type": "application/octet-stream"}
        async with self._get().post("/infer", data=x.tobytes(), headers=headers) as r:
            if r.status != 200:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status, message=await r.text())
            return np.frombuffer(await r.read(), dtype="<f4")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_model_app() -> Starlette:
    """CTRModel's /infer route; set `app.state.runner` before serving."""

    async def infer(request: Request) -> Response:
        runner: ModelRunner | None = getattr(request.app.state, "runner", None)
        if runner is None:
            return Response(b"model loading", 503)
        try:
            n, f = (int(v) for v in request.headers[SHAPE].split(","))
            x = np.frombuffer(await request.body(), dtype="<i8").reshape(n, f)
            y = runner(x)
        except (KeyError, ValueError) as exc:
            return Response(f"bad /infer request: {exc}".encode(), 400)
        return Response(np.ascontiguousarray(y, dtype="<f4").tobytes(), media_type="application/octet-stream")

    return Starlette(routes=[Route("/infer", infer, methods=["POST"])])
