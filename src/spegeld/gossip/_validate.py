"""Whether a member record is believable, beyond being well formed. Sans-I/O.

The codec (``_codec``) checks types and sizes: what fits the wire. This checks
what a member may claim, for a record about anyone (ourselves included), before
the core merges it. A record that fails is ignored and counted under its reason
in ``statistics().rejected``; nothing here raises on peer input.

- ``name``: a node name is 1..253 characters of ``A-Z a-z 0-9 . _ -``, starting
  with a letter or digit (Kubernetes node names and host names fit).
- ``address``: the gossip address is an IP literal and a port 1..65535. A host
  name would make every datagram to it wait on a DNS lookup.
- ``registry`` (the member's mirror address; the reason keeps its old name, a metric
  label): ``host:port``, where host is a host name, an IPv4 address or a bracketed
  IPv6 address, and port is 1..65535 (what the proxy can dial).
- ``incarnation``: at most the *horizon*. Every honest incarnation is a node's
  wall-clock second at its start (``app._setup.next_incarnation``) plus its
  refutations since, so none can be far past the wall clock. This node's own
  starting incarnation stands in for the wall clock, and the horizon is that plus
  the seconds since, plus ``INCARNATION_SLACK`` for clock skew and refutations.
  News about this node itself gets a tighter horizon (``OWN_SLACK``): a refutation
  never takes our incarnation where peers would not follow, and so a key holder
  can neither exhaust the u32 nor push us out of the others' horizon.
- ``version``: at most ``(horizon + 1) << 20``, the most a node could have counted
  to (versions start at ``incarnation << 20``), so a key holder cannot make a node
  jump its ledger past what the codec can carry (2**63 - 1).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Final

from spegeld.errors import ConfigError

from ._codec import MAX_INCARNATION
from ._messages import Addr, Member

__all__ = [
    "INCARNATION_SLACK",
    "MAX_CHUNKS",
    "OWN_SLACK",
    "REJECT_REASONS",
    "Validator",
    "check_own_identity",
    "valid_gossip_addr",
    "valid_name",
    "valid_mirror_addr",
]

# Seconds a member's incarnation may run ahead of our own wall-clock estimate: clocks
# that disagree by days (a VM restored from a snapshot before NTP steps it), plus every
# refutation a node could make. 2**20 s is about 12 days; a record beyond that is not a
# clock problem but a push, and it is ignored.
INCARNATION_SLACK: Final = 1 << 20
# Our own incarnation never goes more than this past our own horizon (about 3 days):
# a quarter of INCARNATION_SLACK, so that after a pushed life the next one
# (``app._setup`` clamps to the wall clock plus this) is still inside every peer's.
OWN_SLACK: Final = INCARNATION_SLACK >> 2
VERSION_SHIFT: Final = 20  # versions start at incarnation << 20 (``_ownership``)
# Chunks in one whole-state transfer: 1024 chunks of about 29 digests is about 30 000
# keys, fifteen times DESIGN's 2000 per node. A larger count is refused before anything
# is held for it, so one forged chunk cannot reserve an unbounded assembly.
MAX_CHUNKS: Final = 1024
# Validated (name, host, port, mirror) tuples remembered: honest records repeat the
# same few, so the string checks run once per member, not once per record.
_MEMO_SIZE: Final = 4096

REJECT_REASONS: Final = (
    "name",
    "address",
    "registry",  # the mirror address; the name is a metric label value, so it stays
    "incarnation",
    "version",
    "members_full",
    "chunk",
    "unsolicited",
    "relays_full",
    "stranger",  # a StatePull from a non-member: its answer has no registered address
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_MIRROR_ADDR = re.compile(r"(?:\[([0-9A-Fa-f:.]{2,45})\]|([A-Za-z0-9.-]{1,253})):([0-9]{1,5})")


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def valid_gossip_addr(addr: Addr) -> bool:
    host, port = addr
    return 0 < port < 65536 and _ip(host)


def valid_mirror_addr(mirror: str) -> bool:
    match = _MIRROR_ADDR.fullmatch(mirror)
    if match is None or not 0 < int(match.group(3)) < 65536:
        return False
    v6, host = match.group(1), match.group(2)
    if v6 is not None:
        return ":" in v6 and _ip(v6)
    return _HOSTNAME.fullmatch(host) is not None


def check_own_identity(node: str, addr: Addr, mirror: str, incarnation: int) -> None:
    """ConfigError unless peers would accept this node's own record: checked at start."""
    if not valid_name(node):
        raise ConfigError(
            f"node name {node[:300]!r} is not 1..253 characters of A-Z a-z 0-9 . _ - "
            "starting with a letter or digit: peers would ignore this node (--node-name)"
        )
    if not valid_gossip_addr(addr):
        raise ConfigError(
            f"gossip address {addr[0]}:{addr[1]} is not an IP address and a port "
            "(--advertise-addr takes an IP)"
        )
    if not valid_mirror_addr(mirror):
        raise ConfigError(f"mirror address {mirror!r} is not HOST:PORT ([v6]:PORT for IPv6)")
    if not 0 <= incarnation <= MAX_INCARNATION:
        raise ConfigError(f"gossip incarnation {incarnation} does not fit in 32 bits")


class Validator:
    """The checks above, for one core: it knows the core's name and starting point."""

    __slots__ = ("_base", "_memo", "_node", "_started")

    def __init__(self, node: str, incarnation: int, now: float) -> None:
        self._node = node
        self._base = incarnation  # stands in for the wall-clock second at ``now``
        self._started = now
        self._memo: set[tuple[str, str, int, str]] = set()

    def horizon(self, now: float, *, own: bool = False) -> int:
        """The highest incarnation a record about us (``own``) or another may carry now."""
        slack = OWN_SLACK if own else INCARNATION_SLACK
        return min(MAX_INCARNATION - 1, self._base + int(max(0.0, now - self._started)) + slack)

    def version_limit(self, now: float) -> int:
        return (self.horizon(now) + 1) << VERSION_SHIFT

    def problem(self, member: Member, now: float) -> str | None:
        """Why ``member`` must be ignored, or None when it may be merged."""
        identity = (member.node, member.addr[0], member.addr[1], member.mirror)
        if identity not in self._memo:
            if not valid_name(member.node):
                return "name"
            if not valid_gossip_addr(member.addr):
                return "address"
            if not valid_mirror_addr(member.mirror):
                return "registry"
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            self._memo.add(identity)
        if member.incarnation > self.horizon(now, own=member.node == self._node):
            return "incarnation"
        if member.version > self.version_limit(now):
            return "version"
        return None
