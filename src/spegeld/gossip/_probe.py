"""One authenticated ping and its ack, for ``spegeld doctor``: sans-I/O.

Any member answers a sealed Ping with an Ack, whoever sent it, so a ping that comes
back proves three things at once: the address is reachable over UDP, a spegeld
listens there, and it holds our cluster key (a packet sealed with another key is
dropped silently, by design).
"""

from __future__ import annotations

import os

from spegeld.errors import RemoteProtocolError

from ._codec import decode_payload, encode_message, encode_sender
from ._messages import Ack, Ping
from ._sealed import ANYONE, NONCE_SIZE, Ciphers, open_any, seal_v2
from ._security import DroppedPacket, Keyring, seal


def ping_datagram(keyring: Keyring, sender: str, incarnation: int, seq: int) -> bytes:
    """A sealed Ping from ``sender``; ``incarnation`` must be fresh for the replay window.

    Version 2 (for ``ANYONE``: we do not know the name there) with a cluster key, which
    every node hears unless it predates version 2; version 1 in insecure mode.
    """
    payload = encode_sender(sender) + encode_message(Ping(seq))
    if keyring.is_insecure:
        return seal(keyring, incarnation, 1, payload)
    return seal_v2(Ciphers(keyring), incarnation, 1, ANYONE, payload, os.urandom(NONCE_SIZE))


def ack_sender(keyring: Keyring, datagram: bytes, seq: int) -> str | None:
    """The node that acked ``seq`` in ``datagram``; None for anything else."""
    try:
        sender, messages = decode_payload(open_any(Ciphers(keyring), datagram).payload)
    except (DroppedPacket, RemoteProtocolError):
        return None
    if any(isinstance(m, Ack) and m.seq == seq for m in messages):
        return sender
    return None
