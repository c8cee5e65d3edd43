"""`ctr bench overload`: past saturation, before and after the gateway's concurrency limit.

The service is started once per configuration on a free port: with CTR_LIMIT=off
(before: every request is admitted and waits out its deadline), with the adaptive limit
at two latency targets and CTR_OVERLOAD=fallback, and with CTR_OVERLOAD=reject. The saturation rate is measured
first (closed loop, the best model-scored rps of the unlimited service); then each
service is offered the same multiples of it in open loop (fixed arrival rate, latency
from the scheduled send time), so a slow server cannot slow the offered load down.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from ctr.bench import loadgen
from ctr.bench.local_server import free_port, serving
from ctr.settings import Settings

CONFIGS: list[tuple[str, dict[str, str]]] = [
    ("before: no limit (CTR_LIMIT=off)", {"CTR_LIMIT": "off"}),
    ("after: limit, CTR_LIMIT_LATENCY_MS=25, fallback", {"CTR_LIMIT_LATENCY_MS": "25"}),
    ("after: limit, CTR_LIMIT_LATENCY_MS=45, fallback", {"CTR_LIMIT_LATENCY_MS": "45"}),
    ("after: limit, CTR_LIMIT_LATENCY_MS=25, reject", {"CTR_LIMIT_LATENCY_MS": "25", "CTR_OVERLOAD": "reject"}),
]
SATURATION_LEVELS = [16, 32, 64]


def run(settings: Settings, port: int, duration: float, n_ads: int, factors: list[float], out: Path) -> str:
    url = f"http://127.0.0.1:{port or free_port()}"
    saturation = 0.0
    tables: list[tuple[str, list[loadgen.LevelResult]]] = []
    sat_rows: list[loadgen.LevelResult] = []
    for name, env in CONFIGS:
        with serving(url, env=env) as proc:
            if proc is None:
                raise SystemExit(f"{url} already answers: stop it, or pass a free --port")
            if not saturation:
                sat_rows = loadgen.run_levels(url, SATURATION_LEVELS, duration, n_ads, settings.data_dir)
                saturation = max(r.model_rps for r in sat_rows)
            else:
                loadgen.run_levels(url, [4], 2.0, n_ads, settings.data_dir, warm_up=False)  # warm-up
            rates = [round(saturation * f) for f in factors]
            tables.append((name, loadgen.run_rates(url, rates, duration, n_ads, settings.data_dir)))
    lines = [f"saturation (closed loop, no limit, best model-scored rps over c={SATURATION_LEVELS}): "
             f"{saturation:.0f} rps", loadgen.format_table(sat_rows, stages=False), ""]  # fmt: skip
    head = ("| service | offered (x saturation) | sent rps | model-scored rps | fallback share | of which shed "
            "| non-200 | p50 ms | p99 ms | p99.9 ms | max ms |")  # fmt: skip
    lines += [head, "|---" * 11 + "|"]
    for name, rows in tables:
        for f, r in zip(factors, rows, strict=True):
            lines.append(f"| {name} | {r.offered_rps:.0f} ({f:g}x) | {r.sent_rps:.0f} | {r.model_rps:.0f} "
                         f"| {r.fallback_share:.1%} | {r.shed} | {r.non_200} | {r.p50_ms:.1f} | {r.p99_ms:.1f} "
                         f"| {r.p999_ms:.1f} | {r.max_ms:.1f} |")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"saturation_rps": saturation, "saturation_levels": [asdict(r) for r in sat_rows],
                               "runs": {n: [asdict(r) for r in rows] for n, rows in tables}}, indent=2))  # fmt: skip
    return "\n".join(lines)
