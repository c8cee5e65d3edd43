"""The wiring hands every part to the gateway it builds (a merge once dropped the canary arms,
so every request went to stable and the gates never saw canary traffic)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from ctr.features.transform import TransformSpec
from ctr.model.segments import SegmentTable
from ctr.serving import wiring
from ctr.settings import Settings

SPEC = TransformSpec(0.04, tuple(np.linspace(0.02, 0.06, 19)), tuple(np.linspace(0.02, 0.06, 19)))
TABLE = SegmentTable({"mobile|news": 30.0}, {"mobile|news": 1000.0}, 400.0, 10_000.0)


def test_the_gateway_gets_the_canary_arms() -> None:
    """wiring.gateway(..., arms) builds a Gateway whose arms are those arms."""
    art: Any = SimpleNamespace(spec=SPEC, segments=TABLE, tag="ctr_model:test")
    stack: Any = SimpleNamespace(lookup=object())
    arms: Any = SimpleNamespace(route=None, record=None)
    gw = wiring.gateway(Settings(), art, object(), stack, arms=arms)  # type: ignore[arg-type]
    assert gw.arms is arms
    assert wiring.gateway(Settings(), art, object(), stack).arms is None  # type: ignore[arg-type]


def test_the_model_runs_in_the_gateway_on_a_cpu_unless_told_otherwise() -> None:
    """CTR_MODEL_REPLICA: local on a CPU (auto), in-graph when asked; CTR_MODEL_URLS wins."""
    assert wiring.runs_local(Settings(model_replica="auto", device="cpu", model_urls=""))
    assert wiring.runs_local(Settings(model_replica="local", model_urls=""))
    assert not wiring.runs_local(Settings(model_replica="in-graph", model_urls=""))
    assert not wiring.runs_local(Settings(model_replica="local", model_urls="http://10.0.0.1:3000"))


def test_auto_goes_in_graph_where_a_gpu_device_node_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decided from /dev alone: importing torch to ask would cost every process of the graph."""
    import sys

    monkeypatch.setattr(wiring, "_gpu_visible", lambda: True)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert not wiring.runs_local(Settings(model_replica="auto", device="auto", model_urls=""))
    assert "torch" not in sys.modules
    assert wiring.runs_local(Settings(model_replica="auto", device="cpu", model_urls=""))


def test_settle_gc_keeps_the_young_threshold_small() -> None:
    """A young threshold of 50,000 made each young collection 22-33 ms at half load."""
    import gc

    before = gc.get_threshold()
    try:
        wiring.settle_gc()
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
    cores = wiring.usable_cores()
    assert wiring.gateway_workers(Settings(gateway_workers=0, model_replica="local", model_urls="")) == cores
    assert wiring.gateway_workers(Settings(gateway_workers=0, model_replica="in-graph")) == max(1, cores // 2)
    assert wiring.gateway_workers(Settings(gateway_workers=3, model_replica="local", model_urls="")) == 3


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
    assert wiring.usable_cores(tmp_path / "limited") == min(mine, 2)
    assert wiring.usable_cores(tmp_path / "open") == mine
    assert wiring.usable_cores(tmp_path / "missing") == mine
