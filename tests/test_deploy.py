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
        if p.name in ("model-canary.yaml", "model-baseline.yaml"):
            assert commented and not listed, p.name
        else:
            assert listed, p.name


def test_one_deployment_per_service_of_service_py() -> None:
    """Each BentoML service of service.py runs as its own Deployment; the canary is a second model."""
    names = set(re.findall(r'@bentoml\.service\(name="(\w+)"', (ROOT / "service.py").read_text()))
    assert names == SERVICES
    served = [flag(container(d), "service-name")[0] for d in docs("Deployment")]
    assert sorted(served) == sorted([*SERVICES, "ctr_model", "ctr_model"])
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


SECRET_KEYS = {"CTR_ADMIN_TOKEN", "CTR_INTERNAL_TOKEN", "CTR_DATABASE_URL"}
INTERNAL = {"ctr-model", "ctr-features", "ctr-fallback"}


def _example_keys() -> dict[str, str]:
    lines = (K8S / "secrets.env.example").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def test_configmap_and_secret_carry_real_settings() -> None:
    """Every CTR_ key is a setting of ctr/settings.py; the tokens and the database URL are secret."""
    fields = {f"CTR_{name.upper()}" for name in Settings.model_fields}
    (cm,) = docs("ConfigMap")
    keys = set(cm["data"])
    assert {k for k in keys if k.startswith("CTR_")} <= fields
    assert "CTR_REDIS_URL" in keys
    example = _example_keys()
    assert set(example) == SECRET_KEYS and fields >= SECRET_KEYS
    assert all(v == "" for v in example.values())  # nothing guessable to copy
    assert not keys & SECRET_KEYS


def test_no_secret_is_committed_and_the_generator_needs_the_operators_file() -> None:
    """No Secret manifest ships; kustomize generates ctr-secrets from secrets.env, which git ignores."""
    import subprocess

    assert docs("Secret") == []
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kust["secretGenerator"] == [{"name": "ctr-secrets", "envs": ["secrets.env"],
                                        "options": {"labels": {"app.kubernetes.io/part-of": "ctr-serve"}}}]  # fmt: skip
    ignored = subprocess.run(["git", "check-ignore", "-q", str(K8S / "secrets.env")], cwd=ROOT)
    assert ignored.returncode == 0
    assert "CHANGE-ME" not in (K8S / "secrets.env.example").read_text()


def _kubectl() -> str:
    import shutil

    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed (kubectl kustomize renders the kustomization offline)")
    return exe


def test_kustomize_refuses_to_render_without_the_secret_file(tmp_path: Path) -> None:
    """Without secrets.env, `kubectl kustomize` fails: no placeholder Secret can be applied."""
    import shutil
    import subprocess

    exe = _kubectl()
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("secrets.env"))
    r = subprocess.run([exe, "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True)
    assert r.returncode != 0 and "secrets.env" in r.stderr


def test_kustomize_renders_the_secret_and_points_every_reference_at_it(tmp_path: Path) -> None:
    """With the operator's file, the generated Secret (hashed name) is what every Deployment reads."""
    import shutil
    import subprocess

    exe = _kubectl()
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns("secrets.env"))
    values = {"CTR_ADMIN_TOKEN": "a" * 64, "CTR_INTERNAL_TOKEN": "b" * 64, "CTR_DATABASE_URL": "postgresql://x:y@h/d"}
    (tmp_path / "k8s" / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    out = subprocess.run([exe, "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    (secret,) = [d for d in rendered if d["kind"] == "Secret"]
    name = secret["metadata"]["name"]
    assert name.startswith("ctr-secrets-") and set(secret["data"]) == SECRET_KEYS
    for d in (d for d in rendered if d["kind"] == "Deployment"):
        c = container(d)
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e]
        assert refs and set(refs) == {name}, d["metadata"]["name"]


def _env_from_secret(c: dict[str, Any]) -> set[str]:
    """The Secret keys a container sees: all of ctr-secrets via envFrom, or single keys."""
    keys = set()
    if {"secretRef": {"name": "ctr-secrets"}} in c.get("envFrom", []):
        keys |= SECRET_KEYS
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["name"] == "ctr-secrets":
            keys.add(ref["key"])
    return keys


def test_every_service_gets_the_internal_token_and_the_model_nothing_more() -> None:
    """All Deployments read CTR_INTERNAL_TOKEN from the Secret; model pods get only that key."""
    for d in docs("Deployment"):
        keys = _env_from_secret(container(d))
        assert "CTR_INTERNAL_TOKEN" in keys, d["metadata"]["name"]
        if d["metadata"]["labels"]["app.kubernetes.io/name"] == "ctr-model":
            assert keys == {"CTR_INTERNAL_TOKEN"}, d["metadata"]["name"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    ok = all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e  # the only operator used here
        ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def test_network_policy_lets_only_gateway_pods_reach_the_internal_services() -> None:
    """The policy selects every internal pod (canary included), not the gateway; only gateway pods get in."""
    (policy,) = docs("NetworkPolicy")
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    for d in docs("Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert _selects(spec["podSelector"], labels) == (labels["app.kubernetes.io/name"] in INTERNAL), labels
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector, no ipBlock
    (gw,) = [d for d in docs("Deployment") if d["metadata"]["name"] == "ctr-gateway"]
    assert _selects(peer["podSelector"], gw["spec"]["template"]["metadata"]["labels"])
    others = [d for d in docs("Deployment") if d["metadata"]["name"] != "ctr-gateway"]
    assert not any(_selects(peer["podSelector"], d["spec"]["template"]["metadata"]["labels"]) for d in others)
    assert rule["ports"] == [{"protocol": "TCP", "port": 3000}]


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


def test_the_canarys_baseline_has_the_canarys_size_and_stables_image() -> None:
    """Kayenta's baseline: stable's image on as many replicas as the canary, its own track and
    Service (never selected by ctr-model), named by CTR_CANARY_BASELINE_URLS."""
    deps = {d["metadata"]["name"]: d for d in docs("Deployment")}
    canary, baseline, stable = deps["ctr-model-canary"], deps["ctr-model-baseline"], deps["ctr-model"]
    assert baseline["spec"]["replicas"] == canary["spec"]["replicas"]
    assert container(baseline)["image"] == container(stable)["image"]
    assert baseline["spec"]["template"]["metadata"]["labels"]["ctr.track"] == "baseline"
    services = {d["metadata"]["name"]: d for d in docs("Service")}
    assert services["ctr-model-baseline"]["spec"]["selector"]["ctr.track"] == "baseline"
    (cm,) = docs("ConfigMap")
    assert cm["data"]["CTR_CANARY_BASELINE_URLS"] == "http://ctr-model-baseline:3000"
