"""Schema-driven fuzzing of the real `bentoml serve`: schemathesis generates requests from
the gateway's own /openapi.json for every public route and runs every check on each answer:
no 5xx, documented status codes and content types, bodies matching their schema, invalid
data refused, valid data accepted, `Allow` on a 405. `make fuzz` runs the same with more
examples (CTR_FUZZ_EXAMPLES)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import BIN, Server

EXAMPLES = int(os.environ.get("CTR_FUZZ_EXAMPLES", "100"))  # per operation and phase
MIN_CASES = 1000
# Every check: besides the answers' conformance, schema-valid requests must be accepted
# (positive_data_acceptance), 405s must name what is allowed, and so on.
CHECKS = "all"


@pytest.fixture(scope="module")
def fuzzed(small_setup: dict[str, str]) -> Iterator[Server]:
    """A gateway of its own (a copy of the data dir, its own Redis database), so what the
    fuzzer writes through /admin/features never reaches the other tests' gateway."""
    data = Path(tempfile.mkdtemp(prefix="ctr-fuzz-data-"))
    shutil.copytree(small_setup["CTR_DATA_DIR"], data, dirs_exist_ok=True)
    env = {**small_setup, "CTR_DATA_DIR": str(data), "CTR_REDIS_URL": small_setup["CTR_REDIS_URL"][:-1] + "3",
           "CTR_MAX_ADS": "50", "CTR_WARM": "false"}  # fmt: skip
    server = Server("service:CTRGateway", env)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data, ignore_errors=True)


def test_fuzzing_every_public_endpoint_finds_no_fault(fuzzed: Server, tmp_path: Path) -> None:
    """At least 1,000 generated requests across /predict, /feedback, /admin/features,
    /model_info (GET and POST) and the probes: every check passes on every answer."""
    cmd = [str(BIN / "schemathesis"), "run", f"{fuzzed.url}/openapi.json", "--url", fuzzed.url,
           "-H", "Authorization: Bearer test-token", "-n", str(EXAMPLES), "--seed", "20261201", "--checks", CHECKS,
           "--no-color", "--report", "json", "--report-json-path", str(tmp_path / "report.json")]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    cases = report["test_cases"]
    print(f"schemathesis: {cases['generated']} test cases, {cases['with_failures']} with failures, "
          f"{report['running_time']:.1f} s")  # fmt: skip
    assert run.returncode == 0 and report["failures"] == [] and report["errors"] == [], run.stdout[-6000:]
    assert report["operations"]["tested"] == 8
    assert cases["generated"] >= MIN_CASES and cases["with_failures"] == 0
