"""Smoke tests of an image: run it on a free loopback port, wait for /readyz, POST
/predict, stop it; or run the manifests' Deployments, one container each, in one pod."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctr.bench.local_server import free_port, wait_ready
from ctr.settings import PROJECT_ROOT
from ctr.ship.common import IMAGE_TAG_FILE, SAMPLE_REQUEST, log, sh
from ctr.ship.image import docker_engine, podman_env


@contextmanager
def running(ref: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """The image running detached on a free loopback port; yields its URL; always removed."""
    engine = "docker" if docker_engine() else "podman"
    port = free_port()
    name = f"ctr-smoke-{os.getpid()}-{port}"
    cmd = [engine, "run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:3000"]
    for k, v in (env or {}).items():
        cmd += ["-e", f"{k}={v}"]
    sh([*cmd, ref], env=podman_env(), stdout=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        logs = subprocess.run([engine, "logs", "--tail", "30", name], env=podman_env(), capture_output=True,
                              text=True)  # fmt: skip
        log.debug("container logs:\n%s%s", logs.stdout, logs.stderr)
        subprocess.run([engine, "rm", "-f", "-t", "5", name], env=podman_env(), capture_output=True)


def post_predict(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{url}/predict", data=json.dumps(body or SAMPLE_REQUEST).encode(),
                                 headers={"content-type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")}


# Redis is not in the container: L2 off; the Bento's SQLite feature database is L3.
SMOKE_ENV = {"CTR_REDIS_URL": ""}


def smoke(ref: str | None = None) -> dict[str, Any]:
    """Run the image, wait for /readyz, POST /predict; returns the figures and the answer."""
    ref = ref or IMAGE_TAG_FILE.read_text().strip()
    t0 = time.monotonic()
    with running(ref, SMOKE_ENV) as url:
        wait_ready(url)
        ready_s = time.monotonic() - t0  # from `run` to /readyz 200
        status, body = post_predict(url)
    return {"image": ref, "ready_s": round(ready_s, 1), "total_s": round(time.monotonic() - t0, 1),
            "status": status, "response": body}  # fmt: skip


# ------------------------------------------------------------------- the manifests, locally

K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"
# Where each k8s Service of deploy/k8s listens when the Deployments share one pod's network.
LOCAL_PORTS = {"ctr-gateway": 3000, "ctr-model": 3101, "ctr-features": 3102, "ctr-fallback": 3103}


def manifest_containers(k8s_dir: Path = K8S_DIR) -> dict[str, dict[str, Any]]:
    """The first container of every Deployment in the manifests, by Deployment name."""
    import yaml

    out = {}
    for f in sorted(k8s_dir.glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "Deployment":
                out[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]["containers"][0]
    return out


def local_args(args: list[str]) -> list[str]:
    """A container's args with the cluster's Service URLs pointed at the local pod's ports."""
    out = []
    for a in args:
        for svc, port in LOCAL_PORTS.items():
            a = a.replace(f"http://{svc}:3000", f"http://127.0.0.1:{port}")
        out.append(a)
    return out


def smoke_distributed(ref: str | None = None) -> dict[str, Any]:
    """The stable Deployments of deploy/k8s, each service its own container with the
    manifest's args and env, in one podman pod (localhost for the Service names); then
    /readyz and POST /predict through the gateway. Proves the one-service-per-Deployment
    wiring (`start-http-server --service-name`, `--depends NAME=URL`) with the real image."""
    ref = ref or IMAGE_TAG_FILE.read_text().strip()
    port = free_port()
    pod = f"ctr-dist-{os.getpid()}-{port}"
    env = podman_env()
    # The Secret's internal token, shared by the pod's services (ctr/api/internal.py); without
    # it each standalone service would draw its own and refuse the gateway.
    token = {"CTR_INTERNAL_TOKEN": secrets.token_urlsafe(32)}
    t0 = time.monotonic()
    sh(["podman", "pod", "create", "--name", pod, "-p", f"127.0.0.1:{port}:3000"], env=env, stdout=subprocess.DEVNULL)
    try:
        for name, c in manifest_containers().items():
            if name not in LOCAL_PORTS:  # the canary track runs the next version's image
                continue
            # from the ConfigMap: the gateway's replicas (without them it would run the model itself)
            replicas = {"CTR_MODEL_URLS": f"http://127.0.0.1:{LOCAL_PORTS['ctr-model']}"}
            envs = {"BENTOML_PORT": str(LOCAL_PORTS[name]), **SMOKE_ENV, **replicas, **token}
            envs |= {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
            cmd = ["podman", "run", "-d", "--pod", pod, "--name", f"{pod}-{name}"]
            cmd += [f"-e{k}={v}" for k, v in envs.items()]
            sh([*cmd, ref, *local_args(c["args"])], env=env, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        ready_s = time.monotonic() - t0
        status, body = post_predict(url)
        # every service must still run: a gateway that runs the model itself would answer even
        # with the model's container gone (it once exited at start, "Service ctr_model not found")
        ps = ["podman", "ps", "--filter", f"pod={pod}", "--filter", "status=running", "--format", "{{.Names}}"]
        running = set(sh(ps, env=env, capture_output=True).stdout.split())
        stopped = [n for n in LOCAL_PORTS if f"{pod}-{n}" not in running]
        if stopped:
            raise RuntimeError(f"containers not running after /predict: {stopped} (running: {sorted(running)})")
    finally:
        subprocess.run(["podman", "pod", "rm", "-f", "-t", "5", pod], env=env, capture_output=True)
    return {"image": ref, "ready_s": round(ready_s, 1), "status": status, "response": body}
