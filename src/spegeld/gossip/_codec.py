"""msgpack encoding of gossip payloads; the boundary where ``Any`` becomes typed.

A payload is a msgpack stream: first the sender's node id, then one array per
message, ``[type, fields...]``. Digest keys travel as 32 raw bytes, tag keys as
strings. Anything that does not decode into the dataclasses of ``_messages``
raises RemoteProtocolError and is dropped.
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
MAX_MESSAGES = 256
_DIGEST_PREFIX = "sha256:"

PING, ACK, PING_REQ, MEMBER, DELTA, SUMMARY, STATE_PULL, STATE_CHUNK, JOIN = range(9)


def _key_out(key: str) -> bytes | str:
    if key.startswith(_DIGEST_PREFIX) and len(key) == 71:
        try:
            return bytes.fromhex(key[7:])
        except ValueError:
            return key
    return key


def _key_in(raw: Any) -> str:
    if isinstance(raw, bytes) and len(raw) == 32:
        return _DIGEST_PREFIX + raw.hex()
    if isinstance(raw, str) and 0 < len(raw) <= MAX_KEY and raw.isprintable():
        return raw
    raise RemoteProtocolError("bad key")


def _member_out(m: Member) -> list[Any]:
    return [
        m.node,
        m.incarnation,
        int(m.state),
        m.addr[0],
        m.addr[1],
        m.registry,
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
    if isinstance(raw, str) and 0 < len(raw) <= MAX_ID and raw.isprintable():
        return raw
    raise RemoteProtocolError("bad node id")


def _int(raw: Any) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= MAX_INT:
        return raw
    raise RemoteProtocolError("bad integer")


def _addr(host: Any, port: Any) -> Addr:
    if not (isinstance(host, str) and 0 < len(host) <= 255 and host.isprintable()):
        raise RemoteProtocolError("bad host")
    port = _int(port)
    if not 0 < port < 65536:
        raise RemoteProtocolError("bad port")
    return host, port


def _list(raw: Any, limit: int = 4096) -> list[Any]:
    if isinstance(raw, list) and len(raw) <= limit:
        return raw
    raise RemoteProtocolError("bad list")


def _member_in(raw: Any) -> Member:
    fields = _list(raw, 8)
    if len(fields) != 8:
        raise RemoteProtocolError("bad member")
    node, incarnation, state, host, port, registry, version, coordinator = fields
    if not isinstance(registry, str) or len(registry) > 300 or not registry.isprintable():
        raise RemoteProtocolError("bad registry address")
    try:
        member_state = State(_int(state))
    except ValueError as exc:
        raise RemoteProtocolError("bad state") from exc
    if not isinstance(coordinator, bool):
        raise RemoteProtocolError("bad coordinator flag")
    return Member(
        _id(node),
        _int(incarnation),
        member_state,
        _addr(host, port),
        registry,
        _int(version),
        coordinator,
    )


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
