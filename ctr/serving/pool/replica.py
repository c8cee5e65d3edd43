"""What the pool calls: a model replica, as a small Protocol.

Two kinds today: `HttpReplica` (a CTRModel process at http://host:port: `/infer` in raw
bytes, `/readyz` as its probe) and `CallReplica` (any async call, e.g. the in-graph CTRModel
reached through BentoML's dependency under `bentoml serve`; its probe is a one-row call).
A later kind can run the model inside the gateway process; the pool does not care which.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
import numpy as np

from ctr.serving.model_client import BinaryModelClient


class Replica(Protocol):
    name: str  # bounded and stable: "host:port", or a fixed name

    async def infer(self, x: np.ndarray) -> np.ndarray: ...

    async def ready(self) -> bool:
        """One active probe (the pool bounds it with a timeout)."""
        ...

    async def close(self) -> None:
        """Drop connections; a later call or probe opens new ones (the pool closes an ejected replica)."""
        ...


class HttpReplica:
    """A CTRModel process reached over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.name = self.url.split("://", 1)[-1]
        self._client = BinaryModelClient(self.url)
        self._probe: aiohttp.ClientSession | None = None  # its own connection: probes never queue behind calls

    async def infer(self, x: np.ndarray) -> np.ndarray:
        return await self._client(x)

    async def ready(self) -> bool:
        if self._probe is None or self._probe.closed:
            self._probe = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with self._probe.get(self.url + "/readyz") as r:
            return r.status == 200

    async def close(self) -> None:
        await self._client.close()
        if self._probe is not None:
            await self._probe.close()


class CallReplica:
    """A replica that is just an async call; probed by calling it with one row of zeros."""

    def __init__(self, name: str, call: Callable[[np.ndarray], Awaitable[np.ndarray]], width: int,
                 close: Callable[[], Awaitable[None]] | None = None) -> None:  # fmt: skip
        self.name, self._call, self._width, self._close = name, call, width, close

    async def infer(self, x: np.ndarray) -> np.ndarray:
        return await self._call(x)

    async def ready(self) -> bool:
        y = await self._call(np.zeros((1, self._width), dtype=np.int64))
        return len(y) == 1

    async def close(self) -> None:
        if self._close is not None:
            await self._close()
