"""Hedged requests: ask the next holder when the current one is slow to answer.

The hedge delay follows recent time-to-first-byte: a peer slower than the
recent 90th percentile (times two, within bounds) gets company.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

C = TypeVar("C")
R = TypeVar("R")

MIN_HEDGE_DELAY = 0.02  # seconds; below this a hedge mostly doubles load for nothing
MAX_HEDGE_DELAY = 1.0  # seconds; above this a stalled peer costs too much
DEFAULT_HEDGE_DELAY = 0.2  # seconds, until there is history to judge by
HISTORY = 200  # recent samples that set the percentile


class LatencyTracker:
    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=HISTORY)

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)

    def hedge_delay(self) -> float:
        if len(self._samples) < 10:
            return DEFAULT_HEDGE_DELAY
        ordered = sorted(self._samples)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        return min(MAX_HEDGE_DELAY, max(MIN_HEDGE_DELAY, 2 * p90))


async def first_success(
    candidates: Sequence[C],
    attempt: Callable[[C], Awaitable[R | None]],
    release: Callable[[R], Awaitable[None]],
    hedge_delay: float,
    on_hedge: Callable[[], None] = lambda: None,
    *,
    within: float = math.inf,
    on_timeout: Callable[[], None] = lambda: None,
) -> R | None:
    """Run ``attempt`` on candidates in order, starting the next one when the
    running ones fail or take longer than ``hedge_delay``. The first non-None
    result wins; the others are cancelled or released. None if all fail, or if
    none has won within ``within`` seconds (then ``on_timeout`` is called).
    """
    send, receive = trio.open_memory_channel[R | None](len(candidates) or 1)
    pending = list(candidates)
    running = 0
    winner: R | None = None

    async def run(candidate: C) -> None:
        send.send_nowait(await attempt(candidate))

    with trio.move_on_after(within) as bounded:
        async with trio.open_nursery() as nursery:
            while pending or running:
                if pending and running == 0:
                    nursery.start_soon(run, pending.pop(0))
                    running += 1
                with trio.move_on_after(hedge_delay if pending else math.inf) as waiting:
                    result = await receive.receive()
                    running -= 1
                    if result is not None:
                        winner = result
                        nursery.cancel_scope.cancel()
                        break
                if waiting.cancelled_caught and pending:
                    on_hedge()
                    nursery.start_soon(run, pending.pop(0))
                    running += 1
    if bounded.cancelled_caught and winner is None:
        on_timeout()
    while True:  # attempts that finished after the winner was chosen, or the deadline
        try:
            extra = receive.receive_nowait()
        except trio.WouldBlock:
            break
        if extra is not None:
            await release(extra)
    return winner
