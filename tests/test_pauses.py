"""GC pause timing must never touch Prometheus from inside the collector."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from ctr import metrics
from ctr.observe import pauses


class Locked:
    """A histogram whose lock is held by this very thread (prometheus_client creating a labelled
    child when a collection started): any observe from the GC callback would block forever."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float]] = []
        self.locked = True

    def labels(self, gen: str) -> Any:
        if self.locked:
            raise AssertionError("the GC callback took the metrics lock (a deadlock under bentoml serve)")
        return type("Child", (), {"observe": lambda _, s: self.seen.append((gen, s))})()


def test_a_collection_is_recorded_off_the_collector(monkeypatch: pytest.MonkeyPatch) -> None:
    """The callback only queues the pause; the event loop's flush observes it (the old callback
    observed at once and hung a gateway process that collected inside prometheus_client)."""
    fake = Locked()
    monkeypatch.setattr(metrics, "GC_PAUSE", fake)
    pauses._pauses.clear()
    pauses._on_gc("start", {"generation": 0})
    pauses._on_gc("stop", {"generation": 0})
    fake.locked = False
    pauses.flush_gc()
    assert len(fake.seen) == 1 and fake.seen[0][0] == "0" and fake.seen[0][1] >= 0


def test_watch_gc_registers_once() -> None:
    pauses.watch_gc()
    pauses.watch_gc()
    try:
        assert gc.callbacks.count(pauses._on_gc) == 1
    finally:
        gc.callbacks.remove(pauses._on_gc)


def _sum(hist: Any) -> float:
    return next(s.value for m in hist.collect() for s in m.samples if s.name.endswith("_sum"))


def test_the_loop_records_its_threads_wait_for_a_cpu_per_tick() -> None:
    """Each tick observes the run-queue wait since the previous one (not the running total)."""
    import asyncio

    totals = iter([1.0, 1.004, 1.010, 1.010] + [1.010] * 1000)
    before = _sum(metrics.EVENT_LOOP_CPU_WAIT)

    async def go() -> None:
        task = asyncio.create_task(pauses.watch_loop(0.001, waited=lambda: next(totals)))
        for _ in range(50):
            await asyncio.sleep(0.002)
        task.cancel()

    asyncio.run(go())
    assert _sum(metrics.EVENT_LOOP_CPU_WAIT) - before == pytest.approx(0.010)


def test_cpu_wait_reads_the_kernels_run_queue_wait(tmp_path: Any) -> None:
    stat = tmp_path / "schedstat"
    stat.write_text("57838251 682363000 25\n")
    assert pauses.cpu_wait_s(str(stat)) == pytest.approx(0.682363)
    assert pauses.cpu_wait_s(str(tmp_path / "absent")) is None
    stat.write_text("0 0 0\n")  # no schedstats in this kernel: unknown, not zero
    assert pauses.cpu_wait_s(str(stat)) is None


def test_a_cache_that_replaces_entries_gets_its_young_generation_collected() -> None:
    """New entries paid for by old ones freed keep CPython's allocation count near zero, so no
    young collection starts however many pile up (asserted below, with the collector on);
    bound_young collects them, and then the middle generation they move to."""
    gc.collect()
    old = [[i] for i in range(30_000)]
    gc.collect()  # the old entries are no longer young
    started: list[int] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(seen)
    try:
        new = []
        for i in range(20_000):
            old.pop()
            new.append([i])
        assert started == [] and len(gc.get_objects(0)) > 20_000  # the pile-up: no collection
        assert pauses.bound_young(5_000, 50_000) == 0  # the young ones, into the middle generation
        assert len(gc.get_objects(0)) < 5_000 and len(gc.get_objects(1)) > 20_000
        assert pauses.bound_young(5_000, 10_000) == 1  # the middle one is over its bound
        assert len(gc.get_objects(1)) < 10_000
        assert pauses.bound_young(5_000, 10_000) == -1  # below both bounds: nothing
    finally:
        gc.callbacks.remove(seen)


def test_every_tick_bounds_the_young_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    ticks: list[int] = []
    monkeypatch.setattr(pauses, "bound_young", lambda: ticks.append(1) or -1)

    async def go() -> None:
        task = asyncio.create_task(pauses.watch_loop(0.001, waited=lambda: None))
        for _ in range(20):
            await asyncio.sleep(0.002)
        task.cancel()

    asyncio.run(go())
    assert len(ticks) >= 2
