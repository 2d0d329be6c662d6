"""Configuration as frozen dataclasses, plus the TOML file that feeds click's defaults.

Precedence, highest first: command-line flag, ``SPEGELD_<NAME>`` environment
variable, the ``--config`` TOML file, the built-in default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spegeld.errors import ConfigError
from spegeld.netaddr import wildcard_host

DEFAULT_CONTAINERD_SOCK = Path("/run/containerd/containerd.sock")
DEFAULT_CONTAINERD_NAMESPACE = "k8s.io"
DEFAULT_CONTENT_PATH = Path("/var/lib/containerd/io.containerd.content.v1.content")
DEFAULT_RESYNC_INTERVAL = 300.0  # seconds; events carry changes, the resync only repairs misses


@dataclass(frozen=True, slots=True)
class ContainerdConfig:
    socket: Path = DEFAULT_CONTAINERD_SOCK
    namespace: str = DEFAULT_CONTAINERD_NAMESPACE
    # None: ask containerd (its Introspection API), else DEFAULT_CONTENT_PATH; a path
    # set here (flag, environment or config file) wins over both.
    content_path: Path | None = None
    resync_interval: float = DEFAULT_RESYNC_INTERVAL


def envvar(option_name: str) -> str:
    """``--containerd-sock`` → ``SPEGELD_CONTAINERD_SOCK``."""
    return "SPEGELD_" + option_name.lstrip("-").replace("-", "_").upper()


def load_toml(path: Path, known_keys: frozenset[str]) -> dict[str, Any]:
    """Read a config file into option defaults keyed by parameter name.

    Keys may be spelled as flags (``containerd-sock``) or as identifiers
    (``containerd_sock``). Unknown keys are an error, so typos do not pass silently.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known_keys:
            raise ConfigError(f"config file {path}: unknown key {key!r}")
        values[name] = value
    return values


# --registry-addr: where containerd, on this host, reaches our mirror. Loopback: nothing
# off the node reaches it (no node authentication there, containerd cannot sign).
DEFAULT_MIRROR_ADDR = "127.0.0.1:5000"
# --peer-addr: where other nodes reach this one (the pull API, node authentication required).
DEFAULT_PEER_ADDR = ":5001"
# An empty host binds every address the node has: both families where the kernel has
# IPv6 (``::``, dual-stack), else IPv4's ``0.0.0.0`` (netaddr.wildcard_host).
DEFAULT_GOSSIP_ADDR = ":7946"  # memberlist's port
DEFAULT_STATE_DIR = Path("/var/lib/spegeld")
DEFAULT_GRACE_PERIOD = 10.0  # seconds in-flight responses get at shutdown


# --tag-quorum: holders on distinct hosts that must name one digest before a tag is
# answered from peers. 2: one node that lies (or one stolen key) cannot pick what others
# run; with fewer agreeing holders containerd asks the upstream (docs/security.md, "Tags").
DEFAULT_TAG_QUORUM = 2


DEFAULT_LEASE_NAMESPACE = "spegeld"
DEFAULT_LEASE_NAME = "spegeld-coordinator"


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    """Where the coordinator Lease lives and how to reach the API server."""

    kubeconfig: Path | None = None  # None: in-cluster credentials, if any
    context: str | None = None
    namespace: str = DEFAULT_LEASE_NAMESPACE
    name: str = DEFAULT_LEASE_NAME
    enabled: bool = True  # --no-election turns it off


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything ``spegeld run`` needs, validated."""

    node_name: str
    containerd: ContainerdConfig
    mirror_host: str  # --registry-addr: the mirror's listen address
    mirror_port: int
    advertise_addr: str
    mirrored_registries: frozenset[str]
    resolve_tags: bool
    static_peers: tuple[str, ...]
    state_dir: Path
    grace_period: float = DEFAULT_GRACE_PERIOD
    peer_host: str = "0.0.0.0"  # --peer-addr: the peer listener; gossip advertises its port
    peer_port: int = 5001
    metrics_host: str | None = None  # --metrics-addr: None, no metrics listener
    metrics_port: int = 0
    gossip_host: str = "0.0.0.0"
    gossip_port: int = 7946
    peers: tuple[tuple[str, int], ...] = ()
    peer_dns: tuple[str, ...] = ()
    cluster_key_file: Path | None = None
    insecure_gossip: bool = False
    gossip_v1: str = "accept"  # --gossip-v1: accept or refuse gossip datagram version 1
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    # Registry filters (oci.ShareFilter): regular expressions on registry/repository[:tag].
    registry_filters: tuple[str, ...] = ()  # excluded from sharing
    registry_includes: tuple[str, ...] = ()  # if any: only these are shared
    tag_quorum: int = DEFAULT_TAG_QUORUM
    # --private-registry: (registry as ``ns`` names it, upstream endpoint URL); their content
    # is served to containerd only with credentials the upstream accepts (mirror._private).
    private_registries: tuple[tuple[str, str], ...] = ()
    coordinate_pulls: bool = True  # one upstream fetch per blob in a scale-out (§9)


# RFC 1123 host names: what getaddrinfo can be asked without an encoding error.
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_host(text: str) -> bool:
    """An IP address or a DNS name (at most 253 characters, labels of at most 63)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        return True
    name = text.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` or ``:port`` (all addresses) → (host, port).

    ``:port`` binds ``::`` (dual-stack) when the kernel has IPv6, else ``0.0.0.0``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT ([v6]:PORT for IPv6)")
    if host.startswith("[") != host.endswith("]"):
        raise ConfigError(f"{what} {text!r} has an unclosed [ ] around its host")
    host = host.removeprefix("[").removesuffix("]") or wildcard_host()
    if not is_host(host):
        raise ConfigError(f"{what} {text!r} has an invalid host")
    return host, int(port_text)


def parse_seed_name(text: str, what: str) -> str:
    """``name[:port]`` for a DNS seed: refused at once if it could never resolve."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, "1"
    if not is_host(host) or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ConfigError(f"{what} {text!r} is not NAME[:PORT]")
    return text
