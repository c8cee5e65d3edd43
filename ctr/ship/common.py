"""What every shipping step shares: where build outputs go, the image's names, and a logged
subprocess runner."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ctr.settings import PROJECT_ROOT

log = logging.getLogger("ctr.ship")

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
