"""The spegeld command line: the only layer that prints with rich or sets exit codes."""

from __future__ import annotations

from pathlib import Path

import click

from spegeld.cli._root import SpegeldGroup, load_config_file
from spegeld.cli.configure import configure
from spegeld.cli.demo import demo
from spegeld.cli.doctor import doctor
from spegeld.cli.images import images
from spegeld.cli.run import run
from spegeld.cli.status import status
from spegeld.cli.version import version

__all__ = ["cli", "main"]


@click.group(cls=SpegeldGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="SPEGELD_CONFIG",
    show_envvar=True,
    callback=load_config_file,
    is_eager=True,
    expose_value=False,
    help="TOML file of option defaults (keys as flag names); flags and SPEGELD_* win over it.",
)
def cli() -> None:
    """spegeld: a peer-to-peer image cache served from containerd's own content store."""


for command in (run, doctor, configure, status, images, demo, version):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="spegeld")
