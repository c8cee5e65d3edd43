"""`ctr bench batching`: the reference batch table re-measured on this machine.

Starts `bentoml serve service:CTRModel` on a free loopback port, calls its /predict with
batches of 1, 32, 128 and 256 rows (one at a time), and prints latency and throughput
per batch size beside the same forward pass in-process; fits latency = T_setup +
B * T_per_sample and prints the batch size B* that maximises B / (T_setup + B * T_per)
within the inference budget.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson

from ctr.api import internal
from ctr.bench.local_server import free_port, serving
from ctr.features import schema
from ctr.settings import Settings

if TYPE_CHECKING:
    from ctr.model.runner import ModelRunner

BATCHES = (1, 32, 128, 256)


def _matrix(b: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.integers(0, c, b) for c in schema.CARDINALITIES], 1).astype(np.int64)


def _time_http(port: int, x: np.ndarray, n: int, token: str) -> list[float]:
    import http.client

    body = orjson.dumps({"features": x.tolist()})
    conn = http.client.HTTPConnection("127.0.0.1", port)
    head = {"content-type": "application/json", **internal.headers(token)}
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        conn.request("POST", "/predict", body, head)
        r = conn.getresponse()
        r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise RuntimeError(f"CTRModel answered {r.status}")
    conn.close()
    return out


def _time_inprocess(runner: ModelRunner, x: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        runner(x)
        out.append(time.perf_counter() - t0)
    return out


def fit(batches: list[int], latencies_s: list[float]) -> tuple[float, float]:
    """Least-squares T_setup, T_per_sample (seconds) of latency = T_setup + B * T_per."""
    a = np.stack([np.ones(len(batches)), np.array(batches, dtype=float)], 1)
    (t_setup, t_per), *_ = np.linalg.lstsq(a, np.array(latencies_s), rcond=None)
    return float(t_setup), float(t_per)


def best_batch(t_setup: float, t_per: float, budget_s: float, max_b: int = 65536) -> int:
    """argmax_B B / (T_setup + B T_per) subject to T_setup + B T_per <= budget (throughput
    grows with B, so the largest B within budget)."""
    if t_per <= 0:
        return max_b
    return int(max(1, min(max_b, math.floor((budget_s - t_setup) / t_per + 1e-9))))


def run(n: int = 300, budget_ms: float = 3.0) -> str:
    """The batch table, from a CTRModel served on a free port; `n` calls per batch size."""
    from ctr.model import store as modelstore
    from ctr.model.runner import ModelRunner

    settings = Settings()
    runner = ModelRunner(modelstore.artifacts(settings.model_tag), settings.device, settings.torch_threads,
                         settings.model_precision, settings.model_engine)  # fmt: skip
    rng = np.random.default_rng(0)
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "service:CTRModel", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    # CTRModel is internal: it answers only callers holding the shared token (ctr/api/internal.py).
    # The server started here gets this process's token (drawn when CTR_INTERNAL_TOKEN is unset).
    token = internal.ensure_token()
    rows = []
    with serving(f"http://127.0.0.1:{port}", timeout_s=120, cmd=cmd, env={internal.ENV: token}):
        for b in BATCHES:
            x = _matrix(b, rng)
            _time_http(port, x, 20, token)  # warm-up
            http = _time_http(port, x, n, token)
            local_s = float(np.median(_time_inprocess(runner, x, n)))
            rows.append((b, float(np.median(http)), float(np.percentile(http, 99)), float(np.percentile(http, 99.9)),
                         float(np.max(http)), local_s))  # fmt: skip
    t_setup, t_per = fit([r[0] for r in rows], [r[1] for r in rows])
    lines = [
        "| batch | p50 ms (server) | p99 ms (server) | p99.9 ms (server) | max ms (server) | rows/s (server) "
        "| p50 ms (in-process) | rows/s (in-process) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for b, h, p99, p999, top, loc in rows:
        lines.append(f"| {b} | {h * 1e3:.2f} | {p99 * 1e3:.2f} | {p999 * 1e3:.2f} | {top * 1e3:.2f} | {b / h:,.0f} "
                     f"| {loc * 1e3:.3f} | {b / loc:,.0f} |")  # fmt: skip
    ratio = (rows[-1][0] / rows[-1][1]) / (rows[0][0] / rows[0][1])
    lines += [
        "",
        f"throughput at batch {rows[-1][0]} / batch 1 (server): {ratio:.1f}x (target >= 10x)",
        f"fit: T_setup = {t_setup * 1e3:.3f} ms, T_per_sample = {t_per * 1e6:.2f} us",
        f"B* within a {budget_ms:g} ms inference budget: {best_batch(t_setup, t_per, budget_ms / 1e3)} rows",
    ]
    return "\n".join(lines)
