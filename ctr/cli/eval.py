"""`ctr eval`: offline evaluations of the served model."""

from __future__ import annotations

import click

from ctr.settings import Settings


def _settings() -> Settings:
    return Settings()


@click.group("eval")
def eval_() -> None:
    """Offline evaluations of the served model."""


@eval_.command("degradation")
def eval_degradation() -> None:
    """AUC and logloss on the test split: full model, feature groups defaulted, fallbacks."""
    from ctr.model import store as modelstore
    from models import degradation

    s = _settings()
    click.echo(degradation.format_table(degradation.table(s.data_dir, modelstore.artifacts(s.model_tag))))
