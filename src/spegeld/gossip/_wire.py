"""Which datagram version to speak to whom, and which to hear: the v1 → v2 upgrade. Sans-I/O.

``V1Policy`` is the node's setting (``--gossip-v1``):

- ``accept`` (the default): hear version 1 and 2; speak version 2 to every member heard
  speaking it (authenticated, since its current incarnation), version 1 to the rest.
  Now and then a member not yet heard in version 2 gets a *hello*: our own member
  record in a version 2 datagram. A node that speaks version 2 takes it (and answers
  in version 2 from then on); a node from before counts it as ``malformed``.
- ``refuse``: once every node runs version 2. Speak only version 2; drop version 1
  unopened (``v1_refused``).
- ``only``: speak and hear only version 1, exactly as a node from before version 2 did.
  Not a daemon setting: the simulator and the upgrade tests use it to stand for an old
  node.

An insecure keyring (``--insecure-gossip``) has nothing to encrypt with: it speaks and
hears only version 1, whatever the policy.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, Literal

from spegeld.errors import RemoteProtocolError

from ._codec import decode_payload
from ._members import PeerRecord
from ._messages import Join, Message, Ping, State
from ._sealed import ANYONE, NONCE_SIZE, VERSION_2, Ciphers, Nonces, open_any, recipient_id, seal_v2
from ._security import DroppedPacket, Keyring, Opened, ReplayWindow, open_datagram, seal

V1Policy = Literal["accept", "refuse", "only"]
V1_POLICIES: Final[tuple[V1Policy, ...]] = ("accept", "refuse", "only")
# A member not heard in version 2 gets a hello at most this often: an old node counts
# each as one malformed datagram, so during an upgrade it sees (new nodes) / 60 a second.
HELLO_INTERVAL: Final = 60.0
# Hellos per sync interval: a joiner meets every member at once, and 1000 hellos in one
# burst would be a burst for nothing; 16 a second reach 1000 members in about a minute.
HELLO_BATCH: Final = 16
# Members remembered as speaking version 2: as many as the member table holds, and more.
MAX_SPEAKERS: Final = 16_384


class Wire:
    """Seals and opens datagrams by the policy, and learns who speaks version 2."""

    __slots__ = ("_hello_at", "_me", "_nonces", "_v2", "ciphers", "policy")

    def __init__(self, node: str, keyring: Keyring, policy: V1Policy, nonces: Nonces) -> None:
        self.ciphers = Ciphers(keyring)
        self.policy = policy
        self._nonces = nonces
        self._me = recipient_id(node)
        self._v2: OrderedDict[str, int] = OrderedDict()  # member → incarnation it spoke v2 at
        self._hello_at: dict[str, float] = {}

    @property
    def keyring(self) -> Keyring:
        return self.ciphers.keyring

    @keyring.setter
    def keyring(self, keyring: Keyring) -> None:
        self.ciphers = Ciphers(keyring)

    @property
    def _speaks_v2(self) -> bool:
        return self.policy != "only" and not self.keyring.is_insecure

    def speaks_v2(self, node: str) -> bool:
        """Whether ``node`` was heard in version 2 (so it is sent version 2)."""
        return node in self._v2

    # ---- sending ----------------------------------------------------------------------

    def seal(
        self, to: str | None, incarnation: int, sequence: int, payload: bytes, *, hello: bool
    ) -> bytes:
        """A datagram for member ``to`` (None: a seed, whose name we do not know yet)."""
        if self._speaks_v2 and (
            hello or self.policy == "refuse" or (to is not None and to in self._v2)
        ):
            recipient = ANYONE if to is None else recipient_id(to)
            return seal_v2(
                self.ciphers, incarnation, sequence, recipient, payload, self._nonces(NONCE_SIZE)
            )
        return seal(self.keyring, incarnation, sequence, payload)

    def hellos(self, members: Iterable[PeerRecord], now: float) -> list[PeerRecord]:
        """Alive members to tell, in version 2, that we speak it (``accept`` only)."""
        if self.policy != "accept" or not self._speaks_v2:
            return []
        due: list[PeerRecord] = []
        for peer in members:
            if len(due) >= HELLO_BATCH:
                break
            if peer.state is not State.ALIVE or peer.node in self._v2:
                continue
            if now - self._hello_at.get(peer.node, -HELLO_INTERVAL) >= HELLO_INTERVAL:
                self._hello_at[peer.node] = now
                due.append(peer)
        return due

    # ---- receiving --------------------------------------------------------------------

    def admit(
        self, datagram: bytes, own: str, replay: ReplayWindow
    ) -> tuple[str, list[Message]] | str:
        """The sender and messages of an authentic, fresh datagram; or why it is dropped.

        In order (docs/protocol.md §1): version refused, framing and authenticity
        (``_security``/``_sealed`` reasons), payload, recipient, our own, replay.
        """
        if self.refuses_version(datagram):
            return "v1_refused"
        try:
            opened = self.open(datagram)
            sender, messages = decode_payload(opened.payload)
        except DroppedPacket as exc:
            return exc.reason
        except RemoteProtocolError:
            return "malformed"
        if self.misaddressed(opened, messages):
            return "recipient"
        if sender == own:
            return "self"
        if not replay.check_and_record(sender, opened.incarnation, opened.sequence):
            return "replay"
        self.heard(sender, opened)
        return sender, messages

    def refuses_version(self, datagram: bytes) -> bool:
        """``refuse``: a version 1 datagram, dropped before any cryptography."""
        return self.policy == "refuse" and self._speaks_v2 and datagram[2:3] == b"\x01"

    def open(self, datagram: bytes) -> Opened:
        """Open a datagram; raises only DroppedPacket (``_security``)."""
        if not self._speaks_v2:
            return open_datagram(self.keyring, datagram)  # version 2 is malformed here
        return open_any(self.ciphers, datagram)

    def misaddressed(self, opened: Opened, messages: list[Message]) -> bool:
        """A version 2 datagram meant for another node (a replay elsewhere): drop it.

        ``ANYONE`` is allowed only for datagrams of Joins and Pings, which a sender may
        send to an address before it knows the name there (a seed; ``spegeld doctor``).
        """
        if opened.version != VERSION_2 or opened.recipient == self._me:
            return False
        if opened.recipient != ANYONE or not messages:
            return True
        return not all(isinstance(message, Join | Ping) for message in messages)

    def heard(self, sender: str, opened: Opened) -> None:
        """An authentic, fresh datagram from ``sender``: note the version it speaks."""
        if opened.version == VERSION_2:
            held = self._v2.get(sender, 0)
            self._v2[sender] = max(held, opened.incarnation)
            self._v2.move_to_end(sender)
            if len(self._v2) > MAX_SPEAKERS:
                self._v2.popitem(last=False)
        elif sender in self._v2 and opened.incarnation > self._v2[sender]:
            # Version 1 from a later life: the member was rolled back to an old version.
            del self._v2[sender]

    def forget(self, node: str) -> None:
        self._v2.pop(node, None)
        self._hello_at.pop(node, None)
