"""``spegeld status``: ask the running daemon what it knows."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from spegeld.cli._options import json_option, option

if TYPE_CHECKING:
    from spegeld.status import NodeStatus, SharingStatus


@click.command()
@option("--registry-addr", default="127.0.0.1:5000", show_default=True,
        help="HOST:PORT ([v6]:PORT) of the daemon's mirror (its /status endpoint).")  # fmt: skip
@json_option
def status(registry_addr: str, as_json: bool) -> None:
    """Show the daemon's peers, keys, coordinator and packet counters."""
    import httpx

    from spegeld.cli._root import fail
    from spegeld.config import parse_host_port
    from spegeld.errors import RemoteProtocolError
    from spegeld.netaddr import join_host_port
    from spegeld.status import NodeStatus

    url = f"http://{join_host_port(*parse_host_port(registry_addr, '--registry-addr'))}/status"
    try:
        response = httpx.get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        fail(f"no spegeld answering at {url}: {exc}")
        return
    if response.status_code != 200:
        fail(f"{url} answered {response.status_code}")
        return
    try:
        node = NodeStatus.decode(response.content)
    except RemoteProtocolError as exc:
        fail(f"{url} did not answer with a spegeld status: {exc}")
        return
    if as_json:
        click.echo(json.dumps(node.to_json(), indent=2, sort_keys=True))
        return
    _render(node)


def _render(node: NodeStatus) -> None:
    from rich.console import Console
    from rich.table import Table

    out = Console(markup=False, highlight=False)  # peer-supplied names are never markup
    store = node.store
    out.print(f"node {node.node}  (spegeld {node.version})")
    out.print(f"mirror {', '.join(node.mirror)}  advertise {node.advertise_addr}")
    out.print(f"coordinator: {node.coordinator or 'none known'}")
    election = node.election
    if election is not None and election.role == "disabled" and election.lease is None:
        out.print(f"election: off ({election.reason})")
    elif election is not None:
        line = f"election: {election.role} (Lease {election.lease})"
        if election.last_error:
            line += f"; last error: {election.last_error}"
        out.print(line)
    out.print(f"own keys: {store.digests} digests, {store.tags} tags"
              f"  (store synced: {store.synced})")  # fmt: skip
    if node.sharing is not None:
        out.print(sharing_line(node.sharing))
    gossip = node.gossip
    if gossip is None:
        out.print(f"router: {'?' if node.router is None else node.router.kind}")
        return
    table = Table(title=f"peers ({gossip.known_keys} keys known)")
    for column in ("node", "state", "address", "mirror", "rtt ms", "keys"):
        table.add_column(column)
    for peer in gossip.peers:
        rtt = "-" if peer.rtt_ms is None else f"{peer.rtt_ms:.2f}"
        table.add_row(peer.node, peer.state, peer.addr, peer.mirror, rtt, str(peer.keys))
    out.print(table)
    packets = gossip.packets
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(packets.dropped.items()))
    out.print(
        f"packets in {packets.packets_in} out {packets.packets_out}; dropped: {dropped or 'none'}"
    )


def sharing_line(sharing: SharingStatus) -> str:
    """Registry filters and the tag quorum, one line (``spegeld status`` and doctor)."""
    rules = [f"exclude {p!r}" for p in sharing.registry_filters]
    rules += [f"include only {p!r}" for p in sharing.registry_includes]
    shared = "; ".join(rules) if rules else "every registry"
    return (
        f"sharing: {shared} ({sharing.withheld_images} local images withheld); "
        f"a tag from peers needs {sharing.tag_quorum} agreeing hosts"
    )
