"""Addresses on IPv4-only, IPv6-only and dual-stack nodes: how to write, read and bind them.

- ``join_host_port`` writes ``host:port``, or ``[v6]:port`` (what URLs, ``hosts.toml``,
  the Lease and ``spegeld status`` show); ``split_host_port`` reads either.
- An empty host (``--peer-addr :5001``) means every address the node has:
  :func:`wildcard_host` is ``::`` when the kernel has IPv6, else ``0.0.0.0``.
- ``::`` is bound dual-stack (``IPV6_V6ONLY`` off): one socket takes IPv4 and IPv6, and
  sees an IPv4 peer as ``::ffff:a.b.c.d``, which :func:`unmapped` turns back into
  ``a.b.c.d`` (the address the peer's gossip record carries). ``0.0.0.0`` stays IPv4-only,
  a literal IPv6 address IPv6-only, as written.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Final

import trio

__all__ = [
    "ANY_V4",
    "ANY_V6",
    "has_ipv6",
    "is_wildcard",
    "join_host_port",
    "open_tcp_listeners",
    "open_udp_socket",
    "split_host_port",
    "unmapped",
    "wildcard_host",
]

ANY_V4: Final = "0.0.0.0"
ANY_V6: Final = "::"
# Connections a listener queues before accept: as many as the kernel allows
# (net.core.somaxconn caps it), as trio's own open_tcp_listeners asks for.
LISTEN_BACKLOG: Final = 0xFFFF


def has_ipv6() -> bool:
    """Whether this kernel speaks IPv6 here: an IPv6 socket can bind ``::1``. Booted
    with ``ipv6.disable=1`` the socket fails; with ``disable_ipv6=1`` ``::1`` is gone."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def wildcard_host() -> str:
    """What an empty host binds: every address of both families, or of IPv4 alone."""
    return ANY_V6 if has_ipv6() else ANY_V4


def is_wildcard(host: str) -> bool:
    return host in (ANY_V4, ANY_V6, "")


def join_host_port(host: str, port: int) -> str:
    """``10.0.0.1:5001``, ``[fd00::1]:5001``, ``node-a:5001``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_host_port(text: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` → (host without brackets, port); None if malformed.

    An unbracketed IPv6 address with a port (``fd00::1:7946``) is read at the last colon,
    as older spegeld versions wrote it."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or len(port_text) > 5 or int(port_text) > 65535:
        return None
    if host.startswith("[") != host.endswith("]"):
        return None
    return host.removeprefix("[").removesuffix("]"), int(port_text)


def unmapped(host: str) -> str:
    """``::ffff:10.0.0.1`` → ``10.0.0.1``; any other address or name unchanged."""
    if not host.startswith("::ffff:") and not host.startswith("::FFFF:"):
        return host
    try:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
    except ValueError:
        return host
    return host if mapped is None else str(mapped)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _dual_stack(sock: trio.socket.SocketType, host: str) -> None:
    """``::`` takes IPv4 too, whatever net.ipv6.bindv6only says."""
    if host == ANY_V6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)


async def open_udp_socket(host: str, port: int) -> trio.socket.SocketType:
    """A UDP socket bound to ``host:port`` (``::``: dual-stack). OSError if it cannot be."""
    sock = trio.socket.socket(_family(host), socket.SOCK_DGRAM)
    try:
        _dual_stack(sock, host)
        await sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tcp_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listeners on ``host:port``. ``::`` is one dual-stack socket (trio's own helper
    would make it IPv6-only); names and other literals go through trio."""
    if host != ANY_V6:
        return await trio.open_tcp_listeners(port, host=host)
    sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _dual_stack(sock, host)
        await sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return [trio.SocketListener(sock)]
