"""`ctr bench l1`: the L1 lookup of one request (1 user x 100 ads, every key in L1), this
tree against an older one, alternated.

Each measurement is a child process (`python -m ctr.bench.l1 --child`) that opens the
feature stack on the SQLite L3 (no Redis), warms L1, reads the load generator's Zipf
requests once, then times `FeatureLookup.lookup` over them (microseconds, median of every
call). With `--against REF` the children alternate between this tree and REF's `ctr`
package (`git archive`, with this file copied in: it uses only APIs both have), and the
table gives each run's median, the median of the medians and their ratio.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from ctr.settings import Settings

REPO = Path(__file__).resolve().parents[2]


async def _measure(n: int) -> float:
    from ctr.bench.loadgen import Traffic
    from ctr.features import stack as feature_stack
    from ctr.features.warm import warm

    settings = Settings()
    reqs = [orjson.loads(b) for b in Traffic(settings.data_dir, 100).bodies(2000)]
    async with feature_stack.opened(settings.model_copy(update={"redis_url": ""})) as stack:
        await warm(stack.store, 10**9, stack.schema)
        lookup = stack.lookup.lookup
        for r in reqs:  # every key in L1 from here on
            await lookup(r["user_id"], r["ad_ids"])
        xs = []
        for i in range(n):
            r = reqs[i % len(reqs)]
            t0 = time.perf_counter()
            await lookup(r["user_id"], r["ad_ids"])
            xs.append(time.perf_counter() - t0)
    return statistics.median(xs) * 1e6


def _child(tree: Path, n: int) -> float:
    # run in `tree` (python -m puts the working directory first on the path), on this tree's data
    env = {**os.environ, "PYTHONPATH": str(tree), "CTR_DATA_DIR": str(Settings().data_dir.resolve())}
    out = subprocess.run([sys.executable, "-m", "ctr.bench.l1", "--child", str(n)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def run(against: str | None, rounds: int = 5, n: int = 5000) -> str:
    """This tree's lookup, alternated with `against`'s (a git ref) when given."""
    trees = {"this tree": REPO}
    tmp = None
    if against:
        tmp = Path(tempfile.mkdtemp(prefix="ctr-l1-"))
        archive = subprocess.run(["git", "archive", against, "ctr"], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
        shutil.copy(Path(__file__), tmp / "ctr" / "bench" / "l1.py")
        trees = {against: tmp, "this tree": REPO}
    try:
        runs: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, tree in trees.items():
                runs[name].append(_child(tree, n))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    head = "| tree | median us per lookup (1 user x 100 ads, all in L1), each run | median of runs |"
    lines = [head, "|---|---|---|"]
    for name, xs in runs.items():
        lines.append(f"| {name} | {', '.join(f'{x:.1f}' for x in xs)} | {statistics.median(xs):.1f} |")
    if against:
        old, new = statistics.median(runs[against]), statistics.median(runs["this tree"])
        lines += ["", f"this tree / {against}: {new / old:.2f}x the time ({old / new:.1f}x faster), "
                  f"{rounds} alternated runs of {n} lookups each"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    print(f"{asyncio.run(_measure(int(sys.argv[2]))):.2f}")
