"""What ctr-serve relies on in BentoML beyond its documented API (ctr.api.bentoml_compat) is
still there in the pinned release: each test fails when a BentoML upgrade changes it."""

from __future__ import annotations

import asyncio
import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import bentoml
from starlette.routing import Match, Route

from ctr.api import bentoml_compat
from ctr.api.edge import LateApp

ROOT = Path(__file__).resolve().parent.parent


def test_the_pinned_bentoml_is_the_one_checked() -> None:
    """pyproject.toml, the compat module and the installed package name one release."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(re.sub(r"^bentoml==", "", d) for d in deps if d.startswith("bentoml=="))
    assert pinned == bentoml_compat.PINNED == version("bentoml")


def test_a_dependency_client_takes_a_header_on_every_session() -> None:
    """A real RemoteProxy carries the header on sessions made before and after; idempotent; an
    in-process dependency is returned as is."""
    from _bentoml_impl.client import RemoteProxy

    async def go() -> tuple[str, str]:
        proxy = RemoteProxy("http://127.0.0.1:9")
        manager = proxy.to_async._session_manager
        before = await manager.get_session()
        bentoml_compat.add_default_header(proxy, "x-test", "v")
        bentoml_compat.add_default_header(proxy, "x-test", "v")
        await manager.close()
        after = await manager.get_session()
        try:
            return before.headers["x-test"], after.headers["x-test"]
        finally:
            await before.close()
            await manager.close()

    assert asyncio.run(go()) == ("v", "v")
    plain = object()
    assert bentoml_compat.add_default_header(plain, "x-test", "v") is plain


def test_one_service_can_be_started_alone_with_its_dependencies_urls() -> None:
    """The internal start module has start-http-server with the options `ctr serve --service` passes."""
    import importlib

    module = importlib.import_module(bentoml_compat.START_MODULE)
    group = module.build_start_command()
    command = group.commands[bentoml_compat.START_COMMAND]
    options = {p.name for p in command.params}
    assert {"bento", "service_name", "depends", "host", "port", "working_dir"} <= options
    cmd = bentoml_compat.start_command("python", "service:CTRGateway")
    assert cmd == ["python", "-m", bentoml_compat.START_MODULE, bentoml_compat.START_COMMAND, "service:CTRGateway"]


def test_a_resolved_dependency_knows_its_url() -> None:
    """`bentoml.depends(url=...)` exposes `.url`; a class attribute that is none gives None."""

    class Holder:
        dep = bentoml.depends(url="http://10.0.0.1:3000")
        other = None

    assert bentoml_compat.dependency_url(Holder, "dep") == "http://10.0.0.1:3000"
    assert bentoml_compat.dependency_url(Holder, "other") is None


def test_a_starlette_app_at_root_is_matched_route_by_route_as_it_is_then() -> None:
    """PassiveMount matches only the mounted app's routes, read per request: BentoML's own
    routes stay reachable, and routes a LateApp is given later are served."""
    from _bentoml_impl.server.mount import PassiveMount

    async def ok(request: object) -> None:
        return None

    late = LateApp()
    mount = PassiveMount("/", late)
    scope = {"type": "http", "path": "/predict", "method": "POST", "root_path": ""}
    assert mount.matches(scope)[0] == Match.NONE
    done = LateApp(routes=[Route("/predict", ok, methods=["POST"])])
    late.serve(done)
    assert mount.matches(scope)[0] == Match.FULL
    assert mount.matches({**scope, "path": "/readyz", "method": "GET"})[0] == Match.NONE


def test_a_token_drawn_once_is_inherited_not_redrawn() -> None:
    env: dict[str, str] = {}
    first = bentoml_compat.shared_token("CTR_X", env)
    assert len(first) >= 32 and env["CTR_X"] == first and bentoml_compat.shared_token("CTR_X", env) == first
    assert bentoml_compat.shared_token("CTR_X", {"CTR_X": "given"}) == "given"
