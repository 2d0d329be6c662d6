"""Translate grpclib and socket errors into spegeld errors, at the client seam."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h2.exceptions
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from spegeld.errors import (
    ContainerdError,
    ContainerdNamespace,
    ContainerdPermission,
    ContainerdUnavailable,
    NotFound,
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
    except (OSError, StreamTerminatedError, ProtocolError, h2.exceptions.ProtocolError) as exc:
        problem = socket_problem(socket)
        if problem is not None:
            raise problem from exc
        message = f"containerd at {socket} is not answering ({what}): {exc}"
        raise ContainerdUnavailable(message) from exc


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
