"""Capacity planning: servers = ceil(peak QPS / (QPS per server x utilization target)),
with the QPS per server taken from a measured `ctr bench e2e` run at the p99 target.
Only model-scored answers count: a level that answered from the fallback table served
nobody a prediction, however many 200s it returned."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def best_rps(levels: list[dict[str, Any]], p99_ms: float = 50.0) -> float:
    """The best model-scored throughput among load levels whose p99 met the target with no
    errors (0 if none)."""
    if any("model_rps" not in lv for lv in levels):
        raise ValueError("a level has no model_rps (a report from before fallbacks were counted apart): re-run it")
    ok = (lv["model_rps"] for lv in levels if lv["p99_ms"] <= p99_ms and lv["non_200"] == 0)
    return float(max(ok, default=0.0))


def qps_at_p99(bench: Path, p99_ms: float) -> float:
    """The best measured model-scored throughput of a `ctr bench e2e` report whose p99 met
    the target (closed- and open-loop levels alike)."""
    report = json.loads(bench.read_text())
    best = best_rps([*report["levels"], *report.get("open_levels", [])], p99_ms)
    if not best:
        raise ValueError(f"no level of {bench} met p99 <= {p99_ms} ms")
    return best


def servers_needed(peak_qps: float, qps_per_server: float, utilization: float) -> int:
    if peak_qps <= 0 or qps_per_server <= 0 or not 0 < utilization <= 1:
        raise ValueError("peak_qps and qps_per_server must be > 0 and utilization in (0, 1]")
    return math.ceil(peak_qps / (qps_per_server * utilization))


def plan(peak_qps: float, qps_per_server: float | None, p99_ms: float, utilization: float, bench: Path) -> str:
    source = "given"
    if qps_per_server is None:
        if not bench.exists():
            raise SystemExit(f"no {bench}: run `ctr bench e2e` first, or pass --qps-per-server")
        qps_per_server = qps_at_p99(bench, p99_ms)
        source = f"model-scored rps measured in {bench} at p99 <= {p99_ms:g} ms"
    n = servers_needed(peak_qps, qps_per_server, utilization)
    return "\n".join([
        "| replica kind | QPS per server | source | utilization | peak QPS | servers |",
        "|---|---|---|---|---|---|",
        f"| CPU (2 cores, whole graph) | {qps_per_server:.0f} | {source} | {utilization:.0%} | {peak_qps:.0f} | {n} |",
        "| GPU model replica | – | not measured: no GPU was lent to this project | – | – | – |",
    ])  # fmt: skip
