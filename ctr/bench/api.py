"""`ctr bench api`: what BentoML's own API layer costs beside the lean /predict mount.

The same requests (1 user x N ads, Zipf users and ads), closed loop, to `POST /predict` (the
Starlette mount: orjson + pydantic, no BentoML IO descriptors) and to `POST /bentoml/predict`
(the `@bentoml.api` that BentoML's clients call, same gateway behind it), in alternating
passes so drift on a shared machine hits both alike; the table has one row per route, level
and pass.
"""

from __future__ import annotations

from ctr.api.bento import ROUTE
from ctr.bench import loadgen
from ctr.bench.local_server import serving
from ctr.settings import Settings

ROUTES = (("/predict (mount)", "/predict"), (f"{ROUTE} (BentoML API)", ROUTE))


def run(settings: Settings, url: str, levels: list[int], duration_s: float, n_ads: int, passes: int = 2) -> str:
    """The table of both routes at each concurrency level, `passes` times each."""
    rows: list[tuple[str, int, loadgen.LevelResult]] = []
    with serving(url):
        for k in range(passes):
            for name, path in ROUTES:
                for r in loadgen.run_levels(url, levels, duration_s, n_ads, settings.data_dir, warm_up=k == 0,
                                            path=path):  # fmt: skip
                    rows.append((name, k + 1, r))
    lines = [f"1 user x {n_ads} ads, closed loop, {duration_s:g} s a level, {passes} alternating passes:",
             "| route | pass | c | model-scored rps | p50 ms | p99 ms | non-200 |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, k, r in rows:
        lines.append(f"| {name} | {k} | {r.concurrency} | {r.model_rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                     f"| {r.non_200} |")  # fmt: skip
    for c in levels:
        mean = {n: [r.model_rps for name, _, r in rows if name == n and r.concurrency == c] for n, _ in ROUTES}
        a, b = (sum(v) / len(v) if v else float("nan") for v in mean.values())
        lines.append(f"c={c}: BentoML API / mount throughput {b / a:.0%}" if a else f"c={c}: no answers")
    return "\n".join(lines)
