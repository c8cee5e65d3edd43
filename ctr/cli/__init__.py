"""The `ctr` command: one module per command group, as serving teams think of them.

`ctr --help` lists them by section (`ctr.cli.help.SECTIONS`): setup, data, train, features,
serve (one service alone, `cluster`, `status`), bench (`loadtest`), canary, capacity, ship,
eval. The CLI is the outermost shell: it may import anything; nothing imports it.
"""

from __future__ import annotations

import logging
import os

import click

from ctr.cli.bench import bench, capacity, loadtest
from ctr.cli.canary import canary
from ctr.cli.eval import eval_
from ctr.cli.features import features
from ctr.cli.help import SectionedGroup
from ctr.cli.serve import cluster, serve
from ctr.cli.setup import data, setup, train
from ctr.cli.ship import ship
from ctr.cli.status import status
from ctr.settings import PROJECT_ROOT


@click.group(cls=SectionedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress.")
@click.option("--traceback", is_flag=True, help="Show the traceback of a failure instead of one line.")
def main(verbose: bool, traceback: bool) -> None:
    """ctr-serve: CTR prediction service tools."""
    from ctr.observe import log as obslog

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    obslog.configure(os.environ.get("CTR_LOG_FORMAT", "text"), "INFO" if verbose else "WARNING")  # type: ignore[arg-type]
    logging.getLogger("ctr.progress").setLevel(logging.INFO)  # without a terminal, progress is log lines
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ.setdefault("BENTOML_HOME", str(PROJECT_ROOT / "bentoml_home"))


for command in (setup, data, train, features, serve, cluster, status, bench, loadtest, capacity, eval_, ship, canary):
    main.add_command(command)
