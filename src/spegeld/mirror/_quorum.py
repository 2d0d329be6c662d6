"""A tag from peers only when enough independent holders name the same digest.

A digest proves bytes, but nothing proves that a tag points at a digest: a peer that
holds the cluster key can advertise ``nginx:latest`` and answer it with any manifest
whose bytes hash to the digest it sends. One such node must not decide what the other
nodes run, so a tag is answered from peers only when ``quorum`` holders on distinct
hosts return the same digest; otherwise the mirror answers 404 and containerd asks the
upstream, which is authoritative for tags. Hosts, not node names, are counted: one
machine can claim several names, not several addresses on the node network.

docs/security.md ("Tags") gives the trade-off and its measured cost.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

from spegeld.routing import Peer

logger = logging.getLogger(__name__)

R = TypeVar("R")


def host_of(mirror: str) -> str:
    """``10.0.0.2:5001`` → ``10.0.0.2``; ``[fd00::2]:5001`` → ``fd00::2``."""
    host = mirror.rpartition(":")[0] if ":" in mirror else mirror
    return host.strip("[]")


async def agreed(
    holders: Sequence[Peer],
    ask: Callable[[Peer], Awaitable[tuple[R, bytes] | None]],
    quorum: int,
    *,
    within: float,
    disagreed: Callable[[], object] = lambda: None,
) -> tuple[R, bytes] | None:
    """Ask every holder at once; the first answer whose digest ``quorum`` hosts return.

    ``ask`` returns a verified (response, body), or None. Gives up after ``within``
    seconds, or once every holder has answered without a quorum; ``disagreed`` is
    called when holders named different digests and none reached the quorum.
    """
    if len({host_of(p.mirror) for p in holders}) < quorum:
        return None  # cannot be met: no request at all, the 404 comes at once
    hosts: dict[str, set[str]] = {}  # digest → the hosts that returned it
    answers: dict[str, tuple[R, bytes]] = {}
    won: list[tuple[R, bytes]] = []
    with trio.move_on_after(within):
        async with trio.open_nursery() as nursery:

            async def one(peer: Peer) -> None:
                got = await ask(peer)
                if got is None or won:
                    return
                digest = "sha256:" + hashlib.sha256(got[1]).hexdigest()
                voters = hosts.setdefault(digest, set())
                voters.add(host_of(peer.mirror))
                answers.setdefault(digest, got)
                if len(voters) >= quorum:
                    won.append(answers[digest])
                    nursery.cancel_scope.cancel()

            for peer in holders:
                nursery.start_soon(one, peer)
    if not won and len(hosts) > 1:
        disagreed()
        votes = "; ".join(f"{d} from {', '.join(sorted(h))}" for d, h in hosts.items())
        logger.warning("holders disagree on a tag, answered 404 (upstream decides): %s", votes)
    return won[0] if won else None
