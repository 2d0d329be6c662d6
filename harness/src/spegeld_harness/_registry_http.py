"""Talking to the registry: responses, errors, and connections made from inside a netns.

http.client never looks at ``http_proxy`` & co., so requests go straight to the registry's
address; the registry itself gets no proxy or ``REGISTRY_*`` variables either
(:func:`child_env`).
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

__all__ = [
    "Connection",
    "UpstreamError",
    "RegistryResponse",
    "child_env",
    "hostport",
    "pick_port",
]

# Send blocks of 1 MiB: blob uploads stream from disk.
_CHUNK: Final = 1 << 20
_CLONE_NEWNET: Final = 0x40000000  # setns(2) nstype: a network namespace
_NETNS_DIR: Final = Path("/run/netns")  # where `ip netns add` pins namespaces
_PROXY_VARS: Final = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})

T = TypeVar("T")


class UpstreamError(RuntimeError):
    """The registry answered a request with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: bytes, note: str = "") -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        text = body[:500].decode(errors="replace").strip()
        super().__init__(f"{method} {path} -> {status}: {text}{note}")


@dataclass(frozen=True)
class RegistryResponse:
    """A response read completely (see :meth:`UpstreamRegistry.request`)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in the network namespace ``netns`` (None: here), in a throwaway thread.

    setns(2) only moves the calling thread, so a short-lived thread enters the namespace,
    runs ``fn`` (e.g. creates and connects a socket, which stays in that namespace) and
    ends.  Needs CAP_SYS_ADMIN.
    """
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(_NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pick_port(host: str, netns: str | None) -> int:
    """A free TCP port on ``host``: bind port 0, read it back, close."""

    def pick() -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
            return port

    return _in_netns(netns, pick)


class Connection(http.client.HTTPConnection):
    """http.client with 1 MiB send blocks, connecting from inside ``netns`` if given."""

    def __init__(self, host: str, port: int, netns: str | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, blocksize=_CHUNK)
        self._netns = netns

    def connect(self) -> None:
        if self._netns is None:
            super().connect()
            return
        addr = (self.host, self.port)
        self.sock = _in_netns(self._netns, lambda: socket.create_connection(addr, self.timeout))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus ``REGISTRY_*`` (config overrides) and proxy settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REGISTRY_") and k.lower() not in _PROXY_VARS
    }
    env.update(extra or {})
    return env
