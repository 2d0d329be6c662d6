"""``spegeld configure containerd|talos``: point containerd at this node's mirror."""

from __future__ import annotations

from pathlib import Path

import click

from spegeld import config
from spegeld.cli._options import option

DEFAULT_CONFIG_PATH = Path("/etc/containerd/certs.d")
# The daemon's default --registry-addr: containerd runs on the same host (under systemd
# and on Talos alike), so it reaches the mirror on loopback, where nothing else can.
DEFAULT_MIRROR_TARGET = f"http://{config.DEFAULT_MIRROR_ADDR}"

_mirror_target = option(
    "--mirror-target",
    metavar="URL",
    default=DEFAULT_MIRROR_TARGET,
    show_default=True,
    help="This node's spegeld mirror, http(s)://host:port: the daemon's --registry-addr.",
)
_mirrored_registries = option(
    "--mirrored-registries",
    metavar="LIST",
    default="",
    help="Comma-separated registries, URLs or hosts (docker.io = https://docker.io; "
    "http://10.0.0.1:5000 for a plain-HTTP one); empty = all. Same forms as `run`.",
)
_resolve_tags = option(
    "--resolve-tags/--no-resolve-tags",
    default=True,
    show_default=True,
    help="Let the mirror resolve tags too, not only serve content by digest.",
)


def _required_target(mirror_target: str) -> str:
    from spegeld.mirrorconfig import parse_mirror_target

    return parse_mirror_target(mirror_target)


@click.group()
def configure() -> None:
    """Point containerd (or Talos) at this node's mirror."""


@configure.command()
@option(
    "--config-path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG_PATH,
    show_default=True,
    help="containerd's registry hosts directory (the CRI plugin's registry config_path).",
)
@_mirror_target
@_mirrored_registries
@_resolve_tags
@option(
    "--keep-existing",
    is_flag=True,
    help="Keep the mirrors of a hosts.toml spegeld did not write, tried after spegeld's "
    "(Spegel's prepend-existing); the original is still backed up and --remove restores it.",
)
@option(
    "--remove",
    is_flag=True,
    help="Remove the hosts.toml files spegeld wrote and restore the ones they replaced.",
)
def containerd(
    config_path: Path,
    mirror_target: str,
    mirrored_registries: str,
    resolve_tags: bool,
    keep_existing: bool,
    remove: bool,
) -> None:
    """Write containerd hosts.toml files that try the mirror first.

    One file per mirrored registry, or _default/hosts.toml for every registry. A
    hosts.toml spegeld did not write is kept as hosts.toml.spegeld-backup. containerd
    reads these files on each pull: no restart needed.
    """
    from spegeld.mirrorconfig import (
        OLD_CONTAINERD_IPV6,
        apply_hosts_files,
        old_containerd_cannot_read,
        parse_registries,
        remove_hosts_files,
        render_hosts_files,
    )

    if remove:
        report = remove_hosts_files(config_path)
    else:
        target = _required_target(mirror_target)
        registries = parse_registries(mirrored_registries)
        files = render_hosts_files(target, registries, resolve_tags=resolve_tags)
        report = apply_hosts_files(config_path, files, keep_existing=keep_existing)
        if old_containerd_cannot_read(target):
            click.echo(f"spegeld: warning: {' '.join(OLD_CONTAINERD_IPV6.split())}", err=True)
    for warning in report.warnings:
        click.echo(f"spegeld: warning: {warning}", err=True)
    for change in report.changes:
        note = f"  ({change.note})" if change.note else ""
        click.echo(f"{change.change:<10} {change.path}{note}")
    if remove and not report.changes:
        click.echo(f"nothing to remove: no hosts.toml under {config_path} was written by spegeld")


@configure.command()
@_mirror_target
@_mirrored_registries
@_resolve_tags
def talos(mirror_target: str, mirrored_registries: str, resolve_tags: bool) -> None:
    """Print the Talos machine-config patch for the mirror.

    Talos generates containerd's hosts directory from its machine config, so the patch
    sets machine.registries.mirrors and the CRI part that keeps layers
    (discard_unpacked_layers = false). Apply it with talosctl patch machineconfig.
    """
    from spegeld.mirrorconfig import parse_registries, render_talos_patch

    target = _required_target(mirror_target)
    registries = parse_registries(mirrored_registries)
    click.echo(render_talos_patch(target, registries, resolve_tags=resolve_tags), nl=False)
    if not resolve_tags:
        click.echo(
            "spegeld: note: Talos mirrors always resolve tags; "
            "run the daemon with --no-resolve-tags as well",
            err=True,
        )
