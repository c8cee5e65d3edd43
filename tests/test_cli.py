"""The `ctr` command line: help grouped by section, --help on every command, one-line errors
naming the flag (never a traceback), progress as log lines without a terminal."""

from __future__ import annotations

import io
import logging

import click
import pytest
from click.testing import CliRunner

from ctr.cli import main
from ctr.cli.help import SECTIONS, SectionedGroup, section_of
from ctr.observe.progress import LogBar, progress


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


COMMANDS = _commands(main)


def test_help_lists_every_operation_by_section_in_order() -> None:
    """`ctr --help` has the sections in the serving order, and every operation in one."""
    out = CliRunner().invoke(main, ["--help"], terminal_width=200)
    assert out.exit_code == 0
    text = out.output
    headings = [s for s, _ in SECTIONS if f"\n{s}:\n" in text]
    assert headings == sorted(headings, key=[s for s, _ in SECTIONS].index)
    assert {"setup", "data", "train", "features", "serve", "bench", "capacity", "ship", "eval"} <= set(headings)
    for path in COMMANDS:
        cmd = main
        for p in path:
            cmd = cmd.commands[p]  # type: ignore[attr-defined]
        if not isinstance(cmd, click.Group):
            assert " ".join(path) in text, path


def test_a_new_command_lands_in_its_section() -> None:
    """Commands to come (serve, canary) have their sections; an unknown one goes to other."""
    assert section_of("serve") == "serve" and section_of("canary") == "canary" and section_of("zzz") == "other"

    @click.group(cls=SectionedGroup)
    def g() -> None:
        """test"""

    @g.command("canary")
    def canary() -> None:
        """Roll out."""

    @g.command("zzz")
    def zzz() -> None:
        """Something else."""

    text = CliRunner().invoke(g, ["--help"]).output
    assert text.index("canary:") < text.index("other:")


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_command_has_help(path: tuple[str, ...]) -> None:
    """`ctr ... --help` answers 0 with a description for every command."""
    out = CliRunner().invoke(main, [*path, "--help"])
    assert out.exit_code == 0, out.output
    assert "Usage:" in out.output and len(out.output.splitlines()) >= 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["setup", "--users", "many"], "'--users'"),
        (["data", "generate", "--zipf", "x"], "'--zipf'"),
        (["train", "--max-epochs", "1.5"], "'--max-epochs'"),
        (["bench", "e2e", "--duration", "soon"], "'--duration'"),
        (["capacity"], "'--peak-qps'"),
        (["status", "--width", "5"], "'--width'"),
        (["features", "put", "ad_stats"], "'ENTITY_ID'"),
        (["setup", "--no-such-flag"], "--no-such-flag"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_bad_arguments_give_one_line_naming_the_flag(args: list[str], needle: str) -> None:
    """A bad argument: exit 2, a single line on stderr that names it, no traceback."""
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 2
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "error:" in err[0], out.stderr
    assert "Traceback" not in out.output


def test_a_failure_at_run_time_is_one_line() -> None:
    """`ctr status` with nothing answering: exit 1 and one line naming the address."""
    out = CliRunner().invoke(main, ["status", "--url", "http://127.0.0.1:9"])
    assert out.exit_code == 1
    assert out.stderr.strip().count("\n") == 0 and "http://127.0.0.1:9/status.json" in out.stderr
    assert "Traceback" not in out.output


def test_progress_without_a_terminal_is_a_few_log_lines() -> None:
    """Not a TTY: start, every 20 %, done; not a line per step."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("ctr.progress")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with progress("loading", total=1000, unit="rows", bar=False) as bar:
            assert isinstance(bar, LogBar)
            for _ in range(1000):
                bar.advance()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    got = stream.getvalue().splitlines()
    assert got[0] == "loading: started (1000 rows)" and got[-1].startswith("loading: done, 1000 rows")
    assert [g.split("(")[-1] for g in got[1:-1]] == ["20 %)", "40 %)", "60 %)", "80 %)"]


def test_progress_on_a_terminal_is_a_rich_bar() -> None:
    """On a terminal the same calls draw a bar (rich), which counts what was done."""
    with progress("training", total=10, unit="batches", bar=True) as bar:
        for _ in range(10):
            bar.advance()
        bar.note("epoch 0")
    assert bar.done == 10


def test_canary_status_reads_like_a_person_wrote_it() -> None:
    """`ctr canary status`: times as UTC dates, not epoch seconds; the p99 difference in ms, an
    error-rate difference within ±100 pp, log ratios as ratios."""
    from ctr.cli.canary import _summary

    doc = {
        "id": "r1", "status": "running", "phase": 1, "share": 0.05, "store": "ok",
        "stable": {"tag": "ctr_model:a"}, "canary": {"tag": "ctr_model:b", "urls": []},
        "gates": {
            "latency": {"gate": "latency", "verdict": "inconclusive", "estimate": 7.36, "interval": [2.43, None]},
            "errors": {"gate": "errors", "verdict": "ok", "estimate": 0.0, "interval": [-1.4, 0.001]},
            "ctr": {"gate": "ctr", "verdict": "ok", "estimate": 0.0, "interval": [-0.1, 0.1]},
            "calibration": {"gate": "calibration", "verdict": "insufficient", "estimate": None,
                            "interval": [None, None]},
        },
        "history": [{"at": 1764748812.0, "action": "start", "phase": 0, "share": 0.01, "by": "admin", "reason": "go"}],
    }  # fmt: skip
    out = _summary(doc)
    assert "p99 difference +7.4 ms [+2.4 ms, –]" in out
    assert "error rate difference +0.00 pp [-100.00 pp, +0.10 pp]" in out
    assert "ratio 1.000 [0.905, 1.105]" in out and "not enough data yet" in out
    assert "2025-12-03 08:00:12 UTC start" in out and "1764748812" not in out
