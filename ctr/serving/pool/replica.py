"""What the pool calls: a model replica, as a small Protocol.

Three kinds: `HttpReplica` (a CTRModel process at http://host:port: `/infer` in raw
bytes, `/readyz` as its probe), `CallReplica` (any async call, e.g. the in-graph CTRModel
reached through BentoML's dependency under `bentoml serve`; its probe is a one-row call) and
`LocalReplica` (the model inside the gateway process, CTR_MODEL_REPLICA=local). The pool
does not care which.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import aiohttp
import numpy as np

from ctr.degraded import Reason
from ctr.serving.model_client import BinaryModelClient, InvalidAnswer


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

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.name = self.url.split("://", 1)[-1]
        self._client = BinaryModelClient(self.url, headers)  # headers: the internal token (ctr.api.internal)
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


class LocalFailure(InvalidAnswer):
    """The forward pass in this process raised: counted against the replica and retried like
    an HTTP replica's error (which the CTRModel process answers as a 5xx)."""

    reason = Reason.MODEL_ERROR


class LocalReplica:
    """The model in this process. `thread=False` (CTR_LOCAL_FORWARD=loop, the default): each
    coalesced forward pass runs on the event loop, which serves nothing else meanwhile; what
    arrives queues and goes into the next pass. `thread=True`: the pass runs in one worker
    thread and the loop goes on parsing and fetching; torch's kernels release the GIL, but the
    module calls between them do not, so the two threads take turns on the GIL (measured on 2
    cores: the loop starved the pass into timeouts at 16 concurrent requests; docs/performance.md).
    """

    def __init__(
        self, runner: Callable[[np.ndarray], np.ndarray], width: int, name: str = "local", thread: bool = False
    ) -> None:
        self.name, self._runner, self._width = name, runner, width
        # torch's thread count is per OS thread (OpenMP): set again in the worker, or its passes
        # ran 1.5x slower here on OpenMP's default team
        init = getattr(runner, "bind_thread", None)
        self._thread = ThreadPoolExecutor(1, "ctr-model", initializer=init) if thread else None

    async def infer(self, x: np.ndarray) -> np.ndarray:
        try:
            if self._thread is None:
                return self._runner(x)
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._runner, x)
        except ValueError as exc:  # the runner refused the matrix (shape, an index out of range)
            raise InvalidAnswer(f"the local model refused the input: {exc}") from None
        except Exception as exc:  # torch's RuntimeError (out of memory, ...): a failure of this replica
            raise LocalFailure(f"the local forward pass failed: {type(exc).__name__}: {exc}") from None

    async def ready(self) -> bool:
        return len(await self.infer(np.zeros((1, self._width), dtype=np.int64))) == 1

    async def close(self) -> None:
        """Nothing to drop: the thread stays for the next call (an ejected replica comes back)."""
