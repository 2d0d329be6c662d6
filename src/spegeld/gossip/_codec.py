"""msgpack encoding of gossip payloads; the boundary where ``Any`` becomes typed.

A payload is a msgpack stream: first the sender's node id, then one array per
message, ``[type, fields...]``. Digest keys (``sha256:`` and 64 lowercase hex
digits) travel as 32 raw bytes, any other key as a string. Anything that does
not decode into the dataclasses of ``_messages`` raises RemoteProtocolError and
is dropped. docs/protocol.md describes every message.
"""

from __future__ import annotations

from typing import Any

import msgpack

from spegeld.errors import RemoteProtocolError

from ._messages import (
    Ack,
    Addr,
    Delta,
    Join,
    Member,
    Message,
    Ping,
    PingReq,
    State,
    StateChunk,
    StatePull,
    Summary,
)

MAX_ID = 253  # node ids are DNS-label-ish names
MAX_KEY = 512
MAX_INT = (1 << 63) - 1
MAX_INCARNATION = 0xFFFF_FFFF  # it is also the datagram header's u32 incarnation
MAX_MESSAGES = 256
_DIGEST_PREFIX = "sha256:"
_LOWER_HEX = frozenset("0123456789abcdef")

PING, ACK, PING_REQ, MEMBER, DELTA, SUMMARY, STATE_PULL, STATE_CHUNK, JOIN = range(9)


def _digest_bytes(key: str) -> bytes | None:
    # Only the canonical lowercase form: bytes decode back to lowercase, so any
    # other spelling must travel as a string to come back unchanged.
    if len(key) == 71 and key.startswith(_DIGEST_PREFIX) and _LOWER_HEX.issuperset(key[7:]):
        return bytes.fromhex(key[7:])
    return None


def _key_out(key: str) -> bytes | str:
    raw = _digest_bytes(key)
    return key if raw is None else raw


def key_size(key: str) -> int:
    """An upper bound on the bytes ``key`` takes in a message (exact for digests)."""
    return 34 if _digest_bytes(key) is not None else len(key.encode()) + 3


def valid_key(key: str) -> bool:
    """Whether ``key`` survives the wire: every receiver's decoder would accept it.

    The byte bound is stricter than the decoder's character bound, so that any
    one key fits in a delta and a state chunk whatever the node ids.
    """
    return 0 < len(key.encode()) <= MAX_KEY and key.isprintable()


def _key_in(raw: Any) -> str:
    if isinstance(raw, bytes) and len(raw) == 32:
        return _DIGEST_PREFIX + raw.hex()
    # Bytes, not characters, bound what a key costs to pass on (valid_key, for senders).
    if (
        isinstance(raw, str)
        and 0 < len(raw) <= MAX_KEY
        and raw.isprintable()
        and (raw.isascii() or len(raw.encode()) <= MAX_KEY)
    ):
        return raw
    raise RemoteProtocolError("bad key")


def _member_out(m: Member) -> list[Any]:
    return [
        m.node,
        m.incarnation,
        int(m.state),
        m.addr[0],
        m.addr[1],
        m.mirror,
        m.version,
        m.coordinator,
    ]


def _encode(msg: Message) -> list[Any]:
    match msg:
        case Ping(seq):
            return [PING, seq]
        case Ack(seq):
            return [ACK, seq]
        case PingReq(seq, target, (host, port)):
            return [PING_REQ, seq, target, host, port]
        case Member():
            return [MEMBER, *_member_out(msg)]
        case Delta(node, version, added, removed):
            return [
                DELTA,
                node,
                version,
                [_key_out(k) for k in added],
                [_key_out(k) for k in removed],
            ]
        case Summary(members, reply):
            return [SUMMARY, reply, [_member_out(m) for m in members]]
        case StatePull(node, have):
            return [STATE_PULL, node, have]
        case StateChunk(node, version, index, count, keys):
            return [STATE_CHUNK, node, version, index, count, [_key_out(k) for k in keys]]
        case Join(member):
            return [JOIN, _member_out(member)]
    raise AssertionError(f"unknown message {msg!r}")


def encode_message(msg: Message) -> bytes:
    packed: bytes = msgpack.packb(_encode(msg), use_bin_type=True)
    return packed


def encode_sender(node: str) -> bytes:
    packed: bytes = msgpack.packb(node, use_bin_type=True)
    return packed


def encode_record(member: Member) -> bytes:
    """One member record as it sits inside a Summary: ``encode_summary`` joins these."""
    packed: bytes = msgpack.packb(_member_out(member), use_bin_type=True)
    return packed


SUMMARY_OVERHEAD = 6  # a Summary's bytes besides its records: array, type, flag, list header


def encode_summary(records: list[bytes], reply: bool) -> bytes:
    """A Summary from already encoded records, so a sender sizes each record once."""
    count = len(records)
    if count < 16:
        head = bytes((0x90 | count,))
    elif count < 1 << 16:
        head = b"\xdc" + count.to_bytes(2, "big")
    else:
        raise ValueError("too many records for one summary")
    return b"\x93" + bytes((SUMMARY,)) + (b"\xc3" if reply else b"\xc2") + head + b"".join(records)


def decode_payload(payload: bytes) -> tuple[str, list[Message]]:
    unpacker = msgpack.Unpacker(
        raw=False, use_list=True, max_buffer_size=len(payload) + 1, strict_map_key=True
    )
    try:
        unpacker.feed(payload)
        items = list(unpacker)
    except Exception as exc:  # msgpack raises many types for hostile input
        raise RemoteProtocolError(f"undecodable payload: {type(exc).__name__}") from exc
    if not items or len(items) > MAX_MESSAGES + 1:
        raise RemoteProtocolError("payload has no sender or too many messages")
    sender = _id(items[0])
    return sender, [_decode(item) for item in items[1:]]


def _id(raw: Any) -> str:
    # ASCII, as Kubernetes node names and host names are: with it, a length in characters
    # is a length in bytes, and the largest member record (about 835 bytes) always fits
    # in a datagram. Printable Unicode could quadruple it.
    if isinstance(raw, str) and 0 < len(raw) <= MAX_ID and raw.isascii() and raw.isprintable():
        return raw
    raise RemoteProtocolError("bad node id")


def _int(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= MAX_INT:
        return raw
    raise RemoteProtocolError("bad integer")


def _addr(host: Any, port: Any) -> Addr:
    if not (
        isinstance(host, str) and 0 < len(host) <= 255 and host.isascii() and host.isprintable()
    ):
        raise RemoteProtocolError("bad host")
    port = _int(port)
    if not 0 < port < 65536:
        raise RemoteProtocolError("bad port")
    return host, port


def _list(raw: Any, limit: int = 4096) -> list[Any]:
    if isinstance(raw, list) and len(raw) <= limit:
        return raw
    raise RemoteProtocolError("bad list")


_STATES = tuple(State)


def _member_in(raw: Any) -> Member:
    # The hottest decoder (a Summary carries dozens of records), so the checks are
    # inlined. ``type(x) is int`` also refuses bool; msgpack yields exact types.
    if type(raw) is not list or len(raw) != 8:
        raise RemoteProtocolError("bad member")
    node, incarnation, state, host, port, mirror, version, coordinator = raw
    if not (
        type(node) is str
        and 0 < len(node) <= MAX_ID
        and type(incarnation) is int
        and 0 <= incarnation <= MAX_INCARNATION
        and type(state) is int
        and 0 <= state < len(_STATES)
        and type(host) is str
        and 0 < len(host) <= 255
        and type(port) is int
        and 0 < port < 65536
        and type(mirror) is str
        and len(mirror) <= 300
        and type(version) is int
        and 0 <= version <= MAX_INT
        and type(coordinator) is bool
        and node.isascii()
        and host.isascii()
        and mirror.isascii()
        and node.isprintable()
        and host.isprintable()
        and mirror.isprintable()
    ):
        raise RemoteProtocolError("bad member")
    return Member(node, incarnation, _STATES[state], (host, port), mirror, version, coordinator)


def _decode(raw: Any) -> Message:
    fields = _list(raw)
    if not fields:
        raise RemoteProtocolError("empty message")
    kind, rest = fields[0], fields[1:]
    try:
        match kind:
            case 0 if len(rest) == 1:
                return Ping(_int(rest[0]))
            case 1 if len(rest) == 1:
                return Ack(_int(rest[0]))
            case 2 if len(rest) == 4:
                return PingReq(_int(rest[0]), _id(rest[1]), _addr(rest[2], rest[3]))
            case 3:
                return _member_in(rest)
            case 4 if len(rest) == 4:
                return Delta(
                    _id(rest[0]),
                    _int(rest[1]),
                    tuple(map(_key_in, _list(rest[2]))),
                    tuple(map(_key_in, _list(rest[3]))),
                )
            case 5 if len(rest) == 2 and isinstance(rest[0], bool):
                return Summary(tuple(map(_member_in, _list(rest[1]))), rest[0])
            case 6 if len(rest) == 2:
                return StatePull(_id(rest[0]), _int(rest[1]))
            case 7 if len(rest) == 5:
                return StateChunk(
                    _id(rest[0]),
                    _int(rest[1]),
                    _int(rest[2]),
                    _int(rest[3]),
                    tuple(map(_key_in, _list(rest[4]))),
                )
            case 8 if len(rest) == 1:
                return Join(_member_in(rest[0]))
    except TypeError as exc:
        raise RemoteProtocolError("bad message fields") from exc
    raise RemoteProtocolError(f"unknown message type {str(kind)[:20]}")
