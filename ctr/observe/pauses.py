"""When the process stops serving: event-loop lag and garbage-collection pauses.

A request waits for everything queued before it on the event loop: a long callback, a
forward pass run on the loop, a full collection. `watch_loop` (a task) asks to wake up every
`every_s` and records how late it woke (ctr_event_loop_lag_seconds) and how long, meanwhile,
its thread was ready to run but waited for a CPU (ctr_event_loop_cpu_wait_seconds, the
kernel's run-queue wait from /proc/thread-self/schedstat); `watch_gc` times each collection
through `gc.callbacks` (ctr_gc_pause_seconds{generation}). They cost next to nothing (a timer
and a 20 us file read a few times a second, two clock reads a collection) and answer "was it
this process's own work, the GC, or another process on its cores?" for a slow request
without a profiler attached.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ctr import metrics

SCHEDSTAT = "/proc/thread-self/schedstat"


def cpu_wait_s(path: str = SCHEDSTAT) -> float | None:
    """Seconds the calling thread has spent ready to run but waiting for a CPU (the second
    field of schedstat, in ns); None where the kernel does not say (not Linux, or a kernel
    without schedstats or delay accounting, whose file reads all zeros)."""
    try:
        with open(path, "rb") as f:
            ran, waited = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    return waited / 1e9 if ran > 0 else None


# The sizes (objects) at which a tick collects the young and the middle generation (bound_young).
YOUNG_LIMIT = 5_000
MIDDLE_LIMIT = 10_000


def bound_young(young: int = YOUNG_LIMIT, middle: int = MIDDLE_LIMIT) -> int:
    """Collect the young generation when it holds more than `young` objects, and the young and
    middle ones when the middle holds more than `middle`; returns the generation collected
    (-1 for none).

    CPython starts a young collection when allocations minus deallocations of tracked objects
    pass 700. A cache that replaces old entries with new ones keeps that difference near zero:
    every new entry is paid for by an old one freed, so the new ones pile up in the young
    generation with no collection, and then in the middle one. In the gateway 81,000-105,000
    piled up and the collection that finally came took 15-45 ms (a temporary hook that logged
    each collection's size, at 944 requests/s). Looking at both sizes each tick (a list of
    references, microseconds at these bounds) caps what one collection has to scan; below the
    bounds it changes nothing."""
    if not gc.isenabled():
        return -1
    if len(gc.get_objects(1)) > middle:
        gc.collect(1)
        return 1
    if len(gc.get_objects(0)) > young:
        gc.collect(0)
        return 0
    return -1


async def watch_loop(
    every_s: float = 0.05,
    clock: Callable[[], float] = time.perf_counter,
    waited: Callable[[], float | None] = cpu_wait_s,
) -> None:
    """Every `every_s` until cancelled: the loop's lag, its thread's run-queue wait since the
    last tick, and the collections timed since; and a bound on the young generation."""
    last = waited()
    while True:
        due = clock() + every_s
        await asyncio.sleep(every_s)
        metrics.EVENT_LOOP_LAG.observe(max(0.0, clock() - due))
        if last is not None and (now := waited()) is not None:
            metrics.EVENT_LOOP_CPU_WAIT.observe(max(0.0, now - last))
            last = now
        bound_young()
        flush_gc()


_started: dict[int, float] = {}
# (generation, seconds) of collections not yet in the histogram. The callback only appends
# here: a collection can start inside prometheus_client while it holds its lock (a new
# labelled child allocating), and observing from the callback then waited for that lock
# forever (a gateway process hung that way in the test suite).
_pauses: deque[tuple[int, float]] = deque(maxlen=10_000)


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    gen = info.get("generation", 2)
    if phase == "start":
        _started[gen] = time.perf_counter()
    elif (t0 := _started.pop(gen, None)) is not None:
        _pauses.append((gen, time.perf_counter() - t0))


def flush_gc() -> None:
    """The collections timed so far into ctr_gc_pause_seconds (called from the event loop)."""
    while _pauses:
        gen, seconds = _pauses.popleft()
        metrics.GC_PAUSE.labels(str(gen)).observe(seconds)


def watch_gc() -> None:
    """Time every collection of this process from now on (once; a second call changes nothing)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def settle_gc() -> None:
    """Move start-up objects out of the collector's sight; collect young objects often and the
    old generation rarely.

    The L1 cache and the model hold ~10^5 long-lived objects; full collections over them
    stalled requests for tens of ms (measured: p99 at 16 concurrent requests 230 ms before
    the freeze, 53 ms after). The young generation is left at Python's 700: a threshold of
    50,000 made each young collection scan tens of thousands of objects, 22-33 ms once or
    twice a 40 s run at half load (ctr_gc_pause_seconds, `ctr bench steady`), enough to push
    requests past the 50 ms deadline; at 700 they took 0.7 ms (the middle generation 2.1 ms).
    The young and middle generations are also bounded by size each loop tick
    (ctr.observe.pauses.bound_young): cache turnover can fill them with no collection
    starting. The forced middle collections count towards a full one too (about 15 a minute
    per process at half load against 5 without), so a full collection comes after 3,000
    middle ones rather than CPython's 1,000: about every 3 hours under that load, as before.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 3000)
