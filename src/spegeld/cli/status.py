"""``spegeld status``: ask the running daemon what it knows."""

from __future__ import annotations

import json
from typing import Any

import click

from spegeld.cli._options import json_option, option


@click.command()
@option("--registry-addr", default="127.0.0.1:5000", show_default=True,
        help="HOST:PORT of the daemon's registry (its /status endpoint).")  # fmt: skip
@json_option
def status(registry_addr: str, as_json: bool) -> None:
    """Show the daemon's peers, keys, coordinator and packet counters."""
    import httpx

    from spegeld.cli._root import fail

    url = f"http://{registry_addr}/status"
    try:
        response = httpx.get(url, timeout=5.0)
        data = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        fail(f"no spegeld answering at {url}: {exc}")
        return
    if response.status_code != 200 or not isinstance(data, dict):
        fail(f"{url} answered {response.status_code}")
        return
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _render(data)


def _render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(markup=False, highlight=False)  # peer-supplied names are never markup
    store = data.get("store", {})
    out.print(f"node {data.get('node')}  (spegeld {data.get('version')})")
    out.print(
        f"registry {', '.join(data.get('registry', []))}  advertise {data.get('advertise_addr')}"
    )
    out.print(f"coordinator: {data.get('coordinator') or 'none known'}")
    election = data.get("election") or {}
    if election.get("role") == "disabled":
        out.print(f"election: off ({election.get('reason')})")
    elif election:
        line = f"election: {election.get('role')} (Lease {election.get('lease')})"
        if election.get("last_error"):
            line += f"; last error: {election['last_error']}"
        out.print(line)
    out.print(f"own keys: {store.get('digests', 0)} digests, {store.get('tags', 0)} tags"
              f"  (store synced: {store.get('synced')})")  # fmt: skip
    gossip = data.get("gossip")
    if gossip is None:
        out.print(f"router: {data.get('router', {}).get('kind', '?')}")
        return
    table = Table(title=f"peers ({gossip.get('known_keys', 0)} keys known)")
    for column in ("node", "state", "address", "registry", "rtt ms", "keys"):
        table.add_column(column)
    for peer in gossip.get("peers", []):
        rtt = peer.get("rtt_ms")
        table.add_row(str(peer.get("node")), str(peer.get("state")), str(peer.get("addr")),
                      str(peer.get("registry")), "-" if rtt is None else f"{rtt:.2f}",
                      str(peer.get("keys")))  # fmt: skip
    out.print(table)
    packets = gossip.get("packets", {})
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(packets.get("dropped", {}).items()))
    out.print(
        f"packets in {packets.get('in')} out {packets.get('out')}; dropped: {dropped or 'none'}"
    )
