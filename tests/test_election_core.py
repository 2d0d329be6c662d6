"""The election core with explicit ``now``: every rule, then a state machine for safety."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from spegeld.election import (
    GOSSIP_ADDR_ANNOTATION,
    MIRROR_ADDR_ANNOTATION,
    CoordinatorView,
    CreateLease,
    ElectionConfig,
    ElectionCore,
    ElectionTimings,
    Event,
    HolderSeen,
    KubeLeaseStore,
    LeadershipChanged,
    LeaseConflicted,
    LeaseRead,
    LeaseRecord,
    LeaseWritten,
    MemoryLeaseApi,
    ReadLease,
    Request,
    RequestFailed,
    Response,
    Role,
    UpdateLease,
    format_micro_time,
    lease_from_record,
    parse_micro_time,
    record_from_lease,
)
from spegeld.errors import ConfigError, RemoteProtocolError

WALL = datetime(2026, 11, 27, 6, 30, tzinfo=UTC)


def _events(core: ElectionCore) -> list[Event]:
    """Every event the core has for us, oldest first."""
    found = []
    while (event := core.next_event()) is not None:
        found.append(event)
    return found


def make_core(identity: str = "a", now: float = 100.0, **timings: float) -> ElectionCore:
    config = ElectionConfig(
        identity,
        gossip_addr=f"{identity}.gossip:7946",
        mirror_addr=f"{identity}.mirror:5000",
        timings=ElectionTimings(**timings),  # type: ignore[arg-type]
    )
    return ElectionCore(config, now)


def held_by(holder: str = "b", rv: str = "7", duration: int = 15, **fields: object) -> LeaseRecord:
    base = LeaseRecord(
        holder=holder,
        duration=duration,
        acquire_time=WALL,
        renew_time=WALL,
        transitions=3,
        gossip_addr=f"{holder}.gossip:7946",
        mirror_addr=f"{holder}.mirror:5000",
        resource_version=rv,
    )
    return replace(base, **fields)  # type: ignore[arg-type]


def one(core: ElectionCore, now: float) -> Request:
    requests = core.requests_to_send(now, WALL + timedelta(seconds=now))
    assert len(requests) == 1, requests
    return requests[0]


def none_sent(core: ElectionCore, now: float) -> None:
    assert core.requests_to_send(now, WALL + timedelta(seconds=now)) == []


def answer_read(core: ElectionCore, now: float, record: LeaseRecord | None) -> None:
    request = one(core, now)
    assert isinstance(request, ReadLease)
    core.receive(LeaseRead(request.request_id, record), now)


def store(record: LeaseRecord, rv: str) -> LeaseRecord:
    return replace(record, resource_version=rv)


def become_leader(core: ElectionCore, sent: float, answered: float | None = None) -> LeaseRecord:
    """Drive a fresh core (view NONE) to leadership through an absent Lease."""
    answer_read(core, sent, None)
    create = one(core, sent)
    assert isinstance(create, CreateLease)
    written = store(create.record, "1")
    core.receive(LeaseWritten(create.request_id, written), answered or sent)
    return written


# ---- timings and the wire format -----------------------------------------------------


def test_default_timings_are_client_gos() -> None:
    timings = ElectionTimings()
    assert (timings.lease_duration, timings.renew_deadline, timings.retry_period) == (15, 10, 2)


@pytest.mark.parametrize(
    ("timings", "message"),
    [
        ({"lease_duration": 10, "renew_deadline": 10.0}, "longer than the renew deadline"),
        ({"renew_deadline": 2.4, "retry_period": 2.0}, "1.2 x the retry period"),
        ({"retry_period": 0.0}, "positive"),
        ({"lease_duration": -15}, "positive"),
        ({"lease_duration": 15.5}, "whole seconds"),
        ({"lease_duration": True}, "positive"),
        ({"renew_deadline": float("nan")}, "positive"),
        ({"max_backoff": 1.0}, "max backoff"),
    ],
)
def test_bad_timings_are_config_errors(timings: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ElectionTimings(**timings)  # type: ignore[arg-type]


def test_tightest_valid_timings() -> None:
    ElectionTimings(lease_duration=3, renew_deadline=2.5, retry_period=2.0)


def test_empty_identity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="identity"):
        ElectionConfig(" ")


@pytest.mark.parametrize(("namespace", "name"), [("", "x"), ("spegeld", "")])
def test_an_empty_lease_namespace_or_name_is_a_config_error(namespace: str, name: str) -> None:
    with pytest.raises(ConfigError, match="namespace and name"):
        KubeLeaseStore(MemoryLeaseApi().client("a"), namespace, name)


def test_micro_time_is_utc_with_six_digits_and_z() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert (
        format_micro_time(datetime(2026, 11, 27, 8, 30, 0, 123456, tzinfo=plus_two))
        == "2026-11-27T06:30:00.123456Z"
    )
    assert format_micro_time(WALL) == "2026-11-27T06:30:00.000000Z"
    with pytest.raises(ValueError, match="aware"):
        format_micro_time(datetime(2026, 11, 27))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-27T06:30:00.123456Z", datetime(2026, 11, 27, 6, 30, 0, 123456, tzinfo=UTC)),
        ("2026-11-27T06:30:00Z", WALL),
        ("2026-11-27T06:30:00.123456789Z", datetime(2026, 11, 27, 6, 30, 0, 123456, tzinfo=UTC)),
        ("2026-11-27T08:30:00.5+02:00", datetime(2026, 11, 27, 6, 30, 0, 500000, tzinfo=UTC)),
    ],
)
def test_parse_micro_time(text: str, expected: datetime) -> None:
    assert parse_micro_time(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T00:00:00Z", 42, None, "2026-11-27"])
def test_bad_times_are_remote_errors(text: object) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_micro_time(text)


def test_lease_object_round_trip_keeps_foreign_metadata() -> None:
    record = held_by("b", rv="42")
    base = {
        "metadata": {
            "name": "spegeld-coordinator",
            "labels": {"team": "infra"},
            "annotations": {"other": "x", GOSSIP_ADDR_ANNOTATION: "old:1"},
            "uid": "u-1",
        },
        "status": {"ignored": True},
    }
    lease = lease_from_record(record, "spegeld", "spegeld-coordinator", base)
    assert lease["apiVersion"] == "coordination.k8s.io/v1"
    assert lease["kind"] == "Lease"
    assert lease["metadata"]["labels"] == {"team": "infra"}
    assert lease["metadata"]["uid"] == "u-1"
    assert lease["metadata"]["resourceVersion"] == "42"
    assert lease["metadata"]["annotations"] == {
        "other": "x",
        GOSSIP_ADDR_ANNOTATION: "b.gossip:7946",
        MIRROR_ADDR_ANNOTATION: "b.mirror:5000",
    }
    assert lease["spec"] == {
        "holderIdentity": "b",
        "leaseDurationSeconds": 15,
        "leaseTransitions": 3,
        "acquireTime": "2026-11-27T06:30:00.000000Z",
        "renewTime": "2026-11-27T06:30:00.000000Z",
    }
    assert "status" not in lease
    assert record_from_lease(lease) == record
    released = lease_from_record(
        replace(record, holder="", gossip_addr="", mirror_addr=""), "spegeld", "x", lease
    )
    assert released["metadata"]["annotations"] == {"other": "x"}


def test_sparse_lease_decodes_with_defaults() -> None:
    record = record_from_lease({"metadata": {"name": "x", "resourceVersion": "5"}})
    assert record == LeaseRecord(holder="", duration=0, resource_version="5")


@pytest.mark.parametrize(
    "lease",
    [
        [],
        {"kind": "Pod"},
        {"spec": {"holderIdentity": 3}},
        {"spec": {"leaseDurationSeconds": "15"}},
        {"spec": {"leaseDurationSeconds": -1}},
        {"spec": {"leaseDurationSeconds": True}},
        {"spec": {"renewTime": "soon"}},
        {"metadata": {"resourceVersion": 5}},
        {"metadata": {"annotations": {GOSSIP_ADDR_ANNOTATION: ["a"]}}},
        {"metadata": []},
    ],
)
def test_malformed_leases_are_remote_errors(lease: object) -> None:
    with pytest.raises(RemoteProtocolError):
        record_from_lease(lease)


# ---- acquiring ------------------------------------------------------------------------


def test_absent_lease_is_created_and_leads_until_renew_deadline_after_send() -> None:
    core = make_core()
    answer_read(core, 100.0, None)
    create = one(core, 100.5)
    assert isinstance(create, CreateLease)
    assert create.record.holder == "a"
    assert create.record.duration == 15
    assert create.record.resource_version is None
    assert create.record.gossip_addr == "a.gossip:7946"
    assert create.record.mirror_addr == "a.mirror:5000"
    assert not core.is_leader(101.0)
    core.receive(LeaseWritten(create.request_id, store(create.record, "1")), 103.0)
    assert _events(core) == [LeadershipChanged(True)]
    assert core.is_leader(103.0)
    assert core.is_leader(110.49)
    assert not core.is_leader(110.5)  # 100.5 (send) + 10, not 103 (answer) + 10


def test_first_view_is_backdated_by_duration_minus_renew_deadline_minus_one() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    record = held_by("b")
    answer_read(core, 100.0, record)  # first view: observed at 100 - (15 - 10 - 1) = 96
    now = 100.0
    sends: list[tuple[float, type]] = []
    while now < 120:
        now = core.next_deadline()
        request = one(core, now)
        sends.append((now, type(request)))
        if isinstance(request, UpdateLease):
            break
        core.receive(LeaseRead(request.request_id, record), now)
    assert sends == [
        (102.0, ReadLease),
        (104.0, ReadLease),
        (106.0, ReadLease),
        (108.0, ReadLease),
        (110.0, ReadLease),
        (111.0, UpdateLease),  # 96 + 15
    ]


def test_backdating_is_clamped_at_zero_for_short_leases() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    answer_read(core, 100.0, held_by("b", duration=5))
    assert core.next_deadline() == 102.0
    answer_read(core, 102.0, held_by("b", duration=5))
    assert core.next_deadline() == 104.0
    answer_read(core, 104.0, held_by("b", duration=5))
    assert core.next_deadline() == 105.0  # observed at 100 exactly: 5 - 10 - 1 < 0
    assert isinstance(one(core, 105.0), UpdateLease)


def test_a_changed_record_is_observed_anew_and_an_unchanged_one_is_not() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    answer_read(core, 100.0, held_by("b", rv="7"))  # valid until 111
    answer_read(core, 102.0, held_by("b", rv="8"))  # renewed: valid until 102 - 4 + 15 = 113
    answer_read(core, 104.0, held_by("b", rv="8"))
    assert core.next_deadline() == 106.0
    for now in (106.0, 108.0, 110.0):
        answer_read(core, now, held_by("b", rv="8"))
    assert core.next_deadline() == 112.0
    answer_read(core, 112.0, held_by("b", rv="8"))
    assert core.next_deadline() == 113.0
    update = one(core, 113.0)
    assert isinstance(update, UpdateLease)
    assert update.record.resource_version == "8"


@pytest.mark.parametrize("skew", [timedelta(days=-3650), timedelta(0), timedelta(days=3650)])
def test_expiry_ignores_renew_time(skew: timedelta) -> None:
    """A holder whose clock is years off expires by our observation alone."""
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    record = held_by("b", renew_time=WALL + skew, acquire_time=WALL + skew)
    answer_read(core, 100.0, record)
    while core.next_deadline() < 111.0:
        answer_read(core, core.next_deadline(), record)
    assert core.next_deadline() == 111.0
    assert isinstance(one(core, 111.0), UpdateLease)


def test_without_a_resource_version_the_whole_spec_identifies_the_version() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    answer_read(core, 100.0, held_by("b", rv=None))
    renewed = held_by("b", rv=None, renew_time=WALL + timedelta(seconds=2))
    answer_read(core, 102.0, renewed)
    while core.next_deadline() < 113.0:
        answer_read(core, core.next_deadline(), renewed)
    assert core.next_deadline() == 113.0  # the changed renewTime counted as a change at 102


def test_released_lease_is_taken_at_once() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    released = held_by("", rv="9", duration=1, gossip_addr="", mirror_addr="")
    answer_read(core, 100.0, released)
    update = one(core, 100.0)
    assert isinstance(update, UpdateLease)
    assert update.record.holder == "a"
    assert update.record.resource_version == "9"
    assert update.record.transitions == 4
    assert update.record.acquire_time == WALL + timedelta(seconds=100)


def test_a_lost_race_is_not_a_failure() -> None:
    core = make_core()
    answer_read(core, 100.0, None)
    create = one(core, 100.0)
    core.receive(LeaseConflicted(create.request_id), 100.2)
    assert core.consecutive_failures == 0
    assert core.role(100.2) is Role.CONTENDING
    assert _events(core) == []
    none_sent(core, 102.1)
    assert isinstance(one(core, 102.2), ReadLease)  # re-read next round


# ---- leading --------------------------------------------------------------------------


def test_leader_renews_every_retry_period_keeping_acquire_time() -> None:
    core = make_core()
    written = become_leader(core, 100.0)
    _events(core)
    for round_ in range(1, 6):
        now = 100.0 + 2.0 * round_
        none_sent(core, now - 0.01)
        renew = one(core, now)
        assert isinstance(renew, UpdateLease)
        assert renew.record.holder == "a"
        assert renew.record.resource_version == written.resource_version
        assert renew.record.acquire_time == WALL + timedelta(seconds=100)
        assert renew.record.renew_time == WALL + timedelta(seconds=now)
        assert renew.record.transitions == written.transitions
        written = store(renew.record, str(round_ + 1))
        core.receive(LeaseWritten(renew.request_id, written), now + 0.1)
        assert core.is_leader(now + 9.99)
    assert _events(core) == []
    assert core.transitions == 1


def test_leader_steps_down_renew_deadline_after_its_last_successful_send() -> None:
    core = make_core()
    become_leader(core, 100.0)
    assert _events(core) == [LeadershipChanged(True)]
    renew = one(core, 102.0)
    core.receive(LeaseWritten(renew.request_id, store(renew.record, "2")), 105.0)
    sent = []
    now = 105.0
    while now < 112.0 - 1e-9:  # failing renewals every retry period until 102 + 10
        now = core.next_deadline()
        if now >= 112.0:
            break
        request = one(core, now)
        sent.append(now)
        core.receive(RequestFailed(request.request_id, "boom"), now)
    assert sent == [105.0, 107.0, 109.0, 111.0]
    assert core.is_leader(111.99)
    assert not core.is_leader(112.0)
    assert core.next_deadline() == 112.0
    core.handle_timer(112.0)
    assert _events(core) == [LeadershipChanged(False)]
    assert core.role(112.0) is Role.UNREACHABLE


def test_a_late_successful_renewal_does_not_extend_past_its_send_time() -> None:
    core = make_core()
    become_leader(core, 100.0)
    renew = one(core, 102.0)
    core.receive(LeaseWritten(renew.request_id, store(renew.record, "2")), 111.0)
    assert core.is_leader(111.0)
    assert not core.is_leader(112.0)


def test_leader_that_reads_another_holder_steps_down_at_once() -> None:
    core = make_core()
    become_leader(core, 100.0)
    _events(core)
    renew = one(core, 102.0)
    core.receive(LeaseConflicted(renew.request_id), 102.1)
    assert core.is_leader(102.1)
    answer_read(core, 104.1, held_by("b", rv="50"))
    assert _events(core) == [LeadershipChanged(False), HolderSeen(held_by("b", rv="50"))]
    assert not core.is_leader(104.1)


def test_request_without_answer_times_out_as_a_failure() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    read = one(core, 100.0)
    assert core.next_deadline() == 105.0
    core.handle_timer(105.0)
    assert core.consecutive_failures == 1
    core.receive(LeaseRead(read.request_id, None), 105.5)  # too late: ignored
    assert core.record is None
    none_sent(core, 106.9)
    assert isinstance(one(core, 107.0), ReadLease)


def test_failures_back_off_doubling_up_to_the_cap() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 0.0)
    now = 0.0
    gaps = []
    for _ in range(8):
        request = one(core, now)
        core.receive(RequestFailed(request.request_id, "down"), now)
        gaps.append(core.next_deadline() - now)
        now = core.next_deadline()
    assert gaps == [2, 4, 8, 16, 30, 30, 30, 30]
    answer_read(core, now, None)
    assert core.consecutive_failures == 0


# ---- gossip ---------------------------------------------------------------------------


def test_follower_with_a_live_coordinator_in_gossip_sends_nothing() -> None:
    core = make_core()
    core.set_view(CoordinatorView.ALIVE, 100.0)
    assert core.next_deadline() == float("inf")
    for now in range(100, 10_000, 7):
        core.handle_timer(float(now))
        none_sent(core, float(now))
    assert core.api_requests == 0
    assert core.role(200.0) is Role.FOLLOWER
    assert core.next_attempt_in(200.0) is None
    core.set_view(CoordinatorView.GONE, 10_000.0)
    assert isinstance(one(core, 10_000.0), ReadLease)


def test_no_gossip_view_reports_the_holder_and_reads_once_per_lease_duration() -> None:
    core = make_core()
    record = held_by("b")
    answer_read(core, 100.0, record)
    assert _events(core) == [HolderSeen(record)]
    assert core.role(100.0) is Role.FOLLOWER
    assert core.next_deadline() == 115.0
    none_sent(core, 114.9)
    answer_read(core, 115.0, held_by("b", rv="8"))
    assert _events(core) == []  # same holder, same address: said once
    assert core.next_deadline() == 130.0
    answer_read(core, 130.0, held_by("c", rv="9"))
    assert [type(e) for e in _events(core)] == [HolderSeen]
    assert core.api_requests == 3


def test_gossip_turning_gone_ends_the_no_view_backoff() -> None:
    core = make_core()
    answer_read(core, 100.0, held_by("b"))
    core.set_view(CoordinatorView.GONE, 103.0)
    assert isinstance(one(core, 103.0), ReadLease)


# ---- release --------------------------------------------------------------------------


def test_release_empties_the_holder_with_a_one_second_lease() -> None:
    core = make_core()
    written = become_leader(core, 100.0)
    _events(core)
    release = core.release(101.0, WALL + timedelta(seconds=101))
    assert isinstance(release, UpdateLease)
    assert release.record.holder == ""
    assert release.record.duration == 1
    assert release.record.renew_time == WALL + timedelta(seconds=101)
    assert release.record.resource_version == written.resource_version
    assert release.record.transitions == written.transitions
    assert _events(core) == [LeadershipChanged(False)]
    assert not core.is_leader(101.0)
    assert core.role(101.0) is Role.DISABLED
    for now in (103.0, 150.0):
        none_sent(core, now)
    assert core.release(102.0, WALL) is None


def test_release_without_holding_sends_nothing() -> None:
    core = make_core()
    core.set_view(CoordinatorView.GONE, 100.0)
    answer_read(core, 100.0, held_by("b"))
    assert core.release(100.0, WALL) is None
    assert _events(core) == []


def test_after_release_another_node_takes_over_at_once() -> None:
    a, b = make_core("a"), make_core("b")
    written = become_leader(a, 100.0)
    release = a.release(101.0, WALL)
    assert release is not None
    stored = store(release.record, "2")
    b.set_view(CoordinatorView.GONE, 101.0)
    answer_read(b, 101.1, stored)
    take = one(b, 101.1)
    assert isinstance(take, UpdateLease)
    assert take.record.transitions == written.transitions + 1
    b.receive(LeaseWritten(take.request_id, store(take.record, "3")), 101.2)
    assert b.is_leader(101.2)
    assert not a.is_leader(101.2)


# ---- the state machine ----------------------------------------------------------------


@dataclass
class SimNode:
    identity: str
    core: ElectionCore | None
    incarnation: int
    offset: float  # local monotonic = offset + true time x rate
    rate: float
    last: float = -1e18  # local time never goes back
    released: bool = False
    cut: bool = False  # partitioned from the API server: its requests fail

    def local(self, true_time: float) -> float:
        self.last = max(self.last, self.offset + true_time * self.rate)
        return self.last


@dataclass
class InFlight:
    node: int
    incarnation: int
    message: Request | Response


TIMINGS = ElectionTimings()
QUIET_FOR = 60.0  # true seconds of a fault-free network after which somebody must lead


class ElectionMachine(RuleBasedStateMachine):
    """Cores against one model Lease store with a hostile network and crashes."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.lease: LeaseRecord | None = None
        self.version = 0
        self.nodes: list[SimNode] = []
        self.requests: list[InFlight] = []
        self.responses: list[InFlight] = []
        self.wall_skew: list[float] = []

    @initialize(
        clocks=st.lists(
            st.tuples(st.floats(0, 1e5), st.floats(0.99, 1.01), st.floats(-86400, 86400)),
            min_size=3,
            max_size=5,
        ),
        views=st.lists(st.sampled_from(CoordinatorView), min_size=5, max_size=5),
    )
    def start(self, clocks: list[tuple[float, float, float]], views: list[CoordinatorView]) -> None:
        for index, (offset, rate, skew) in enumerate(clocks):
            node = SimNode(f"node-{index}", None, 0, offset, rate)
            self.nodes.append(node)
            self.wall_skew.append(skew)
            node.core = ElectionCore(
                ElectionConfig(node.identity, timings=TIMINGS), node.local(self.now)
            )
            node.core.set_view(views[index], node.local(self.now))
            self.pump(index)

    # ---- plumbing -----------------------------------------------------------------

    def wall(self, index: int) -> datetime:
        return WALL + timedelta(seconds=self.now + self.wall_skew[index])

    def pump(self, index: int) -> None:
        node = self.nodes[index]
        if node.core is None:
            return
        for request in node.core.requests_to_send(node.local(self.now), self.wall(index)):
            self.requests.append(InFlight(index, node.incarnation, request))

    def apply(self, request: Request) -> Response:
        """The API server: conditional writes with fresh resourceVersions."""
        if isinstance(request, ReadLease):
            return LeaseRead(request.request_id, self.lease)
        if isinstance(request, CreateLease):
            if self.lease is not None:
                return LeaseConflicted(request.request_id)
        elif self.lease is None:
            return RequestFailed(request.request_id, "404")
        elif request.record.resource_version != self.lease.resource_version:
            return LeaseConflicted(request.request_id)
        self.version += 1
        self.lease = replace(request.record, resource_version=str(self.version))
        return LeaseWritten(request.request_id, self.lease)

    def deliver(self, flight: InFlight) -> None:
        node = self.nodes[flight.node]
        if node.core is None or node.incarnation != flight.incarnation:
            return
        assert not isinstance(flight.message, (ReadLease, CreateLease, UpdateLease))
        node.core.receive(flight.message, node.local(self.now))
        _events(node.core)
        self.check_one_leader()
        self.pump(flight.node)

    def run_until(self, target: float, instant_network: bool = False) -> None:
        for _ in range(100_000):
            if instant_network:
                self.flush()
            due: tuple[float, int] | None = None
            for index, node in enumerate(self.nodes):
                if node.core is None:
                    continue
                timer = node.core.next_deadline()
                if timer == float("inf"):
                    continue
                at = max(self.now, (timer - node.offset) / node.rate)
                if due is None or at < due[0]:
                    due = (at, index)
            if due is None or due[0] > target:
                self.now = max(self.now, target)
                return
            self.now, index = due
            node = self.nodes[index]
            assert node.core is not None
            node.last = max(node.last, node.core.next_deadline())
            node.core.handle_timer(node.local(self.now))
            _events(node.core)
            self.pump(index)
            self.check_one_leader()
        raise AssertionError("the simulation did not advance")

    def flush(self) -> None:
        for _ in range(10_000):
            if self.requests:
                flight = self.requests.pop(0)
                assert isinstance(flight.message, (ReadLease, CreateLease, UpdateLease))
                if self.nodes[flight.node].cut:
                    answer: Response = RequestFailed(flight.message.request_id, "partitioned")
                else:
                    answer = self.apply(flight.message)
                self.responses.append(InFlight(flight.node, flight.incarnation, answer))
            elif self.responses:
                self.deliver(self.responses.pop(0))
            else:
                return
        raise AssertionError("the network did not drain")

    def leaders(self) -> list[str]:
        return [
            node.identity
            for node in self.nodes
            if node.core is not None and node.core.is_leader(node.local(self.now))
        ]

    # ---- rules --------------------------------------------------------------------

    @rule(
        seconds=st.one_of(st.sampled_from([0.5, 1.0, 2.0, 5.0, 9.0, 11.0, 15.0]), st.floats(0, 20)),
        instant_network=st.booleans(),
    )
    def advance(self, seconds: float, instant_network: bool) -> None:
        """Time passes; the network either holds everything or answers at once."""
        self.run_until(self.now + seconds, instant_network)

    @rule(pick=st.integers(0), cut=st.booleans())
    def partition(self, pick: int, cut: bool) -> None:
        """Cut a node off the API server (its requests fail on an instant network), or heal it."""
        self.nodes[pick % len(self.nodes)].cut = cut

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0), outcome=st.sampled_from(["answer", "lose", "fail"]))
    def server_applies(self, pick: int, outcome: str) -> None:
        """The server applies a request; its answer travels, gets lost, or becomes an error."""
        flight = self.requests.pop(pick % len(self.requests))
        assert isinstance(flight.message, (ReadLease, CreateLease, UpdateLease))
        answer = self.apply(flight.message)
        if outcome == "fail":
            answer = RequestFailed(answer.request_id, "applied, then the connection broke")
        if outcome != "lose":
            self.responses.append(InFlight(flight.node, flight.incarnation, answer))

    @precondition(lambda self: self.requests)
    @rule(pick=st.integers(0), outcome=st.sampled_from(["conflict", "fail", "lose"]))
    def server_refuses(self, pick: int, outcome: str) -> None:
        """A request that never reaches the store: a spurious 409, an error, or silence."""
        flight = self.requests.pop(pick % len(self.requests))
        request_id = flight.message.request_id
        answer: Response | None = {
            "conflict": LeaseConflicted(request_id),
            "fail": RequestFailed(request_id, "refused"),
            "lose": None,
        }[outcome]
        if answer is not None:
            self.responses.append(InFlight(flight.node, flight.incarnation, answer))

    @precondition(lambda self: self.responses)
    @rule(pick=st.integers(0), lose=st.booleans())
    def response_arrives(self, pick: int, lose: bool) -> None:
        flight = self.responses.pop(pick % len(self.responses))
        if not lose:
            self.deliver(flight)

    @rule(pick=st.integers(0), view=st.sampled_from(CoordinatorView))
    def gossip_says(self, pick: int, view: CoordinatorView) -> None:
        """Gossip may be wrong in any way: safety must not depend on it."""
        index = pick % len(self.nodes)
        node = self.nodes[index]
        if node.core is not None:
            node.core.set_view(view, node.local(self.now))
            self.pump(index)

    @rule(pick=st.integers(0))
    def crash(self, pick: int) -> None:
        self.nodes[pick % len(self.nodes)].core = None  # its requests stay in the network

    @rule(pick=st.integers(0), offset=st.floats(0, 1e5))
    def restart(self, pick: int, offset: float) -> None:
        index = pick % len(self.nodes)
        node = self.nodes[index]
        if node.core is not None:
            return
        node.incarnation += 1
        node.offset, node.last, node.released = offset - self.now * node.rate, -1e18, False
        node.core = ElectionCore(
            ElectionConfig(node.identity, timings=TIMINGS), node.local(self.now)
        )
        self.pump(index)

    @rule(pick=st.integers(0))
    def release(self, pick: int) -> None:
        index = pick % len(self.nodes)
        node = self.nodes[index]
        if node.core is None:
            return
        request = node.core.release(node.local(self.now), self.wall(index))
        node.released = True
        _events(node.core)
        assert not node.core.is_leader(node.local(self.now))
        if request is not None:
            self.requests.append(InFlight(index, node.incarnation, request))

    @precondition(lambda self: any(n.core is not None and not n.released for n in self.nodes))
    @rule()
    def quiet_network_elects_someone(self) -> None:
        """With the faults over and gossip saying GONE, a live node leads soon."""
        for node in self.nodes:
            node.cut = False
        self.flush()
        for index, node in enumerate(self.nodes):
            if node.core is not None:
                node.core.set_view(CoordinatorView.GONE, node.local(self.now))
                self.pump(index)
        self.run_until(self.now + QUIET_FOR, instant_network=True)
        assert len(self.leaders()) == 1, self.leaders()

    @invariant()
    def check_one_leader(self) -> None:
        leaders = self.leaders()
        assert len(leaders) <= 1, f"two leaders at {self.now}: {leaders}"


ElectionMachine.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestElectionStateMachine = ElectionMachine.TestCase


def test_machine_partitioned_leader_is_outlived_before_anyone_takes_over() -> None:
    """The state machine's tightest case, fixed: the follower reads right after a renewal."""
    machine = ElectionMachine()
    machine.start([(0.0, 1.0, 0.0)] * 3, [CoordinatorView.NONE] * 5)
    machine.run_until(4.0, instant_network=True)  # a renewal is sent and applied at 4.0
    (leader,) = machine.leaders()
    first = int(leader.rsplit("-", 1)[1])
    assert machine.lease is not None
    assert machine.lease.renew_time == WALL + timedelta(seconds=4)
    machine.partition(first, cut=True)
    for index in range(3):
        if index != first:
            machine.gossip_says(index, CoordinatorView.GONE)  # they read at 4.0 too
    machine.run_until(30.0, instant_network=True)  # checks the invariant after every step
    (successor,) = machine.leaders()
    assert successor != leader
    assert machine.lease.holder == successor
    # The old leader fenced itself at 4 + 10; the first view, backdated, expires at 4 + 11.
    assert machine.lease.acquire_time == WALL + timedelta(seconds=15)
