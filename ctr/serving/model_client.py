"""The gateway's client of CTRModel: the raw `/infer` hop, or BentoML's client.

BentoML's client and API wrapper cost ~4 ms a call here (pickled bodies, IO
descriptors, the adaptive batcher; notes/bentoml.md), ten times the forward pass of a
100-row batch. CTRModel also serves `/infer`: the raw int64 matrix in (shape in a header),
raw float32 scores out, on the same address BentoML gives the dependency (a Unix socket
under `bentoml serve`, a URL in a cluster). The gateway's coalescer already batches, so
nothing is lost by skipping BentoML's batcher.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import urlparse

import aiohttp
import numpy as np

from ctr.degraded import Reason
from ctr.model.app import SHAPE
from ctr.serving.coalesce import ModelCall, ModelError


class InvalidAnswer(ModelError):
    """The model answered, but not one finite score per row."""

    reason = Reason.MODEL_INVALID_ANSWER


def check_answer(x: np.ndarray, y: object) -> np.ndarray:
    """`y` if it is exactly one finite score per row of `x`, else InvalidAnswer."""
    if not isinstance(y, np.ndarray) or y.ndim != 1 or len(y) != len(x):
        shape = list(y.shape) if isinstance(y, np.ndarray) else type(y).__name__
        raise InvalidAnswer(f"the model answered {shape} for {len(x)} rows; want one score per row")
    if not np.isfinite(y).all():
        raise InvalidAnswer(f"the model answered {int((~np.isfinite(y)).sum())} non-finite scores")
    return y


def checked(call: ModelCall) -> ModelCall:
    """`call` whose answer is verified (`check_answer`); the gateway answers an invalid one
    from the fallback. Wraps any model client; the pool checks every replica's answer."""

    async def run(x: np.ndarray) -> np.ndarray:
        return check_answer(x, await call(x))

    return run


class BinaryModelClient:
    """POST /infer over one keep-alive connection pool (made on first use, in the loop)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        u = urlparse(url)
        self._headers = dict(headers or {})  # e.g. the internal token (ctr.api.internal)
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
        headers = {**self._headers, SHAPE: f"{x.shape[0]},{x.shape[1]}", "content-type": "application/octet-stream"}
        async with self._get().post("/infer", data=x.tobytes(), headers=headers) as r:
            if r.status != 200:
                raise aiohttp.ClientResponseError(r.request_info, (), status=r.status, message=await r.text())
            return np.frombuffer(await r.read(), dtype="<f4")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


# () -> (the dependency's URL or None, BentoML's own async call)
Resolver = Callable[[], tuple[str | None, Callable[[np.ndarray], Awaitable[np.ndarray]]]]


class ModelClient:
    """CTRModel as the gateway calls it: one object, whose transport is chosen on first use
    (BentoML's client of a dependency exists only once the server runs). Raw `/infer` when
    the dependency has a URL and `hop` is "binary"; BentoML's client otherwise (in-process
    outside a server, or CTR_MODEL_HOP=bentoml)."""

    def __init__(self, resolve: Resolver, hop: str = "binary", headers: dict[str, str] | None = None) -> None:
        self._resolve = resolve
        self._hop = hop
        self._headers = headers
        self._call: Callable[[np.ndarray], Awaitable[np.ndarray]] | None = None
        self._binary: BinaryModelClient | None = None

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._call is None:
            url, bentoml_call = self._resolve()
            if self._hop == "binary" and url:
                self._binary = BinaryModelClient(url, self._headers)
                self._call = self._binary
            else:
                self._call = bentoml_call
        return await self._call(x)

    async def close(self) -> None:
        if self._binary is not None:
            await self._binary.close()
