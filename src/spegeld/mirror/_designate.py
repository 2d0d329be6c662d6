"""Who fetches a blob from the upstream when several nodes pull the same image at once
(docs/protocol.md, "One upstream copy").

Sans-I/O: the mirror feeds in its manifest and blob requests, the node sets it read from
the router, and the clock; this module answers which keys to advertise or withdraw, and
what to do on a blob miss that found no holder.

The rule. A node that serves containerd a manifest request (by tag or digest) is
*pulling* that repository: it advertises ``pulling:<hash of the manifest key>`` for each
manifest key of the pull, at once (not at the next gossip round). On a blob miss with no
complete holder:

1. If other nodes *fetch* the blob from the upstream now (they advertise
   ``fetching:<hash of the digest>``), follow one of their downloads.
2. Else the node's *co-pullers* are the nodes advertising any of the ``pulling:`` keys of
   its newest pull of that repository (a new tag is a new pull). The blob's *designated*
   node is the one with the highest rendezvous score ``sha256(digest | node)`` over {this
   node} and its co-pullers: the layers of one image spread over the pulling nodes, and
   every node that knows the same set picks the same one.
3. Designated, or no co-puller: answer 404 now and advertise ``fetching:`` at once
   (containerd goes to the upstream). Otherwise wait, up to ``WAIT_FOR_DESIGNATED``, for
   the designated node's claim and download, then 404.

No miss waits for co-pullers to be heard of: their ``pulling:`` keys are pushed when
their manifest requests arrive, a datagram away, while containerd asks for the layers
only after its own manifest round trips to the upstream. A node that starts later than
another's blob miss finds that node's ``fetching:`` claims instead (step 1): a node that
pulls alone never waits, and one that joins late follows.

containerd opens a blob's ingest before it asks the mirror, so every co-puller shows as
an in-flight holder of every blob while it waits: only the downloads of nodes that claim
the blob are followed, and those of nodes outside the co-pull (``followable``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from spegeld.oci import Digest

PULLING_PREFIX = "pulling:"  # never a digest, tag or in-flight key
FETCHING_PREFIX = "fetching:"  # nor this: a claim on a blob's upstream fetch
# Seconds a non-designated node waits for the designated node's download to show up: its
# containerd's request to the upstream (a token and a redirect: about 0.3 s across the
# internet), the ingest scan (0.1-0.25 s) and a gossip round for the in-flight key
# (0.2 s): under 1 s typical, and more than as much again as margin. Also the most a
# failed or slow designated node costs a blob over today's 404.
WAIT_FOR_DESIGNATED = 2.5
# Seconds from a miss within which a designated node that has not claimed the blob must
# show it in flight: containerd opens a blob's ingest before it asks its mirror, and the
# ingest scan (0.25 s when idle) pushes the in-flight key at once. A node that shows
# nothing by then is not fetching this blob (a pull of another platform, a layer queued
# behind the node's download limit): waiting out WAIT_FOR_DESIGNATED for it would cost
# every follower 2.5 s. A claim is waited for the whole bound: the claimer's containerd
# was sent to the upstream, though its download can show up later than that (2.3's
# transfer service was seen to take over 1 s with four layers at once).
SHOW_GRACE = 1.0
# Seconds after a claim by which this node's own download of the blob must show (in
# flight here), or the claim is withdrawn: the pull was cancelled, or it failed. More
# than WAIT_FOR_DESIGNATED, so no follower's wait is cut short by it; later misses of the
# blob (a retry, the next node's pull) then do not wait for a download that is gone.
CLAIM_BACKING = 3.0
# Seconds a pull stays advertised after this node's last request of its repository: the
# time between two layer requests of one pull (containerd queues layers behind its
# download limit) is well under this; a finished pull's keys then go away.
PULL_IDLE = 30.0
# Co-pullers read per key: the rendezvous spreads layers over at most this many nodes.
MAX_COPULLERS = 64


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pulling_key(manifest_key: str) -> str:
    """The key that says this node is pulling ``manifest_key`` (a digest or a tag key)."""
    return PULLING_PREFIX + _short_hash(manifest_key)


def fetching_key(digest: Digest) -> str:
    """The key that says this node's containerd fetches ``digest`` from the upstream now."""
    return FETCHING_PREFIX + _short_hash(digest)


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
    designated: str = ""  # for WAIT: the node waited for


@dataclass(slots=True)
class _Pull:
    started: float
    last: float
    keys: set[str] = field(default_factory=set)  # pulling: keys
    claims: set[str] = field(default_factory=set)  # fetching: keys


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
    co-pullers and it holds the miss's ``fetching:`` claim. Older pulls' keys stay
    advertised until they go idle, so a node that starts the same pull later still finds
    this one.
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

    def claim(self, repository: str, digest: Digest, now: float) -> str | None:
        """This node's containerd fetches ``digest`` for the repository's newest pull: the
        ``fetching:`` key to advertise, or None if already (or no pull is live)."""
        live = self._live(repository, now)
        if not live:
            return None
        key = fetching_key(digest)
        if key in live[-1].claims:
            return None
        advertised = self._advertised()
        live[-1].claims.add(key)
        return None if key in advertised else key

    def unclaim(self, digest: Digest) -> str | None:
        """This node no longer fetches ``digest``: the ``fetching:`` key to withdraw."""
        key = fetching_key(digest)
        held = [pull for pulls in self._pulls.values() for pull in pulls if key in pull.claims]
        for pull in held:
            pull.claims.discard(key)
        return key if held else None

    def keys(self, repository: str, now: float) -> list[str]:
        """The newest live pull's keys (what its co-pullers advertise too)."""
        live = self._live(repository, now)
        return sorted(live[-1].keys) if live else []

    def started(self, repository: str, now: float) -> float | None:
        """When the newest live pull began; None: this node is not pulling it."""
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
                dropped |= pull.keys | pull.claims
            if not pulls:
                del self._pulls[repository]
        return sorted(dropped - self._advertised())

    def _live(self, repository: str, now: float) -> list[_Pull]:
        """The repository's pulls not idle yet, oldest first."""
        return [p for p in self._pulls.get(repository, ()) if now - p.last <= PULL_IDLE]

    def _advertised(self) -> set[str]:
        return {
            key
            for pulls in self._pulls.values()
            for pull in pulls
            for key in (*pull.keys, *pull.claims)
        }


def followable(
    me: str, copullers: Iterable[str], fetchers: Iterable[str], inflight: Iterable[str]
) -> set[str]:
    """Which in-flight holders of a blob a miss of this node's pull may stream from.

    containerd opens a blob's ingest (advertised in flight) before it asks the mirror,
    so a co-puller's in-flight key says only that it wants the blob too, maybe waiting
    itself: following it would wait on a download nobody started. Followed are the
    downloads of nodes that claim the blob's upstream fetch (``fetchers``), and of any
    node outside the co-pull (it started before, or does not coordinate).
    """
    waiting = set(copullers) - set(fetchers)
    return set(inflight) - waiting - {me}


def decide(
    me: str,
    digest: Digest,
    copullers: Iterable[str],
    fetchers: Iterable[str] = (),
    inflight: Iterable[str] = (),
    *,
    pulling: bool,
    missed_at: float,
    now: float,
    unusable: Iterable[str] = (),
) -> Decision:
    """What a blob miss with no holder to follow does now.

    ``pulling``: this node serves a pull of the blob's repository (False: a blob asked for
    without its manifest, as §8 does: no wait); ``fetchers``: the nodes that claim the
    blob's upstream fetch; ``inflight``: the nodes that show it in flight (downloading,
    or waiting to); ``missed_at``: when the miss began, the start of the bounded wait;
    ``unusable``: nodes whose download this node's proxy cannot use now (unreachable, or
    sent bad bytes): waiting for one of them would only run out the bound.
    """
    if not pulling:
        return Decision(Verdict.UPSTREAM)
    deadline = missed_at + WAIT_FOR_DESIGNATED
    if now >= deadline:
        return Decision(Verdict.UPSTREAM)
    claimed = set(fetchers) - {me}
    if claimed:  # someone fetches it already: follow, never fetch it again
        usable = claimed - set(unusable)
        if not usable:
            return Decision(Verdict.UPSTREAM)
        return Decision(Verdict.WAIT, deadline, designated(digest, usable))
    others = set(copullers) - {me}
    if not others:
        return Decision(Verdict.UPSTREAM)
    chosen = designated(digest, others | {me})
    # Past the grace, a designated node that shows nothing in flight is not fetching it.
    absent = now >= missed_at + SHOW_GRACE and chosen not in set(inflight)
    if chosen == me or chosen in set(unusable) or absent:
        return Decision(Verdict.UPSTREAM)
    return Decision(Verdict.WAIT, deadline, chosen)
