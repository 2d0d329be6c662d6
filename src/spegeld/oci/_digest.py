"""Content digests: ``algorithm:hex``, validated once at the edge."""

from __future__ import annotations

import re
from typing import NewType

from spegeld.errors import RemoteProtocolError

Digest = NewType("Digest", str)

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


def parse_digest(text: str) -> Digest:
    """Return ``text`` as a Digest, or raise RemoteProtocolError if it is not one."""
    if not _DIGEST_RE.fullmatch(text):
        raise RemoteProtocolError(f"invalid digest {text[:80]!r}: want sha256:<64 hex>")
    return Digest(text)


def is_digest(text: str) -> bool:
    return _DIGEST_RE.fullmatch(text) is not None


def digest_hex(digest: Digest) -> str:
    """The hex part of a digest, safe to use as a file name (validated above)."""
    return digest.partition(":")[2]
