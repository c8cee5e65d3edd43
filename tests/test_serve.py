"""`ctr serve --service NAME`: the standalone server of one service, its dependencies' URLs from
the settings (the same command `make cluster` and tests/test_pool_faults.py start)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ctr.bench.cluster import topology
from ctr.cli import main
from ctr.cli.launch import serve_command

ROOT = Path(__file__).resolve().parent.parent


def test_a_model_replica_is_served_alone() -> None:
    cmd, env = serve_command("CTRModel", "127.0.0.1", 3101, {})
    assert cmd[1:5] == ["-m", "bentoml_cli._internal.start", "start-http-server", "service:CTRGateway"]
    assert "--service-name=ctr_model" in cmd and "3101" in cmd
    assert not [a for a in cmd if a.startswith("--depends")] and "BENTOML_CONFIG_OPTIONS" not in env
    # the graph BentoML searches for --service-name holds CTRModel only when the gateway does not
    # run the model itself (without this, `ctr serve --service CTRModel` failed: "Service ctr_model not found")
    assert env["CTR_MODEL_REPLICA"] == "in-graph"
    names = "import service; print(sorted(s.name for s in service.CTRGateway.all_services().values()))"
    graph = subprocess.run(
        [sys.executable, "-c", names],
        env={**os.environ, **env}, cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "ctr_model" in graph, graph


def test_a_gateway_gets_its_dependencies_from_the_settings() -> None:
    """Replicas from CTR_MODEL_URLS, the other services from CTR_*_URL; /readyz does not follow them."""
    env = {"CTR_MODEL_URLS": "http://10.0.0.1:3000,http://10.0.0.2:3000", "CTR_FEATURES_URL": "http://f:1"}
    cmd, out = serve_command("CTRGateway", "0.0.0.0", 3000, env)
    assert "--depends=ctr_model=http://10.0.0.1:3000" in cmd
    assert "--depends=ctr_features=http://f:1" in cmd and "--depends=ctr_fallback=http://127.0.0.1:3002" in cmd
    assert out["BENTOML_CONFIG_OPTIONS"] == "services.ctr_gateway.runner_probe.enabled=false"


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--service", "CTRGateway"], "needs CTR_MODEL_URLS"),
    (["serve", "--service", "Nope"], "unknown service 'Nope'"),
])  # fmt: skip
def test_bad_serve_arguments_are_usage_errors(args: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTR_MODEL_URLS", raising=False)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and message in r.output


def test_the_local_topology() -> None:
    t = topology(3, 3000)
    assert (
        t["models"] == [3101, 3102, 3103]
        and t["urls"] == "http://127.0.0.1:3101,http://127.0.0.1:3102,http://127.0.0.1:3103"
    )
