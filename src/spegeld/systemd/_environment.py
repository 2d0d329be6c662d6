"""What else systemd tells a service through its environment: credentials and the journal.

Credentials: ``LoadCredential=ID:PATH`` copies a file into ``$CREDENTIALS_DIRECTORY/ID``,
readable by the service alone. systemd 252 fails the unit when PATH is missing, unless
``SetCredential=ID:…`` gives a default; spegeld.service uses ``SetCredential=kubeconfig:absent``
so that a node without a kubeconfig still starts (and runs without election). The word
``absent`` therefore means "no credential"; an empty file does too.

The journal: under systemd stderr is a stream to journald and ``$JOURNAL_STREAM`` holds its
``device:inode``. Comparing that with stderr itself (not just testing the variable, which a
child whose stderr was redirected inherits) says whether a ``<N>`` syslog-priority prefix
will be understood; journald then files each line at its real level instead of all at
``info``.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal, TextIO

from spegeld.errors import ConfigError

__all__ = [
    "ABSENT_CREDENTIAL",
    "KUBECONFIG_CREDENTIAL",
    "PriorityPrefix",
    "credential_path",
    "log_format",
    "priority",
    "stderr_is_journal",
]

KUBECONFIG_CREDENTIAL: Final = "kubeconfig"  # LoadCredential=kubeconfig:… in spegeld.service
ABSENT_CREDENTIAL: Final = b"absent"  # SetCredential=kubeconfig:absent, the unit's default
_PLACEHOLDER_MAX_BYTES: Final = 64  # a real credential is longer; only these are read here


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path | None:
    """``$CREDENTIALS_DIRECTORY/name`` when systemd passed that credential, else None.

    None also for the unit's placeholder (empty, or the word ``absent``): the caller then
    falls back to its flag, exactly as when not running under systemd. The file is not
    read otherwise; the caller parses it and reports its problems.
    """
    if not name or "/" in name or name in {".", ".."} or "\0" in name:
        raise ConfigError(f"credential name {name!r} is not a plain file name")
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    try:
        info = path.stat()
        placeholder = stat.S_ISREG(info.st_mode) and info.st_size <= _PLACEHOLDER_MAX_BYTES
        if placeholder and path.read_bytes().strip() in {b"", ABSENT_CREDENTIAL}:
            return None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(
            f"credential {name} in {directory} cannot be read: {exc.strerror}"
        ) from exc
    return path


def stderr_is_journal(
    environ: Mapping[str, str] | None = None, stderr: TextIO | int | None = None
) -> bool:
    """True when stderr is the very stream journald handed this service."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    fd = stderr if isinstance(stderr, int) else (stderr or _default_stderr()).fileno()
    try:
        info = os.fstat(fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


def log_format(
    requested: str | None,
    environ: Mapping[str, str] | None = None,
    stderr: TextIO | None = None,
) -> Literal["text", "json"]:
    """``--log-format`` if given; else JSON for machines (journald, a pipe, a file) and text
    for a person at a terminal."""
    if requested == "json":
        return "json"
    if requested == "text":
        return "text"
    if requested is not None:
        raise ConfigError(f"log format {requested!r} is not text or json")
    stream = stderr or _default_stderr()
    if stderr_is_journal(environ, stream):
        return "json"
    try:
        return "text" if stream.isatty() else "json"
    except (OSError, ValueError):
        return "json"


# sd-daemon.h's <N> prefixes, by Python level: journald maps them to PRIORITY=.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)


class PriorityPrefix(logging.Formatter):
    """Wraps a formatter and puts journald's ``<N>`` priority in front of each record."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return f"<{priority(record.levelno)}>{self._inner.format(record)}"


def priority(levelno: int) -> int:
    for level, value in _PRIORITIES:
        if levelno >= level:
            return value
    return 7  # debug


def _default_stderr() -> TextIO:
    return sys.stderr  # looked up per call: tests and click's runner replace it
