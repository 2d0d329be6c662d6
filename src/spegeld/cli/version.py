"""``spegeld version``."""

from __future__ import annotations

import click

from spegeld.cli._root import version_line


@click.command()
def version() -> None:
    """Print spegeld's version (also `spegeld --version`)."""
    click.echo(version_line())
