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
    return StripePlan(
        size, list(sources), chunk=10 * KiB, window=window, min_split=2 * KiB, patience=1.0,
        slow_factor=3.0,
    )  # fmt: skip


def fill(p: StripePlan[str], stripe: Stripe[str], now: float = 0.0) -> None:
    p.received(stripe, stripe.remaining, now)


def test_stripes_go_out_in_order_and_never_past_the_window() -> None:
    p = plan()
    taken = [p.take(s, 0.0) for s in "abc"]
    assert [(s.start, s.end, s.owner) for s in taken if s] == [
        (0, 10 * KiB, "a"), (10 * KiB, 20 * KiB, "b"), (20 * KiB, 30 * KiB, "c"),
    ]  # fmt: skip
    assert p.take("a", 0.0) is None, "a source fetches one stripe at a time"
    fill(p, taken[1])  # type: ignore[arg-type]
    fourth = p.take("b", 0.0)
    assert fourth is not None and (fourth.start, fourth.end) == (30 * KiB, 40 * KiB)
    fill(p, taken[2])  # type: ignore[arg-type]
    # 40 KiB window from byte 0: nothing new, and a is not late yet: c waits.
    assert p.take("c", 0.5) is None
    # Past the patience, c splits a's stripe (the earliest) and takes its back half.
    stolen = p.take("c", 1.5)
    assert stolen is not None and (stolen.start, stolen.end) == (5 * KiB, 10 * KiB)
    assert taken[0] is not None and taken[0].end == 5 * KiB
    fill(p, taken[0])
    p.delivered(5 * KiB)
    assert p.take("a", 1.5) is not None, "the window moved on"


def test_a_failed_source_hands_on_the_rest_of_its_stripe() -> None:
    p = plan()
    a, b = p.take("a", 0.0), p.take("b", 0.0)
    assert a is not None and b is not None
    p.received(a, 3 * KiB, 0.0)
    p.failed("a")
    assert p.sources == ["b", "c"]
    assert p.take("a", 0.0) is None, "a failed source gets no more work"
    rest = p.take("c", 0.0)
    assert rest is a and rest.next_byte == 3 * KiB and rest.owner == "c"
    assert not p.failed_all


def test_every_source_failed_with_bytes_missing_is_final() -> None:
    p = plan(sources="ab")
    p.take("a", 0.0)
    p.failed("a")
    p.failed("b")
    assert p.failed_all and not p.complete


def test_a_slow_source_keeps_losing_halves_to_idle_ones() -> None:
    p = plan(size=10 * KiB, sources="ab")
    slow = p.take("a", 0.0)
    assert slow is not None
    pieces = []
    while (piece := p.take("b", 2.0)) is not None:
        pieces.append((piece.start, piece.end))
        fill(p, piece, 2.0)
    assert pieces == [(5 * KiB, 10 * KiB), (2560, 5 * KiB)], "halves until under 2 x min_split"
    assert slow.end == 2560
    fill(p, slow)
    assert p.complete


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        StripePlan(0, ["a"], chunk=1, window=1, min_split=1, patience=1, slow_factor=1)
    with pytest.raises(ValueError):
        StripePlan(10, ["a"], chunk=4, window=2, min_split=1, patience=1, slow_factor=1)
    p = plan()
    stripe = p.take("a", 0.0)
    assert stripe is not None
    with pytest.raises(ValueError):
        p.received(stripe, stripe.remaining + 1, 0.0)


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
    p = StripePlan(
        size, names, chunk=7 * KiB, window=21 * KiB, min_split=KiB, patience=0.5,
        slow_factor=2.0,
    )  # fmt: skip
    owned: dict[str, Stripe[str]] = {}
    received = 0
    delivered = 0
    now = 0.0
    for _ in range(100_000):
        now += rng.random() * 0.1
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
                taken = p.take(source, now)
                if taken is None:
                    continue
                owned[source] = stripe = taken
            count = rng.randint(0, stripe.remaining)
            p.received(stripe, count, now)
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


def test_a_source_slower_than_the_others_is_split_only_once_it_is_late() -> None:
    """Patience follows the stripes done so far: 3 times their time per byte."""
    p = StripePlan(
        40 * KiB, ["a", "b"], chunk=10 * KiB, window=20 * KiB, min_split=KiB, patience=0.1,
        slow_factor=3.0,
    )  # fmt: skip
    a, b = p.take("a", 0.0), p.take("b", 0.0)
    assert a is not None and b is not None
    fill(p, b, 1.0)  # 10 KiB in 1 s: the typical pace
    assert p.take("b", 2.5) is None, "a took 2.5 s of an expected 1 s, within 3 x"
    stolen = p.take("b", 3.5)
    assert stolen is not None and (stolen.start, stolen.end) == (5 * KiB, 10 * KiB)
