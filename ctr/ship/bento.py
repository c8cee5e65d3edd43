"""The Bento: `bentoml build` with the model tag resolved to an exact version (also a label,
with the git commit) and the build's inputs digested into a label, so an unchanged checkout
reuses its Bento; the tag goes to build/bento.tag."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

import click

from ctr.settings import PROJECT_ROOT
from ctr.ship.common import BENTO_TAG_FILE, BUILD, GPU_REQUIREMENTS, bentoml_exe, log, sh


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
        # service.py reads CTR_MODEL_TAG: the exact version is what the Bento pins; in-graph, so
        # the Bento's service list holds CTRModel (the gateway of a CPU host runs the model itself).
        from ctr.observe.progress import progress

        with progress("bento build", total=1, unit="builds") as bar:
            out = sh(
                cmd,
                capture_output=True,
                env={**os.environ, "CTR_MODEL_TAG": model_tag, "CTR_MODEL_REPLICA": "in-graph"},
            ).stdout
            bar.advance()
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
