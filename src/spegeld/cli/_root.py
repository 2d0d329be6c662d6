"""The root click group: config file loading and the one place exit codes are mapped."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from spegeld.errors import SpegeldError

EXIT_USAGE = 2


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit: for known failures, never a traceback."""
    click.echo(f"spegeld: error: {message}", err=True)
    raise click.exceptions.Exit(code)


def not_built(what: str, issue: str) -> None:
    """A command of the CLI contract that does not exist yet says so and exits 2."""
    click.echo(
        f"spegeld: {what} is not built yet (planned in {issue}); nothing was done.", err=True
    )
    raise click.exceptions.Exit(EXIT_USAGE)


def _param_names(command: click.Command) -> set[str]:
    names = {p.name for p in command.params if p.name}
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names |= _param_names(sub)
    return names


def _default_map(command: click.Command, values: dict[str, Any]) -> dict[str, Any]:
    own = {p.name: values[p.name] for p in command.params if p.name in values}
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            own[name] = _default_map(sub, values)
    return own


class SpegeldGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpegeldError as exc:
            if os.environ.get("SPEGELD_DEBUG"):
                raise
            fail(str(exc), exc.exit_code)


def load_config_file(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is None:
        return
    from spegeld.config import load_toml

    group = ctx.command
    try:
        values = load_toml(value, frozenset(_param_names(group)))
    except SpegeldError as exc:
        fail(str(exc), exc.exit_code)
    ctx.default_map = _default_map(group, values)


def python_version() -> str:
    return sys.version.split()[0]
