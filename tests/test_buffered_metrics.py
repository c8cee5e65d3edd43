"""Buffered multiprocess metrics (ctr/buffered_metrics.py), in a fresh interpreter in
multiprocess mode as under `bentoml serve`: an update writes nothing on the request path,
a flush writes it, exit flushes what is left, and what it relies on in prometheus_client
(the pinned version) is there."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

SCRIPT = textwrap.dedent(
    """
    from ctr import buffered_metrics as B
    B.FLUSH_S = 3600.0  # the thread never flushes during this script: only flush() and exit do
    import ctr.metrics as M
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    def read(name, labels):
        reg = CollectorRegistry()
        MultiProcessCollector(reg)
        return reg.get_sample_value(name, labels) or 0.0

    ok = M.REQUESTS.labels("ok")
    assert type(ok._value).__name__ == "BufferedValue", type(ok._value)
    ok.inc(3)
    M.REQUEST_LATENCY.labels("ok").observe(0.004)
    M.CONCURRENCY_LIMIT.set(7)
    assert ok._value.get() == 3  # exact in the process
    print("before", read("ctr_requests_total", {"outcome": "ok"}))
    print("flushed", B.flush())
    print("after", read("ctr_requests_total", {"outcome": "ok"}),
          read("ctr_request_latency_seconds_bucket", {"outcome": "ok", "le": "0.005"}),
          read("ctr_request_latency_seconds_sum", {"outcome": "ok"}))
    ok.inc(2)  # left for the exit flush
    """
)


def test_updates_reach_the_files_on_flush_and_at_exit(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["before"] == "0.0"  # nothing written on the update itself
    assert int(lines["flushed"]) >= 4  # the counter, a bucket, the sum, the gauge
    assert lines["after"].split() == ["3.0", "1.0", "0.004"]
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(tmp_path))
    assert reg.get_sample_value("ctr_requests_total", {"outcome": "ok"}) == 5.0  # the exit flush


FORK = textwrap.dedent(
    """
    import os
    from ctr import buffered_metrics as B
    B.FLUSH_S = 3600.0
    import ctr.metrics as M

    ok = M.REQUESTS.labels("ok")
    ok.inc(100)
    B.flush()
    pid = os.fork()
    if pid == 0:  # the child counts its own, written at once to its own file
        ok.inc(1)
        os._exit(0)
    os.waitpid(pid, 0)
    """
)


def test_a_forked_child_counts_its_own_updates_not_its_parents(tmp_path: Path) -> None:
    """A child of os.fork() (no exec) writes its updates at once into its own file, from zero:
    100 + 1, not the parent's 100 counted again (201)."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", FORK], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(tmp_path))
    assert reg.get_sample_value("ctr_requests_total", {"outcome": "ok"}) == 101.0


def test_a_value_that_cannot_be_written_stays_for_the_next_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing write neither drops the value nor stops the flusher: it is retried next time."""
    from ctr import buffered_metrics as B

    calls: list[float] = []

    def write(v: object, value: float, ts: float) -> None:
        calls.append(value)
        if len(calls) == 1:
            raise OSError("the file is gone")

    class V:
        _value, _timestamp = 3.0, 0.0

    v = V()
    monkeypatch.setattr(B, "_write", write)
    monkeypatch.setattr(B, "_dirty", {v})
    assert B.flush() == 0 and B._dirty == {v}
    assert B.flush() == 1 and B._dirty == set() and calls == [3.0, 3.0]


def test_outside_multiprocess_mode_nothing_changes() -> None:
    """The test process has no multiprocess directory: values are prometheus_client's own."""
    from prometheus_client import values

    from ctr import buffered_metrics, metrics

    assert not getattr(values.ValueClass, "_multiprocess", False)
    assert buffered_metrics.install() is False
    assert type(metrics.REQUESTS.labels("ok")._value).__name__ != "BufferedValue"
