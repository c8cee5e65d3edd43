"""The `ctr` command: one module per command group, as serving teams think of them.

`setup` (data, train), `features`, `serve` (one service alone; `cluster`), `bench` (loadtest,
capacity), `eval`, `ship`, `canary`.
The CLI is the outermost shell: it may import anything; nothing imports it.
"""

from __future__ import annotations

import logging
import os

import click

from ctr.cli.bench import bench, capacity, loadtest
from ctr.cli.canary import canary
from ctr.cli.eval import eval_
from ctr.cli.features import features
from ctr.cli.serve import cluster, serve
from ctr.cli.setup import data, setup, train
from ctr.cli.ship import ship
from ctr.settings import PROJECT_ROOT


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress.")
def main(verbose: bool) -> None:
    """ctr-serve: CTR prediction service tools."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("BENTOML_HOME", str(PROJECT_ROOT / "bentoml_home"))


for command in (setup, data, train, features, serve, cluster, bench, loadtest, capacity, eval_, ship, canary):
    main.add_command(command)
