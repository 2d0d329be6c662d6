"""``spegeld run``: the node daemon."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from spegeld import config
from spegeld.cli._options import (
    containerd_config,
    containerd_options,
    gossip_options,
    kube_options,
    lease_settings,
    listener_options,
    mirror_addr_option,
    option,
    state_dir_option,
)
from spegeld.errors import ConfigError, SpegeldError
from spegeld.oci import ShareFilter

if TYPE_CHECKING:
    from spegeld.systemd import InheritedSocket


# Destinations only asked of the routing table (a UDP connect sends no packet): the
# documentation prefixes of each family, which no real route is meant to reach.
_ROUTE_PROBES = ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1"))
IF_INET6 = Path("/proc/net/if_inet6")  # Linux's list of this namespace's IPv6 addresses
_IFA_F_TENTATIVE_OR_DADFAILED = 0x40 | 0x08  # not usable yet, or never


def default_advertise_addr(if_inet6: Path = IF_INET6) -> str:
    """The address peers reach this node at: the source address of the IPv4 default
    route, else of the IPv6 one (an IPv6-only node), else a global IPv6 address of any
    interface (an IPv6-only node with no default route), else loopback."""
    for family, destination in _ROUTE_PROBES:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((destination, 9))
                return str(probe.getsockname()[0])
        except OSError:  # no route of this family, or no such family here
            continue
    return _global_ipv6(if_inet6) or "127.0.0.1"


def _global_ipv6(if_inet6: Path) -> str | None:
    """The first global-scope IPv6 address in ``/proc/net/if_inet6`` that is not
    tentative: ``address ifindex prefixlen scope flags name`` per line, hex."""
    try:
        lines = if_inet6.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        fields = line.split()
        if len(fields) != 6 or fields[3] != "00":  # scope 00: global (ULA included)
            continue
        try:
            flags = int(fields[4], 16)
            address = ipaddress.IPv6Address(int(fields[0], 16))
        except ValueError:
            continue
        if not flags & _IFA_F_TENTATIVE_OR_DADFAILED:
            return str(address)
    return None


def registry_host(entry: str) -> str:
    """``https://docker.io`` or ``docker.io`` → ``docker.io``, as containerd's ``ns`` names it.

    The parser of ``spegeld configure``: both commands take the same forms.
    """
    from spegeld.mirrorconfig import parse_registry

    return parse_registry(entry).host


@click.command()
@option("--node-name", default=socket.gethostname, help="This node's name.  [default: hostname]")
@containerd_options
@mirror_addr_option
@listener_options
@option("--advertise-addr", default=None,
        help="IP (IPv4 or IPv6) peers use to reach this node.  [default: the source "
        "address of the IPv4 default route, else of the IPv6 one, else a global IPv6 "
        "address]")  # fmt: skip
@option("--mirrored-registries", default="", show_default=True,
        help="Comma-separated registries to mirror (URLs or hosts); empty: all.")  # fmt: skip
@option("--resolve-tags/--no-resolve-tags", default=True, show_default=True,
        help="Answer tag lookups (manifests by tag) as well as digests.")  # fmt: skip
@option("--registry-filter", "registry_filters", multiple=True, metavar="REGEX",
        help="Keep images whose registry/repository[:tag] matches REGEX out of sharing: not "
        "advertised, not served (repeatable; Spegel's --registry-filters).")  # fmt: skip
@option("--registry-include", "registry_includes", multiple=True, metavar="REGEX",
        help="Share only images whose registry/repository[:tag] matches REGEX (repeatable; "
        "--registry-filter still excludes).")  # fmt: skip
@option("--private-registry", "private_registries", multiple=True, metavar="HOST|URL",
        help="Serve this registry's content to containerd only with pull credentials its "
        "upstream accepts (challenge, one upstream check per credential and repository); "
        "HOST is https://HOST, or give http(s)://HOST:PORT (repeatable).")  # fmt: skip
@option("--coordinate-pulls/--no-coordinate-pulls", default=True, show_default=True,
        help="When several nodes pull one repository at once, one node fetches each blob "
        "upstream and the others follow its download (a miss waits for it at most 2.5 s; "
        "a lone pull never waits). Needs gossip: off with --static-peer.")  # fmt: skip
@option("--tag-quorum", type=click.IntRange(min=1), default=config.DEFAULT_TAG_QUORUM,
        show_default=True, help="Holders on distinct hosts that must return one digest before "
        "a tag is answered from peers; fewer: 404, containerd asks the upstream.")  # fmt: skip
@gossip_options
@option("--gossip-v1", type=click.Choice(["accept", "refuse"]), default="accept",
        show_default=True, help="Gossip datagram version 1 (authenticated, not encrypted): "
        "accept it during an upgrade; refuse it once every node speaks version 2.")  # fmt: skip
@option("--peer-dns", "peer_dns", multiple=True, metavar="NAME[:PORT]",
        help="A DNS name whose addresses are gossip seeds (repeatable).")  # fmt: skip
@option("--static-peer", "static_peers", multiple=True, metavar="HOST:PORT",
        help="Instead of gossip: a peer's mirror asked on every miss (repeatable).")  # fmt: skip
@kube_options
@option("--no-election", is_flag=True,
        help="Never contend for the coordinator Lease (still follows gossip).")  # fmt: skip
@state_dir_option
@option("--grace-period", type=click.FloatRange(min=0), default=config.DEFAULT_GRACE_PERIOD,
        show_default=True, help="Seconds in-flight responses get at shutdown.")  # fmt: skip
@option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
        show_default=True)  # fmt: skip
@option("--log-format", type=click.Choice(["text", "json"]), default=None,
        help="Log format.  [default: json unless stderr is a terminal]")  # fmt: skip
def run(**params: Any) -> None:
    """Run the node daemon: serve this node's images to containerd and to peers."""
    import trio

    from spegeld.app import Supervision, load_credentials, load_keyring, run_node
    from spegeld.cli._logging import configure_logging
    from spegeld.systemd import Notifier, listen_fds, watchdog_interval

    ctx = click.get_current_context()
    cfg = node_config(**params)
    configure_logging(params["log_level"], params["log_format"])
    keyring = load_keyring(cfg)
    creds = load_credentials(cfg)
    inherited = split_inherited(listen_fds())
    for name, sockets in inherited.items():  # socket activation: the port is the socket's
        if sockets and name != "metrics":
            port = sockets[0].socket.getsockname()[1]
            field = "peer_port" if name == "peer" else "mirror_port"
            cfg = dataclasses.replace(cfg, **{field: port})
    supervision = Supervision(
        notifier=Notifier.from_environ(),
        watchdog=watchdog_interval(unset=True),
        listeners=tuple(s.listener() for s in inherited["mirror"]),
        peer_listeners=tuple(s.listener() for s in inherited["peer"]),
        metrics_listeners=tuple(s.listener() for s in inherited["metrics"]),
        reload_config=lambda: _reload_config(ctx),
    )
    try:
        trio.run(run_node, cfg, keyring, creds, supervision)
    except BaseExceptionGroup as group:
        # Nurseries wrap what a component raised; a known failure still gets one line.
        known = group.subgroup(lambda exc: isinstance(exc, SpegeldError))
        if known is None:
            raise
        raise _first_leaf(known) from None


def split_inherited(sockets: list[InheritedSocket]) -> dict[str, list[InheritedSocket]]:
    """Passed sockets by the listener they serve, from their ``FileDescriptorName=``:
    ``peer`` and ``metrics`` name theirs; any other name (``registry``, systemd's default
    of the socket unit's name, ``unknown``) is the mirror's, as before there were three."""
    found: dict[str, list[InheritedSocket]] = {"mirror": [], "peer": [], "metrics": []}
    for sock in sockets:
        found[sock.name if sock.name in ("peer", "metrics") else "mirror"].append(sock)
    return found


def node_config(
    *,
    node_name: str,
    containerd_sock: Path,
    containerd_namespace: str,
    containerd_content_path: Path,
    registry_addr: str,
    peer_addr: str,
    metrics_addr: str | None,
    advertise_addr: str | None,
    mirrored_registries: str,
    resolve_tags: bool,
    registry_filters: tuple[str, ...],
    registry_includes: tuple[str, ...],
    tag_quorum: int,
    coordinate_pulls: bool,
    private_registries: tuple[str, ...],
    gossip_addr: str,
    peers: tuple[str, ...],
    peer_dns: tuple[str, ...],
    cluster_key_file: Path | None,
    insecure_gossip: bool,
    gossip_v1: str,
    static_peers: tuple[str, ...],
    kubeconfig: Path | None,
    kube_context: str | None,
    lease_namespace: str,
    lease_name: str,
    no_election: bool,
    state_dir: Path,
    grace_period: float,
    **_logging: Any,
) -> config.NodeConfig:
    """The validated configuration from the command's parameters."""
    from spegeld.systemd import KUBECONFIG_CREDENTIAL, credential_path

    host, port = config.parse_host_port(registry_addr, "--registry-addr")
    peer_host, peer_port = config.parse_host_port(peer_addr, "--peer-addr")
    metrics_host, metrics_port = (
        config.parse_host_port(metrics_addr, "--metrics-addr") if metrics_addr else (None, 0)
    )
    if peer_port == 0:
        # Peers reach this node at the port gossip advertises: it must be known up front.
        raise ConfigError(f"--peer-addr {peer_addr}: peers need a fixed port, not 0")
    gossip_host, gossip_port = config.parse_host_port(gossip_addr, "--gossip-addr")
    if gossip_port == 0 and not static_peers:
        # Peers reach this node at the port it advertises, before any datagram is sent.
        raise ConfigError(f"--gossip-addr {gossip_addr}: gossip needs a fixed port, not 0")
    if gossip_v1 == "refuse" and insecure_gossip:
        raise ConfigError("--gossip-v1 refuse needs a cluster key: version 2 encrypts with it")
    seeds = tuple(config.parse_host_port(peer, "--peer") for peer in peers)
    for peer in static_peers:
        config.parse_host_port(peer, "--static-peer")
    registries = frozenset(registry_host(e) for e in mirrored_registries.split(",") if e.strip())
    ShareFilter.parse(registry_includes, registry_filters)  # a bad pattern stops us here
    private = tuple(_private_registry(entry) for entry in private_registries)
    # Under systemd, LoadCredential=kubeconfig:... delivers it when no flag names one.
    kubeconfig = kubeconfig or credential_path(KUBECONFIG_CREDENTIAL)
    return config.NodeConfig(
        node_name=node_name,
        containerd=containerd_config(
            containerd_sock, containerd_namespace, containerd_content_path
        ),
        mirror_host=host,
        mirror_port=port,
        peer_host=peer_host,
        peer_port=peer_port,
        metrics_host=metrics_host,
        metrics_port=metrics_port,
        advertise_addr=_unbracketed(advertise_addr or default_advertise_addr()),
        mirrored_registries=registries,
        resolve_tags=resolve_tags,
        static_peers=static_peers,
        state_dir=state_dir,
        grace_period=grace_period,
        gossip_host=gossip_host,
        gossip_port=gossip_port,
        peers=seeds,
        peer_dns=tuple(config.parse_seed_name(name, "--peer-dns") for name in peer_dns),
        cluster_key_file=cluster_key_file,
        insecure_gossip=insecure_gossip,
        gossip_v1=gossip_v1,
        lease=lease_settings(
            kubeconfig, kube_context, lease_namespace, lease_name, enabled=not no_election
        ),
        registry_filters=tuple(registry_filters),
        registry_includes=tuple(registry_includes),
        tag_quorum=tag_quorum,
        private_registries=private,
        coordinate_pulls=coordinate_pulls,
    )


def _unbracketed(address: str) -> str:
    """``[fd00::1]``, as HOST:PORT forms write it, is the address ``fd00::1``."""
    if address.startswith("[") and address.endswith("]"):
        return address[1:-1]
    return address


def _private_registry(entry: str) -> tuple[str, str]:
    from spegeld.mirror import private_endpoint

    try:
        return private_endpoint(entry)
    except ValueError as exc:
        raise ConfigError(f"--private-registry: {exc}") from exc


def _reload_config(ctx: click.Context) -> config.NodeConfig:
    """SIGHUP: the same flags and environment, over the config file as it is now."""
    from click.core import ParameterSource

    from spegeld.cli._root import read_config_file

    values = read_config_file(ctx)
    fresh = dict(ctx.params)
    for param in ctx.command.params:
        name = param.name
        if name is None or ctx.get_parameter_source(name) not in (
            ParameterSource.DEFAULT,
            ParameterSource.DEFAULT_MAP,
        ):
            continue  # a flag or SPEGELD_* variable: it has not changed
        value = values[name] if name in values else param.get_default(ctx)
        fresh[name] = param.process_value(ctx, value)
    return node_config(**fresh)


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
