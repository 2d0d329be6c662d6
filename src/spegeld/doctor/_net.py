"""Sorting a failed connection into what the network did to it.

A TCP connect that times out means SYNs vanished: something dropped them (a
NetworkPolicy, a CiliumNetworkPolicy, a host firewall's DROP). RST means nothing
listens, or a REJECT rule answered for it. ICMP unreachable means the kernel or a
router had no way there. These are the distinctions that take hours to find by
hand, so each gets its own verdict.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

RESOLV_CONF = Path("/etc/resolv.conf")


class Connect(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"  # RST: nothing listening, or REJECT --reject-with tcp-reset
    DROPPED = "dropped"  # no answer at all within the timeout
    UNREACHABLE = "unreachable"  # ICMP unreachable, no route, or an ICMP REJECT
    ERROR = "error"  # anything else the kernel said


# What connect() says when there is no way there (ip-route(8), measured on Linux 6.x):
# EHOSTUNREACH for an ``unreachable`` route or an ICMP host/admin unreachable coming
# back; ENETUNREACH for no route at all, a ``throw`` route or an ICMP net unreachable;
# EACCES for a ``prohibit`` route; EINVAL for a ``blackhole`` route (our socket and
# address are well-formed, so EINVAL here can only come from the route).
_UNREACHABLE = {
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EADDRNOTAVAIL,
    errno.EACCES,
    errno.EINVAL,
}


@dataclass(frozen=True, slots=True)
class ConnectResult:
    outcome: Connect
    seconds: float
    detail: str  # the kernel's words, or "no answer in 3.0 s"


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def nameservers() -> list[str]:
    try:
        lines = RESOLV_CONF.read_text().splitlines()
    except OSError:
        return []
    return [ln.split()[1] for ln in lines if ln.startswith("nameserver") and len(ln.split()) > 1]


async def resolve(host: str, port: int, timeout: float) -> list[str] | str:
    """The addresses ``host`` resolves to, or the resolver's complaint as text."""
    if is_ip(host):
        return [host]
    with trio.move_on_after(timeout):
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            return exc.strerror or str(exc)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))
    return f"no answer from the resolver in {timeout:.1f} s"


async def tcp_connect(ip: str, port: int, timeout: float) -> ConnectResult:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    started = trio.current_time()
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    with sock:
        with trio.move_on_after(timeout):
            try:
                await sock.connect((ip, port))
            except OSError as exc:
                took = trio.current_time() - started
                detail = exc.strerror or str(exc)
                if exc.errno == errno.ECONNREFUSED:
                    return ConnectResult(Connect.REFUSED, took, detail)
                if exc.errno in _UNREACHABLE:
                    return ConnectResult(Connect.UNREACHABLE, took, detail)
                if exc.errno == errno.ETIMEDOUT:
                    return ConnectResult(Connect.DROPPED, took, detail)
                return ConnectResult(Connect.ERROR, took, detail)
            return ConnectResult(Connect.OK, trio.current_time() - started, "connected")
    return ConnectResult(Connect.DROPPED, timeout, f"no answer in {timeout:.1f} s")


@dataclass(frozen=True, slots=True)
class Route:
    routed: bool  # False: this node's kernel itself refuses to send toward the address
    text: str  # ``ip route get``'s answer on one line, or the kernel's refusal


async def route_to(ip: str) -> Route:
    """The route the kernel picks for ``ip``, as ``ip route get`` prints it."""
    tool = shutil.which("ip")
    if tool is not None:
        with trio.move_on_after(2):
            done = await trio.run_process(
                [tool, "route", "get", ip], capture_stdout=True, capture_stderr=True, check=False
            )
            text = (done.stdout or done.stderr).decode(errors="replace").strip()
            return Route(done.returncode == 0, " ".join(text.split()))
    return source_address(ip)


def source_address(ip: str) -> Route:
    """Which local address the kernel would use toward ``ip`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((ip, 9))
        except OSError as exc:
            return Route(False, f"no route: {exc.strerror}")
        return Route(True, f"via source {probe.getsockname()[0]}")


__all__ = [
    "Connect",
    "ConnectResult",
    "Route",
    "is_ip",
    "nameservers",
    "resolve",
    "route_to",
    "source_address",
    "tcp_connect",
]
