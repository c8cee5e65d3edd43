"""Capacity planning and the batch-size model of the benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctr.bench.batching import best_batch, fit
from ctr.bench.capacity import plan, qps_at_p99, servers_needed


def test_servers_needed_formula() -> None:
    """servers = ceil(peak / (per-server QPS x utilization))."""
    assert servers_needed(10_000, 400, 0.6) == 42
    assert servers_needed(240, 400, 0.6) == 1
    with pytest.raises(ValueError):
        servers_needed(100, 0, 0.5)


def test_qps_at_p99_takes_the_best_level_meeting_the_target(tmp_path: Path) -> None:
    """Levels over the p99 target or with errors do not count."""
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"levels": [
        {"rps": 100, "p99_ms": 10, "non_200": 0}, {"rps": 300, "p99_ms": 45, "non_200": 0},
        {"rps": 500, "p99_ms": 80, "non_200": 0}, {"rps": 350, "p99_ms": 40, "non_200": 3}]}))  # fmt: skip
    assert qps_at_p99(f, 50) == 300
    assert "| 300 |" in plan(1000, None, 50, 0.5, f) and "| 7 |" in plan(1000, None, 50, 0.5, f)


def test_fit_recovers_setup_and_per_sample_time() -> None:
    """A linear latency model is recovered exactly, and B* is the largest batch within budget."""
    t_setup, t_per = fit([1, 32, 128, 256], [0.002 + b * 1e-5 for b in (1, 32, 128, 256)])
    assert t_setup == pytest.approx(0.002) and t_per == pytest.approx(1e-5)
    assert best_batch(0.002, 1e-5, 0.003) == 100
