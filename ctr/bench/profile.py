"""`ctr bench profile`: where each service process spends its CPU under load, by py-spy.

py-spy samples every BentoML worker process (each gateway process, the model when it runs
apart, features, fallback) while
the load generator drives `/predict` at one concurrency level; the raw stacks are kept
under `--out` and each process's busy samples are summed by the package of the frame
that was running (ours, torch, uvicorn, opentelemetry, ...). It found BentoML's
OpenTelemetry middleware costing 12-19 % of the CPU with no exporter configured.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import psutil

from ctr.bench import loadgen
from ctr.bench.local_server import serving
from ctr.settings import Settings

# Checked in order against the file of the innermost frame; the first match names it.
PACKAGES = (
    ("ctr/", "ctr (ours)"),
    ("models/", "models (ours)"),
    ("opentelemetry", "opentelemetry"),
    ("bentoml", "bentoml"),
    ("uvicorn", "uvicorn"),
    ("starlette", "starlette"),
    ("aiohttp", "aiohttp"),
    ("asyncio", "asyncio"),
    ("prometheus_client", "prometheus_client"),
    ("torch", "torch"),
    ("numpy", "numpy"),
    ("redis", "redis"),
    ("asyncpg", "asyncpg"),
    ("tenacity", "tenacity"),
    ("pydantic", "pydantic"),
)
_FRAME_FILE = re.compile(r"\(([^()]*):\d+\)$")


def package_of(frame: str) -> str:
    """The package a py-spy frame `func (path/file.py:line)` belongs to."""
    m = _FRAME_FILE.search(frame)
    path = m.group(1) if m else frame
    for needle, name in PACKAGES:
        if needle in path:
            return name
    return "other"


def summarize(raw_lines: Iterable[str]) -> tuple[int, Counter[str]]:
    """Samples, and samples by the package of the innermost frame, from py-spy's `--format raw`
    output (`frame;frame;... count` per line)."""
    total, by_package = 0, Counter[str]()
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        by_package[package_of(stack.split(";")[-1])] += n
    return total, by_package


def format_summary(name: str, total: int, by_package: Counter[str], rate: int, duration_s: float, top: int = 10) -> str:
    busy = total / (rate * duration_s)
    lines = [f"{name}: {total} samples, busy {busy:.0%} of one core", "| package | share of busy samples |"]
    lines.append("|---|---|")
    lines += [f"| {pkg} | {n / total:.1%} |" for pkg, n in by_package.most_common(top)] if total else []
    return "\n".join(lines)


def service_workers(root_pid: int) -> dict[str, int]:
    """BentoML worker processes under the `bentoml serve` process, by service name; a service's
    second and later processes (CTR_GATEWAY_WORKERS > 1) as `name#2`, `name#3`, ..."""
    out: dict[str, int] = {}
    for child in sorted(psutil.Process(root_pid).children(recursive=True), key=lambda p: p.pid):
        try:
            cmd = child.cmdline()
        except psutil.Error:  # gone, or a zombie not reaped yet (a worker that was just killed)
            continue
        if "--service-name" in cmd:
            name = cmd[cmd.index("--service-name") + 1]
            n = sum(1 for k in out if k == name or k.startswith(name + "#"))
            out[name if n == 0 else f"{name}#{n + 1}"] = child.pid
    return out


def run(settings: Settings, url: str, concurrency: int, duration_s: float, n_ads: int, rate: int, out: Path) -> str:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        raise RuntimeError("py-spy is not installed (it is in the project's dev extras: pip install -e '.[dev]')")
    out.mkdir(parents=True, exist_ok=True)
    with serving(url) as proc:
        if proc is None:
            raise RuntimeError(f"a service already answers on {url}: stop it or give a free --url, so this starts one")
        workers = service_workers(proc.pid)
        loadgen.run_levels(url, [4], 2.0, n_ads, settings.data_dir, warm_up=False)  # warm-up, not sampled
        spies = {}
        for name, pid in sorted(workers.items()):
            cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(duration_s)), "--rate", str(rate),
                   "--format", "raw", "--nonblocking", "--output", str(out / f"{name}.txt")]  # fmt: skip
            spies[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rows = loadgen.run_levels(url, [concurrency], duration_s + 1.0, n_ads, settings.data_dir, warm_up=False)
        for spy in spies.values():
            spy.wait(60)
    r = rows[0]
    lines = [f"load: c={concurrency}, {r.model_rps:.0f} model-scored rps ({r.fallback} fallbacks), "
             f"p99 {r.p99_ms:.1f} ms; raw stacks in {out}/", ""]  # fmt: skip
    for name in spies:
        raw = out / f"{name}.txt"
        total, by_package = summarize(raw.read_text().splitlines() if raw.exists() else [])
        lines += [format_summary(name, total, by_package, rate, duration_s), ""]
    return "\n".join(lines)
