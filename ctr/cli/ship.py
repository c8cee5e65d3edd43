"""`ctr ship`: Bento, image and container smoke test (make bento, make image, make smoke)."""

from __future__ import annotations

import json
import time

import click

# The ctr.ship modules are imported by the commands that use them: `ctr serve` and every other
# command load this module, and ctr.ship.smoke brings in ctr.bench.


@click.group("ship")
def ship() -> None:
    """Bento, image and container smoke test (make bento, make image)."""


@ship.command("bento")
@click.option("--gpu", is_flag=True, help="Build the GPU variant (PyPI's CUDA torch) instead of CPU torch.")
@click.option("--force", is_flag=True, help="Build a new Bento even when an identical one exists.")
def bento_cmd(gpu: bool, force: bool) -> None:
    """Build the Bento from bentofile.yaml; its tag goes to build/bento.tag."""
    from ctr.ship.bento import build_bento

    t0 = time.monotonic()
    tag = build_bento(gpu=gpu, force=force)
    click.echo(json.dumps({"bento": tag, "seconds": round(time.monotonic() - t0, 1)}))


@ship.command("image")
@click.option("--bento", "bento_tag", default=None, help="Bento tag (default: build/bento.tag).")
@click.option("--force", is_flag=True, help="Build even when the image exists.")
def image_cmd(bento_tag: str | None, force: bool) -> None:
    """Containerize the Bento; the image name goes to build/image.tag."""
    from ctr.ship.image import build_image, image_size_bytes

    t0 = time.monotonic()
    ref = build_image(bento_tag, force=force)
    figures = {"image": ref, "seconds": round(time.monotonic() - t0, 1), "size_mb": image_size_bytes(ref) // 2**20}
    click.echo(json.dumps(figures))


@ship.command("smoke")
@click.option("--image", "ref", default=None, help="Image (default: build/image.tag).")
@click.option("--distributed", is_flag=True, help="One container per service, wired as in deploy/k8s.")
def smoke_cmd(ref: str | None, distributed: bool) -> None:
    """Run the image on a loopback port, wait for /readyz, POST /predict, stop it."""
    from ctr.ship.smoke import smoke, smoke_distributed

    out = smoke_distributed(ref) if distributed else smoke(ref)
    click.echo(json.dumps(out))
    if out["status"] != 200:
        raise SystemExit(1)
