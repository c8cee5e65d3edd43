"""`ctr setup`, `ctr data`, `ctr train`: the click log, the model and the feature database."""

from __future__ import annotations

import json
from typing import Any

import click

from ctr.settings import Settings, redact_url
from models.data import DataConfig


def _settings() -> Settings:
    return Settings()


def _data_options(f):  # type: ignore[no-untyped-def]
    """The click log's size options, shared by `setup` and `data generate`."""
    defaults = DataConfig()
    for flag, name in reversed(_DATA_FLAGS):
        f = click.option(flag, name, type=type(getattr(defaults, name)), default=getattr(defaults, name),
                         show_default=True)(f)  # fmt: skip
    return f


_DATA_FLAGS = (
    ("--users", "n_users"),
    ("--ads", "n_ads"),
    ("--impressions", "n_impressions"),
    ("--zipf", "zipf_exponent"),
    ("--seed", "seed"),
)


@click.command()
@_data_options
@click.option("--max-epochs", type=int, default=None, help="Default: the training config's (10).")
@click.option("--force", is_flag=True, help="Regenerate, retrain and reload even when up to date.")
def setup(force: bool, max_epochs: int | None, **data_cfg: Any) -> None:
    """Everything `make serve` needs: click log, trained model, loaded feature database."""
    from ctr.cli import provision as steps

    s = _settings()
    steps.ensure_data(s.data_dir, force=force, **data_cfg)
    tag = steps.ensure_model(s.data_dir, s.model_tag, force=force, **_epochs(max_epochs))
    steps.ensure_features(s, force=force)
    click.echo(f"ready: model {tag}, data {s.data_dir}, features {redact_url(s.resolved_database_url)}")


def _epochs(max_epochs: int | None) -> dict[str, int]:
    return {} if max_epochs is None else {"max_epochs": max_epochs}


@click.group()
def data() -> None:
    """The click log."""


@data.command("generate")
@_data_options
@click.option("--force", is_flag=True)
def data_generate(force: bool, **cfg: Any) -> None:
    """Generate the synthetic click log into CTR_DATA_DIR."""
    from ctr.cli import provision as steps

    meta = steps.ensure_data(_settings().data_dir, force=force, **cfg)
    click.echo(json.dumps(meta, indent=2))


@click.command()
@click.option("--max-epochs", type=int, default=None, help="Default: the training config's (10).")
@click.option("--force", is_flag=True, help="Train even if a model of this data is stored.")
def train(max_epochs: int | None, force: bool) -> None:
    """Train DeepFM on the click log and save it to the BentoML model store."""
    from ctr.cli import provision as steps
    from ctr.model import store as modelstore

    s = _settings()
    tag = steps.ensure_model(s.data_dir, s.model_tag, force=force, **_epochs(max_epochs))
    click.echo(json.dumps({"tag": tag, **modelstore.artifacts(tag).metadata["metrics"]}, indent=2))
