"""The OCI image of a Bento: `bentoml containerize`.

With a Docker engine that answers, the normal path. Without one (these machines), buildah
builds and podman runs, installed with apt-get when missing; when the Bento's base image
(python:3.11-slim) cannot be pulled, a local one is made with debootstrap from the
machine's own apt mirror, and the Python packages are installed from a wheelhouse prepared
on the host (`pip download`), mounted into the build only for its RUN steps together with a
uv.toml saying `no-index`: nothing of the host (pip config, certificates, credentials) is
copied into an image. The image name goes to build/image.tag.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ctr.ship.bento import recorded_bento
from ctr.ship.common import (
    BASE_PYTHON_EXTRAS,
    CONTAINERS_CONF,
    IMAGE_NAME,
    IMAGE_TAG_FILE,
    LOCAL_BASE,
    TOOLS,
    UPSTREAM_BASE,
    UV_VERSION,
    WHEELHOUSE,
    bentoml_exe,
    log,
    sh,
)


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

    from ctr.observe.progress import progress

    tag = bento_tag or recorded_bento()
    ref = image_ref(tag)
    cmd = [bentoml_exe(), "containerize", tag, "-t", ref]
    with progress(f"image {ref}", total=4, unit="steps") as bar:
        if docker_engine():
            bar.note("docker build")
            sh(cmd)
            bar.advance(4)
        else:
            bar.note("container tools")
            ensure_tools()
            bar.advance()
            if force or not image_exists(f"localhost/{ref}"):
                if not can_pull(UPSTREAM_BASE):
                    log.info("%s cannot be pulled: building %s with debootstrap", UPSTREAM_BASE, LOCAL_BASE)
                    bar.note("wheelhouse")
                    wheelhouse = prepare_wheelhouse(Path(bentoml.bentos.get(tag).path))
                    bar.advance()
                    bar.note("local base image")
                    base = ensure_local_base()
                    bar.advance()
                    cmd += ["--opt", f"from={base}", "--opt", f"volume={wheelhouse}:/etc/uv:ro"]
                # RUN steps need chroot isolation here; layers are cached for the next build.
                env = {**podman_env(), "BUILDAH_ISOLATION": "chroot", "BUILDAH_LAYERS": "true"}
                bar.note("buildah build")
                sh([*cmd, "--backend", "buildah"], env=env)
            bar.advance(4 - bar.done)
    IMAGE_TAG_FILE.write_text(ref + "\n")
    return ref


def image_size_bytes(ref: str) -> int:
    engine = "docker" if docker_engine() else "podman"
    out = sh([engine, "image", "inspect", ref, "--format", "{{.Size}}"], capture_output=True, env=podman_env())
    return int(out.stdout.strip())
