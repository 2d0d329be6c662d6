"""What a running node says about itself: the one typed model behind ``/status``.

The daemon builds a :class:`NodeStatus` once per question (``app``), serves its
:meth:`NodeStatus.to_json` at ``/status`` and folds it into systemd's ``STATUS=`` line;
``spegeld status`` and ``spegeld doctor`` read it back with :meth:`NodeStatus.decode`.

The JSON is a contract between daemon and CLI versions: reading tolerates fields an
older daemon did not send (they take their defaults) and fields a newer one adds (they
are ignored), while a field of the wrong type, or a body that is not JSON, is a
:class:`~spegeld.errors.RemoteProtocolError` that names the field. Writing keeps the
exact shape earlier versions served, so older ``spegeld status`` clients read it.

Plain data and the standard library only, so every layer that needs it may import it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from math import isfinite
from typing import Any

from spegeld.errors import RemoteProtocolError

__all__ = [
    "ElectionStatus",
    "GossipStatus",
    "HttpStatus",
    "NodeStatus",
    "PacketCounts",
    "PeerStatus",
    "RouterStatus",
    "SharingStatus",
    "StoreStatus",
]

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """The local index over containerd's content store (``store.StoreStatistics``)."""

    images: int = 0
    digests: int = 0
    loose_blobs: int = 0  # committed content no image references yet (containerd 2.1+)
    tags: int = 0
    full_syncs: int = 0
    events_applied: int = 0
    synced: bool = False
    direct_reads: bool = False  # containerd's blobs directory is readable right now
    read_mode: str = "none"  # how the last blob was served: "file", "grpc", or "none" yet
    file_reads: int = 0
    grpc_reads: int = 0
    warnings: tuple[str, ...] = ()

    def to_json(self) -> JsonObject:
        return _flat(self)

    @classmethod
    def from_json(cls, data: object, where: str = "store") -> StoreStatus:
        r = _Reader(data, where)
        return cls(
            images=r.integer("images"),
            digests=r.integer("digests"),
            loose_blobs=r.integer("loose_blobs"),
            tags=r.integer("tags"),
            full_syncs=r.integer("full_syncs"),
            events_applied=r.integer("events_applied"),
            synced=r.boolean("synced"),
            direct_reads=r.boolean("direct_reads"),
            read_mode=r.text("read_mode", "none"),
            file_reads=r.integer("file_reads"),
            grpc_reads=r.integer("grpc_reads"),
            warnings=r.texts("warnings"),
        )


@dataclass(frozen=True, slots=True)
class HttpStatus:
    """The mirror's HTTP server counters (``spegeld.mirror``'s ``ServerStatistics``)."""

    connections: int = 0
    in_flight: int = 0
    requests: int = 0
    aborted: int = 0
    bad_requests: int = 0
    errors: int = 0
    timeouts: int = 0
    refused: int = 0

    def to_json(self) -> JsonObject:
        return _flat(self)

    @classmethod
    def from_json(cls, data: object, where: str = "http") -> HttpStatus:
        r = _Reader(data, where)
        return cls(
            connections=r.integer("connections"),
            in_flight=r.integer("in_flight"),
            requests=r.integer("requests"),
            aborted=r.integer("aborted"),
            bad_requests=r.integer("bad_requests"),
            errors=r.integer("errors"),
            timeouts=r.integer("timeouts"),
            refused=r.integer("refused"),
        )


@dataclass(frozen=True, slots=True)
class RouterStatus:
    """Which router finds peers' content: ``gossip``, or ``static`` with its peers."""

    kind: str
    peers: tuple[str, ...] = ()  # the --static-peer addresses (static only)

    def to_json(self) -> JsonObject:
        if self.kind == "static":
            return {"kind": self.kind, "peers": list(self.peers)}
        return {"kind": self.kind}

    @classmethod
    def from_json(cls, data: object, where: str = "router") -> RouterStatus:
        r = _Reader(data, where)
        return cls(kind=r.text("kind", "?"), peers=r.texts("peers"))


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One member of the gossip table, as this node sees it."""

    node: str
    state: str  # alive, suspect, dead or left
    addr: str = ""  # the gossip address, host:port
    mirror: str = ""  # the peer's mirror, host:port (JSON: ``registry``)
    incarnation: int = 0
    rtt_ms: float | None = None
    keys: int = 0
    version: int = 0
    coordinator: bool = False

    def gossip_addr(self) -> tuple[str, int] | None:
        """``addr`` as (host, port), brackets of an IPv6 host removed; None if malformed."""
        host, _, port = self.addr.rpartition(":")
        if not host or not port.isdigit():
            return None
        return host.strip("[]"), int(port)

    def to_json(self) -> JsonObject:
        return {("registry" if k == "mirror" else k): v for k, v in _flat(self).items()}

    @classmethod
    def from_json(cls, data: object, where: str) -> PeerStatus:
        r = _Reader(data, where)
        return cls(
            node=r.text("node", "?"),
            state=r.text("state", "?"),
            addr=r.text("addr"),
            mirror=r.text("registry"),
            incarnation=r.integer("incarnation"),
            rtt_ms=r.number("rtt_ms"),
            keys=r.integer("keys"),
            version=r.integer("version"),
            coordinator=r.boolean("coordinator"),
        )


@dataclass(frozen=True, slots=True)
class PacketCounts:
    """Gossip datagrams: JSON keys ``in``/``out`` are the datagram counts."""

    packets_in: int = 0
    packets_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    send_errors: int = 0
    dropped: Mapping[str, int] = field(default_factory=dict)  # whole datagrams, by reason
    rejected: Mapping[str, int] = field(default_factory=dict)  # records ignored, by reason

    def to_json(self) -> JsonObject:
        return {
            "in": self.packets_in,
            "out": self.packets_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "send_errors": self.send_errors,
            "dropped": dict(self.dropped),
            "rejected": dict(self.rejected),
        }

    @classmethod
    def from_json(cls, data: object, where: str = "gossip.packets") -> PacketCounts:
        r = _Reader(data, where)
        return cls(
            packets_in=r.integer("in"),
            packets_out=r.integer("out"),
            bytes_in=r.integer("bytes_in"),
            bytes_out=r.integer("bytes_out"),
            send_errors=r.integer("send_errors"),
            dropped=r.counts("dropped"),
            rejected=r.counts("rejected"),
        )


@dataclass(frozen=True, slots=True)
class GossipStatus:
    """This node's gossip view: itself, the member table and the packet counters."""

    node: str
    incarnation: int = 0
    key_fingerprint: str | None = None  # the cluster key's, to compare with doctor's
    own_keys: int = 0
    known_keys: int = 0
    members: Mapping[str, int] = field(default_factory=dict)  # members by state
    peers: tuple[PeerStatus, ...] = ()
    coordinator: str | None = None  # the coordinator gossip names, if alive
    packets: PacketCounts = field(default_factory=PacketCounts)

    @property
    def alive(self) -> int:
        return self.members.get("alive", 0)

    def to_json(self) -> JsonObject:
        return {
            "node": self.node,
            "incarnation": self.incarnation,
            "key_fingerprint": self.key_fingerprint,
            "own_keys": self.own_keys,
            "known_keys": self.known_keys,
            "members": dict(self.members),
            "peers": [peer.to_json() for peer in self.peers],
            "coordinator": self.coordinator,
            "packets": self.packets.to_json(),
        }

    @classmethod
    def from_json(cls, data: object, where: str = "gossip") -> GossipStatus:
        r = _Reader(data, where)
        packets = r.nested("packets")
        return cls(
            node=r.text("node", "?"),
            incarnation=r.integer("incarnation"),
            key_fingerprint=r.text_or_none("key_fingerprint"),
            own_keys=r.integer("own_keys"),
            known_keys=r.integer("known_keys"),
            members=r.counts("members"),
            peers=tuple(
                PeerStatus.from_json(item, f"{where}.peers[{i}]")
                for i, item in enumerate(r.items("peers"))
            ),
            coordinator=r.text_or_none("coordinator"),
            packets=PacketCounts() if packets is None else PacketCounts.from_json(packets),
        )


@dataclass(frozen=True, slots=True)
class ElectionStatus:
    """The coordinator election, or why this node runs none.

    ``lease`` tells the two shapes apart: a node that runs no elector (``--no-election``,
    static peers, no credentials, or not started yet) has none and says ``reason``; an
    elector reports its counters and the Lease it contends for.
    """

    role: str  # leader, follower, contending, unreachable or disabled
    reason: str | None = None  # why there is no elector (no lease)
    preflight: str | None = None  # the start-up API diagnosis, one line
    lease: str | None = None  # namespace/name
    api: str | None = None  # the API server's URL
    holder: str | None = None  # the coordinator as we know it (Lease or gossip)
    last_error: str | None = None  # the diagnosis of the latest failure streak
    consecutive_failures: int = 0
    next_attempt_in: float | None = None  # seconds to our next API call; None while quiet
    transitions: int = 0  # how often this node's leadership changed
    api_requests: int = 0

    def to_json(self) -> JsonObject:
        if self.lease is None:
            return {"role": self.role, "reason": self.reason, "preflight": self.preflight}
        return {
            "role": self.role,
            "holder": self.holder,
            "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
            "next_attempt_in": self.next_attempt_in,
            "transitions": self.transitions,
            "api_requests": self.api_requests,
            "lease": self.lease,
            "api": self.api,
            "preflight": self.preflight,
        }

    @classmethod
    def from_json(cls, data: object, where: str = "election") -> ElectionStatus:
        r = _Reader(data, where)
        return cls(
            role=r.text("role", "?"),
            reason=r.text_or_none("reason"),
            preflight=r.text_or_none("preflight"),
            lease=r.text_or_none("lease"),
            api=r.text_or_none("api"),
            holder=r.text_or_none("holder"),
            last_error=r.text_or_none("last_error"),
            consecutive_failures=r.integer("consecutive_failures"),
            next_attempt_in=r.number("next_attempt_in"),
            transitions=r.integer("transitions"),
            api_requests=r.integer("api_requests"),
        )


@dataclass(frozen=True, slots=True)
class SharingStatus:  # --registry-filter, --registry-include, --tag-quorum
    registry_filters: tuple[str, ...] = ()
    registry_includes: tuple[str, ...] = ()
    tag_quorum: int = 1
    withheld_images: int = 0  # local images the filters keep out of the index

    def to_json(self) -> JsonObject:
        return _flat(self)

    @classmethod
    def from_json(cls, data: object, where: str = "sharing") -> SharingStatus:
        r = _Reader(data, where)
        filters, includes = r.texts("registry_filters"), r.texts("registry_includes")
        return cls(filters, includes, r.integer("tag_quorum"), r.integer("withheld_images"))


@dataclass(frozen=True, slots=True)
class NodeStatus:
    """Everything ``/status`` says; ``gossip`` is None under static peers."""

    node: str
    version: str = ""
    advertise_addr: str = ""
    mirror: tuple[str, ...] = ()  # the mirror's bound addresses, host:port (JSON: ``registry``)
    store: StoreStatus = field(default_factory=StoreStatus)
    http: HttpStatus = field(default_factory=HttpStatus)
    router: RouterStatus | None = None
    gossip: GossipStatus | None = None
    election: ElectionStatus | None = None  # None only from daemons older than the election
    sharing: SharingStatus | None = None  # None only from daemons older than the filters

    @property
    def coordinator(self) -> str | None:
        """The coordinator this node follows: gossip's word, the one source of it."""
        return None if self.gossip is None else self.gossip.coordinator

    def to_json(self) -> JsonObject:
        data: JsonObject = {
            "node": self.node,
            "version": self.version,
            "advertise_addr": self.advertise_addr,
            "registry": list(self.mirror),
            "store": self.store.to_json(),
            "http": self.http.to_json(),
            "coordinator": self.coordinator,
        }
        if self.router is not None:
            data["router"] = self.router.to_json()
        if self.gossip is not None:
            data["gossip"] = self.gossip.to_json()
        if self.election is not None:
            data["election"] = self.election.to_json()
        if self.sharing is not None:
            data["sharing"] = self.sharing.to_json()
        return data

    @classmethod
    def from_json(cls, data: object) -> NodeStatus:
        r = _Reader(data, "")
        store, http, router = r.nested("store"), r.nested("http"), r.nested("router")
        gossip, election, sharing = r.nested("gossip"), r.nested("election"), r.nested("sharing")
        return cls(
            node=r.text("node", "?"),
            version=r.text("version"),
            advertise_addr=r.text("advertise_addr"),
            mirror=r.texts("registry"),
            store=StoreStatus() if store is None else StoreStatus.from_json(store),
            http=HttpStatus() if http is None else HttpStatus.from_json(http),
            router=None if router is None else RouterStatus.from_json(router),
            gossip=None if gossip is None else GossipStatus.from_json(gossip),
            election=None if election is None else ElectionStatus.from_json(election),
            sharing=None if sharing is None else SharingStatus.from_json(sharing),
        )

    @classmethod
    def decode(cls, body: bytes | str) -> NodeStatus:
        """A ``/status`` body; anything that is not one is a RemoteProtocolError."""
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise RemoteProtocolError(f"the status is not JSON: {_short(exc)}") from exc
        return cls.from_json(data)


class _Reader:
    """Typed fields out of one decoded JSON object, naming the path of any bad one.

    A missing key (or ``null`` where a default exists) takes the default: older daemons
    sent fewer fields. A present value of the wrong type is an error.
    """

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, dict):
            raise RemoteProtocolError(
                f"{where or 'the status'}: expected a JSON object, got {_kind(data)}"
            )
        self._data: dict[object, object] = data
        self._where = where  # the path of this object from the top ("" at the top)

    def _bad(self, key: str, expected: str, value: object) -> RemoteProtocolError:
        path = f"{self._where}.{key}" if self._where else key
        return RemoteProtocolError(f"{path}: expected {expected}, got {_kind(value)}")

    def integer(self, key: str, default: int = 0) -> int:
        value = self._data.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer", value)
        return value

    def number(self, key: str) -> float | None:
        value = self._data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not isfinite(value):
            raise self._bad(key, "a finite number", value)  # json reads NaN; we never send it
        return value  # an int stays one: the JSON reads back as it was sent

    def boolean(self, key: str, default: bool = False) -> bool:
        value = self._data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def text(self, key: str, default: str = "") -> str:
        value = self.text_or_none(key)
        return default if value is None else value

    def text_or_none(self, key: str) -> str | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value

    def items(self, key: str) -> list[object]:
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list | tuple):
            raise self._bad(key, "a list", value)
        return list(value)

    def texts(self, key: str) -> tuple[str, ...]:
        items = self.items(key)
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self._bad(f"{key}[{i}]", "a string", item)
        return tuple(str(item) for item in items)

    def counts(self, key: str) -> dict[str, int]:
        """A JSON object of counters: name → integer."""
        value = self._data.get(key)
        if value is None:
            return {}
        inner = _Reader(value, f"{self._where}.{key}" if self._where else key)
        return {str(name): inner.integer(str(name)) for name in inner.names()}

    def names(self) -> list[str]:
        return [str(key) for key in self._data]

    def nested(self, key: str) -> object | None:
        """A nested object, left for its own reader; None when absent or null."""
        return self._data.get(key)


def _flat(obj: Any) -> JsonObject:
    """A dataclass of scalars (and tuples of them) as a JSON object, field by field."""
    return {
        f.name: list(value) if isinstance(value := getattr(obj, f.name), tuple) else value
        for f in fields(obj)
    }


def _kind(value: object) -> str:
    """A bad value, described briefly: its JSON type and the start of its text."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "an object", type(None): "null"}  # fmt: skip
    return f"{names.get(type(value), type(value).__name__)} {_short(value)}"


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."  # a daemon's junk, kept to one line
