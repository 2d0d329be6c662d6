"""Socket activation (sd_listen_fds(3)): listening sockets systemd opened for us.

With ``spegeld.socket`` systemd binds the mirror's port before spegeld starts and keeps
it bound across restarts, so containerd's connections queue instead of being refused
while the daemon restarts; the mirror then serves the inherited socket instead of
binding ``--registry-addr``.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Final

import trio

from spegeld.errors import ConfigError

__all__ = ["LISTEN_FDS_START", "InheritedSocket", "listen_fds"]

LISTEN_FDS_START: Final = 3  # SD_LISTEN_FDS_START: the first fd after stdin, stdout, stderr
_MAX_FDS: Final = 64  # far more than a unit will pass; bounds the loop over a typo'd count
_STREAM_FAMILIES: Final = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """One passed socket: its ``FileDescriptorName=`` (or ``unknown``) and the trio socket."""

    name: str
    socket: trio.socket.SocketType

    def listener(self) -> trio.SocketListener:
        return trio.SocketListener(self.socket)


def listen_fds(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = True
) -> list[InheritedSocket]:
    """The listening TCP sockets systemd passed, in order; [] when not socket-activated.

    Honours ``LISTEN_PID`` (variables meant for another process are ignored), marks the
    fds close-on-exec, and by default removes the three variables afterwards, as
    ``sd_listen_fds(unset_environment=1)`` does, so no child believes it was passed them.
    Anything but a listening IPv4/IPv6 stream socket is a ConfigError naming the fd: the
    mirror speaks HTTP over TCP and cannot serve a datagram or unbound socket.
    """
    env = os.environ if environ is None else environ
    pid_text = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    names_text = env.get("LISTEN_FDNAMES")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if pid_text is None or count_text is None:
        return []
    if not pid_text.isdigit():
        raise ConfigError(f"LISTEN_PID={pid_text[:20]!r} is not a process id")
    if int(pid_text) != os.getpid():
        return []
    if not count_text.isdigit() or int(count_text) > _MAX_FDS:
        raise ConfigError(f"LISTEN_FDS={count_text[:20]!r} is not a count of 0..{_MAX_FDS}")
    count = int(count_text)
    names = names_text.split(":") if names_text else ["unknown"] * count
    if len(names) != count:
        raise ConfigError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")
    fds = range(LISTEN_FDS_START, LISTEN_FDS_START + count)
    for fd in fds:
        # Before anything can fail: a child must never inherit these, even on an error path.
        _set_cloexec(fd)
    adopted: list[socket.socket] = []
    try:
        for fd, name in zip(fds, names, strict=True):
            adopted.append(_adopt(fd, name))
    except BaseException:
        # Plain sockets until all are valid: a trio socket cannot be closed outside trio.run,
        # and this runs before it (the CLI reads its environment first).
        for sock in adopted:
            sock.close()
        raise
    return [
        InheritedSocket(name, trio.socket.from_stdlib_socket(sock))
        for name, sock in zip(names, adopted, strict=True)
    ]


def _set_cloexec(fd: int) -> None:
    try:
        os.set_inheritable(fd, False)
    except OSError as exc:
        raise ConfigError(
            f"socket activation passed fd {fd}, but it is not open ({exc.strerror})"
        ) from exc


def _adopt(fd: int, name: str) -> socket.socket:
    what = f"socket activation fd {fd} ({name})"
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        if exc.errno == errno.ENOTSOCK:
            raise ConfigError(f"{what} is not a socket") from exc
        raise ConfigError(f"{what} cannot be used: {exc.strerror}") from exc
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(
                f"{what} is not a stream socket: the mirror needs ListenStream=, "
                "not ListenDatagram="
            )
        if sock.family not in _STREAM_FAMILIES:
            raise ConfigError(f"{what} is not an IPv4 or IPv6 socket: the mirror speaks TCP")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError(f"{what} is not listening")
    except BaseException:
        sock.close()
        raise
    return sock
