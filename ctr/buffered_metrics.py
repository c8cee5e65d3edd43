"""Prometheus values written to the multiprocess files in batches, not on every update.

Under `bentoml serve` prometheus_client runs in multiprocess mode: each inc, set or
observe of a metric takes a lock, calls getpid (a system call, its fork check) and writes
the value into the process's mmap'd file. A gateway request made 29 such writes (ten
histogram observations of two values each, six counters, two gauges, ...): 6 % of each
gateway process's CPU at saturation (`ctr bench profile`), a fifth of the gateway's own
bookkeeping in process (`ctr bench stages`, "gateway predict").

`install()` (called by ctr/metrics.py before it makes any metric) turns every value made
afterwards in this process into a `BufferedValue`: an update changes the value in memory
and marks it dirty, and a daemon thread writes the dirty values to the file every
`FLUSH_S` (and at exit). So a scrape reads figures at most `FLUSH_S` old; reads in the
process (`get`) are exact. Outside multiprocess mode (tests, `ctr` commands) values are
plain memory already and nothing changes. A process killed with SIGKILL loses at most its
last `FLUSH_S` of updates; a child forked without exec writes at once. What this relies on
beyond prometheus_client's public API (`values.ValueClass`, the multiprocess value class's
`_value`, `_timestamp`, and its `inc` and `set` writing the file) is checked on
the pinned version by tests/test_buffered_metrics.py.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from typing import Any

from prometheus_client import values

FLUSH_S = 0.1

# Reentrant: a finalizer run by a collection that starts inside a flush (at any allocation)
# may update a metric in the same thread.
_lock = threading.RLock()
_dirty: set[Any] = set()
_flusher: threading.Thread | None = None
_write: Any = None  # the multiprocess class's own `set`: writes one value to the file
_forked = False  # in a forked child: no buffering
log = logging.getLogger(__name__)


def install() -> bool:
    """Buffer the values made from now on in this process (True), or nothing to do (False:
    not in multiprocess mode)."""
    global _write
    base = values.ValueClass
    if _write is not None:
        return True
    if not getattr(base, "_multiprocess", False):
        return False
    _write = base.set

    class BufferedValue(base):  # type: ignore[misc,valid-type]
        """A multiprocess value whose updates reach the file on the next flush (in a forked
        child: at once, as prometheus_client's own, which resets the parent's totals)."""

        def inc(self, amount: float) -> None:
            if _forked:
                return base.inc(self, amount)
            with _lock:
                self._value += amount
                self._timestamp = 0.0
                _dirtied(self)

        def set(self, value: float, timestamp: float | None = None) -> None:
            if _forked:
                return base.set(self, value, timestamp)
            with _lock:
                self._value = value
                self._timestamp = timestamp or 0.0
                _dirtied(self)

    values.ValueClass = BufferedValue
    atexit.register(flush)
    os.register_at_fork(after_in_child=_forked_child)
    return True


def flush() -> int:
    """Write every dirty value to the file now; returns how many. A value that cannot be
    written stays dirty for the next flush (logged), and the others are written."""
    global _dirty
    failed: list[Any] = []
    with _lock:
        pending, _dirty = _dirty, set()  # updates made meanwhile (a finalizer) go to the new set
        for v in pending:
            try:
                _write(v, v._value, v._timestamp)
            except Exception:  # a closed file, a bad value: never the flusher's end
                failed.append(v)
        _dirty.update(failed)
    if failed:
        log.warning("%d metric value(s) not written to the multiprocess files; retrying", len(failed), exc_info=True)
    return len(pending) - len(failed)


def _dirtied(value: Any) -> None:
    """`value` changed (under _lock): written by the next flush; the first one starts the flusher."""
    _dirty.add(value)
    if _flusher is None:
        _start()


def _start() -> None:
    """The flusher thread (under _lock, on the first update of this process)."""
    global _flusher

    def run() -> None:
        while True:
            time.sleep(FLUSH_S)
            flush()

    _flusher = threading.Thread(target=run, name="ctr-metrics-flush", daemon=True)
    _flusher.start()


def _forked_child() -> None:
    """In a child of os.fork() (BentoML starts its workers with fork + exec, so only a fork
    without exec gets here): values are written at once from now on, as prometheus_client's
    own, whose pid check resets them from the child's own file; the parent's unwritten
    updates are the parent's, and its thread did not come along. (A fork while the parent's
    flusher held prometheus_client's lock would leave it held in the child, as with
    prometheus_client alone and any thread that updates a metric.)"""
    global _forked, _flusher, _lock
    _forked, _flusher, _lock = True, None, threading.RLock()
    _dirty.clear()
