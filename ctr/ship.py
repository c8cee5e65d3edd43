"""Ship a version: an immutable Bento, an OCI image of it, and a smoke test of the image.

`make bento`, `make image` and the container test call these functions (`ctr ship ...`).

- bento: `bentoml build` with the model tag resolved to an exact version (and recorded as a
  label, with the git commit), the build's inputs digested into a label so an unchanged
  checkout reuses its Bento; the tag goes to build/bento.tag.
- image: `bentoml containerize`. With a Docker engine that answers, the normal path. Without
  one (these machines), buildah builds and podman runs, installed with apt-get when missing;
  when the Bento's base image (python:3.11-slim) cannot be pulled, a local one is made with
  debootstrap from the machine's own apt mirror, and the Python packages are installed from
  a wheelhouse prepared on the host (`pip download`), mounted into the build only for its
  RUN steps together with a uv.toml saying `no-index`: nothing of the host (pip config,
  certificates, credentials) is copied into an image. The image name goes to build/image.tag.
- smoke: run the image on a free loopback port, wait for /readyz, POST /predict, stop it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ctr.local_server import free_port, wait_ready
from ctr.settings import PROJECT_ROOT

log = logging.getLogger(__name__)

BUILD = PROJECT_ROOT / "build"
BENTO_TAG_FILE = BUILD / "bento.tag"
IMAGE_TAG_FILE = BUILD / "image.tag"
WHEELHOUSE = BUILD / "wheelhouse"
CONTAINERS_CONF = PROJECT_ROOT / "deploy" / "containers.conf"
GPU_REQUIREMENTS = "deploy/requirements/gpu.txt"
IMAGE_NAME = "ctr-serve"
UPSTREAM_BASE = "docker.io/library/python:3.11-slim"
LOCAL_BASE = "localhost/ctr-base:bookworm-py311"
# The uv that BentoML's Dockerfile wants (>= 0.13.4); put into the local base image.
UV_VERSION = "0.13.4"
# The local base's Python is bookworm's 3.11.2, where markers ask for more than on this host's
# Python (pip download cannot evaluate python_full_version for another interpreter): redis
# needs async-timeout below 3.11.3.
BASE_PYTHON_EXTRAS = ("async-timeout==5.0.1",)
TOOLS = {"podman": "podman", "buildah": "buildah", "runc": "runc", "debootstrap": "debootstrap"}

SAMPLE_REQUEST = {
    "user_id": "u42",
    "ad_ids": ["a7", "a19", "a3"],
    "context": {"hour": 14, "device_type": "mobile", "site_category": "news", "banner_pos": 1, "conn_type": "wifi"},
}


def sh(cmd: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, logged, failing loudly."""
    log.info("$ %s", " ".join(cmd))
    return subprocess.run(list(cmd), check=True, text=True, **kwargs)


def bentoml_exe() -> str:
    return str(Path(sys.executable).with_name("bentoml"))


# ---------------------------------------------------------------------------------- Bento


def _bentofile(gpu: bool) -> Path:
    """bentofile.yaml, or its GPU variant (the same with the GPU requirements) under build/."""
    src = PROJECT_ROOT / "bentofile.yaml"
    if not gpu:
        return src
    text = re.sub(r'requirements_txt: "[^"]+"', f'requirements_txt: "{GPU_REQUIREMENTS}"', src.read_text())
    out = BUILD / "bentofile.gpu.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _included_files(bentofile: Path) -> list[Path]:
    """The files the bentofile's include patterns name (for the inputs digest)."""
    import yaml

    cfg = yaml.safe_load(bentofile.read_text())
    files = {p for pattern in cfg["include"] for p in PROJECT_ROOT.glob(pattern) if p.is_file()}
    req = PROJECT_ROOT / cfg["python"]["requirements_txt"]
    files |= {bentofile, req, *req.parent.glob("*.txt")}
    return sorted(files)


def inputs_digest(bentofile: Path, model_tag: str) -> str:
    """A digest of everything a Bento is built from: included files, requirements, model tag."""
    h = hashlib.sha256(model_tag.encode())
    for f in _included_files(bentofile):
        h.update(str(f.relative_to(PROJECT_ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


FEATURES_DB = PROJECT_ROOT / "data" / "features.db"  # the file bentofile.yaml packs


def checkpoint_sqlite(path: Path) -> None:
    """Fold the WAL into the database file, so the file the Bento copies is complete; a
    missing file is an error (connecting would create an empty one, and ship it)."""
    import sqlite3
    from contextlib import closing

    if not path.is_file():
        raise click.ClickException(f"{path} is missing: run `make setup` first")
    with closing(sqlite3.connect(f"file:{path}?mode=rw", uri=True)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, text=True,
                             capture_output=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def build_bento(gpu: bool = False, force: bool = False) -> str:
    """Build (or reuse, when nothing changed) the Bento; returns its tag and records it."""
    import bentoml

    from ctr.settings import Settings

    settings = Settings()
    model_tag = str(bentoml.models.get(settings.model_tag).tag)
    checkpoint_sqlite(FEATURES_DB)
    bentofile = _bentofile(gpu)
    digest = inputs_digest(bentofile, model_tag)
    tag = None if force else _bento_with_digest(digest)
    if tag is None:
        labels = {"model": model_tag.replace(":", "-"), "git": _git_commit(), "inputs": digest,
                  "torch": "gpu" if gpu else "cpu"}  # fmt: skip
        cmd = [bentoml_exe(), "build", "-f", str(bentofile), "-o", "tag", str(PROJECT_ROOT)]
        cmd += [a for k, v in labels.items() for a in ("--label", f"{k}={v}")]
        # service.py reads CTR_MODEL_TAG: the exact version is what the Bento pins.
        out = sh(cmd, capture_output=True, env={**os.environ, "CTR_MODEL_TAG": model_tag}).stdout
        match = re.search(r"__tag__:(\S+)", out)
        if match is None:
            raise RuntimeError(f"bentoml build printed no tag: {out!r}")
        tag = match.group(1)
    BENTO_TAG_FILE.parent.mkdir(parents=True, exist_ok=True)
    BENTO_TAG_FILE.write_text(tag + "\n")
    log.info("bento %s (model %s, inputs %s)", tag, model_tag, digest)
    return tag


def _bento_with_digest(digest: str) -> str | None:
    import bentoml

    for bento in sorted(bentoml.bentos.list(), key=lambda b: b.info.creation_time, reverse=True):
        if bento.info.labels.get("inputs") == digest:
            return str(bento.tag)
    return None


def recorded_bento() -> str:
    if not BENTO_TAG_FILE.exists():
        raise FileNotFoundError(f"{BENTO_TAG_FILE} is missing: run `make bento` first")
    return BENTO_TAG_FILE.read_text().strip()


# ---------------------------------------------------------------------------------- engines


@functools.cache
def docker_engine() -> bool:
    """Whether a Docker engine answers (the normal path); a lone docker client does not count."""
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def ensure_tools() -> None:
    """podman, buildah, runc and debootstrap, installed with apt-get when missing."""
    missing = [pkg for exe, pkg in TOOLS.items() if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists()]
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sh(["apt-get", "update", "-qq"], env=env)
    sh(["apt-get", "install", "-y", "-qq", *missing], env=env)


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def image_exists(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], env=podman_env()).returncode == 0


def can_pull(ref: str) -> bool:
    if image_exists(ref):
        return True
    done = subprocess.run(["podman", "pull", "-q", ref], env=podman_env(), capture_output=True, timeout=300)
    return done.returncode == 0


def apt_mirror() -> str:
    """The Debian mirror of this machine's own apt sources (deb822 or one-line format)."""
    texts = [p.read_text() for p in (Path("/etc/apt/sources.list"), *Path("/etc/apt/sources.list.d").glob("*"))
             if p.is_file()]  # fmt: skip
    for text in texts:
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.MULTILINE):
            uri = m.group(1)
            if re.search(r"/debian/?$", uri):
                return uri
    return "http://deb.debian.org/debian"


def ensure_local_base() -> str:
    """A Debian bookworm image with Python 3.11 and uv, made with debootstrap; returns its name."""
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE
    uv_wheel = _download_uv()
    with tempfile.TemporaryDirectory(prefix="ctr-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        sh(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
            "bookworm", str(rootfs), apt_mirror()], stdout=subprocess.DEVNULL)  # fmt: skip
        with zipfile.ZipFile(uv_wheel) as z:
            name = next(n for n in z.namelist() if n.endswith("/scripts/uv"))
            target = rootfs / "usr/local/bin/uv"
            target.write_bytes(z.read(name))
            target.chmod(0o755)
        # Nothing of this host: its resolver and name are the runtime's to provide.
        for p in ("etc/resolv.conf", "etc/hostname"):
            (rootfs / p).unlink(missing_ok=True)
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for f in (rootfs / d).glob("*"):
                if f.is_file():
                    f.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        sh(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", LOCAL_BASE], stdin=tar.stdout,
           env=podman_env(), stdout=subprocess.DEVNULL)  # fmt: skip
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    return LOCAL_BASE


def _download_uv() -> Path:
    dest = WHEELHOUSE / "tools"
    dest.mkdir(parents=True, exist_ok=True)
    wheels = list(dest.glob(f"uv-{UV_VERSION}-*.whl"))
    if not wheels:
        sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest),
            f"uv=={UV_VERSION}"])  # fmt: skip
        wheels = list(dest.glob(f"uv-{UV_VERSION}-*.whl"))
    return wheels[0]


def wheelhouse_requirements(text: str) -> list[str]:
    """The requirement lines of a Bento's requirements.txt, for `pip download`: options dropped
    (the build installs with no index), and a pin without a local label made exact (`===`),
    so the host's CPU build (`torch 2.13.0+cpu` in its find-links) cannot stand in for
    PyPI's CUDA `torch==2.13.0` of the GPU variant."""
    out = []
    for line in text.splitlines():
        req = line.split("#", 1)[0].strip()
        if not req or req.startswith("-"):
            continue
        if re.fullmatch(r"[A-Za-z0-9._-]+==[^+=\s]+", req):
            req = req.replace("==", "===", 1)
        out.append(req)
    return out


def prepare_wheelhouse(bento_path: Path) -> Path:
    """Every wheel the Bento's requirements need, downloaded on the host, plus a uv.toml that
    makes the build install from them alone; one folder per distinct set of requirements,
    mounted at /etc/uv for the build's RUN steps only."""
    reqs = [*wheelhouse_requirements((bento_path / "env/python/requirements.txt").read_text()), *BASE_PYTHON_EXTRAS]
    house = WHEELHOUSE / hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    (house / "wheels").mkdir(parents=True, exist_ok=True)
    (house / "requirements.txt").write_text("\n".join(reqs) + "\n")
    sh([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(house / "wheels"), "-r",
        str(house / "requirements.txt")])  # fmt: skip
    (house / "uv.toml").write_text(
        "# Mounted at /etc/uv during the image build only: install from the wheelhouse, no network.\n"
        'no-index = true\nfind-links = ["/etc/uv/wheels"]\npython-downloads = "never"\n'
    )
    return house


# ---------------------------------------------------------------------------------- image


def image_ref(bento_tag: str) -> str:
    return f"{IMAGE_NAME}:{bento_tag.split(':', 1)[1]}"


def build_image(bento_tag: str | None = None, force: bool = False) -> str:
    """Containerize the Bento (reusing an image already built from it); returns the image name."""
    import bentoml

    tag = bento_tag or recorded_bento()
    ref = image_ref(tag)
    cmd = [bentoml_exe(), "containerize", tag, "-t", ref]
    if docker_engine():
        sh(cmd)
    else:
        ensure_tools()
        if force or not image_exists(f"localhost/{ref}"):
            if not can_pull(UPSTREAM_BASE):
                log.info("%s cannot be pulled: building %s with debootstrap", UPSTREAM_BASE, LOCAL_BASE)
                wheelhouse = prepare_wheelhouse(Path(bentoml.bentos.get(tag).path))
                base = ensure_local_base()
                cmd += ["--opt", f"from={base}", "--opt", f"volume={wheelhouse}:/etc/uv:ro"]
            # RUN steps need chroot isolation here; layers are cached for the next build.
            env = {**podman_env(), "BUILDAH_ISOLATION": "chroot", "BUILDAH_LAYERS": "true"}
            sh([*cmd, "--backend", "buildah"], env=env)
    IMAGE_TAG_FILE.write_text(ref + "\n")
    return ref


def image_size_bytes(ref: str) -> int:
    engine = "docker" if docker_engine() else "podman"
    out = sh([engine, "image", "inspect", ref, "--format", "{{.Size}}"], capture_output=True, env=podman_env())
    return int(out.stdout.strip())


# ---------------------------------------------------------------------------------- smoke


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
    t0 = time.monotonic()
    sh(["podman", "pod", "create", "--name", pod, "-p", f"127.0.0.1:{port}:3000"], env=env, stdout=subprocess.DEVNULL)
    try:
        for name, c in manifest_containers().items():
            if name not in LOCAL_PORTS:  # the canary track runs the next version's image
                continue
            envs = {"BENTOML_PORT": str(LOCAL_PORTS[name]), **SMOKE_ENV}
            envs |= {e["name"]: e["value"] for e in c.get("env", [])}
            cmd = ["podman", "run", "-d", "--pod", pod, "--name", f"{pod}-{name}"]
            cmd += [f"-e{k}={v}" for k, v in envs.items()]
            sh([*cmd, ref, *local_args(c["args"])], env=env, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        ready_s = time.monotonic() - t0
        status, body = post_predict(url)
    finally:
        subprocess.run(["podman", "pod", "rm", "-f", "-t", "5", pod], env=env, capture_output=True)
    return {"image": ref, "ready_s": round(ready_s, 1), "status": status, "response": body}


# ---------------------------------------------------------------------------------- CLI


@click.group("ship")
def cli() -> None:
    """Bento, image and container smoke test (make bento, make image)."""


@cli.command("bento")
@click.option("--gpu", is_flag=True, help="Build the GPU variant (PyPI's CUDA torch) instead of CPU torch.")
@click.option("--force", is_flag=True, help="Build a new Bento even when an identical one exists.")
def bento_cmd(gpu: bool, force: bool) -> None:
    """Build the Bento from bentofile.yaml; its tag goes to build/bento.tag."""
    t0 = time.monotonic()
    tag = build_bento(gpu=gpu, force=force)
    click.echo(json.dumps({"bento": tag, "seconds": round(time.monotonic() - t0, 1)}))


@cli.command("image")
@click.option("--bento", "bento_tag", default=None, help="Bento tag (default: build/bento.tag).")
@click.option("--force", is_flag=True, help="Build even when the image exists.")
def image_cmd(bento_tag: str | None, force: bool) -> None:
    """Containerize the Bento; the image name goes to build/image.tag."""
    t0 = time.monotonic()
    ref = build_image(bento_tag, force=force)
    figures = {"image": ref, "seconds": round(time.monotonic() - t0, 1), "size_mb": image_size_bytes(ref) // 2**20}
    click.echo(json.dumps(figures))


@cli.command("smoke")
@click.option("--image", "ref", default=None, help="Image (default: build/image.tag).")
@click.option("--distributed", is_flag=True, help="One container per service, wired as in deploy/k8s.")
def smoke_cmd(ref: str | None, distributed: bool) -> None:
    """Run the image on a loopback port, wait for /readyz, POST /predict, stop it."""
    out = smoke_distributed(ref) if distributed else smoke(ref)
    click.echo(json.dumps(out))
    if out["status"] != 200:
        raise SystemExit(1)
