"""One authenticated ping and its ack, for ``spegeld doctor``: sans-I/O.

Any member answers a sealed Ping with an Ack, whoever sent it, so a ping that comes
back proves three things at once: the address is reachable over UDP, a spegeld
listens there, and it holds our cluster key (a packet sealed with another key is
dropped silently, by design).
"""

from __future__ import annotations

from spegeld.errors import RemoteProtocolError

from ._codec import decode_payload, encode_message, encode_sender
from ._messages import Ack, Ping
from ._security import DroppedPacket, Keyring, open_datagram, seal


def ping_datagram(keyring: Keyring, sender: str, incarnation: int, seq: int) -> bytes:
    """A sealed Ping from ``sender``; ``incarnation`` must be fresh for the replay window."""
    payload = encode_sender(sender) + encode_message(Ping(seq))
    return seal(keyring, incarnation, 1, payload)


def ack_sender(keyring: Keyring, datagram: bytes, seq: int) -> str | None:
    """The node that acked ``seq`` in ``datagram``; None for anything else."""
    try:
        sender, messages = decode_payload(open_datagram(keyring, datagram).payload)
    except (DroppedPacket, RemoteProtocolError):
        return None
    if any(isinstance(m, Ack) and m.seq == seq for m in messages):
        return sender
    return None
