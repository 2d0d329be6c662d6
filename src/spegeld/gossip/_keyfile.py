"""The gossip key file: parsed once at start into a Keyring, never logged.

Format: UTF-8 text, one key per line as ``<id>:<secret>``::

    # spegeld gossip keys; the first key signs, every key verifies
    2:<base64 secret>
    1:<hex secret>   # the old key, kept until every node signs with 2

- ``id`` is a decimal key id 1..255 (0 is reserved for insecure mode) and is
  unique in the file. The first key is the primary: it signs; all verify.
- ``secret`` is hex when it consists only of hex digits and has an even
  length; otherwise standard or URL-safe base64 (padding optional). It must
  decode to at least 32 bytes.
- A file holding a single line without a colon is that bare secret, as key 1.
- ``#`` starts a comment (neither alphabet uses it); blank lines are ignored.

To rotate, roll three file changes through the cluster, restarting each node
(the file is read once): append ``2:<new secret>`` (a bare secret must now be
written ``1:<secret>``); then move that line first, so key 2 signs; then,
once every node signs with key 2, delete key 1.

Until spegeld grows a command for it, make a key file (a bare secret, so key
id 1) with::

    (umask 077; head -c 32 /dev/urandom | base64 > gossip.key)

(``base64`` wraps at 76 characters: add ``-w0`` for secrets longer than 57
bytes.) The file should be readable by the daemon alone: any group or world
permission bit draws a warning, which the caller logs.

Under systemd, prefer ``LoadCredential=gossip-key:/etc/spegeld/gossip.key``
(or ``SetCredentialEncrypted=``): systemd then places a private copy in
``$CREDENTIALS_DIRECTORY/gossip-key``, readable by the service only, and
``load_credential("gossip-key")`` reads it from there.

Error messages name the file and, for a line, its number, but never echo the
file's content: a malformed line may well be a secret.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from spegeld.errors import ConfigError

from ._security import Keyring

__all__ = [
    "GOSSIP_KEY_CREDENTIAL",
    "MIN_FILE_SECRET_BYTES",
    "load_credential",
    "load_key_file",
]

MIN_FILE_SECRET_BYTES: Final = 32  # 256 bits: HMAC-SHA256 gains nothing from a longer key
GOSSIP_KEY_CREDENTIAL: Final = "gossip-key"  # the LoadCredential= name the unit uses
_MAX_FILE_BYTES: Final = 64 * 1024  # 255 keys of long secrets fit with room; refuse a stray blob
_ID_RE = re.compile(r"[0-9]{1,3}")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")
_B64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


def load_key_file(path: str | os.PathLike[str]) -> tuple[Keyring, list[str]]:
    """Read and parse ``path`` once; return the keyring and warnings to log.

    Every problem is a ConfigError of one line naming the path.
    """
    path = Path(path)
    data, mode = _read(path)
    warnings: list[str] = []
    if mode & 0o077:
        warnings.append(
            f"gossip key file {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    return _parse(path, data), warnings


def load_credential(
    name: str = GOSSIP_KEY_CREDENTIAL, *, environ: Mapping[str, str] | None = None
) -> tuple[Keyring, list[str]] | None:
    """The key file systemd passed with ``LoadCredential=<name>:…``, or None.

    None when ``$CREDENTIALS_DIRECTORY`` is unset or holds no file called
    ``name``: the caller then falls back to its key file option. A credential
    that exists but is broken is a ConfigError, as for ``load_key_file``.
    """
    if not name or "/" in name or name in {".", ".."}:
        raise ConfigError(f"credential name {name!r} is not a plain file name")
    env = os.environ if environ is None else environ
    directory = env.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / name
    if not path.exists():
        return None
    return load_key_file(path)


def _read(path: Path) -> tuple[bytes, int]:
    # O_NONBLOCK: opening a FIFO by mistake must fail below, not hang the daemon's start.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        raise ConfigError(f"gossip key file {path} does not exist") from exc
    except PermissionError as exc:
        raise ConfigError(
            f"gossip key file {path} cannot be read: permission denied (running as uid "
            f"{os.geteuid()})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"gossip key file {path} cannot be opened: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"gossip key file {path} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"gossip key file {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"gossip key file {path} cannot be read: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(f"gossip key file {path} is larger than {_MAX_FILE_BYTES} bytes")
    return data, info.st_mode


def _parse(path: Path, data: bytes) -> Keyring:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"gossip key file {path} is not UTF-8 text") from None
    entries: list[tuple[int, str]] = []  # (line number, content without comment)
    for number, raw in enumerate(text.splitlines(), start=1):
        content = raw.partition("#")[0].strip()
        if content:
            entries.append((number, content))
    if not entries:
        raise ConfigError(f"gossip key file {path} holds no key")

    keys: list[tuple[int, bytes]] = []
    first_line: dict[int, int] = {}
    for number, content in entries:
        where = f"gossip key file {path}, line {number}"
        if ":" in content:
            id_text, _, secret_text = content.partition(":")
            id_text, secret_text = id_text.strip(), secret_text.strip()
            if not _ID_RE.fullmatch(id_text) or not 1 <= int(id_text) <= 255:
                raise ConfigError(f"{where}: the key id must be a number 1..255")
            key_id = int(id_text)
        elif len(entries) == 1:
            key_id, secret_text = 1, content
        else:
            raise ConfigError(
                f"{where}: expected <id>:<secret> (a bare secret is allowed only as the "
                "file's one line)"
            )
        if key_id in first_line:
            raise ConfigError(
                f"{where}: key id {key_id} is already defined on line {first_line[key_id]}"
            )
        first_line[key_id] = number
        secret = _decode_secret(secret_text)
        if secret is None:
            raise ConfigError(f"{where}: key {key_id}'s secret is neither hex nor base64")
        if len(secret) < MIN_FILE_SECRET_BYTES:
            raise ConfigError(
                f"{where}: key {key_id}'s secret decodes to {len(secret)} bytes; need at "
                f"least {MIN_FILE_SECRET_BYTES} (head -c 32 /dev/urandom | base64)"
            )
        keys.append((key_id, secret))
    return Keyring(keys)


def _decode_secret(text: str) -> bytes | None:
    if _HEX_RE.fullmatch(text):
        return bytes.fromhex(text)
    if not _B64_RE.fullmatch(text):
        return None
    standard = text.rstrip("=").translate(_URLSAFE_TO_STANDARD)
    if len(standard) % 4 == 1:
        return None
    try:
        return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except binascii.Error:
        return None
