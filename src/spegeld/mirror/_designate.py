"""Who fetches a blob from the upstream when several nodes pull the same image at once
(docs/protocol.md, "One upstream copy").

Sans-I/O: the mirror feeds in its manifest and blob requests, the node set it read from
the router, and the clock; this module answers which ``pulling:`` keys to advertise or
withdraw, and what to do on a blob miss that found no holder.

The rule. A node that serves containerd a manifest request (by tag or digest) is
*pulling* that repository: it advertises ``pulling:<hash of the manifest key>`` for each
manifest key of the pull. On a blob miss with no complete or in-flight holder, the
node's *co-pullers* are the nodes advertising any of the ``pulling:`` keys of its newest
pull of that repository (a new tag is a new pull: nodes that pulled ``app:v1`` a moment
ago are not co-pullers of ``app:v2``). The blob's *designated* node is the one with the
highest rendezvous score ``sha256(digest | node)`` over {this node} and its co-pullers:
the layers of one image spread over the pulling nodes, and every node that knows the
same set picks the same one. Designated, or no co-puller: answer 404 now (containerd
goes to the upstream). Otherwise wait, up to ``WAIT_FOR_DESIGNATED``, for a holder (in
flight or complete) to appear, then proxy from it; none by then: 404.

One wait comes before that: co-pullers are learnt through gossip, one round (0.2 s) or
two after their manifest requests, while containerd asks for the layers a few tens of
milliseconds after the manifest when the upstream is near. So a blob miss within
``SETTLE`` of this node's first manifest request of the pull waits until then (or until
a holder appears) before it decides. A lone node's pull pays that once (its layer
requests wait together) and only when its manifest phase was shorter than ``SETTLE``.

containerd opens a blob's ingest before it asks the mirror, so every co-puller shows as
an in-flight holder of every blob while it waits: only the designated node's download
is followed (``followable``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from spegeld.oci import Digest

PULLING_PREFIX = "pulling:"  # never a digest, tag or in-flight key
# Seconds after this node's first manifest request of a pull during which a blob miss
# waits for co-pullers to be heard of: two gossip rounds (gossip_interval 0.2 s; in a
# small cluster one round reaches every member, docs/protocol.md §9 has the measurement).
SETTLE = 0.4
# Seconds a non-designated node waits for the designated node's download to show up: the
# designated node's own settle (0.4 s), its containerd's request to the upstream (a token
# and a redirect: about 0.3 s across the internet), the ingest scan (0.1 s) and a gossip
# round or two (0.4 s): 1.2 s typical, and as much again as margin. Also the most a
# failed or slow designated node costs a blob over today's 404.
WAIT_FOR_DESIGNATED = 2.5
# Seconds a pull stays advertised after this node's last request of its repository: the
# time between two layer requests of one pull (containerd queues layers behind its
# download limit) is well under this; a finished pull's key then goes away.
PULL_IDLE = 30.0
# Co-pullers read per key: the rendezvous spreads layers over at most this many nodes.
MAX_COPULLERS = 64


def pulling_key(manifest_key: str) -> str:
    """The key that says this node is pulling ``manifest_key`` (a digest or a tag key)."""
    return PULLING_PREFIX + hashlib.sha256(manifest_key.encode()).hexdigest()[:32]


def score(digest: Digest, node: str) -> bytes:
    """The rendezvous score of ``node`` for ``digest``: the highest is designated."""
    return hashlib.sha256(f"{digest}|{node}".encode()).digest()


def designated(digest: Digest, nodes: Iterable[str]) -> str:
    return max(nodes, key=lambda node: score(digest, node))


class Verdict(Enum):
    UPSTREAM = "upstream"  # 404 now: this node's containerd fetches it
    WAIT = "wait"  # look for a holder again until ``Decision.until``, then ask again


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    until: float = 0.0  # for WAIT: the deadline (trio clock)
    designated: str = ""  # for WAIT after the settle: the node waited for


@dataclass(slots=True)
class _Pull:
    started: float
    last: float
    keys: set[str] = field(default_factory=set)


def _is_tag_key(manifest_key: str) -> bool:
    """A tag key is ``registry/repository:tag``; a digest (``sha256:…``) has no slash."""
    return "/" in manifest_key


class Pulls:
    """This node's pulls in progress, by repository (``registry/name``).

    A repository can have several pulls alive at once (``PULL_IDLE`` after their last
    request): a manifest request by a tag no live pull has asked for starts a new pull
    (containerd resolves a tag once per pull); one by digest joins the newest live pull
    (the tag's index and manifests follow its resolution), or starts one (a pull by
    digest). The newest pull is the one a blob miss belongs to: its keys find the
    co-pullers and its start times the settle. Older pulls' keys stay advertised until
    they go idle, so a node that starts the same pull later still finds this one.
    """

    def __init__(self) -> None:
        self._pulls: dict[str, list[_Pull]] = {}

    def manifest(self, repository: str, manifest_key: str, now: float) -> str | None:
        """A manifest request: the ``pulling:`` key to advertise, or None if already."""
        key = pulling_key(manifest_key)
        live = self._live(repository, now)
        if _is_tag_key(manifest_key):
            pull = next((p for p in live if key in p.keys), None)
        else:
            pull = live[-1] if live else None
        if pull is None:
            pull = _Pull(started=now, last=now)
            self._pulls.setdefault(repository, []).append(pull)
        pull.last = now
        if key in pull.keys:
            return None
        advertised = self._advertised()
        pull.keys.add(key)
        return None if key in advertised else key

    def blob(self, repository: str, now: float) -> None:
        """A blob request keeps the repository's newest pull alive."""
        live = self._live(repository, now)
        if live:
            live[-1].last = now

    def keys(self, repository: str, now: float) -> list[str]:
        """The newest live pull's keys (what its co-pullers advertise too)."""
        live = self._live(repository, now)
        return sorted(live[-1].keys) if live else []

    def started(self, repository: str, now: float) -> float | None:
        live = self._live(repository, now)
        return live[-1].started if live else None

    def expire(self, now: float) -> list[str]:
        """Forget idle pulls: the keys to withdraw (unless another pull still has them)."""
        dropped: set[str] = set()
        for repository in list(self._pulls):
            pulls = self._pulls[repository]
            gone = [p for p in pulls if now - p.last > PULL_IDLE]
            for pull in gone:
                pulls.remove(pull)
                dropped |= pull.keys
            if not pulls:
                del self._pulls[repository]
        return sorted(dropped - self._advertised())

    def _live(self, repository: str, now: float) -> list[_Pull]:
        """The repository's pulls not idle yet, oldest first."""
        return [p for p in self._pulls.get(repository, ()) if now - p.last <= PULL_IDLE]

    def _advertised(self) -> set[str]:
        return {key for pulls in self._pulls.values() for pull in pulls for key in pull.keys}


def followable(
    me: str, digest: Digest, copullers: Iterable[str], inflight: Iterable[str], *, settling: bool
) -> set[str]:
    """Which in-flight holders of ``digest`` a miss of this node's pull may stream from.

    containerd opens a blob's ingest (advertised in flight) before it asks the mirror,
    so a co-puller's in-flight key says only that it wants the blob too, maybe waiting
    itself: following it would wait on a download nobody started. Only the designated
    node's download is followed, and any node outside the co-pull (it started before).
    While settling, the designated node is not known yet: only outsiders.
    """
    others = set(copullers) - {me}
    holders = set(inflight) - {me}
    outside = holders - others
    if settling or not others:
        return outside
    chosen = designated(digest, others | {me})
    return outside | ({chosen} & holders)


def decide(
    me: str,
    digest: Digest,
    copullers: Iterable[str],
    *,
    started: float | None,
    missed_at: float,
    now: float,
    unusable: Iterable[str] = (),
) -> Decision:
    """What a blob miss with no holder does now.

    ``started``: this node's first manifest request of the pull this blob belongs to
    (None: not pulling it, e.g. a blob asked for without its manifest); ``missed_at``:
    when the miss began, the start of the wait for the designated node; ``unusable``:
    nodes whose download this node's proxy cannot use now (unreachable, or sent bad
    bytes): waiting for one of them would only run out the bound.
    """
    if started is None:
        return Decision(Verdict.UPSTREAM)
    settled = started + SETTLE
    if now < settled:
        return Decision(Verdict.WAIT, settled)
    others = set(copullers) - {me}
    if not others:
        return Decision(Verdict.UPSTREAM)
    chosen = designated(digest, others | {me})
    deadline = missed_at + WAIT_FOR_DESIGNATED
    if chosen == me or now >= deadline or chosen in set(unusable):
        return Decision(Verdict.UPSTREAM)
    return Decision(Verdict.WAIT, deadline, chosen)
