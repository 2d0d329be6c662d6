"""sd_notify over ``$NOTIFY_SOCKET``, spoken directly: no libsystemd in the wheel or the Talos
bundle, and the protocol is one ``KEY=value`` datagram (systemd's sd_notify(3)).

Sending never blocks the trio loop and never raises: the socket is non-blocking, and a
send that fails (systemd gone, queue full, bad address) is logged once at DEBUG and
dropped. A lost ``STATUS=`` is harmless; a lost ``READY=1`` makes systemd time the start
out, which is what should happen when PID 1 cannot hear us anyway.

``Notifier.from_environ`` removes ``NOTIFY_SOCKET`` from the environment it read, as
``sd_notify(unset_environment=1)`` does: the unit says ``NotifyAccess=main``, so a child we
spawn could not notify on our behalf anyway, and a child that is itself a notify-aware
program (a helper, a ``spegeld doctor`` run from a hook) must not mistake our socket for
its own.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping
from types import TracebackType
from typing import Final, NoReturn

import trio

from spegeld.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_STATUS_CHARS",
    "Notifier",
    "serve_watchdog",
    "watchdog_interval",
]

MAX_STATUS_CHARS: Final = 200  # one line in `systemctl status`; longer text is cut with "…"
_MAX_ADDRESS_BYTES: Final = 107  # sockaddr_un.sun_path is 108 bytes with the NUL
_MAX_WATCHDOG_USEC: Final = 24 * 3600 * 1_000_000  # a day: anything longer is a typo


def _monotonic_usec() -> int:
    # RELOADING=1 needs CLOCK_MONOTONIC itself (systemd compares it with its own clock),
    # not trio's clock, whose origin is arbitrary.
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Tells systemd about the service's state; a no-op when not started by systemd."""

    def __init__(self, address: str | None, *, clock: Callable[[], int] = _monotonic_usec) -> None:
        self._address = _parse_address(address)
        self._clock = clock
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = True
    ) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` (and, by default, remove it: see the module docstring)."""
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) if unset else env.get("NOTIFY_SOCKET")
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        """The service is up: only once it serves what it promises (DESIGN.md §8)."""
        return self.send("READY=1", status)

    def status(self, text: str) -> bool:
        """A one-line state for ``systemctl status`` (peers, coordinator, last error)."""
        return self.send(None, text)

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """Reload begins; send ``ready()`` when it is done. systemd 253+ requires
        ``MONOTONIC_USEC`` with ``RELOADING=1`` (to order it against the reload request);
        older versions ignore the extra field."""
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={self._clock()}", status)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1", None)

    def send(self, fields: str | None, status: str | None) -> bool:
        """Send one datagram; True when the kernel took it. Never raises."""
        if self._address is None:
            return False
        lines = [fields] if fields else []
        if status is not None:
            lines.append("STATUS=" + _one_line(status))
        if not lines:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logger.debug("cannot notify systemd (further failures are not logged): %s", exc)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_address(address: str | None) -> str | bytes | None:
    """An absolute path, or ``@name`` for an abstract socket; anything else disables us."""
    if not address:
        return None
    if address.startswith("@"):
        raw = b"\0" + address[1:].encode()
    elif address.startswith("/"):
        raw = address.encode()
    else:
        # vsock: (systemd 253+, VMs) and relative paths are not for a node daemon.
        logger.debug("NOTIFY_SOCKET %r is not a path or @abstract name: not notifying", address)
        return None
    if len(raw) > _MAX_ADDRESS_BYTES:
        logger.debug("NOTIFY_SOCKET is longer than a socket address may be: not notifying")
        return None
    return raw if address.startswith("@") else address


def _one_line(text: str) -> str:
    """Control characters would end the field (newline) or garble the status line."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if len(flat) > MAX_STATUS_CHARS:
        flat = flat[: MAX_STATUS_CHARS - 1] + "…"
    return flat


def watchdog_interval(
    environ: MutableMapping[str, str] | None = None, *, unset: bool = False
) -> float | None:
    """The watchdog timeout in seconds that systemd expects pings within, or None.

    None when ``WATCHDOG_USEC`` is unset, or ``WATCHDOG_PID`` names another process
    (the variables leaked from a parent). A malformed value is a ConfigError: systemd
    would kill a daemon that silently ignored its watchdog.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    pid_text = env.get("WATCHDOG_PID")
    if unset:
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
    if usec_text is None:
        return None
    if pid_text is not None:
        if not pid_text.isdigit():
            raise ConfigError(f"WATCHDOG_PID={pid_text[:20]!r} is not a process id")
        if int(pid_text) != os.getpid():
            return None
    if not usec_text.isdigit() or not 0 < int(usec_text) <= _MAX_WATCHDOG_USEC:
        raise ConfigError(
            f"WATCHDOG_USEC={usec_text[:20]!r} is not a number of microseconds "
            f"between 1 and {_MAX_WATCHDOG_USEC}"
        )
    return int(usec_text) / 1_000_000


async def serve_watchdog(
    notifier: Notifier,
    interval: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Ping ``WATCHDOG=1`` at half of ``interval`` (sd_watchdog_enabled(3)'s advice) from
    the trio loop itself, so a wedged loop (a blocking call, a busy handler) stops the pings
    and systemd restarts us."""
    if not interval > 0:
        raise ValueError(f"watchdog interval must be positive, not {interval!r}")
    period = interval / 2
    notifier.watchdog()
    task_status.started()
    while True:
        await trio.sleep(period)
        notifier.watchdog()
