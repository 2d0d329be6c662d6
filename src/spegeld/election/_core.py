"""The coordinator election's decision core: client-go's Lease algorithm, plus gossip. Sans-I/O.

The interface is the gossip core's (aioquic's shape). Inputs carry the local
monotonic time: ``set_view(view, now)``, ``receive(response, now)``,
``handle_timer(now)``; outputs are ``requests_to_send(now, wall)`` (at most one
request in flight), ``next_event()``, ``next_deadline()`` and ``is_leader(now)``.
``wall`` is the wall-clock time, used only for the Lease's
``acquireTime``/``renewTime``; no decision ever reads it.

The rules (client-go's leaderelection, with the differences marked):

* A record is valid until ``observed + leaseDurationSeconds``, where ``observed`` is
  the local monotonic time at which *we* saw this version (resourceVersion, or the
  whole record without one) for the first time. ``renewTime`` is never compared
  with our clock, so wall-clock skew between nodes does not matter.
* Refinement: that first observation is backdated by
  ``max(0, leaseDurationSeconds - renew_deadline - 1 s)``. Followers do not poll
  (below), so they first read a dead coordinator's Lease only once gossip says it
  is gone; without backdating a crash would cost detection + 15 s + 2 s.
* An empty ``holderIdentity`` (a released Lease) may be taken at once; a Lease naming
  us may always be renewed. Every write is conditional on the resourceVersion we
  read; a 409 is a lost race: re-read next round.
* A leader leads until ``renew_deadline`` after the *send time* of its last
  successful write, whatever happens to later renewals; ``is_leader(now)`` says so
  even before the step-down timer runs. It renews every retry period.
* Followers learn the coordinator from gossip: while gossip shows a live
  coordinator (ALIVE) a follower sends nothing at all. When gossip says it is
  GONE, the follower reads every retry period (and at the record's expiry) and
  acquires when the record has expired. With no gossip view (NONE) a read that
  shows a live holder yields a :class:`HolderSeen` event (its gossip address is our
  seed) and the next read waits a whole lease duration.
* Failures: the leader retries every retry period until its deadline, then steps
  down; otherwise retries back off, doubling from the retry period to ``max_backoff``.

Safety: never two leaders at one instant. Order the Lease's successful writes
w1, w2, … as the API server applied them; each is conditional on its predecessor's
resourceVersion. Take a node B that becomes leader through write wk after reading
the version v = w(k-1), and any other node A whose last successful write is wj,
j < k (A cannot succeed after wk without reading B's version and finding it
expired, which is the same argument with the roles swapped). A sent wj at
s_A ≤ apply(wj) ≤ apply(w(k-1)) ≤ r, where r is when B first received a read
showing v: one cannot read a version before it is written. A leads until at most
s_A + renew_deadline. B took the Lease in one of three ways:

1. v had expired: B sent wk at s_B ≥ observed + D. Without backdating observed ≥ r,
   so s_B ≥ r + D > r + renew_deadline. With it, observed = r - (D - renew_deadline - 1),
   so s_B ≥ r + renew_deadline + 1 s. Either way s_B > s_A + renew_deadline, and B
   leads only after its response arrives, later than s_B. The spare second covers
   clock rates: the two intervals are measured by different clocks, and drift of
   up to about 4 % between them keeps the order.
2. v was released: the releasing node stopped leading when it sent the release,
   before apply(v) ≤ r ≤ s_B, and it never leads again (release is final).
3. v names B itself: no one else wrote in between, so only B's own earlier term is
   involved.

Times are taken conservatively: ``now`` at ``requests_to_send`` is no later than the
real send, and ``now`` at ``handle_response`` is no earlier than the server's apply.
Reads may even be stale (served from a cache): the argument only needs r ≥ apply(v).
Every node must use the same renew deadline, and nobody may delete the Lease by
hand while a coordinator holds it.
"""

from __future__ import annotations

import enum
import math
from dataclasses import replace
from datetime import datetime

from spegeld.routing import CoordinatorView as View

from ._model import (
    CreateLease,
    ElectionConfig,
    Event,
    HolderSeen,
    LeadershipChanged,
    LeaseConflicted,
    LeaseRead,
    LeaseRecord,
    LeaseWritten,
    ReadLease,
    Request,
    RequestFailed,
    Response,
    UpdateLease,
)

# The margin of the first-view backdating, in seconds; see the module docstring.
BACKDATE_MARGIN = 1.0


class Role(enum.Enum):
    LEADER = "leader"
    FOLLOWER = "follower"  # a coordinator is known (gossip or the Lease): quiet
    CONTENDING = "contending"  # reading the Lease, ready to take it
    UNREACHABLE = "unreachable"  # the API failed; backing off
    DISABLED = "disabled"  # released: this process will not lead again


class ElectionCore:
    def __init__(self, config: ElectionConfig, now: float) -> None:
        self.config = config
        self._timings = config.timings
        self._view = View.NONE
        self._record: LeaseRecord | None = None
        self._known = False  # whether _record holds a read (None then means: no Lease)
        self._key: object = None
        self._observed_at = now
        self._need_read = True  # act only on what we read, not on what we guess
        self._leading = False
        self._leader_until = -math.inf
        self._inflight: Request | None = None
        self._inflight_sent = now
        self._next_id = 1
        self._next_attempt = now
        self._failures = 0
        self._stopped = False
        self._events: list[Event] = []
        self._told: tuple[str, str] | None = None  # the holder a HolderSeen last reported
        self.transitions = 0  # how often our own leadership changed
        self.api_requests = 0

    # ---- inputs ------------------------------------------------------------------------

    def set_view(self, view: View, now: float) -> None:
        """What gossip says now. Leaving ALIVE (or NONE for GONE) means: look at the Lease."""
        if view is self._view:
            return
        self._view = view
        if view is not View.ALIVE:
            self._need_read = True
            if self._failures == 0:
                self._next_attempt = min(self._next_attempt, now)

    def handle_timer(self, now: float) -> None:
        if self._leading and now >= self._leader_until:
            self._set_leading(False)
            self._need_read = True
        if (
            self._inflight is not None
            and now >= self._inflight_sent + self._timings.request_timeout
        ):
            request, self._inflight = self._inflight, None
            self._failed(request, now)

    def receive(self, response: Response, now: float) -> None:
        request = self._inflight
        if request is None or response.request_id != request.request_id or self._stopped:
            return  # a late answer to an abandoned request (or after release): ignore it
        self._inflight = None
        sent = self._inflight_sent
        if isinstance(response, RequestFailed):
            self._failed(request, now)
            return
        self._failures = 0
        if isinstance(response, LeaseRead):
            self._observe(response.record, now)
            self._after_read(now)
        elif isinstance(response, LeaseWritten):
            self._written(response.record, sent, now)
        else:
            assert isinstance(response, LeaseConflicted)
            self._need_read = True
            self._next_attempt = now + self._timings.retry_period

    def release(self, now: float, wall: datetime) -> UpdateLease | None:
        """Stop for good; return the update that hands the Lease back, if we hold it.

        client-go's release: empty holder, a one-second duration, a fresh renewTime.
        """
        if self._stopped:
            return None
        self._stopped = True
        self._inflight = None
        if self._leading:
            self._set_leading(False)
        self._leader_until = -math.inf
        record = self._record
        if record is None or record.holder != self.config.identity:
            return None
        if record.resource_version is None:
            return None
        released = replace(
            record,
            holder="",
            duration=1,
            acquire_time=wall,
            renew_time=wall,
            gossip_addr="",
            mirror_addr="",
        )
        self.api_requests += 1
        return UpdateLease(self._take_id(), released)

    # ---- outputs -----------------------------------------------------------------------

    def requests_to_send(self, now: float, wall: datetime) -> list[Request]:
        if self._stopped or self._inflight is not None or self._idle():
            return []
        if now < self._next_attempt:
            return []
        request = self._decide(now, wall)
        self._inflight = request
        self._inflight_sent = now
        self.api_requests += 1
        return [request]

    def next_deadline(self) -> float:
        timer = self._leader_until if self._leading else math.inf
        if self._inflight is not None:
            timer = min(timer, self._inflight_sent + self._timings.request_timeout)
        elif not self._stopped and not self._idle():
            timer = min(timer, self._next_attempt)
        return timer

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self._events.pop(0) if self._events else None

    def is_leader(self, now: float) -> bool:
        return self._leading and now < self._leader_until

    # ---- state for statistics ----------------------------------------------------------

    def role(self, now: float) -> Role:
        if self._stopped:
            return Role.DISABLED
        if self.is_leader(now):
            return Role.LEADER
        if self._failures:
            return Role.UNREACHABLE
        if self._view is View.ALIVE or (self._told is not None and self._view is View.NONE):
            return Role.FOLLOWER
        return Role.CONTENDING

    @property
    def record(self) -> LeaseRecord | None:
        """The Lease as last read or written, or None if we have not seen one."""
        return self._record

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def next_attempt_in(self, now: float) -> float | None:
        """Seconds to our next API request; None while gossip keeps us quiet."""
        if self._stopped or self._idle():
            return None
        if self._inflight is not None:
            return 0.0
        return max(0.0, self._next_attempt - now)

    # ---- the rules ---------------------------------------------------------------------

    def _idle(self) -> bool:
        return self._view is View.ALIVE and not self._leading

    def _decide(self, now: float, wall: datetime) -> Request:
        if self._need_read or not self._known:
            return ReadLease(self._take_id())
        record = self._record
        if record is None:
            return CreateLease(self._take_id(), self._claim(None, wall))
        if record.holder in ("", self.config.identity) or self._expired(now):
            return UpdateLease(self._take_id(), self._claim(record, wall))
        return ReadLease(self._take_id())

    def _claim(self, base: LeaseRecord | None, wall: datetime) -> LeaseRecord:
        """The record that makes (or keeps) us the holder of ``base``."""
        config = self.config
        ours = LeaseRecord(
            holder=config.identity,
            duration=self._timings.lease_duration,
            acquire_time=wall,
            renew_time=wall,
            gossip_addr=config.gossip_addr,
            mirror_addr=config.mirror_addr,
        )
        if base is None:
            return ours
        if base.holder == config.identity:
            return replace(
                ours,
                acquire_time=base.acquire_time or wall,
                transitions=base.transitions,
                resource_version=base.resource_version,
            )
        return replace(
            ours, transitions=base.transitions + 1, resource_version=base.resource_version
        )

    def _observe(self, record: LeaseRecord | None, now: float) -> None:
        key = None if record is None else record.spec_key()
        if not self._known or key != self._key:
            backdate = 0.0
            if record is not None:
                backdate = record.duration - self._timings.renew_deadline - BACKDATE_MARGIN
            self._observed_at = now - max(0.0, backdate)
            self._key = key
        self._record = record
        self._known = True
        self._need_read = False
        if self._leading and (record is None or record.holder != self.config.identity):
            self._set_leading(False)  # someone took it after our term: we are late to know

    def _expired(self, now: float) -> bool:
        record = self._record
        return record is not None and now >= self._expiry(record)

    def _expiry(self, record: LeaseRecord) -> float:
        return self._observed_at + record.duration

    def _after_read(self, now: float) -> None:
        record = self._record
        if record is None or record.holder in ("", self.config.identity) or self._expired(now):
            self._next_attempt = now  # take it (or keep it) right away
            return
        if self._view is View.NONE:
            told = (record.holder, record.gossip_addr)
            if told != self._told:
                self._told = told
                self._events.append(HolderSeen(record))
            self._need_read = True
            self._next_attempt = now + self._timings.lease_duration
            return
        self._next_attempt = min(now + self._timings.retry_period, self._expiry(record))

    def _written(self, record: LeaseRecord, sent: float, now: float) -> None:
        self._record = record
        self._known = True
        self._key = record.spec_key()
        self._observed_at = now
        self._need_read = False
        if record.holder != self.config.identity:
            return
        self._leader_until = sent + self._timings.renew_deadline
        if now < self._leader_until and not self._leading:
            self._set_leading(True)
        self._next_attempt = max(now, sent + self._timings.retry_period)

    def _failed(self, request: Request, now: float) -> None:
        self._failures += 1
        if not isinstance(request, UpdateLease):
            self._need_read = True  # an update may be retried as it was: it is conditional
        if self._leading:
            self._next_attempt = now + self._timings.retry_period
            return
        backoff = self._timings.retry_period * 2.0 ** min(self._failures - 1, 30)
        self._next_attempt = now + min(backoff, self._timings.max_backoff)

    def _set_leading(self, leading: bool) -> None:
        self._leading = leading
        self.transitions += 1
        self._events.append(LeadershipChanged(leading))

    def _take_id(self) -> int:
        request_id = self._next_id
        self._next_id += 1
        return request_id
