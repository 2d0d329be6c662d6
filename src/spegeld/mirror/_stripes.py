"""Which byte ranges of one blob go to which source: the sans-I/O core of ``_swarm``.

A blob is cut into stripes of at most ``chunk`` bytes, handed out in order to the
sources as they become idle, never further than ``window`` bytes past the point the
client has been sent (the memory bound). A source that fails is dropped for the rest
of the blob and what it had not delivered of its stripe goes back to be taken by the
next idle source, from the first byte not received. An idle source with nothing left to
take splits the remaining part of the earliest stripe that another source has held for
longer than it should (``slow_factor`` times the time per byte of the stripes completed
so far, and at least ``patience`` seconds) and takes its back half: a slow or stopped
source keeps losing work to the others, so the slowest source never sets the pace. A
source that is merely not done yet is left alone: each split costs the victim's
connection (the rest of its response is never read) and whatever the peer had already
queued on its uplink for it.

No clock, no I/O: the shell passes the time in, reports what arrived and what failed,
and asks for work.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

S = TypeVar("S", bound=Hashable)


@dataclass(slots=True, eq=False)
class Stripe(Generic[S]):
    start: int
    end: int  # exclusive; lowered when another source takes the back of the stripe
    filled: int = 0  # bytes received, from ``start``
    owner: S | None = None
    taken_at: float = 0.0  # when the owner took it
    taken_bytes: int = 0  # bytes left of it then

    @property
    def next_byte(self) -> int:
        return self.start + self.filled

    @property
    def remaining(self) -> int:
        return self.end - self.next_byte


class StripePlan(Generic[S]):
    """The stripes of a blob of ``size`` bytes fetched from ``sources``."""

    def __init__(
        self,
        size: int,
        sources: Sequence[S],
        *,
        chunk: int,
        window: int,
        min_split: int,
        patience: float,
        slow_factor: float,
    ) -> None:
        if size <= 0 or chunk <= 0 or window < chunk or min_split <= 0 or patience < 0:
            raise ValueError("size, chunk, min_split must be positive, window >= chunk")
        self.size = size
        self._chunk = chunk
        self._window = window
        self._min_split = min_split
        self._patience = patience
        self._slow_factor = slow_factor
        self._per_byte: float | None = None  # seconds per byte of completed stripes (EWMA)
        self._live: list[S] = list(dict.fromkeys(sources))
        self._stripes: list[Stripe[S]] = []  # ordered by start, covering [0, _cut)
        self._cut = 0  # the first byte not in any stripe yet
        self._delivered = 0  # bytes the client has been sent
        self._owned: dict[S, Stripe[S]] = {}
        self.splits = 0  # stripes split for an idle source (statistics)

    @property
    def sources(self) -> list[S]:
        """The sources not failed."""
        return list(self._live)

    @property
    def failed_all(self) -> bool:
        """No source is left and bytes are missing: the blob cannot be completed."""
        return not self._live and not self.complete

    @property
    def complete(self) -> bool:
        return self._cut == self.size and all(s.remaining == 0 for s in self._stripes)

    def take(self, source: S, now: float) -> Stripe[S] | None:
        """The stripe ``source`` should fetch next (bytes ``next_byte`` to ``end``), or
        None when it has nothing to do now (window full, or nothing left to split)."""
        if source not in self._live or source in self._owned:
            return None
        limit = self._delivered + self._window
        for stripe in self._stripes:
            if stripe.start >= limit:
                break
            if stripe.owner is None and stripe.remaining > 0:
                return self._give(stripe, source, now)
        if self._cut < self.size and self._cut < limit:
            end = min(self._cut + self._chunk, self.size)
            stripe = Stripe[S](self._cut, end)
            self._stripes.append(stripe)
            self._cut = end
            return self._give(stripe, source, now)
        return self._steal(source, now)

    def _give(self, stripe: Stripe[S], source: S, now: float) -> Stripe[S]:
        stripe.owner = source
        stripe.taken_at, stripe.taken_bytes = now, stripe.remaining
        self._owned[source] = stripe
        return stripe

    def _overdue(self, stripe: Stripe[S], now: float) -> bool:
        expected = (self._per_byte or 0.0) * stripe.taken_bytes * self._slow_factor
        return now - stripe.taken_at > max(self._patience, expected)

    def _steal(self, source: S, now: float) -> Stripe[S] | None:
        for index, victim in enumerate(self._stripes):
            if (
                victim.owner is not None
                and victim.remaining >= 2 * self._min_split
                and self._overdue(victim, now)
            ):
                middle = victim.next_byte + victim.remaining // 2
                back = Stripe[S](middle, victim.end)
                victim.end = middle
                self.splits += 1
                self._stripes.insert(index + 1, back)
                return self._give(back, source, now)
        return None

    def received(self, stripe: Stripe[S], count: int, now: float) -> None:
        """``count`` more bytes of ``stripe`` arrived; the stripe is released at its end."""
        if count < 0 or count > stripe.remaining:
            raise ValueError(f"{count} bytes do not fit the {stripe.remaining} left")
        stripe.filled += count
        if stripe.remaining == 0 and stripe.owner is not None:
            per_byte = (now - stripe.taken_at) / max(1, stripe.taken_bytes)
            old = self._per_byte
            self._per_byte = per_byte if old is None else 0.8 * old + 0.2 * per_byte
            del self._owned[stripe.owner]
            stripe.owner = None

    def failed(self, source: S) -> None:
        """``source`` broke off or misbehaved: it gets no more work, and the rest of its
        stripe is taken by the next idle source."""
        if source in self._live:
            self._live.remove(source)
        stripe = self._owned.pop(source, None)
        if stripe is not None:
            stripe.owner = None

    def delivered(self, upto: int) -> None:
        """The client has been sent every byte before ``upto``: the window moves on."""
        self._delivered = max(self._delivered, min(upto, self.size))
        while self._stripes and self._stripes[0].end <= self._delivered:
            if self._stripes[0].remaining:
                break  # cannot happen: bytes are delivered only once received
            self._stripes.pop(0)

    def stripe_at(self, offset: int) -> Stripe[S] | None:
        """The stripe holding byte ``offset``, if one was handed out yet."""
        for stripe in self._stripes:
            if stripe.start <= offset < stripe.end:
                return stripe
        return None
