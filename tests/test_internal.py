"""Internal services refuse callers without the shared token (X-CTR-Internal-Token):
the middleware alone, BentoML's dependency client carrying it, and a real CTRModel process."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import Server
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ctr.api import internal
from ctr.model.app import SHAPE
from ctr.serving.model_client import BinaryModelClient

TOKEN = "s3cret-internal-token"
WIDTH = 16  # DeepFM's 16 categorical fields


def app() -> Starlette:
    async def ok(request: object) -> PlainTextResponse:
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in ("/infer", "/livez", "/metrics")])
    return internal.InternalAuth(inner, token=TOKEN)  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [("/infer", {}, 401), ("/infer", {internal.HEADER: "wrong"}, 401), ("/infer", {internal.HEADER: TOKEN}, 200),
     ("/livez", {}, 200), ("/metrics", {}, 200)],
)  # fmt: skip
def test_the_middleware_wants_the_token_except_on_probes(path: str, headers: dict[str, str], status: int) -> None:
    with TestClient(app()) as client:  # type: ignore[arg-type]
        r = client.post(path, headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert internal.HEADER in r.json()["error"]


def test_an_unset_token_is_drawn_at_random_once() -> None:
    """ensure_token fills the environment once; a set token is kept; the middleware needs one."""
    env: dict[str, str] = {}
    first = internal.ensure_token(env)
    assert len(first) >= 32 and env[internal.ENV] == first and internal.ensure_token(env) == first
    assert internal.ensure_token({internal.ENV: "given"}) == "given"
    assert internal.ensure_token({}) != first
    with pytest.raises(ValueError, match="non-empty token"):
        internal.InternalAuth(app(), token="")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model_server(small_setup: dict[str, str]) -> Iterator[Server]:
    """CTRModel alone, as a Deployment runs it, with the token set."""
    server = Server("service:CTRModel", {**small_setup, internal.ENV: TOKEN})
    yield server
    server.stop()


def test_ctrmodel_refuses_infer_and_its_api_without_the_token(model_server: Server) -> None:
    """/infer and the BentoML API answer 401 without the token and 200 with it; probes stay open."""
    x = np.zeros((3, WIDTH), dtype="<i8")
    infer = {"content": x.tobytes(), "headers": {SHAPE: f"3,{WIDTH}", "content-type": "application/octet-stream"}}
    api = {"json": {"features": x.tolist()}}
    with httpx.Client(base_url=model_server.url, timeout=10) as c:
        assert c.post("/infer", **infer).status_code == 401  # type: ignore[arg-type]
        assert c.post("/predict", **api).status_code == 401  # type: ignore[arg-type]
        pickled = c.post("/predict", content=b"\x80\x04N.", headers={"content-type": "application/vnd.bentoml+pickle"})
        assert pickled.status_code == 401
        r = c.post("/infer", **{**infer, "headers": {**infer["headers"], internal.HEADER: TOKEN}})  # type: ignore[arg-type, dict-item]
        assert r.status_code == 200 and len(np.frombuffer(r.content, dtype="<f4")) == 3
        r = c.post("/predict", **api, headers={internal.HEADER: TOKEN})  # type: ignore[arg-type]
        assert r.status_code == 200 and len(r.json()) == 3
        assert c.get("/readyz").status_code == 200 and c.get("/livez").status_code == 200


def test_the_gateways_binary_client_sends_the_token(model_server: Server) -> None:
    """BinaryModelClient with the internal headers gets scores; without them, a 401."""
    import asyncio

    import aiohttp

    x = np.zeros((2, WIDTH), dtype=np.int64)

    async def go() -> tuple[int, int]:
        good, bad = BinaryModelClient(model_server.url, internal.headers(TOKEN)), BinaryModelClient(model_server.url)
        try:
            n = len(await good(x))
            try:
                await bad(x)
                status = 200
            except aiohttp.ClientResponseError as exc:
                status = exc.status
            return n, status
        finally:
            await good.close()
            await bad.close()

    assert asyncio.run(go()) == (2, 401)
