"""Zero-copy file bodies: ``os.sendfile`` on a non-blocking socket, under a deadline."""

from __future__ import annotations

import errno
import os

import trio

from ._messages import AbortResponse, FileBody

SENDFILE_CHUNK = 8 * 1024 * 1024  # large enough to amortise the syscall, small enough to be fair
# sendfile errors that mean the client went away, not that the file failed us.
CLIENT_GONE_ERRNOS = frozenset(
    {errno.EPIPE, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH}
)


class SentLength:
    """Stands in for a body h11 must count but we send ourselves (sendfile)."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n


class WriteTimeout(Exception):
    """The client accepted no byte for ``Limits.write_timeout`` seconds."""


class BodyFailed(Exception):
    """The body's source (a stream, a file) raised: the response cannot be finished."""


async def sendfile(stream: trio.SocketStream, body: FileBody, write_timeout: float) -> None:
    """Zero-copy send of a file region. A file that cannot be opened or read is a
    BodyFailed; a client that accepts nothing for ``write_timeout`` s a WriteTimeout."""
    sock = stream.socket
    try:
        fd = os.open(body.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BodyFailed from exc
    try:
        offset, remaining = body.offset, body.length
        while remaining > 0:
            await trio.lowlevel.checkpoint()
            try:
                sent = os.sendfile(sock.fileno(), fd, offset, min(remaining, SENDFILE_CHUNK))
            except BlockingIOError:
                with trio.move_on_after(write_timeout):
                    await trio.lowlevel.wait_writable(sock)
                    continue
                raise WriteTimeout from None
            except OSError as exc:
                if exc.errno in CLIENT_GONE_ERRNOS:
                    raise
                raise BodyFailed from exc
            if sent == 0:
                raise AbortResponse(f"{body.path} ended {remaining} bytes early")
            offset += sent
            remaining -= sent
    finally:
        os.close(fd)
