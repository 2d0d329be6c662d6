"""The trio shell around the election core: it makes the API calls and keeps the time.

It never raises because the API misbehaves: failures become responses for the
core, one diagnosed WARNING per failure streak, and DEBUG lines for the retries.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

import trio

from spegeld.errors import KubeStatusError, KubeUnreachable, LeaseConflict, SpegeldError
from spegeld.metrics import Gauge, MetricsRegistry
from spegeld.routing import CoordinatorView

from ._core import ElectionCore
from ._lease import LeaseStore
from ._model import (
    CreateLease,
    ElectionConfig,
    HolderSeen,
    LeadershipChanged,
    LeaseConflicted,
    LeaseRead,
    LeaseWritten,
    ReadLease,
    Request,
    RequestFailed,
    Response,
)

logger = logging.getLogger(__name__)

RELEASE_GRACE = 1.0  # seconds shutdown waits for the Lease release
DIAGNOSE_TIMEOUT = 5.0  # seconds a diagnosis may take before we log the bare error

Diagnose = Callable[[Exception], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class ElectionStatistics:
    role: str  # leader, follower, contending, unreachable or disabled
    holder: str | None  # the coordinator as we know it (Lease or gossip)
    last_error: str | None  # the diagnosis of the latest failure streak
    consecutive_failures: int
    next_attempt_in: float | None  # seconds to our next API call; None while quiet
    transitions: int  # how often this node's leadership changed
    api_requests: int


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _ignore(_: object) -> None:
    return None


def _failure_class(exc: Exception) -> str:
    if isinstance(exc, KubeStatusError):
        return f"{type(exc).__name__}:{exc.code}"
    return type(exc).__name__


def _describe(exc: Exception) -> str:
    if isinstance(exc, SpegeldError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Elector:
    """Contends for the coordinator Lease in ``store``; tells the app when it leads.

    ``set_coordinator_view(view, node)`` tells it what gossip knows, whenever that
    changes (gossip's CoordinatorChanged events); ``on_leadership(bool)`` runs
    on every change of our leadership; ``on_holder(gossip_addr)`` runs when, with
    no gossip view, the Lease names a live coordinator (our seed); ``diagnose(exc)``
    turns a failure into one line for the log.
    """

    def __init__(
        self,
        store: LeaseStore,
        config: ElectionConfig,
        *,
        on_leadership: Callable[[bool], object] = _ignore,
        on_holder: Callable[[str], object] = _ignore,
        diagnose: Diagnose | None = None,
        metrics: MetricsRegistry | None = None,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.config = config
        self._store = store
        self._view: tuple[CoordinatorView, str | None] = (CoordinatorView.NONE, None)
        self._wake: trio.MemorySendChannel[Response | None] | None = None
        self._on_leadership = on_leadership
        self._on_holder = on_holder
        self._diagnose = diagnose
        self._wall = wall_clock
        self._gauge: Gauge | None = None
        if metrics is not None:
            self._gauge = metrics.gauge(
                "spegeld_coordinator", "1 while this node holds the coordinator Lease."
            )
            self._gauge.set(0)
        self._core: ElectionCore | None = None
        self._streak: str | None = None  # the failure class of the current streak
        self._last_error: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        core = ElectionCore(self.config, trio.current_time())
        self._core = core
        core.set_view(self._view[0], trio.current_time())
        # Responses, and None: the gossip view changed (set_coordinator_view).
        send, receive = trio.open_memory_channel[Response | None](math.inf)
        self._wake = send
        with send, receive:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    now = trio.current_time()
                    if now >= core.next_deadline():
                        core.handle_timer(now)
                    for request in core.requests_to_send(now, self._wall()):
                        nursery.start_soon(self._perform, request, send)
                    self._dispatch(core)
                    with trio.move_on_at(core.next_deadline()):
                        response = await receive.receive()
                        if response is not None:
                            core.receive(response, trio.current_time())
        raise AssertionError("unreachable")  # pragma: no cover

    async def release(self) -> None:
        """Hand the Lease back if we hold it, so another node takes over at once."""
        core = self._core
        if core is None:
            return
        with trio.move_on_after(RELEASE_GRACE, shield=True) as scope:
            request = core.release(trio.current_time(), self._wall())
            self._dispatch(core)
            if request is None:
                return
            try:
                await self._store.update(request.record)
            except LeaseConflict:
                logger.info("election: the Lease changed before we released it; left as it is")
            except Exception as exc:  # shutdown goes on; the Lease simply expires
                logger.warning("election: could not release the Lease: %s", _describe(exc))
            else:
                logger.info("election: released the coordinator Lease")
        if scope.cancelled_caught:
            logger.warning(
                "election: releasing the Lease took over %g s; it will expire", RELEASE_GRACE
            )

    def statistics(self) -> ElectionStatistics:
        core = self._core
        if core is None:
            return ElectionStatistics("disabled", None, self._last_error, 0, None, 0, 0)
        now = trio.current_time()
        record = core.record
        holder = record.holder if record is not None and record.holder else None
        view, node = self._view
        if view is CoordinatorView.ALIVE and node is not None and not core.is_leader(now):
            holder = node  # gossip is newer than a Lease we stopped reading
        if core.is_leader(now):
            holder = self.config.identity
        return ElectionStatistics(
            role=core.role(now).value,
            holder=holder,
            last_error=self._last_error,
            consecutive_failures=core.consecutive_failures,
            next_attempt_in=core.next_attempt_in(now),
            transitions=core.transitions,
            api_requests=core.api_requests,
        )

    def is_leader(self) -> bool:
        core = self._core
        return core is not None and core.is_leader(trio.current_time())

    # ---- the moving parts -------------------------------------------------------------

    def set_coordinator_view(self, view: CoordinatorView, node: str | None) -> None:
        """What gossip says about the coordinator now (it may be this node)."""
        self._view = (view, node)
        core = self._core
        if core is not None:
            core.set_view(view, trio.current_time())
        wake = self._wake
        if wake is not None:
            try:
                wake.send_nowait(None)  # the loop decides again, now
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._wake = None  # run() has ended: nothing to wake

    def _dispatch(self, core: ElectionCore) -> None:
        while (event := core.next_event()) is not None:
            if isinstance(event, LeadershipChanged):
                if self._gauge is not None:
                    self._gauge.set(1 if event.leader else 0)
                if event.leader:
                    logger.info("election: this node is now the coordinator")
                else:
                    logger.info("election: this node is no longer the coordinator")
                self._on_leadership(event.leader)
            elif isinstance(event, HolderSeen) and event.record.gossip_addr:
                logger.info(
                    "election: the Lease names coordinator %s at %s; using it as a gossip seed",
                    event.record.holder,
                    event.record.gossip_addr,
                )
                self._on_holder(event.record.gossip_addr)

    async def _perform(
        self, request: Request, send: trio.MemorySendChannel[Response | None]
    ) -> None:
        timeout = self.config.timings.request_timeout
        failure: Exception | None = None
        response: Response | None = None
        with trio.move_on_after(timeout):
            try:
                response = await self._call(request)
            except LeaseConflict:
                response = LeaseConflicted(request.request_id)
            except Exception as exc:  # any failure is a response for the core, never a crash
                failure = exc
        if response is None and failure is None:
            failure = KubeUnreachable(f"the Kubernetes API did not answer within {timeout:g} s")
        if failure is not None:
            response = RequestFailed(request.request_id, _describe(failure))
        assert response is not None
        send.send_nowait(response)
        if failure is None:
            self._recovered()
        else:
            await self._failed(failure)

    async def _call(self, request: Request) -> Response:
        if isinstance(request, ReadLease):
            return LeaseRead(request.request_id, await self._store.get())
        if isinstance(request, CreateLease):
            return LeaseWritten(request.request_id, await self._store.create(request.record))
        return LeaseWritten(request.request_id, await self._store.update(request.record))

    def _recovered(self) -> None:
        if self._streak is not None:
            self._streak = None
            logger.info("election: the Kubernetes API answers again")

    async def _failed(self, exc: Exception) -> None:
        failure_class = _failure_class(exc)
        if failure_class == self._streak:
            logger.debug("election: Lease request failed again: %s", _describe(exc))
            return
        self._streak = failure_class
        line = _describe(exc)
        self._last_error = line
        if self._diagnose is not None:
            with trio.move_on_after(DIAGNOSE_TIMEOUT):
                try:
                    line = await self._diagnose(exc)
                except Exception as diagnose_error:  # a broken diagnosis must not stop us
                    logger.debug("election: diagnosis failed: %s", _describe(diagnose_error))
        self._last_error = line
        unexpected = not isinstance(exc, SpegeldError)
        logger.warning(
            "election: Lease request failed: %s; retrying with backoff",
            line,
            exc_info=exc if unexpected else None,
        )
