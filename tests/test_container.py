"""The container smoke test: build the Bento and its image (make bento, make image), run it on
a loopback port, wait for /readyz, POST /predict, stop it; then the same image as one container
per service wired as deploy/k8s wires them. A few minutes cold (apt-get, debootstrap, the image),
under a minute when the image exists. CI always runs it; CTR_SKIP_CONTAINER=1 skips it locally.

It packs the checkout's own model and feature database (`make setup`'s, as `make image` does),
not the test model store: the image is the one a developer ships."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CTR = str(Path(sys.executable).parent / "ctr")
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = [
    pytest.mark.skipif(os.environ.get("CTR_SKIP_CONTAINER") == "1" and not CI, reason="CTR_SKIP_CONTAINER=1"),
    pytest.mark.timeout(1200),
]


def ship(*args: str) -> dict:
    """`ctr ship ...` against the checkout's model store; its JSON answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTR_")}
    env["BENTOML_HOME"] = str(ROOT / "bentoml_home")
    done = subprocess.run([CTR, "-v", "ship", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    if not (ROOT / "bentoml_home" / "models" / "ctr_model").is_dir():
        pytest.fail("no model in bentoml_home: run `make setup` (make test does)")
    ship("bento")
    yield ship("image")["image"]


def test_the_bento_lists_every_service() -> None:
    """The Bento's service list holds CTRModel too: it is built in-graph (built as the CPU
    default, with the gateway running the model itself, it listed only three services)."""
    import yaml

    ship("bento")  # reuses the Bento when nothing changed
    name, version = (ROOT / "build" / "bento.tag").read_text().strip().split(":")
    doc = yaml.safe_load((ROOT / "bentoml_home" / "bentos" / name / version / "bento.yaml").read_text())
    assert {s["name"] for s in doc["services"]} == {"ctr_gateway", "ctr_model", "ctr_features", "ctr_fallback"}


def check_answer(out: dict) -> None:
    assert out["status"] == 200, out
    body = out["response"]
    assert len(body["scores"]) == 3 and all(0 < s < 1 for s in body["scores"])
    assert body["fallback"] is False and body["model_version"].startswith("ctr_model:")


def test_image_answers_predict(image: str) -> None:
    """The image serves all four services and answers /predict from its own model and features."""
    out = ship("smoke", "--image", image)
    check_answer(out)
    assert out["response"]["degraded"] == []


def test_image_as_the_manifests_deploy_it(image: str) -> None:
    """One container per service with the manifests' args (--service-name, --depends) answers too."""
    if shutil.which("podman") is None:
        pytest.skip("the pod needs podman (a Docker engine built the image)")
    check_answer(ship("smoke", "--distributed", "--image", image))
