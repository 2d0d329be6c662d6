"""Writing and removing hosts.toml files under containerd's hosts directory.

Every write goes to a temp file in the same directory, is fsynced and renamed over the
target, so containerd never reads half a file. A hosts.toml that spegeld did not write is
copied to ``hosts.toml.spegeld-backup`` first (an existing backup is never overwritten),
and ``remove_hosts_files`` moves it back. Nothing is touched before every file has been
checked, so a conflict leaves the directory as it was.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import os
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spegeld.errors import SpegeldError
from spegeld.mirrorconfig._render import (
    DEFAULT_DIRECTORY,
    HOSTS_TOML,
    HostsFile,
    is_spegeld_file,
    keep_existing_hosts,
)

__all__ = [
    "BACKUP_NAME",
    "Change",
    "FileChange",
    "HostsDirError",
    "HostsReport",
    "apply_hosts_files",
    "remove_hosts_files",
]

BACKUP_NAME = HOSTS_TOML + ".spegeld-backup"
FILE_MODE = 0o644  # containerd runs as root; nothing secret in here
DIR_MODE = 0o755


class Change(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"
    BACKED_UP = "backed-up"
    RESTORED = "restored"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class FileChange:
    path: Path
    change: Change
    note: str = ""


@dataclass(frozen=True, slots=True)
class HostsReport:
    """What happened, per file, in order; plus warnings for the person running it."""

    changes: tuple[FileChange, ...] = ()
    warnings: tuple[str, ...] = field(default=())


class HostsDirError(SpegeldError):
    """The hosts directory could not be read or changed, or holds a conflicting backup."""


@contextlib.contextmanager
def _os_errors(action: str, path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise HostsDirError(f"cannot {action} {path}: {reason}") from exc


def _read(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    with _os_errors("read", path):
        try:
            if path.is_dir():
                raise HostsDirError(f"{path} is a directory, not a hosts.toml file")
            return path.read_bytes()
        except FileNotFoundError:
            return None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_copy(directory: Path, name: str, data: bytes, mode: int) -> Path:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def _write_atomic(path: Path, data: bytes) -> None:
    with _os_errors("write", path):
        tmp = _temp_copy(path.parent, path.name, data, FILE_MODE)
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(path.parent)


def _write_backup(backup: Path, data: bytes, mode: int) -> None:
    """Create the backup atomically; a hard link never replaces an existing file."""
    with _os_errors("back up to", backup):
        tmp = _temp_copy(backup.parent, backup.name, data, mode)
        try:
            os.link(tmp, backup)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _fsync_dir(backup.parent)


def _subdirectories(config_path: Path) -> list[Path]:
    with _os_errors("list", config_path):
        if not config_path.is_dir():
            return []
        return sorted(p for p in config_path.iterdir() if p.is_dir())


def _check_root(config_path: Path) -> None:
    if config_path.exists() and not config_path.is_dir():
        raise HostsDirError(f"containerd hosts directory {config_path} is not a directory")


def _undo(directory: Path, changes: list[FileChange]) -> None:
    """Take spegeld's hosts.toml out of one directory, restoring the backup if any."""
    hosts, backup = directory / HOSTS_TOML, directory / BACKUP_NAME
    if backup.exists():
        with _os_errors("restore", hosts):
            os.replace(backup, hosts)
            _fsync_dir(directory)
        changes.append(FileChange(hosts, Change.RESTORED, f"from {BACKUP_NAME}"))
        return
    with _os_errors("remove", hosts):
        hosts.unlink(missing_ok=True)
    changes.append(FileChange(hosts, Change.REMOVED))
    with _os_errors("remove", directory):
        try:
            directory.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # something else lives there
                raise
            return
    changes.append(FileChange(directory, Change.REMOVED, "left empty"))


def apply_hosts_files(
    config_path: Path, files: Sequence[HostsFile], *, keep_existing: bool = False
) -> HostsReport:
    """Make ``config_path`` hold exactly these spegeld hosts.toml files.

    With ``keep_existing``, the mirrors of a hosts.toml spegeld did not write (the file
    itself, or its backup once spegeld's file replaced it) are kept after spegeld's.

    Files spegeld wrote earlier for other registries are taken out again (with their
    backups restored), so switching between ``_default`` and a list leaves no stale mirror.
    """
    _check_root(config_path)
    wanted = {f.directory: f for f in files}
    changes: list[FileChange] = []
    warnings: list[str] = []

    # Plan everything first: a refusal must come before the first write.
    plan: list[tuple[HostsFile, bytes | None, bool]] = []
    for wanted_file in files:
        hosts_file = wanted_file
        directory = config_path / hosts_file.directory
        current = _read(directory / HOSTS_TOML)
        foreign = current is not None and not is_spegeld_file(current)
        if foreign and (directory / BACKUP_NAME).exists():
            raise HostsDirError(
                f"{directory / HOSTS_TOML} was not written by spegeld and "
                f"{directory / BACKUP_NAME} already exists; move one of them away first"
            )
        if keep_existing:
            original = current if foreign else _read(directory / BACKUP_NAME)
            if original is not None:
                where = str(directory / (HOSTS_TOML if foreign else BACKUP_NAME))
                merged = keep_existing_hosts(hosts_file.content, original, where)
                hosts_file = HostsFile(hosts_file.directory, merged)
        plan.append((hosts_file, current, foreign))
    stale: list[Path] = []
    for directory in _subdirectories(config_path):
        current = _read(directory / HOSTS_TOML)
        if directory.name in wanted or current is None:
            continue
        if is_spegeld_file(current):
            stale.append(directory)
        elif DEFAULT_DIRECTORY in wanted:
            warnings.append(
                f"{directory / HOSTS_TOML} is not spegeld's and takes precedence over "
                f"{DEFAULT_DIRECTORY} for {directory.name}: that registry is not mirrored"
            )

    with _os_errors("create", config_path):
        config_path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    for hosts_file, current, foreign in plan:
        directory = config_path / hosts_file.directory
        hosts = directory / HOSTS_TOML
        data = hosts_file.content.encode()
        if current == data:
            changes.append(FileChange(hosts, Change.UNCHANGED))
            continue
        if foreign:
            assert current is not None
            with _os_errors("read", hosts):
                mode = stat.S_IMODE(hosts.stat().st_mode)
            _write_backup(directory / BACKUP_NAME, current, mode)
            changes.append(
                FileChange(directory / BACKUP_NAME, Change.BACKED_UP, "not written by spegeld")
            )
        with _os_errors("create", directory):
            directory.mkdir(mode=DIR_MODE, exist_ok=True)
        _write_atomic(hosts, data)
        changes.append(FileChange(hosts, Change.CREATED if current is None else Change.UPDATED))
    for directory in stale:
        _undo(directory, changes)
    return HostsReport(tuple(changes), tuple(warnings))


def remove_hosts_files(config_path: Path) -> HostsReport:
    """Remove every hosts.toml spegeld wrote under ``config_path`` and restore backups.

    A directory left empty is removed too. A backup next to a hosts.toml that spegeld did
    not write is left alone, with a warning.
    """
    _check_root(config_path)
    changes: list[FileChange] = []
    warnings: list[str] = []
    for directory in _subdirectories(config_path):
        hosts, backup = directory / HOSTS_TOML, directory / BACKUP_NAME
        current = _read(hosts)
        ours = current is not None and is_spegeld_file(current)
        if ours or (current is None and backup.exists()):
            _undo(directory, changes)
        elif current is not None and backup.exists():
            warnings.append(
                f"left {backup} in place: {hosts} next to it was not written by spegeld"
            )
    return HostsReport(tuple(changes), tuple(warnings))
