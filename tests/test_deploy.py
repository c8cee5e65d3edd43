"""The Kubernetes manifests under deploy/k8s and the Bento's pinned requirements, offline."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from ctr.settings import Settings
from ctr.ship import bento, image, smoke
from ctr.ship.common import GPU_REQUIREMENTS

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.37.0"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
SERVICES = {"ctr_gateway", "ctr_model", "ctr_features", "ctr_fallback"}


def docs(kind: str | None = None) -> list[dict[str, Any]]:
    out = [d for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]
    return [d for d in out if kind is None or d["kind"] == kind]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def flag(c: dict[str, Any], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in c["args"] if a.startswith(f"--{name}=")]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    """Every resource passes strict validation (unknown fields rejected) for Kubernetes 1.37."""
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """kubectl apply -k applies every manifest; the canary is listed commented out (opt-in)."""
    text = (K8S / "kustomization.yaml").read_text()
    for p in MANIFESTS:
        listed = re.search(rf"^\s*- {re.escape(p.name)}$", text, re.MULTILINE)
        commented = re.search(rf"^\s*#\s*- {re.escape(p.name)}$", text, re.MULTILINE)
        if p.name == "model-canary.yaml":
            assert commented and not listed, p.name
        else:
            assert listed, p.name


def test_one_deployment_per_service_of_service_py() -> None:
    """Each BentoML service of service.py runs as its own Deployment; the canary is a second model."""
    names = set(re.findall(r'@bentoml\.service\(name="(\w+)"', (ROOT / "service.py").read_text()))
    assert names == SERVICES
    served = [flag(container(d), "service-name")[0] for d in docs("Deployment")]
    assert sorted(served) == sorted([*SERVICES, "ctr_model"])
    assert all(container(d)["args"][0] == "start-http-server" for d in docs("Deployment"))


def test_gateway_depends_on_every_dependency_by_service_url() -> None:
    """--depends names each dependency of CTRGateway with the URL of an existing Service."""
    (gw,) = [d for d in docs("Deployment") if d["metadata"]["name"] == "ctr-gateway"]
    depends = dict(s.split("=", 1) for s in flag(container(gw), "depends"))
    assert set(depends) == SERVICES - {"ctr_gateway"}
    services = {d["metadata"]["name"]: d for d in docs("Service")}
    for url in depends.values():
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", url).groups()  # type: ignore[union-attr]
        assert int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    # The model Service selects only the stable track, so a canary never joins it by accident.
    assert services["ctr-model"]["spec"]["selector"]["ctr.track"] == "stable"


def test_probes_resources_and_settings_on_every_deployment() -> None:
    """Liveness on /livez, readiness on /readyz, CPU/memory requests, settings from the ConfigMap."""
    for d in docs("Deployment"):
        c = container(d)
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert {"configMapRef": {"name": "ctr-config"}} in c["envFrom"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in d["spec"]["selector"]["matchLabels"].items())


def test_model_replicas_request_a_gpu() -> None:
    """Both model tracks request nvidia.com/gpu; the other services do not."""
    for d in docs("Deployment"):
        res = container(d)["resources"]
        gpu = "nvidia.com/gpu" in res["requests"] and "nvidia.com/gpu" in res["limits"]
        assert gpu == (flag(container(d), "service-name") == ["ctr_model"]), d["metadata"]["name"]


def test_hpa_scales_the_gateway() -> None:
    (hpa,) = docs("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ctr-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2


def test_configmap_and_secret_carry_real_settings() -> None:
    """Every CTR_ key is a setting of ctr/settings.py; the token and the database URL are secret."""
    fields = {f"CTR_{name.upper()}" for name in Settings.model_fields}
    (cm,) = docs("ConfigMap")
    keys = set(cm["data"])
    assert {k for k in keys if k.startswith("CTR_")} <= fields
    assert "CTR_REDIS_URL" in keys
    (secret,) = docs("Secret")
    assert set(secret["stringData"]) == {"CTR_ADMIN_TOKEN", "CTR_DATABASE_URL"}
    assert not keys & set(secret["stringData"])


def test_local_args_point_service_urls_at_local_ports() -> None:
    """The container test runs the manifests' args with Service URLs rewritten to one pod's ports."""
    args = ["--depends=ctr_model=http://ctr-model:3000", "--service-name=ctr_gateway"]
    assert smoke.local_args(args) == ["--depends=ctr_model=http://127.0.0.1:3101", "--service-name=ctr_gateway"]
    assert set(smoke.manifest_containers()) >= set(smoke.LOCAL_PORTS)


def _pins(path: Path) -> dict[str, str]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return dict(ln.split("==", 1) for ln in lines if ln and not ln.startswith(("#", "-")))


def test_bento_requirements_pin_what_pyproject_pins() -> None:
    """cpu.txt and gpu.txt pin pyproject's dependencies exactly; only the torch build differs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = dict(d.split("==", 1) for d in pyproject["project"]["dependencies"])
    deps.pop("bentoml")  # bentoml build adds its own version
    cpu, gpu = _pins(ROOT / "deploy/requirements/cpu.txt"), _pins(ROOT / "deploy/requirements/gpu.txt")
    assert cpu.pop("torch") == deps["torch"] + "+cpu"
    assert gpu.pop("torch") == deps.pop("torch")
    assert cpu == gpu == deps


def test_bentofile_packs_the_feature_database_and_cpu_requirements() -> None:
    cfg = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert "data/features.db" in cfg["include"]
    assert cfg["python"]["requirements_txt"] == "deploy/requirements/cpu.txt"
    gpu = yaml.safe_load(bento._bentofile(gpu=True).read_text())
    assert gpu["python"]["requirements_txt"] == GPU_REQUIREMENTS


def test_wheelhouse_requirements_keep_cpu_and_cuda_torch_apart() -> None:
    """Options are dropped; plain pins become exact, so a local +cpu wheel cannot satisfy the GPU pin."""
    text = "# c\n--extra-index-url https://x\ntorch==2.13.0+cpu\nnumpy==2.4.6  # n\n"
    assert image.wheelhouse_requirements(text) == ["torch==2.13.0+cpu", "numpy===2.4.6"]
    assert image.wheelhouse_requirements("torch==2.13.0\n") == ["torch===2.13.0"]


def test_gateway_canary_arm_points_at_the_canary_service() -> None:
    """CTR_CANARY_URLS names the canary model Service's port; that Service selects the canary track only."""
    (cm,) = docs("ConfigMap")
    services = {d["metadata"]["name"]: d for d in docs("Service")}
    deployments = {d["metadata"]["name"]: d for d in docs("Deployment")}
    for url in cm["data"]["CTR_CANARY_URLS"].split(","):
        host, port = re.fullmatch(r"http://([\w-]+):(\d+)", url).groups()  # type: ignore[union-attr]
        svc = services[host]
        assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
        assert svc["spec"]["selector"]["ctr.track"] == "canary"
        pods = deployments[host]["spec"]["template"]["metadata"]["labels"]
        assert all(pods[k] == v for k, v in svc["spec"]["selector"].items())
        assert flag(container(deployments[host]), "service-name") == ["ctr_model"]
    assert cm["data"]["CTR_CANARY_REDIS_URL"].startswith("redis://")  # transitions need one node
