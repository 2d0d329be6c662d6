"""Gossip packet security: framing, HMAC authentication and anti-replay, sans-I/O.

Pure functions and plain state: no sockets, no trio, no clock. The trio shell
seals what the core wants to send and opens what the socket receives.

Datagram layout (version 1)
---------------------------

Every gossip datagram is a fixed 28-byte header followed by the payload. All
integers are unsigned and big-endian (network byte order)::

    offset  size  field
    ------  ----  ------------------------------------------------------------
         0     2  magic: the ASCII bytes "SG" (0x53 0x47)
         2     1  version: 1
         3     1  key id: 1..255 names the cluster key that made the tag;
                  0 means insecure mode (unauthenticated, tag all zeros)
         4     4  sender incarnation (u32): raised by the sender whenever it
                  restarts, and before its sequence number would wrap
         8     4  sequence (u32): per (sender, incarnation), never reused
        12    16  tag: HMAC-SHA256(key, bytes 0..11 || payload), truncated to
                  its first 16 bytes; sixteen 0x00 bytes when key id is 0
        28     n  payload: the msgpack stream decoded by ``_codec`` (it starts
                  with the sender's node id)

A datagram is at most ``MAX_DATAGRAM`` = 1200 bytes (to fit IPv6's minimum MTU
and Talos KubeSpan's WireGuard links), so a payload is at most ``MAX_PAYLOAD`` =
1172 bytes. The tag covers every byte of the datagram except itself: the 12
bytes before it, then the payload. The HMAC key is the secret itself.

Sending
-------

A sender seals with its keyring's primary key. It never reuses a (incarnation,
sequence) pair: it counts sequence numbers up from 0 within an incarnation,
moves to a higher incarnation before the sequence would pass 2**32 - 1, and
starts each run of the process with an incarnation higher than any it used
before (the shell may persist it, or derive it from the wall-clock second at
start). Receivers refuse an incarnation lower than the highest they have seen
from that sender, so a node that restarts with an old incarnation is not heard
until it raises it.

Receiving, in order
-------------------

1. Longer than 1200 bytes: dropped as ``oversize``.
2. Shorter than 28 bytes, magic other than "SG", or version other than 1:
   dropped as ``malformed``.
3. Key id not held by the receiver's keyring: dropped as ``unknown_key``. A
   secure keyring never holds id 0, and an insecure keyring holds only id 0, so
   a node in the other mode is counted here (``UnknownKey.key_id`` says which
   id arrived: 0 means the sender runs ``--insecure-gossip``).
4. Secure: tag differs from the recomputed one (compared in constant time):
   dropped as ``bad_mac``. Insecure: a tag that is not all zeros is
   ``malformed``.
5. The caller decodes the payload, which names the sender, and asks
   ``ReplayWindow.check_and_record(sender, incarnation, sequence)``; False is
   counted as ``replay``.

``open_datagram`` raises only ``DroppedPacket`` subclasses, whatever the bytes.

What the tag does and does not prove
------------------------------------

The key is shared by the whole cluster: a valid tag proves the sender holds
the cluster key, not which member it is. The sender id inside the payload is
covered by the tag, so an outsider can neither forge nor alter it, but any key
holder can claim any id. The header carries no destination, so an outsider can
replay a packet that a member sent to one node to a different node, which may
not have seen that sequence number yet; messages meant for one node (ping, ack,
ping-req) must therefore name their target in the payload, and a receiver must
ignore those naming someone else. Gossip broadcasts are meant for everyone and
are idempotent by version.

Key rotation, one rolling restart per step: (1) add the new key to every node,
still signing with the old; (2) make the new key primary everywhere; (3) remove
the old key. Every node accepts every key in its ring, so no step partitions
the cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal

from spegeld.errors import ConfigError, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_SENDERS",
    "DEFAULT_REPLAY_WINDOW",
    "DROP_REASONS",
    "HEADER_SIZE",
    "INSECURE_KEY_ID",
    "MAGIC",
    "MAX_DATAGRAM",
    "MAX_PAYLOAD",
    "MIN_SECRET_BYTES",
    "TAG_SIZE",
    "VERSION",
    "BadMac",
    "DropReason",
    "DroppedPacket",
    "Key",
    "Keyring",
    "MalformedPacket",
    "Opened",
    "OversizePacket",
    "ReplayWindow",
    "UnknownKey",
    "open_datagram",
    "seal",
]

MAGIC: Final = b"SG"
VERSION: Final = 1
INSECURE_KEY_ID: Final = 0
TAG_SIZE: Final = 16  # 128 bits of HMAC-SHA256: RFC 2104 §5 allows truncating to half
# IPv6's minimum MTU (1280) less the IPv6 and UDP headers (48) leaves 1232; 1200 also
# fits inside Talos KubeSpan's WireGuard links without fragmentation (DESIGN.md §5).
MAX_DATAGRAM: Final = 1200

_PREFIX = struct.Struct(">2sBBII")  # magic, version, key id, incarnation, sequence
_TAG_OFFSET: Final = _PREFIX.size
HEADER_SIZE: Final = _PREFIX.size + TAG_SIZE
MAX_PAYLOAD: Final = MAX_DATAGRAM - HEADER_SIZE
MIN_SECRET_BYTES: Final = 16  # 128-bit keys; key files demand 32 (see _keyfile)
_MAX_U32: Final = 0xFFFF_FFFF
_ZERO_TAG: Final = bytes(TAG_SIZE)

DropReason = Literal["malformed", "oversize", "unknown_key", "bad_mac"]
DROP_REASONS: Final[tuple[DropReason, ...]] = ("malformed", "oversize", "unknown_key", "bad_mac")


class DroppedPacket(RemoteProtocolError):
    """A received datagram failed framing or authentication; count ``reason`` and drop it."""

    reason: ClassVar[DropReason]


class MalformedPacket(DroppedPacket):
    """Too short, wrong magic or version, or a nonzero tag on an insecure packet."""

    reason = "malformed"


class OversizePacket(DroppedPacket):
    """Longer than MAX_DATAGRAM."""

    reason = "oversize"


class UnknownKey(DroppedPacket):
    """Signed with a key id this keyring does not hold (0 is insecure mode's id)."""

    reason = "unknown_key"

    def __init__(self, key_id: int) -> None:
        super().__init__(f"gossip packet with unknown key id {key_id}")
        self.key_id = key_id


class BadMac(DroppedPacket):
    """The tag does not match: wrong secret under a known id, or altered in flight."""

    reason = "bad_mac"


@dataclass(frozen=True, slots=True)
class Key:
    """One cluster key. The secret never appears in ``repr``."""

    key_id: int
    secret: bytes = field(repr=False)


class Keyring:
    """The keys a node signs and verifies with: one primary for sealing, all for opening.

    A secure keyring holds 1..255 keys with ids 1..255 and secrets of at least
    MIN_SECRET_BYTES bytes; it rejects insecure (key id 0) packets. The keyring
    from ``Keyring.insecure()`` holds no key: it seals with key id 0 and a zero
    tag and accepts only key id 0 packets, so a lab cluster and a secure one
    never mix silently.
    """

    __slots__ = ("_keys", "_primary")

    def __init__(self, keys: Iterable[tuple[int, bytes]], *, primary: int | None = None) -> None:
        """``keys`` are (key id, secret) pairs; ``primary`` defaults to the first key's id."""
        table: dict[int, Key] = {}
        for key_id, secret in keys:
            if isinstance(key_id, bool) or not isinstance(key_id, int) or not 1 <= key_id <= 255:
                raise ConfigError(f"gossip key id must be an integer 1..255, not {key_id!r}")
            if not isinstance(secret, bytes):
                raise ConfigError(f"gossip key {key_id}: the secret must be bytes")
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"gossip key {key_id}: the secret is {len(secret)} bytes; "
                    f"need at least {MIN_SECRET_BYTES}"
                )
            if key_id in table:
                raise ConfigError(f"gossip key id {key_id} appears twice")
            table[key_id] = Key(key_id, secret)
        if not table:
            raise ConfigError("a gossip keyring needs at least one key (or use Keyring.insecure())")
        if primary is None:
            primary = next(iter(table))
        elif primary not in table:
            raise ConfigError(f"primary gossip key id {primary!r} is not in the keyring")
        self._keys: dict[int, Key] = table
        self._primary: Key | None = table[primary]

    @classmethod
    def insecure(cls) -> Keyring:
        """The explicit ``--insecure-gossip`` mode: unauthenticated, for labs only."""
        ring = cls.__new__(cls)
        ring._keys = {}
        ring._primary = None
        return ring

    @property
    def is_insecure(self) -> bool:
        return self._primary is None

    @property
    def primary_id(self) -> int:
        """The key id seals use: 0 in insecure mode."""
        return INSECURE_KEY_ID if self._primary is None else self._primary.key_id

    @property
    def key_ids(self) -> tuple[int, ...]:
        """The ids accepted when opening: ``(0,)`` in insecure mode."""
        return (INSECURE_KEY_ID,) if self._primary is None else tuple(self._keys)

    def __repr__(self) -> str:
        if self._primary is None:
            return "Keyring.insecure()"
        return f"Keyring(key_ids={self.key_ids!r}, primary={self.primary_id})"

    def fingerprint(self) -> str:
        """``<primary id>:<16 hex>``, safe to show: a keyed hash, not the secret.

        Two nodes (or the doctor and a daemon) with the same fingerprint seal alike.
        """
        if self._primary is None:
            return "insecure"
        digest = hashlib.sha256(b"spegeld gossip key fingerprint\0" + self._primary.secret)
        return f"{self._primary.key_id}:{digest.hexdigest()[:16]}"

    def derive(self, label: bytes) -> tuple[tuple[int, bytes], ...]:
        """(key id, HMAC-SHA256(secret, ``label``)) per key, the primary first: a key for
        another use of the cluster key (the mirror's peer requests) that tells nothing of
        the gossip secret. Empty in insecure mode."""
        if self._primary is None:
            return ()
        order = [self._primary, *(k for k in self._keys.values() if k is not self._primary)]
        return tuple((k.key_id, hmac.digest(k.secret, label, "sha256")) for k in order)

    def _primary_key(self) -> Key | None:
        return self._primary

    def _lookup(self, key_id: int) -> Key | None:
        return self._keys.get(key_id)


def _tag(key: Key, signed: bytes) -> bytes:
    return hmac.digest(key.secret, signed, "sha256")[:TAG_SIZE]


@dataclass(frozen=True, slots=True)
class Opened:
    """An authenticated datagram; feed (sender, incarnation, sequence) to a ReplayWindow."""

    key_id: int  # 0: insecure mode, nothing was authenticated
    incarnation: int
    sequence: int
    payload: bytes
    version: int = VERSION
    recipient: bytes = b""  # version 2 only (``_sealed``): whom the sender meant it for


def seal(keyring: Keyring, incarnation: int, sequence: int, payload: bytes) -> bytes:
    """Frame ``payload`` and tag it with the primary key.

    Raises LocalProtocolError when the datagram would exceed MAX_DATAGRAM (size
    payloads to MAX_PAYLOAD) or a counter is outside u32: those are our bugs.
    """
    if len(payload) > MAX_PAYLOAD:
        raise LocalProtocolError(
            f"gossip payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})"
        )
    if not 0 <= incarnation <= _MAX_U32 or not 0 <= sequence <= _MAX_U32:
        raise LocalProtocolError(
            f"gossip incarnation {incarnation} / sequence {sequence} do not fit in u32"
        )
    key = keyring._primary_key()
    prefix = _PREFIX.pack(MAGIC, VERSION, keyring.primary_id, incarnation, sequence)
    tag = _ZERO_TAG if key is None else _tag(key, prefix + payload)
    return prefix + tag + payload


def open_datagram(keyring: Keyring, datagram: bytes) -> Opened:
    """Check framing and tag; return the header fields and payload.

    Raises only DroppedPacket subclasses (see the module docstring for the
    order of checks). It does not check for replay: the sender id is inside the
    payload, so the caller decodes it and consults a ReplayWindow.
    """
    if len(datagram) > MAX_DATAGRAM:
        raise OversizePacket(f"gossip datagram of {len(datagram)} bytes")
    if len(datagram) < HEADER_SIZE:
        raise MalformedPacket(f"gossip datagram of {len(datagram)} bytes is shorter than a header")
    magic, version, key_id, incarnation, sequence = _PREFIX.unpack_from(datagram)
    if magic != MAGIC:
        raise MalformedPacket("gossip datagram with bad magic")
    if version != VERSION:
        raise MalformedPacket(f"gossip datagram of unsupported version {version}")
    tag = datagram[_TAG_OFFSET:HEADER_SIZE]
    payload = datagram[HEADER_SIZE:]
    if keyring.is_insecure:
        if key_id != INSECURE_KEY_ID:
            raise UnknownKey(key_id)
        if tag != _ZERO_TAG:
            raise MalformedPacket("insecure gossip datagram with a nonzero tag")
    else:
        key = keyring._lookup(key_id)
        if key is None:
            raise UnknownKey(key_id)
        expected = _tag(key, datagram[:_TAG_OFFSET] + payload)
        if not hmac.compare_digest(tag, expected):
            raise BadMac(f"gossip datagram with a bad tag for key id {key_id}")
    return Opened(key_id, incarnation, sequence, payload)


DEFAULT_REPLAY_WINDOW = 64  # sequence numbers; as IPsec's and DTLS's default
DEFAULT_MAX_SENDERS = 4096  # a cluster of 1000 nodes with room for churn


class ReplayWindow:
    """Per-sender anti-replay state, in the style of IPsec/DTLS (RFC 6347 §4.1.2.6).

    For each sender id, keep the highest incarnation seen and, within it, the
    highest sequence number plus a bitmask of the ``window`` sequence numbers at
    and below it. A packet is accepted, and recorded, when its incarnation is
    higher than the one held (the window restarts there), or when it is the same
    incarnation and its sequence is either newer than any seen or inside the
    window and not yet seen. A lower incarnation, a duplicate, or a sequence
    older than the window is refused.

    Call it only after ``open_datagram`` accepted the tag: an attacker without
    the key cannot then forge entries, advance a sender's window, or evict one.

    Memory is bounded: at most ``max_senders`` are tracked, the least recently
    accepted evicted first; ``forget`` drops a sender (say, once it is declared
    dead). A forgotten or evicted sender, or any sender after our own restart,
    starts afresh, so a recorded packet of its current incarnation could be
    accepted once more; gossip state is versioned, so that replays stale news.
    """

    __slots__ = ("_max_senders", "_senders", "_window", "_window_mask")

    def __init__(
        self, *, window: int = DEFAULT_REPLAY_WINDOW, max_senders: int = DEFAULT_MAX_SENDERS
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ConfigError(f"replay window must be a positive integer, not {window!r}")
        if isinstance(max_senders, bool) or not isinstance(max_senders, int) or max_senders < 1:
            raise ConfigError(f"replay sender cap must be a positive integer, not {max_senders!r}")
        self._window = window
        self._window_mask = (1 << window) - 1
        self._max_senders = max_senders
        # sender → (incarnation, highest sequence, bitmask; bit i = highest - i seen)
        self._senders: OrderedDict[str, tuple[int, int, int]] = OrderedDict()

    def check_and_record(self, sender: str, incarnation: int, sequence: int) -> bool:
        """True: fresh, now recorded. False: a replay or too old; drop it."""
        state = self._senders.get(sender)
        if state is None or incarnation > state[0]:
            self._store(sender, (incarnation, sequence, 1))
            return True
        held_incarnation, highest, mask = state
        if incarnation < held_incarnation:
            return False
        if sequence > highest:
            # A jump past the window leaves only the new sequence: shifting by the whole
            # jump (up to 2**32) would build a 512 MiB integer first.
            jump = sequence - highest
            mask = ((mask << jump) | 1) & self._window_mask if jump < self._window else 1
            self._store(sender, (incarnation, sequence, mask))
            return True
        age = highest - sequence
        if age >= self._window or mask >> age & 1:
            return False
        self._store(sender, (incarnation, highest, mask | 1 << age))
        return True

    def forget(self, sender: str) -> None:
        self._senders.pop(sender, None)

    def __len__(self) -> int:
        return len(self._senders)

    def __contains__(self, sender: object) -> bool:
        return sender in self._senders

    def _store(self, sender: str, state: tuple[int, int, int]) -> None:
        self._senders[sender] = state
        self._senders.move_to_end(sender)
        if len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
