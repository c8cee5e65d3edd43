"""`ctr bench http`: what BentoML's ASGI stack adds to a POST /predict, layer by layer, in process.

The gateway's BentoML server app is built as `bentoml serve` builds it
(`CTRGateway.to_asgi(is_main=True)`, Prometheus in multiprocess mode as under `bentoml
serve`) and called without HTTP: an ASGI scope of a POST /predict with a real body, in a
loop. The service is not started in this process, so the gateway's route answers its
fixed "starting" 503 at once: what is timed is the stack around the route, not the
request's work. Variants, measured in alternated rounds (median of the rounds' means):

- BentoML's whole stack (what /predict took before the fast path);
- the same with one middleware left out (A/B: its cost is the difference);
- BentoML's router alone (its routes and the mount, no middleware);
- the mounted app alone;
- the fast path (`ctr.api.bentoml_compat.Dispatch` in front of BentoML's stack: what
  /predict takes now).

uvicorn's own work (httptools, its proxy-headers middleware) is the same for every
variant and for the peers; `ctr bench e2e` measures it with everything else.
"""

from __future__ import annotations

import asyncio
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ctr.bench.loadgen import Traffic
from ctr.settings import PROJECT_ROOT, Settings

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
OUR_LAYERS = ("FastPath",)  # the gateway's own service middleware: left in every BentoML variant


def _scope(body: bytes, path: str = "/predict") -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:3000"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "server": ("127.0.0.1", 3000), "client": ("127.0.0.1", 50000), "scheme": "http", "method": "POST",
            "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers}  # fmt: skip


class _Driver:
    """Calls an ASGI app with one request and swallows the answer; counts the statuses."""

    def __init__(self, body: bytes) -> None:
        self.body, self.statuses = body, dict[int, int]()

    async def receive(self) -> dict[str, Any]:
        return {"type": "http.request", "body": self.body, "more_body": False}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.statuses[message["status"]] = self.statuses.get(message["status"], 0) + 1

    async def call(self, app: App, n: int) -> float:
        """Mean seconds per call over n calls."""
        t0 = time.perf_counter()
        for _ in range(n):
            await app(_scope(self.body), self.receive, self.send)
        return (time.perf_counter() - t0) / n


def layers(server_app: Any) -> list[Any]:
    """The built middleware stack of a Starlette app, outermost first, down to its router."""
    out, a = [], server_app.middleware_stack
    while a is not None:
        out.append(a)
        a = getattr(a, "app", None) if a is not server_app.router else None
    return out


def without(chain: list[Any], skip: set[str]) -> App:
    """The chain with the layers named in `skip` left out (shallow copies, relinked)."""
    kept = [a for a in chain if type(a).__name__ not in skip]
    head = kept[-1]
    for a in reversed(kept[:-1]):
        c = copy.copy(a)
        c.app = head
        head = c
    return head  # type: ignore[no-any-return]


async def measure(n: int = 2000, rounds: int = 5) -> tuple[list[tuple[str, float]], dict[int, int]]:
    """(variant, median us per request) and the statuses the calls got."""
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="ctr-bench-http-"))
    if str(PROJECT_ROOT) not in sys.path:  # service.py sits at the project's root, beside ctr/
        sys.path.insert(0, str(PROJECT_ROOT))
    import service
    from ctr.api.bentoml_compat import Dispatch
    from ctr.api.edge import Edge
    from ctr.api.routes import make_app

    service.predict_app.serve(make_app(Edge()))  # routes over no gateway: /predict answers "starting" (503)
    server_app = service.CTRGateway.to_asgi(is_main=True)
    body = Traffic(Settings().data_dir, 100).bodies(1)[0]
    driver = _Driver(body)
    await driver.call(server_app, 1)  # builds the middleware stack
    chain = layers(server_app)
    names = [type(a).__name__ for a in chain]
    bentoml_mw = [x for x in names[1:-2] if x not in OUR_LAYERS]  # between Starlette's error and exception layers
    variants: dict[str, App] = {"BentoML's whole stack (before)": without(chain, set())}
    variants |= {f"without {x}": without(chain, {x}) for x in bentoml_mw}
    variants["BentoML's router alone (routes + mount, no middleware)"] = server_app.router
    variants["the mounted app alone"] = service.predict_app
    variants["fast path: Dispatch in front of BentoML's stack (after)"] = Dispatch(
        without(chain, set()), {"/predict": service.predict_app}
    )
    for app in variants.values():  # warm
        await driver.call(app, 200)
    means: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    for r in range(rounds):
        for k in order if r % 2 == 0 else reversed(order):
            means[k].append(await driver.call(variants[k], n))
    return [(k, statistics.median(v) * 1e6) for k, v in means.items()], driver.statuses


def run(n: int = 2000, rounds: int = 5) -> str:
    rows, statuses = asyncio.run(measure(n, rounds))
    by = dict(rows)
    full = by["BentoML's whole stack (before)"]
    lines = [f"POST /predict, in process, no HTTP ({rounds} alternated rounds of {n} calls; median of the rounds' "
             f"means; answers by status: {statuses})", "",
             "| variant | us per request | BentoML's stack minus this |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v:.1f} | {full - v:+.1f} |" for k, v in rows]
    return "\n".join(lines)
