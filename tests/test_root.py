"""The composition root hands every part to the gateway it builds (a merge once dropped the canary arms,
so every request went to stable and the gates never saw canary traffic)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ctr.features.transform import TransformSpec
from ctr.model.segments import SegmentTable
from ctr.observe import pauses
from ctr.serving import placement, root
from ctr.settings import Settings

SPEC = TransformSpec(0.04, tuple(np.linspace(0.02, 0.06, 19)), tuple(np.linspace(0.02, 0.06, 19)))
TABLE = SegmentTable({"mobile|news": 30.0}, {"mobile|news": 1000.0}, 400.0, 10_000.0)


def test_the_gateway_gets_the_canary_arms() -> None:
    """root.gateway(..., arms) builds a Gateway whose arms are those arms."""
    art: Any = SimpleNamespace(spec=SPEC, segments=TABLE, tag="ctr_model:test")
    stack: Any = SimpleNamespace(lookup=object())
    arms: Any = SimpleNamespace(route=None, record=None)
    gw = root.gateway(Settings(), art, object(), stack, arms=arms)  # type: ignore[arg-type]
    assert gw.arms is arms
    assert root.gateway(Settings(), art, object(), stack).arms is None  # type: ignore[arg-type]


def test_the_model_runs_in_the_gateway_on_a_cpu_unless_told_otherwise() -> None:
    """CTR_MODEL_REPLICA: local on a CPU (auto), in-graph when asked; CTR_MODEL_URLS wins."""
    assert placement.runs_local(Settings(model_replica="auto", device="cpu", model_urls=""))
    assert placement.runs_local(Settings(model_replica="local", model_urls=""))
    assert not placement.runs_local(Settings(model_replica="in-graph", model_urls=""))
    assert not placement.runs_local(Settings(model_replica="local", model_urls="http://10.0.0.1:3000"))


def test_auto_goes_in_graph_where_a_gpu_device_node_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided from /dev alone: importing torch to ask would cost every process of the graph."""
    import sys

    monkeypatch.setattr(placement, "_gpu_visible", lambda: True)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert not placement.runs_local(Settings(model_replica="auto", device="auto", model_urls=""))
    assert "torch" not in sys.modules
    assert placement.runs_local(Settings(model_replica="auto", device="cpu", model_urls=""))


def test_settle_gc_keeps_the_young_threshold_small() -> None:
    """A young threshold of 50,000 made each young collection 22-33 ms at half load."""
    import gc

    before = gc.get_threshold()
    try:
        pauses.settle_gc()
        assert gc.get_threshold() == (700, 10, 3000)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_local_forward_pass_in_a_thread_leaves_the_event_loop_free() -> None:
    """CTR_LOCAL_FORWARD=thread runs the pass in a worker thread: while it computes, the loop serves
    (here the pass waits for the loop to set an event; run inline it would never return)."""
    import asyncio
    import threading

    from ctr.serving.pool import LocalReplica

    started, loop_ran = threading.Event(), threading.Event()

    def forward(x: np.ndarray) -> np.ndarray:
        started.set()
        assert loop_ran.wait(5.0), "the event loop was blocked by the forward pass"
        return np.zeros(len(x), dtype=np.float32)

    async def go() -> np.ndarray:
        call = asyncio.ensure_future(LocalReplica(forward, 16, thread=True).infer(np.zeros((2, 16), dtype=np.int64)))
        while not started.is_set():
            await asyncio.sleep(0.001)
        loop_ran.set()  # the loop got here while the pass was running
        return await call

    assert len(asyncio.run(go())) == 2


def test_gateway_workers_default_to_a_process_per_core_when_each_runs_the_model() -> None:
    """CTR_GATEWAY_WORKERS=0: every core when the gateway runs the model itself, half of them
    when CTRModel needs the rest; a number given is kept."""
    cores = placement.usable_cores()
    assert placement.gateway_workers(Settings(gateway_workers=0, model_replica="local", model_urls="")) == cores
    assert placement.gateway_workers(Settings(gateway_workers=0, model_replica="in-graph")) == max(1, cores // 2)
    assert placement.gateway_workers(Settings(gateway_workers=3, model_replica="local", model_urls="")) == 3


def test_a_local_pass_that_raises_is_a_replica_failure_not_a_500() -> None:
    """A torch error in the local pass (out of memory, ...) reaches the gateway as a model
    failure it answers with the fallback; it used to escape the pool and the gateway as is."""
    import asyncio

    from ctr.serving.coalesce import ModelError
    from ctr.serving.pool import LocalReplica

    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("CUDA out of memory")

    async def go() -> None:
        await LocalReplica(broken, 16).infer(np.zeros((2, 16), dtype=np.int64))

    try:
        asyncio.run(go())
    except ModelError as exc:
        assert exc.reason == "model:error" and "out of memory" in str(exc)
    else:
        raise AssertionError("no error")


def test_usable_cores_follow_a_container_cpu_limit(tmp_path: Path) -> None:
    """A cgroup quota of 1.5 CPUs gives 2 cores at most (os.cpu_count() is the host's)."""
    import os

    mine = len(os.sched_getaffinity(0))
    (tmp_path / "limited").write_text("150000 100000\n")
    (tmp_path / "open").write_text("max 100000\n")
    assert placement.usable_cores(tmp_path / "limited") == min(mine, 2)
    assert placement.usable_cores(tmp_path / "open") == mine
    assert placement.usable_cores(tmp_path / "missing") == mine


def test_two_roots_share_nothing_and_the_routes_read_their_own(tmp_path: Path) -> None:
    """`build` makes every object a request passes through: two roots in one process keep their
    own SLIs, breakers and edge (a module singleton would show one root's request in both)."""
    from starlette.testclient import TestClient

    from ctr.api.routes import make_app

    art: Any = SimpleNamespace(spec=SPEC, segments=TABLE, tag="ctr_model:test", metadata={},
                               architecture={"cardinalities": [4] * 16})  # fmt: skip
    settings = Settings(redis_url="", canary_redis_url="", model_urls="", admin_token="t" * 32, warm=False,
                        database_url=f"sqlite:///{tmp_path / 'f.db'}", data_dir=tmp_path)  # fmt: skip

    def forward(x: np.ndarray) -> np.ndarray:
        return np.full(len(x), 0.25, dtype=np.float32)

    async def go() -> tuple[Any, Any, dict[str, Any]]:
        a, b = root.build(settings, art, local=forward), root.build(settings, art, local=forward)
        await a.pool.start()
        try:
            assert a.telemetry.sli is not b.telemetry.sli and a.edge.gateway is a.gateway is not b.gateway
            assert a.gateway.sli is a.status.sources.recorder and a.edge.status is a.status
            assert {x.name for x in a.breakers.live()} == {"l2", "l3", "model:0"}  # the store's, the replica's
            assert not set(map(id, a.breakers.live())) & set(map(id, b.breakers.live()))
            body = {"user_id": "u1", "ad_ids": ["a1", "a2"], "context": {"hour": 1, "device_type": "mobile",
                    "site_category": "news", "banner_pos": 0, "conn_type": "wifi"}}  # fmt: skip
            return a, b, body
        finally:
            await a.pool.close()

    a, b, body = asyncio.run(go())
    with TestClient(make_app(a.edge)) as client:
        r = client.post("/predict", json=body)
    assert r.status_code == 200 and r.json()["fallback"] is False and r.json()["scores"] == [0.25, 0.25]
    assert a.telemetry.sli.window(60).requests == 1 and b.telemetry.sli.window(60).requests == 0


def test_no_app_state_and_no_process_singletons_on_the_request_path() -> None:
    """Routes read the Edge they were built over; the recorder, the burst log and the breaker
    registry are made by the root (they were module globals set up in two phases)."""
    import ast

    from ctr.observe import log as obslog
    from ctr.observe import sli
    from ctr.resilience import breaker

    root_dir = Path(__file__).resolve().parent.parent
    for path in [*(root_dir / "ctr").rglob("*.py"), root_dir / "service.py"]:
        tree = ast.parse(path.read_text())
        uses = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "state" and (
                (isinstance(n.value, ast.Attribute) and n.value.attr == "app")
                or (isinstance(n.value, ast.Name) and n.value.id.endswith("app")))]  # fmt: skip
        assert not uses, (path, uses)
    assert not hasattr(sli, "RECORDER") and not hasattr(obslog, "BURSTS") and not hasattr(breaker, "_LIVE")


def test_a_root_starts_and_closes_what_it_built(tmp_path: Path) -> None:
    """start(): the pool, the ticker and the model's warm-up (ready once the model answered in
    time); close(): every task ended, the pool closed; the gateway and its pools share one
    counter of requests on their way (the deadline window reads it)."""
    art: Any = SimpleNamespace(spec=SPEC, segments=TABLE, tag="ctr_model:test", metadata={},
                               architecture={"cardinalities": [4] * 16})  # fmt: skip
    settings = Settings(redis_url="", canary_redis_url="", model_urls="", admin_token="t" * 32, warm=False,
                        database_url=f"sqlite:///{tmp_path / 'f.db'}", data_dir=tmp_path)  # fmt: skip

    async def go() -> None:
        r = root.build(settings, art, local=lambda x: np.full(len(x), 0.25, dtype=np.float32))
        assert r.gateway.upstream is r.pool.config.upstream is not None
        await r.start()
        try:
            for _ in range(2000):
                if r.ready():
                    break
                await asyncio.sleep(0.005)
            assert r.ready() and r._tasks and not any(t.done() for t in r._tasks)
        finally:
            await r.close()
        assert all(t.done() for t in r._tasks) and r._model_warm is not None and r._model_warm.done()

    asyncio.run(go())
