"""The `ctr` group: help grouped by section, and one-line errors instead of tracebacks.

`SECTIONS` maps each section, in the order serving teams go through them, to the commands
in it; a command added with `main.add_command` shows under its section (`serve` and `canary`
have theirs waiting), one in no section under "other". A bad argument is answered with one
line naming the flag (`ctr setup: error: Invalid value for '--users': ...`) and exit 2; an
expected failure at run time (a service that does not answer, a missing file) with one line
and exit 1. `ctr --traceback ...` shows the traceback instead.
"""

from __future__ import annotations

import sys
from typing import Any

import click

SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("setup", ("setup",)),
    ("data", ("data",)),
    ("train", ("train",)),
    ("features", ("features",)),
    ("serve", ("serve", "cluster", "status")),
    ("bench", ("bench", "loadtest")),
    ("canary", ("canary",)),
    ("capacity", ("capacity",)),
    ("ship", ("ship",)),
    ("eval", ("eval",)),
)
# Failures a user can act on: one line, no traceback.
EXPECTED = (OSError, TimeoutError, ValueError, RuntimeError, LookupError)


def section_of(name: str) -> str:
    return next((s for s, names in SECTIONS if name in names), "other")


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def operations(ctx: click.Context, name: str, cmd: click.Command) -> list[tuple[str, str]]:
    """(name, short help) of a command, or of each command of a group ("features load")."""
    if not isinstance(cmd, click.Group):
        return [(name, cmd.get_short_help_str(limit=90))]
    rows = []
    for sub in cmd.list_commands(ctx):
        c = cmd.get_command(ctx, sub)
        if c is not None and not c.hidden:
            rows += operations(ctx, f"{name} {sub}", c)
    return rows or [(name, cmd.get_short_help_str(limit=90))]


class SectionedGroup(click.Group):
    """A click group whose help lists its commands under SECTIONS."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list[tuple[str, str]]] = {}
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is None or cmd.hidden:
                continue
            rows.setdefault(section_of(name), []).extend(operations(ctx, name, cmd))
        for section in [s for s, _ in SECTIONS] + ["other"]:
            if rows.get(section):
                with formatter.section(section):
                    formatter.write_dl(rows[section])

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:  # fmt: skip
        argv = list(sys.argv[1:] if args is None else args)
        traceback = "--traceback" in argv
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:  # a bare group: its help, as click does
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else (prog_name or "ctr")  # type: ignore[attr-defined]
            click.echo(f"{where}: error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except EXPECTED as exc:
            if traceback:
                raise
            click.echo(f"{prog_name or 'ctr'}: error: {type(exc).__name__}: {one_line(str(exc))}", err=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)
