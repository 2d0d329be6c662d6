"""``spegeld images``: the keys this node would advertise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from spegeld.cli._options import containerd_config, containerd_options, json_option


@click.command()
@containerd_options
@json_option
def images(
    containerd_sock: Path, containerd_namespace: str, containerd_content_path: Path, as_json: bool
) -> None:
    """List the tags and digests this node would advertise to its peers."""
    import trio

    from spegeld.app import index_once

    cfg = containerd_config(containerd_sock, containerd_namespace, containerd_content_path)
    report = trio.run(index_once, cfg)
    data: dict[str, Any] = {
        "namespace": cfg.namespace,
        "tags": dict(sorted(report.snapshot.tags.items())),
        "digests": [
            {"digest": d.digest, "mediaType": d.media_type, "size": d.size}
            for d in sorted(report.snapshot.digests.values(), key=lambda d: d.digest)
        ],
        "warnings": list(report.warnings),
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _render(data)


def _render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Image names come from containerd and, in time, from peers: never parse them as markup.
    out = Console(markup=False, highlight=False)
    err = Console(stderr=True, markup=False, highlight=False)
    for warning in data["warnings"]:
        err.print(f"warning: {warning}", style="yellow")
    table = Table(title=f"Keys advertised from namespace {data['namespace']}")
    table.add_column("key", overflow="fold")
    table.add_column("media type", overflow="fold")
    table.add_column("size", justify="right")
    by_digest = {d["digest"]: d for d in data["digests"]}
    for key, digest in data["tags"].items():
        table.add_row(key, f"tag → {digest[:19]}…", "")
    for entry in by_digest.values():
        table.add_row(entry["digest"], entry["mediaType"], _size(entry["size"]))
    out.print(table)
    out.print(f"{len(data['tags'])} tags, {len(data['digests'])} digests")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)
