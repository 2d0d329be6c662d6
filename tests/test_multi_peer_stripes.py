"""The range scheduling core of the multi-peer proxy (``mirror/_stripes.py``), no I/O."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spegeld.mirror._stripes import Stripe, StripePlan

KiB = 1024


def plan(size: int = 100 * KiB, sources: str = "abc", window: int = 40 * KiB) -> StripePlan[str]:
    return StripePlan(size, list(sources), chunk=10 * KiB, window=window, min_split=2 * KiB)


def fill(p: StripePlan[str], stripe: Stripe[str]) -> None:
    p.received(stripe, stripe.remaining)


def test_stripes_go_out_in_order_and_never_past_the_window() -> None:
    p = plan()
    taken = [p.take(s) for s in "abc"]
    assert [(s.start, s.end, s.owner) for s in taken if s] == [
        (0, 10 * KiB, "a"), (10 * KiB, 20 * KiB, "b"), (20 * KiB, 30 * KiB, "c"),
    ]  # fmt: skip
    assert p.take("a") is None, "a source fetches one stripe at a time"
    fill(p, taken[1])  # type: ignore[arg-type]
    fourth = p.take("b")
    assert fourth is not None and (fourth.start, fourth.end) == (30 * KiB, 40 * KiB)
    fill(p, taken[2])  # type: ignore[arg-type]
    # 40 KiB window from byte 0: nothing new; c splits a's stripe (the earliest) instead.
    stolen = p.take("c")
    assert stolen is not None and (stolen.start, stolen.end) == (5 * KiB, 10 * KiB)
    assert taken[0] is not None and taken[0].end == 5 * KiB
    fill(p, taken[0])
    p.delivered(5 * KiB)
    assert p.take("a") is not None, "the window moved on"


def test_a_failed_source_hands_on_the_rest_of_its_stripe() -> None:
    p = plan()
    a, b = p.take("a"), p.take("b")
    assert a is not None and b is not None
    p.received(a, 3 * KiB)
    p.failed("a")
    assert p.sources == ["b", "c"]
    assert p.take("a") is None, "a failed source gets no more work"
    rest = p.take("c")
    assert rest is a and rest.next_byte == 3 * KiB and rest.owner == "c"
    assert not p.failed_all


def test_every_source_failed_with_bytes_missing_is_final() -> None:
    p = plan(sources="ab")
    p.take("a")
    p.failed("a")
    p.failed("b")
    assert p.failed_all and not p.complete


def test_a_slow_source_keeps_losing_halves_to_idle_ones() -> None:
    p = plan(size=10 * KiB, sources="ab")
    slow = p.take("a")
    assert slow is not None
    pieces = []
    while (piece := p.take("b")) is not None:
        pieces.append((piece.start, piece.end))
        fill(p, piece)
    assert pieces == [(5 * KiB, 10 * KiB), (2560, 5 * KiB)], "halves until under 2 x min_split"
    assert slow.end == 2560
    fill(p, slow)
    assert p.complete


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        StripePlan(0, ["a"], chunk=1, window=1, min_split=1)
    with pytest.raises(ValueError):
        StripePlan(10, ["a"], chunk=4, window=2, min_split=1)
    p = plan()
    stripe = p.take("a")
    assert stripe is not None
    with pytest.raises(ValueError):
        p.received(stripe, stripe.remaining + 1)


@settings(max_examples=300, deadline=None)
@given(
    size=st.integers(1, 300 * KiB),
    sources=st.integers(1, 5),
    seed=st.integers(0, 2**32),
    failures=st.integers(0, 4),
)
def test_random_schedules_deliver_every_byte_once_within_the_memory_bound(
    size: int, sources: int, seed: int, failures: int
) -> None:
    """Sources receive random amounts, some fail, the client consumes at random: the
    stripes always tile the blob, each byte arrives once, buffered bytes stay within
    window + chunk, and the blob completes while one source is left."""
    rng = random.Random(seed)
    names = [f"s{i}" for i in range(sources)]
    failures = min(failures, sources - 1)
    p = StripePlan(size, names, chunk=7 * KiB, window=21 * KiB, min_split=KiB)
    owned: dict[str, Stripe[str]] = {}
    received = 0
    delivered = 0
    for _ in range(100_000):
        if p.complete and delivered == size:
            break
        action = rng.random()
        live = p.sources
        if action < 0.02 and failures and len(live) > 1:
            victim = rng.choice(live)
            p.failed(victim)
            owned.pop(victim, None)
            failures -= 1
        elif action < 0.5:
            source = rng.choice(live)
            stripe = owned.get(source)
            if stripe is None or stripe.remaining == 0 or stripe.owner != source:
                taken = p.take(source)
                if taken is None:
                    continue
                owned[source] = stripe = taken
            count = rng.randint(0, stripe.remaining)
            p.received(stripe, count)
            received += count
        else:
            # The client takes what is contiguous from the delivery point.
            ready = delivered
            while (stripe := p.stripe_at(ready)) is not None:
                ready = stripe.next_byte
                if stripe.remaining:
                    break
            delivered = rng.randint(delivered, ready)
            p.delivered(delivered)
        stripes = sorted(p._stripes, key=lambda s: s.start)
        for before, after in itertools.pairwise(stripes):
            assert before.end == after.start, "stripes tile the blob"
        assert all(0 <= s.filled <= s.end - s.start for s in stripes)
        assert received - delivered <= 21 * KiB + 7 * KiB, "memory bound"
    assert p.complete and delivered == size
    assert received == size, "each byte received exactly once"
