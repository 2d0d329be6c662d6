"""IPv6-only network namespaces: :class:`Network`'s bridge and nodes, with a random ULA
``/64`` (``fdXX:XXXX:XXXX::/64``, RFC 4193) on ``eth0`` instead of an IPv4 ``/24``.

Duplicate address detection is off (``accept_dad=0`` and ``nodad``): the addresses are
ours alone, and DAD would hold each one tentative (unusable) for a second or more. The
bridge does not snoop multicast, so neighbour discovery reaches every port from the start.
"""

from __future__ import annotations

import ipaddress
import secrets

from spegeld_harness._netns import Network, run

_SYSCTLS = (
    "net.ipv6.conf.all.disable_ipv6=0",
    "net.ipv6.conf.default.disable_ipv6=0",
    "net.ipv6.conf.all.accept_dad=0",
    "net.ipv6.conf.default.accept_dad=0",
    "net.ipv6.conf.eth0.disable_ipv6=0",
    "net.ipv6.conf.eth0.accept_dad=0",
)


class Network6(Network):
    """``nodes`` namespaces with ``<prefix>::<i+1>/64`` on ``eth0`` and no IPv4 address."""

    def __init__(self, nodes: int, prefix: str = "spg6") -> None:
        super().__init__(nodes, subnet="", prefix=prefix)
        # A random ULA /64: fd, 40 random bits of global ID, a 16-bit subnet ID of 0.
        prefix_bits = (0xFD << 56 | secrets.randbits(40) << 16) << 64
        self.prefix = ipaddress.IPv6Network((prefix_bits, 64))
        self.subnet = str(self.prefix)

    def address(self, i: int) -> str:
        """The canonical text (RFC 5952), as the kernel and the daemon print it."""
        return str(self.prefix[i + 1])

    def create(self) -> None:
        super().create()
        bridge = ["ip", "-n", self.bridge, "link", "set", "br0", "type", "bridge"]
        run([*bridge, "mcast_snooping", "0"])

    def _add_address(self, node: str, i: int) -> None:
        run(["ip", "netns", "exec", node, "sysctl", "-q", "-w", *_SYSCTLS])
        run(["ip", "-n", node, "addr", "add", f"{self.address(i)}/64", "dev", "eth0", "nodad"])


__all__ = ["Network6"]
