"""Translate grpclib, h2, bridge and socket errors into spegeld errors, at the client seam.

A lost connection can surface from any layer under the client, depending on which
line grpclib was at when containerd went away. Each shape seen or read in grpclib 0.4's
source is listed here; nothing from them reaches the store or the mirror.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpclib
import h2.exceptions
from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from spegeld.errors import (
    ContainerdError,
    ContainerdNamespace,
    ContainerdPermission,
    ContainerdUnavailable,
    NotFound,
)

from ._bridge import CallTimeout, ConnectionLost

_GRPCLIB_DIR = os.path.dirname(grpclib.__file__) + os.sep

# Errors of a connection that broke or a containerd that stopped answering.
_CONNECTION_ERRORS = (
    OSError,  # ConnectionResetError, BrokenPipeError, TimeoutError, ...
    StreamTerminatedError,  # "Connection lost", GOAWAY, RST_STREAM
    ProtocolError,  # grpclib's own
    h2.exceptions.H2Error,  # ProtocolError, StreamClosedError, FlowControlError, ...
    ConnectionLost,  # asyncio.CancelledError from the asyncio side, via the bridge
    CallTimeout,
)


def socket_problem(path: Path) -> ContainerdError | None:
    """Say precisely what is wrong with a containerd socket path, if anything is."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return ContainerdUnavailable(
            f"containerd socket {path} does not exist (is containerd running?)"
        )
    except PermissionError:
        return ContainerdPermission(f"containerd socket {path}: permission denied")
    except OSError as exc:
        return ContainerdUnavailable(f"containerd socket {path}: {exc.strerror or exc}")
    if not stat.S_ISSOCK(mode):
        return ContainerdUnavailable(f"{path} is not a socket (check --containerd-sock)")
    if not os.access(path, os.R_OK | os.W_OK):
        return ContainerdPermission(
            f"containerd socket {path}: permission denied (run as root or join its group)"
        )
    return None


@contextmanager
def map_containerd_errors(socket: Path, what: str) -> Iterator[None]:
    """Raise the spegeld error for a failed containerd call ``what``."""
    try:
        yield
    except GRPCError as exc:
        raise _from_status(exc, what) from exc
    except PermissionError as exc:
        raise ContainerdPermission(f"containerd socket {socket}: permission denied") from exc
    except _CONNECTION_ERRORS as exc:
        raise _unavailable(socket, what, exc) from exc
    except AttributeError as exc:
        if not _grpclib_lost_its_transport(exc):
            raise  # our own bug: let it show
        raise _unavailable(socket, what, exc) from exc
    except (AssertionError, NotImplementedError, DecodeError) as exc:
        # grpclib asserts that a reply is as long as its length prefix says (a stream
        # that ended mid-message), refuses compressed replies with NotImplementedError,
        # and protobuf refuses a reply it cannot decode: containerd sent something
        # broken. Raised from anywhere but grpclib or protobuf, it is our bug.
        if isinstance(exc, DecodeError) or _raised_in_grpclib(exc):
            raise ContainerdError(f"containerd sent a broken reply ({what}): {exc!r}") from exc
        raise


def _unavailable(socket: Path, what: str, exc: BaseException) -> ContainerdError:
    problem = socket_problem(socket)
    if problem is not None:
        return problem
    return ContainerdUnavailable(f"containerd at {socket} is not answering ({what}): {exc}")


def _raised_in_grpclib(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename.startswith(_GRPCLIB_DIR)


def _grpclib_lost_its_transport(exc: AttributeError) -> bool:
    """grpclib's ``Connection.close()`` deletes ``_transport`` when the connection is lost.

    ``Channel.__connect__`` can hand out a protocol whose connection was lost while it
    was being made, and a stream that is acknowledging data or asking for its peer can
    find the attribute gone: ``AttributeError: 'Connection' object has no attribute
    '_transport'`` from grpclib's own frames. Only that exact case is a lost
    connection; any other AttributeError is a bug and must not be hidden.
    """
    return exc.name == "_transport" and _raised_in_grpclib(exc)


def _from_status(exc: GRPCError, what: str) -> ContainerdError | NotFound:
    message = exc.message or exc.status.name
    if exc.status is Status.NOT_FOUND:
        return NotFound(f"{what}: {message}")
    if exc.status is Status.UNAVAILABLE:
        return ContainerdUnavailable(f"containerd is unavailable ({what}): {message}")
    if exc.status is Status.PERMISSION_DENIED:
        return ContainerdPermission(f"containerd refused {what}: {message}")
    if exc.status in (Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION) and (
        "namespace" in message
    ):
        return ContainerdNamespace(f"containerd namespace problem ({what}): {message}")
    return ContainerdError(f"containerd failed {what}: {exc.status.name}: {message}")
