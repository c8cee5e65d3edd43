"""`ctr bench steady`: long open-loop runs below saturation, and where their tail comes from.

Saturation is the best model-scored rps at p99 <= 50 ms of a closed-loop sweep (or
`--saturation`); each run then offers a fixed share of it (default 50 %) for `--duration`
seconds. Per run: the answers by kind (model-scored, past the deadline, shed, other
fallbacks), the client's p99 / p99.9 / max, and from the gateway's /metrics over the same
window the event loop's lag (ctr_event_loop_lag_seconds) and the garbage collector's pauses
(ctr_gc_pause_seconds), the two in-process suspects of a slow request.
"""

from __future__ import annotations

import re
import urllib.request
from dataclasses import asdict
from pathlib import Path

from ctr.bench import loadgen
from ctr.bench.capacity import best_rps
from ctr.bench.local_server import serving
from ctr.settings import Settings


def scrape(url: str) -> dict[tuple[str, str], float]:
    """Every ctr_* sample of /metrics, by (name, labels)."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("ctr_"):
            key, _, value = line.rpartition(" ")
            name, _, labels = key.partition("{")
            out[(name, labels.rstrip("}"))] = float(value)
    return out


def _delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], name: str) -> dict[str, float]:
    return {labels: v - before.get((n, labels), 0.0) for (n, labels), v in after.items() if n == name}


def _bucket_quantile(buckets: dict[str, float], q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile q; 0 with no samples."""
    edges = sorted((float(k.split('le="')[1].rstrip('"').replace("+Inf", "inf")), v) for k, v in buckets.items())
    total = edges[-1][1] if edges else 0.0
    if total <= 0:
        return 0.0
    return next(le for le, count in edges if count >= q * total) * 1000


def window_stats(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, object]:
    """The gateway's own account of a window: fallbacks by reason, loop lag, GC pauses."""
    lag = _delta(before, after, "ctr_event_loop_lag_seconds_bucket")
    gc_count = _delta(before, after, "ctr_gc_pause_seconds_count")
    gc_sum = _delta(before, after, "ctr_gc_pause_seconds_sum")
    fallbacks = _delta(before, after, "ctr_fallbacks_total")
    return {
        "fallbacks": {re.sub(r'reason="([^"]+)"', r"\1", k): int(v) for k, v in fallbacks.items() if v},
        "lag_p99_ms": _bucket_quantile(lag, 0.99),
        "lag_max_ms": _bucket_quantile(lag, 1.0),
        "gc": {
            re.sub(r'generation="(\d)"', r"\1", k): (int(n), gc_sum.get(k, 0.0) / n * 1000 if n else 0.0)
            for k, n in gc_count.items()
            if n
        },
    }


def run(settings: Settings, url: str, share: float, duration: float, runs: int, saturation: float | None) -> str:
    lines = []
    with serving(url):
        if saturation is None:
            sweep = loadgen.run_levels(url, [1, 4, 8, 16, 32], 8.0, 100, settings.data_dir)
            saturation = best_rps([asdict(r) for r in sweep])
            lines += ["closed-loop sweep (for saturation):", loadgen.format_table(sweep, stages=False), ""]
        rate = round(saturation * share)
        lines.append(f"saturation {saturation:.0f} model-scored rps; {runs} open-loop run(s) of {duration:.0f} s "
                     f"at {share:.0%} = {rate}/s")  # fmt: skip
        head = ("| run | requests | model-scored | past deadline | shed | other fallbacks | p99 ms | p99.9 ms "
                "| max ms | loop lag p99 / max ms | GC collections (mean ms) by generation |")  # fmt: skip
        lines += [head, "|---" * 11 + "|"]
        for i in range(runs):
            before = scrape(url)
            r = loadgen.run_rates(url, [rate], duration, 100, settings.data_dir)[0]
            w = window_stats(before, scrape(url))
            fb: dict[str, int] = w["fallbacks"]  # type: ignore[assignment]
            other = sum(v for k, v in fb.items() if k not in ("model:timeout", "model:deadline", "overload:shed"))
            gc: dict[str, tuple[int, float]] = w["gc"]  # type: ignore[assignment]
            gcs = ", ".join(f"gen{g}: {n} ({ms:.1f})" for g, (n, ms) in sorted(gc.items())) or "none"
            lines.append(f"| {i + 1} | {r.requests} | {r.model_scored} | {r.deadline} | {r.shed} | {other} "
                         f"| {r.p99_ms:.2f} | {r.p999_ms:.2f} | {r.max_ms:.2f} "
                         f"| {w['lag_p99_ms']:.1f} / {w['lag_max_ms']:.1f} | {gcs} |")  # fmt: skip
    return "\n".join(lines)


def main(url: str, share: float, duration: float, runs: int, saturation: float | None, out: Path | None) -> str:
    text = run(Settings(), url, share, duration, runs, saturation)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return text
