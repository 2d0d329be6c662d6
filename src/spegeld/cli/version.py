"""``spegeld version``."""

from __future__ import annotations

import click

from spegeld.cli._root import python_version


@click.command()
def version() -> None:
    """Print spegeld's version."""
    from importlib.metadata import version as dist_version

    click.echo(f"spegeld {dist_version('spegeld')} (Python {python_version()})")
