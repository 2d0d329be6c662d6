"""The designation rule (``mirror/_designate``), sans-I/O: which node fetches a blob
from the upstream when several pull the same image at once, and the bounds of a wait."""

from __future__ import annotations

import hashlib
from collections import Counter

from spegeld.gossip._codec import valid_key
from spegeld.mirror._designate import (
    PULL_IDLE,
    SHOW_GRACE,
    WAIT_FOR_DESIGNATED,
    Pulls,
    Verdict,
    decide,
    designated,
    fetching_key,
    followable,
    pulling_key,
)
from spegeld.oci import Digest


def digest(n: int) -> Digest:
    return Digest("sha256:" + hashlib.sha256(str(n).encode()).hexdigest())


NODES = ["node-a", "node-b", "node-c", "node-d", "node-e"]


def test_pulling_keys_are_short_gossip_keys_distinct_from_digests_and_tags() -> None:
    for manifest in (digest(1), "example.com/app:v1", "r.io/" + "x" * 400 + ":" + "t" * 128):
        key = pulling_key(manifest)
        assert valid_key(key) and key.startswith("pulling:") and len(key) == 40
        assert key == pulling_key(manifest)
    assert pulling_key(digest(1)) != pulling_key(digest(2))


def test_fetching_keys_are_short_gossip_keys_one_per_digest() -> None:
    key = fetching_key(digest(1))
    assert valid_key(key) and key.startswith("fetching:") and len(key) == 41
    assert key == fetching_key(digest(1)) and key != fetching_key(digest(2))


def test_every_node_picks_the_same_designated_node_whatever_the_order() -> None:
    for n in range(50):
        picks = {designated(digest(n), order) for order in (NODES, NODES[::-1], sorted(NODES))}
        assert len(picks) == 1


def test_the_layers_spread_over_the_pulling_nodes() -> None:
    counts = Counter(designated(digest(n), NODES) for n in range(5000))
    assert set(counts) == set(NODES)
    assert all(800 <= c <= 1200 for c in counts.values()), counts  # 1000 each, +-20 %


def test_a_node_leaving_moves_only_its_own_blobs() -> None:
    before = {n: designated(digest(n), NODES) for n in range(500)}
    after = {n: designated(digest(n), NODES[1:]) for n in range(500)}
    moved = [n for n in before if before[n] != after[n]]
    assert moved and all(before[n] == "node-a" for n in moved)


def test_a_blob_outside_any_pull_goes_upstream_at_once() -> None:
    d = decide("node-a", digest(1), ["node-b"], pulling=False, missed_at=10.0, now=10.0)
    assert d.verdict is Verdict.UPSTREAM


def test_a_lone_puller_never_waits() -> None:
    """No settle: co-pullers' keys are pushed when their pulls begin, not a round later."""
    d = decide("node-a", digest(1), [], pulling=True, missed_at=10.0, now=10.0)
    assert d.verdict is Verdict.UPSTREAM
    d = decide("node-a", digest(1), ["node-a"], pulling=True, missed_at=10.0, now=10.0)
    assert d.verdict is Verdict.UPSTREAM  # itself among the co-pullers changes nothing


def test_the_designated_node_goes_upstream_and_the_others_wait_a_bounded_time() -> None:
    blob = digest(7)
    chosen = designated(blob, NODES[:3])
    for me in NODES[:3]:
        others = [n for n in NODES[:3] if n != me]
        d = decide(me, blob, others, pulling=True, missed_at=20.0, now=20.0)
        if me == chosen:
            assert d.verdict is Verdict.UPSTREAM
        else:
            assert d.verdict is Verdict.WAIT and d.designated == chosen
            assert d.until == 20.0 + WAIT_FOR_DESIGNATED
            late = decide(me, blob, others, pulling=True, missed_at=20.0, now=d.until)
            assert late.verdict is Verdict.UPSTREAM


def test_a_claimed_fetch_is_followed_even_by_the_node_the_rendezvous_picks() -> None:
    """A node that missed before it heard of this one fetched the blob and said so: the
    node the rendezvous picks follows that fetch instead of making a second."""
    blob = digest(9)
    chosen = designated(blob, NODES[:3])
    early = next(n for n in NODES[:3] if n != chosen)
    others = [n for n in NODES[:3] if n != chosen]
    d = decide(chosen, blob, others, [early], pulling=True, missed_at=20.0, now=20.0)
    assert d.verdict is Verdict.WAIT and d.designated == early
    assert d.until == 20.0 + WAIT_FOR_DESIGNATED
    late = decide(chosen, blob, others, [early], pulling=True, missed_at=20.0, now=d.until)
    assert late.verdict is Verdict.UPSTREAM
    # Even with no co-puller known: the claim alone says someone fetches it now.
    d = decide("node-e", blob, [], [early], pulling=True, missed_at=20.0, now=20.0)
    assert d.verdict is Verdict.WAIT and d.designated == early
    # Its own claim (a retry after a cut) does not hold it back: the rendezvous decides.
    its_others = [n for n in NODES[:3] if n != early]
    d = decide(early, blob, its_others, [early], pulling=True, missed_at=20.0, now=20.0)
    assert d.verdict is Verdict.WAIT and d.designated == chosen


def test_a_designated_node_that_shows_no_download_is_waited_for_only_the_grace() -> None:
    """A designated node fetching the blob shows it in flight at once (its ingest opens
    before it asks its mirror): one that does not is not fetching it (another platform's
    pull) and is not waited for long. A claim is waited for the whole bound."""
    blob = digest(7)
    chosen = designated(blob, NODES[:3])
    me = next(n for n in NODES[:3] if n != chosen)
    others = [n for n in NODES[:3] if n != me]
    end = 20.0 + SHOW_GRACE
    early = decide(me, blob, others, [], [], pulling=True, missed_at=20.0, now=20.5)
    assert early.verdict is Verdict.WAIT and early.designated == chosen
    late = decide(me, blob, others, [], [], pulling=True, missed_at=20.0, now=end)
    assert late.verdict is Verdict.UPSTREAM
    # Showing the blob in flight, or claiming it, it is waited for up to the whole bound.
    for fetchers, inflight in (([], [chosen]), ([chosen], [])):
        d = decide(me, blob, others, fetchers, inflight, pulling=True, missed_at=20.0, now=end)
        assert d.verdict is Verdict.WAIT and d.until == 20.0 + WAIT_FOR_DESIGNATED


def test_a_claimed_fetch_the_proxy_cannot_use_is_not_waited_for() -> None:
    blob = digest(9)
    d = decide(
        "node-a", blob, ["node-b", "node-c"], ["node-b"], pulling=True, missed_at=20.0,
        now=20.0, unusable=["node-b"],
    )  # fmt: skip
    assert d.verdict is Verdict.UPSTREAM


def test_no_miss_waits_longer_than_the_bound() -> None:
    for n in range(200):
        blob, missed = digest(n), 10.0 + (n % 7) / 10
        fetchers = [NODES[n % 5]] if n % 3 == 0 else []
        now = missed
        for _ in range(1000):
            d = decide("node-a", blob, NODES[1:], fetchers, pulling=True, missed_at=missed, now=now)
            if d.verdict is Verdict.UPSTREAM:
                break
            assert d.until > now
            now = d.until
        assert now - missed <= WAIT_FOR_DESIGNATED


def test_pulls_advertise_each_key_once_and_withdraw_after_idle() -> None:
    pulls = Pulls()
    first = pulls.manifest("r.io/app", "r.io/app:v1", 0.0)
    assert first == pulling_key("r.io/app:v1")
    assert pulls.manifest("r.io/app", "r.io/app:v1", 0.1) is None
    second = pulls.manifest("r.io/app", str(digest(1)), 0.2)
    assert pulls.keys("r.io/app", 0.3) == sorted([first, second])
    assert pulls.started("r.io/app", 0.3) == 0.0
    pulls.blob("r.io/app", PULL_IDLE)  # a layer request keeps the pull alive
    assert pulls.expire(PULL_IDLE + 1.0) == []
    assert pulls.expire(2 * PULL_IDLE + 1.0) == sorted([first, second])
    assert pulls.keys("r.io/app", 2 * PULL_IDLE + 1.0) == []
    assert pulls.started("r.io/app", 2 * PULL_IDLE + 1.0) is None


def test_a_key_shared_by_two_pulls_stays_while_one_lives() -> None:
    pulls = Pulls()
    shared = str(digest(3))  # the same manifest under two repository names
    pulls.manifest("r.io/a", shared, 0.0)
    pulls.manifest("r.io/b", shared, PULL_IDLE)
    assert pulls.expire(PULL_IDLE + 1.0) == []
    assert pulls.expire(2 * PULL_IDLE + 1.0) == [pulling_key(shared)]


def test_a_new_pull_after_an_idle_one_settles_again() -> None:
    pulls = Pulls()
    pulls.manifest("r.io/app", "r.io/app:v1", 0.0)
    pulls.manifest("r.io/app", "r.io/app:v2", PULL_IDLE + 5.0)
    assert pulls.started("r.io/app", PULL_IDLE + 5.0) == PULL_IDLE + 5.0
    assert pulls.expire(3 * PULL_IDLE) == sorted(
        [pulling_key("r.io/app:v1"), pulling_key("r.io/app:v2")]
    )  # the idle pull's key was not lost


def test_a_new_tag_is_a_new_pull_even_while_the_last_one_is_alive() -> None:
    """A rollout from v1 to v2 within ``PULL_IDLE``: the v2 pull's co-pullers are found
    by v2's keys only (nodes that just pulled v1 never fetch v2's layers), and its blob
    misses settle from v2's first request. v1's keys stay advertised until idle."""
    pulls = Pulls()
    v1 = pulls.manifest("r.io/app", "r.io/app:v1", 0.0)
    v1_index = pulls.manifest("r.io/app", str(digest(1)), 0.05)
    pulls.blob("r.io/app", 0.1)
    v2 = pulls.manifest("r.io/app", "r.io/app:v2", 5.0)
    v2_index = pulls.manifest("r.io/app", str(digest(2)), 5.05)
    assert pulls.keys("r.io/app", 5.1) == sorted([v2, v2_index])
    assert pulls.started("r.io/app", 5.1) == 5.0
    assert pulls.manifest("r.io/app", "r.io/app:v1", 5.2) is None  # v1's pull, still live
    assert pulls.keys("r.io/app", 5.3) == sorted([v2, v2_index])
    pulls.blob("r.io/app", 20.0)  # v2's layers: the newest pull's
    assert pulls.expire(5.2 + PULL_IDLE + 1.0) == sorted([v1, v1_index])
    assert pulls.keys("r.io/app", 5.2 + PULL_IDLE + 1.0) == sorted([v2, v2_index])
    assert pulls.expire(20.0 + PULL_IDLE + 1.0) == sorted([v2, v2_index])


def test_a_pull_by_digest_alone_is_a_pull() -> None:
    pulls = Pulls()
    key = pulls.manifest("r.io/app", str(digest(4)), 1.0)
    assert key == pulling_key(str(digest(4)))
    assert pulls.started("r.io/app", 1.1) == 1.0 and pulls.keys("r.io/app", 1.1) == [key]


def test_a_designated_node_the_proxy_cannot_use_is_not_waited_for() -> None:
    blob = digest(7)
    chosen = designated(blob, NODES[:3])
    me = next(n for n in NODES[:3] if n != chosen)
    others = [n for n in NODES[:3] if n != me]
    d = decide(me, blob, others, pulling=True, missed_at=20.0, now=20.0, unusable=[chosen])
    assert d.verdict is Verdict.UPSTREAM
    other = next(n for n in others if n != chosen)
    d = decide(me, blob, others, pulling=True, missed_at=20.0, now=20.0, unusable=[other])
    assert d.verdict is Verdict.WAIT


def test_only_claimed_downloads_or_an_outsiders_are_followed() -> None:
    pullers = NODES[:4]
    me, fetcher, waiting, late = pullers
    copullers = [fetcher, waiting, late]
    inflight = [fetcher, waiting, "node-e", me]  # node-e: downloading, not in this pull
    assert followable(me, copullers, [fetcher], inflight) == {fetcher, "node-e"}
    # A claim without a download yet: nothing of the co-pull to follow, only the outsider.
    assert followable(me, copullers, [late], inflight) == {"node-e"}
    # Alone: any in-flight holder (item 1).
    assert followable(me, [], [], inflight) == {fetcher, waiting, "node-e"}


def test_claims_are_made_once_and_withdrawn_with_their_pull() -> None:
    pulls = Pulls()
    assert pulls.claim("r.io/app", digest(1), 0.0) is None  # no pull: nothing to hold it
    pull = pulls.manifest("r.io/app", "r.io/app:v1", 0.0)
    claim = pulls.claim("r.io/app", digest(1), 0.1)
    assert claim == fetching_key(digest(1))
    assert pulls.claim("r.io/app", digest(1), 0.2) is None
    assert pulls.keys("r.io/app", 0.3) == [pull]  # claims do not find co-pullers
    assert pulls.expire(PULL_IDLE + 1.0) == sorted([pull, claim])


def test_a_claim_withdrawn_early_is_not_withdrawn_again_with_its_pull() -> None:
    pulls = Pulls()
    pull = pulls.manifest("r.io/app", "r.io/app:v1", 0.0)
    claim = pulls.claim("r.io/app", digest(1), 0.1)
    assert pulls.unclaim(digest(1)) == claim  # the download that backed it is gone
    assert pulls.unclaim(digest(1)) is None
    assert pulls.expire(PULL_IDLE + 1.0) == [pull]
