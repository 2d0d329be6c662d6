"""Gossip datagram version 2: AES-256-GCM, a named recipient, a random nonce. Sans-I/O.

Version 1 (``_security``) authenticates; version 2 also hides the payload (node
names, addresses, and every key a node holds: registry hosts, repositories, tags).
docs/protocol.md §1 and §5 describe both; this is the layout::

    offset  size  field
         0     2  magic "SG"
         2     1  version: 2
         3     1  key id: 1..255 (version 2 has no insecure mode)
         4     4  sender incarnation (u32)
         8     4  sequence (u32), per (sender, incarnation), never reused
        12     8  recipient: ``recipient_id(node name)``, or eight zero bytes
                  (``ANYONE``) when the sender does not know the name yet
        20    12  nonce: 96 random bits, fresh for every datagram
        32     n  ciphertext of the payload, n ≤ MAX_PAYLOAD (1172)
      32+n    16  GCM tag

The header (bytes 0..31) is the associated data: it is authenticated, not hidden.
The AES key is derived from the cluster secret with HKDF-SHA256, so v1's HMAC key
and v2's cipher key differ. The payload budget is v1's, so a datagram carries the
same messages in either version; a v2 datagram is at most 1220 bytes, which still
fits IPv6's minimum MTU (1280 less 48 bytes of IPv6 and UDP headers: 1232).

``open_any`` hears both versions (a node in a mixed cluster); ``_security.open_datagram``
alone hears only version 1, as a node from before version 2 did.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from spegeld.errors import LocalProtocolError

from ._security import (
    MAGIC,
    MAX_PAYLOAD,
    BadMac,
    Keyring,
    MalformedPacket,
    Opened,
    OversizePacket,
    UnknownKey,
    open_datagram,
)

__all__ = [
    "ANYONE",
    "HEADER_SIZE_V2",
    "MAX_DATAGRAM_V2",
    "NONCE_SIZE",
    "VERSION_2",
    "Ciphers",
    "open_any",
    "recipient_id",
    "seal_v2",
]

VERSION_2: Final = 2
NONCE_SIZE: Final = 12  # 96 bits: GCM's native nonce (a longer one is hashed down)
RECIPIENT_SIZE: Final = 8  # 64 bits: two of 1000 node names share one with p ≈ 3·10⁻¹⁴
GCM_TAG: Final = 16
ANYONE: Final = bytes(RECIPIENT_SIZE)
_HEADER = struct.Struct(">2sBBII8s12s")  # magic, version, key id, inc, seq, recipient, nonce
HEADER_SIZE_V2: Final = _HEADER.size  # 32
MAX_DATAGRAM_V2: Final = HEADER_SIZE_V2 + MAX_PAYLOAD + GCM_TAG  # 1220
_MAX_U32: Final = 0xFFFF_FFFF
_KDF_INFO: Final = b"spegeld gossip v2 AES-256-GCM key"
_RECIPIENT_LABEL: Final = b"spegeld gossip recipient\0"

Nonces = Callable[[int], bytes]  # os.urandom in the daemon; seeded in the simulator


def recipient_id(node: str) -> bytes:
    """The 8 bytes that name ``node`` as a datagram's recipient."""
    return hashlib.sha256(_RECIPIENT_LABEL + node.encode()).digest()[:RECIPIENT_SIZE]


class Ciphers:
    """The AES-GCM cipher of every key in a keyring, derived once (HKDF-SHA256)."""

    __slots__ = ("_by_id", "keyring")

    def __init__(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._by_id: dict[int, AESGCM] = {}
        if keyring.is_insecure:
            return
        for key_id in keyring.key_ids:
            key = keyring._lookup(key_id)
            assert key is not None
            kdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KDF_INFO)
            self._by_id[key_id] = AESGCM(kdf.derive(key.secret))

    def primary(self) -> tuple[int, AESGCM]:
        key_id = self.keyring.primary_id
        cipher = self._by_id.get(key_id)
        if cipher is None:
            raise LocalProtocolError("gossip version 2 needs a cluster key (not --insecure-gossip)")
        return key_id, cipher

    def get(self, key_id: int) -> AESGCM | None:
        return self._by_id.get(key_id)


def seal_v2(
    ciphers: Ciphers,
    incarnation: int,
    sequence: int,
    recipient: bytes,
    payload: bytes,
    nonce: bytes,
) -> bytes:
    """Frame and encrypt ``payload`` for ``recipient`` with the primary key.

    Raises LocalProtocolError for a payload over MAX_PAYLOAD, counters outside u32, a
    malformed recipient or nonce, or an insecure keyring: those are our bugs.
    """
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(
            f"gossip payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})"
        )
    if not 0 <= incarnation <= _MAX_U32 or not 0 <= sequence <= _MAX_U32:
        raise LocalProtocolError(
            f"gossip incarnation {incarnation} / sequence {sequence} do not fit in u32"
        )
    if len(recipient) != RECIPIENT_SIZE or len(nonce) != NONCE_SIZE:
        raise LocalProtocolError("gossip v2 recipient must be 8 bytes and the nonce 12")
    key_id, cipher = ciphers.primary()
    header = _HEADER.pack(MAGIC, VERSION_2, key_id, incarnation, sequence, recipient, nonce)
    return header + cipher.encrypt(nonce, payload, header)


def _open_v2(ciphers: Ciphers, datagram: bytes) -> Opened:
    if len(datagram) < HEADER_SIZE_V2 + GCM_TAG:
        raise MalformedPacket(f"gossip v2 datagram of {len(datagram)} bytes is too short")
    magic, _, key_id, incarnation, sequence, recipient, nonce = _HEADER.unpack_from(datagram)
    if magic != MAGIC:
        raise MalformedPacket("gossip datagram with bad magic")
    cipher = ciphers.get(key_id)
    if cipher is None:
        raise UnknownKey(key_id)
    header = datagram[:HEADER_SIZE_V2]
    try:
        payload = cipher.decrypt(nonce, datagram[HEADER_SIZE_V2:], header)
    except InvalidTag:
        raise BadMac(f"gossip v2 datagram that key id {key_id} does not open") from None
    return Opened(key_id, incarnation, sequence, payload, VERSION_2, recipient)


def open_any(ciphers: Ciphers, datagram: bytes) -> Opened:
    """Check framing and authenticity of a version 1 or 2 datagram; decrypt version 2.

    Raises only DroppedPacket subclasses. The caller checks the recipient (it needs the
    decoded messages: ``ANYONE`` is allowed only for Join and Ping) and the replay window.
    """
    if len(datagram) > MAX_DATAGRAM_V2:
        raise OversizePacket(f"gossip datagram of {len(datagram)} bytes")
    if len(datagram) > 2 and datagram[2] == VERSION_2:
        return _open_v2(ciphers, datagram)
    return open_datagram(ciphers.keyring, datagram)
