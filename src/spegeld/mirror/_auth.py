"""Node-to-node authentication on the peer listener: one signed header per request. Sans-I/O.

The sender adds::

    X-Spegeld-Auth: v1 key=<id> node=<name> ts=<unix seconds> nonce=<32 hex> sig=<64 hex>

``sig`` is HMAC-SHA256, under the key ``key`` names, over the scheme, the method, the
request target (path and query), the key id, the node name, the timestamp and the nonce,
one per line (none of them can hold a newline: h11 refuses one in a method or target,
and the rest are checked here). The key is not the cluster secret itself but a key
derived from it for this use only (``AUTH_KEY_LABEL``), so a MAC made here can never
pass as a gossip datagram's, nor the other way round.

The receiver accepts a request when the header parses, the key id is in its keyring
(every key verifies, so a rotation rolls through the cluster), the signature matches,
the timestamp is within ``TOLERANCE`` of its own clock, and the nonce was not seen in
that window. Anything else is a :class:`Refused` with one of ``REASONS``, never an
exception: the header is whatever a client sent.

The caller owns the clock (``now``: Unix seconds) and the :class:`NonceMemory`.
"""

from __future__ import annotations

import heapq
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from spegeld.errors import ConfigError

HEADER: Final = b"x-spegeld-auth"
SCHEME: Final = "v1"
# What the cluster key is hashed with to give this use its own key (see the module doc).
AUTH_KEY_LABEL: Final = b"spegeld peer request key v1"
# Seconds a timestamp may be off this node's clock, either way. Nodes run NTP (kubelet
# certificates already need it); 30 s covers a clock that has drifted for days, and a
# captured request is only good within it (and once: the nonce is remembered).
TOLERANCE: Final = 30.0
# Nonces remembered at most: 65536 in a 60 s window is over 1000 signed requests a second
# into this one node, far past what a cluster's pulls send (a pull is tens of requests),
# for about 10 MB at most. When full, a new nonce is refused (see NonceMemory).
MAX_NONCES: Final = 65536
NONCE_BYTES: Final = 16  # 128 random bits: never repeated by chance
MAX_HEADER: Final = 512  # the longest honest header is about 420 bytes (a 253-character node)

Reason = Literal["missing", "malformed", "unknown_key", "bad_signature", "stale", "replay"]
REASONS: Final[tuple[Reason, ...]] = (
    "missing",
    "malformed",
    "unknown_key",
    "bad_signature",
    "stale",
    "replay",
)

# The gossip protocol's node name grammar (gossip/_validate.py): no space, no newline.
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
_HEADER = re.compile(
    r"v1 key=(?P<key>[0-9]{1,3}) node=(?P<node>[A-Za-z0-9][A-Za-z0-9._-]{0,252})"
    r" ts=(?P<ts>[0-9]{1,12}) nonce=(?P<nonce>[0-9a-f]{32}) sig=(?P<sig>[0-9a-f]{64})"
)


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """This node's name and the keys it signs (the first) and verifies (all) with.

    ``keys`` are (key id, derived secret) pairs; none means insecure mode: requests go
    unsigned and the peer listener checks nothing.
    """

    node: str
    keys: tuple[tuple[int, bytes], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if not _NODE.fullmatch(self.node):
            raise ConfigError(
                f"node name {self.node[:300]!r} is not 1..253 characters of A-Z a-z 0-9 . _ -"
            )
        for key_id, secret in self.keys:
            if not 1 <= key_id <= 255 or len(secret) < 16:
                raise ConfigError(f"peer key {key_id}: an id 1..255 and a 16+ byte secret")

    @property
    def secure(self) -> bool:
        return bool(self.keys)

    def secret(self, key_id: int) -> bytes | None:
        return next((secret for kid, secret in self.keys if kid == key_id), None)


@dataclass(frozen=True, slots=True)
class Verified:
    node: str
    key_id: int


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Reason
    detail: str


def _signed(method: bytes, target: bytes, key_id: int, node: str, ts: int, nonce: str) -> bytes:
    fields: Sequence[bytes] = (
        b"spegeld-peer-" + SCHEME.encode(),
        method,
        target,
        str(key_id).encode(),
        node.encode(),
        str(ts).encode(),
        nonce.encode(),
    )
    return b"\n".join(fields)


def sign(
    method: bytes, target: bytes, now: float, keys: PeerKeys, nonce: bytes | None = None
) -> bytes | None:
    """The header value for one request to a peer, or None in insecure mode."""
    if not keys.keys:
        return None
    key_id, secret = keys.keys[0]
    ts = int(now)
    nonce_hex = (nonce if nonce is not None else secrets.token_bytes(NONCE_BYTES)).hex()
    sig = hmac.digest(secret, _signed(method, target, key_id, keys.node, ts, nonce_hex), "sha256")
    return (
        f"{SCHEME} key={key_id} node={keys.node} ts={ts} nonce={nonce_hex} sig={sig.hex()}"
    ).encode()


class NonceMemory:
    """Nonces seen, each until its request could no longer pass the timestamp check.

    Bounded: when ``capacity`` live nonces are held, a new one is refused rather than an
    old one forgotten. Forgetting would let that request be replayed within its window;
    refusing only turns away signed requests (their senders try the next holder, then
    the upstream), and only a holder of the key can sign one. Fail closed.
    """

    def __init__(self, capacity: int = MAX_NONCES) -> None:
        self._capacity = capacity
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def remember(self, nonce: str, until: float, now: float) -> Literal["new", "seen", "full"]:
        self._expire(now)
        if nonce in self._expiry:
            return "seen"
        if len(self._expiry) >= self._capacity:
            return "full"
        self._expiry[nonce] = until
        heapq.heappush(self._heap, (until, nonce))
        return "new"

    def _expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] < now:
            _, nonce = heapq.heappop(self._heap)
            self._expiry.pop(nonce, None)


def verify(
    method: bytes,
    target: bytes,
    header: bytes | None,
    now: float,
    keys: PeerKeys,
    nonces: NonceMemory,
) -> Verified | Refused:
    """Whether a request on the peer listener comes from a node holding the cluster key."""
    if header is None:
        return Refused("missing", "no X-Spegeld-Auth header: node authentication required")
    if len(header) > MAX_HEADER:
        return Refused("malformed", "X-Spegeld-Auth header too long")
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        return Refused("malformed", "X-Spegeld-Auth header is not ASCII")
    match = _HEADER.fullmatch(text)
    if match is None:
        return Refused("malformed", "X-Spegeld-Auth header is not v1 key= node= ts= nonce= sig=")
    key_id, node, ts = int(match["key"]), match["node"], int(match["ts"])
    secret = keys.secret(key_id)
    if secret is None:
        return Refused("unknown_key", f"key id {key_id} is not in this node's keyring")
    want = hmac.digest(secret, _signed(method, target, key_id, node, ts, match["nonce"]), "sha256")
    if not hmac.compare_digest(want, bytes.fromhex(match["sig"])):
        return Refused("bad_signature", "the signature does not match")
    if abs(now - ts) > TOLERANCE:
        return Refused("stale", f"timestamp {ts} is {now - ts:+.0f} s off this node's clock")
    seen = nonces.remember(match["nonce"], ts + TOLERANCE, now)
    if seen == "seen":
        return Refused("replay", "this request was already served")
    if seen == "full":
        return Refused("replay", "too many recent requests to remember another")
    return Verified(node, key_id)
