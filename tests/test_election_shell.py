"""The trio Elector on autojump_clock against the in-memory Lease API twin."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
import trio.testing

from spegeld.election import (
    GOSSIP_ADDR_ANNOTATION,
    MIRROR_ADDR_ANNOTATION,
    CoordinatorView,
    ElectionConfig,
    Elector,
    KubeLeaseStore,
    MemoryLeaseApi,
    parse_micro_time,
)
from spegeld.errors import KubeStatusError, KubeUnreachable
from spegeld.metrics import MetricsRegistry

NS, NAME = "spegeld", "spegeld-coordinator"
EPOCH = datetime(2026, 11, 27, 6, 30, tzinfo=UTC)
GOSSIP_DETECTION = 5.0  # simulated seconds until gossip calls a killed coordinator gone


def wall() -> datetime:
    """Wall time that is trio time, so renewTime tells us when a request was sent."""
    return EPOCH + timedelta(seconds=trio.current_time())


def sent_at(lease: dict[str, Any] | None, field_name: str = "renewTime") -> float:
    assert lease is not None
    return (parse_micro_time(lease["spec"][field_name]) - EPOCH).total_seconds()


@dataclass
class FakeGossip:
    """What gossip would say: the flag set by on_leadership, and deaths seen after a delay.

    A stand-in for gossip's CoordinatorChanged events: real gossip needs sockets and
    seconds to detect a death, and these tests are about the election's timing. It
    tells each elector its view when that changes, as GossipRouter's events do.
    """

    coordinator: str | None = None
    killed: dict[str, float] = field(default_factory=dict)
    members: bool = True
    electors: dict[str, Elector] = field(default_factory=dict)
    told: dict[str, tuple[CoordinatorView, str | None]] = field(default_factory=dict)
    running: bool = False

    def publish(self) -> None:
        """An event to every elector whose view changed since it was last told."""
        for name, elector in self.electors.items():
            view = self.view(name)
            if self.told.get(name) != view:
                self.told[name] = view
                elector.set_coordinator_view(*view)

    async def run(self) -> None:
        """Deaths are seen GOSSIP_DETECTION after the kill: look for them now and then."""
        while True:
            self.publish()
            await trio.sleep(0.01)

    def view(self, me: str) -> tuple[CoordinatorView, str | None]:
        if not self.members:
            return CoordinatorView.NONE, None
        node = self.coordinator
        if node is None or node == me:
            return CoordinatorView.GONE, None
        killed = self.killed.get(node)
        if killed is not None and trio.current_time() >= killed + GOSSIP_DETECTION:
            return CoordinatorView.GONE, None
        return CoordinatorView.ALIVE, node

    def leadership(self, node: str, leader: bool) -> None:
        if leader:
            self.coordinator = node
        elif self.coordinator == node:
            self.coordinator = None
        self.publish()


@dataclass
class Node:
    name: str
    elector: Elector
    changes: list[bool]
    metrics: MetricsRegistry
    gossip: FakeGossip
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


def make_node(api: MemoryLeaseApi, gossip: FakeGossip, name: str, **kwargs: Any) -> Node:
    changes: list[bool] = []
    metrics = MetricsRegistry()

    def on_leadership(leader: bool) -> None:
        changes.append(leader)
        gossip.leadership(name, leader)

    elector = Elector(
        KubeLeaseStore(api.client(name), NS, NAME),
        ElectionConfig(name, gossip_addr=f"{name}-gossip:7946", mirror_addr=f"{name}-reg:5000"),
        on_leadership=on_leadership,
        metrics=metrics,
        wall_clock=wall,
        **kwargs,
    )
    gossip.electors[name] = elector
    gossip.told.pop(name, None)
    gossip.publish()
    return Node(name, elector, changes, metrics, gossip)


async def start(nursery: trio.Nursery, node: Node) -> None:
    if not node.gossip.running:
        node.gossip.running = True
        nursery.start_soon(node.gossip.run)

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with node.scope:
            await node.elector.run(task_status=task_status)

    await nursery.start(run)


async def wait_for(condition: Any, timeout: float, what: str) -> float:
    start_time = trio.current_time()
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return trio.current_time() - start_time
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def leaders(nodes: list[Node]) -> list[str]:
    return [n.name for n in nodes if n.elector.is_leader()]


async def test_single_node_acquires_and_renews_every_retry_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api, gossip = MemoryLeaseApi(), FakeGossip()
    node = make_node(api, gossip, "a")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await start(nursery, node)
            await wait_for(node.elector.is_leader, 1, "leadership")
            assert node.changes == [True]
            assert "spegeld_coordinator 1" in node.metrics.render()
            first = api.lease(NS, NAME)
            assert first is not None
            assert first["spec"]["holderIdentity"] == "a"
            assert first["spec"]["leaseDurationSeconds"] == 15
            assert first["spec"]["renewTime"].endswith("Z")
            assert len(first["spec"]["renewTime"]) == len("2026-11-27T06:30:00.000000Z")
            assert first["metadata"]["annotations"] == {
                GOSSIP_ADDR_ANNOTATION: "a-gossip:7946",
                MIRROR_ADDR_ANNOTATION: "a-reg:5000",
            }
            before = api.requests_by["a"]
            renewals: list[float] = []
            for _ in range(10):
                previous = api.lease(NS, NAME)
                await wait_for(lambda p=previous: api.lease(NS, NAME) != p, 3, "a renewal")  # type: ignore[misc]
                renewals.append(sent_at(api.lease(NS, NAME)))
            gaps = [round(b - a, 6) for a, b in itertools.pairwise(renewals)]
            assert gaps == [2.0] * 9
            assert api.requests_by["a"] - before == 10  # one update per renewal, no reads
            lease = api.lease(NS, NAME)
            assert lease is not None
            assert lease["spec"]["acquireTime"] == first["spec"]["acquireTime"]
            stats = node.elector.statistics()
            assert (stats.role, stats.holder, stats.consecutive_failures) == ("leader", "a", 0)
            assert stats.api_requests == api.requests_by["a"]
            nursery.cancel_scope.cancel()


async def test_three_electors_one_leader_and_silent_followers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api, gossip = MemoryLeaseApi(), FakeGossip()
    nodes = [make_node(api, gossip, name) for name in "abc"]
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await start(nursery, node)
            await wait_for(lambda: len(leaders(nodes)) == 1, 5, "a leader")
            await trio.sleep(1)
            (leader,) = leaders(nodes)
            followers = [n.name for n in nodes if n.name != leader]
            counts = {name: api.requests_by.get(name, 0) for name in followers}
            for _ in range(600):  # 60 s, checked every 0.1 s
                await trio.sleep(0.1)
                assert leaders(nodes) == [leader]
            assert {name: api.requests_by.get(name, 0) for name in followers} == counts
            assert api.requests_by[leader] >= 30
            for node in nodes:
                if node.name != leader:
                    stats = node.elector.statistics()
                    assert (stats.role, stats.holder, stats.next_attempt_in) == (
                        "follower",
                        leader,
                        None,
                    )
            nursery.cancel_scope.cancel()


async def test_leader_crash_is_taken_over_after_its_fence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api, gossip = MemoryLeaseApi(), FakeGossip()
    nodes = [make_node(api, gossip, name) for name in "abc"]
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await start(nursery, node)
            await wait_for(lambda: len(leaders(nodes)) == 1, 5, "a leader")
            await trio.sleep(7.3)
            (old,) = [n for n in nodes if n.elector.is_leader()]
            old.scope.cancel()  # kill -9: no release, no goodbye
            killed = trio.current_time()
            gossip.killed[old.name] = killed
            last_renewal = sent_at(api.lease(NS, NAME))
            survivors = [n for n in nodes if n is not old]
            took = await wait_for(
                lambda: len([n for n in survivors if n.elector.is_leader()]) == 1, 30, "takeover"
            )
            new = api.lease(NS, NAME)
            assert new is not None
            assert new["spec"]["holderIdentity"] != old.name
            assert new["spec"]["leaseTransitions"] == 1
            # Safe: not before the old leader's own fence (its last send + renew deadline)...
            assert sent_at(new, "acquireTime") > last_renewal + 10.0
            # ...and prompt: gossip's detection, then renew deadline + 1 s from the first read.
            assert took <= GOSSIP_DETECTION + 0.5 + 10.0 + 1.0 + 0.1, took
            nursery.cancel_scope.cancel()


async def test_graceful_release_is_taken_over_within_two_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api, gossip = MemoryLeaseApi(), FakeGossip()
    nodes = [make_node(api, gossip, name) for name in "abc"]
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await start(nursery, node)
            await wait_for(lambda: len(leaders(nodes)) == 1, 5, "a leader")
            await trio.sleep(20)
            (old,) = [n for n in nodes if n.elector.is_leader()]
            await old.elector.release()
            old.scope.cancel()
            assert old.changes == [True, False]
            assert old.elector.statistics().role == "disabled"
            released = api.lease(NS, NAME)
            assert released is not None
            assert released["spec"]["holderIdentity"] == ""
            assert released["spec"]["leaseDurationSeconds"] == 1
            took = await wait_for(lambda: len(leaders(nodes)) == 1, 2, "takeover after release")
            assert took <= 2.0
            assert old.name not in leaders(nodes)
            nursery.cancel_scope.cancel()


@dataclass
class Diagnoser:
    calls: list[str] = field(default_factory=list)

    async def __call__(self, exc: Exception) -> str:
        await trio.sleep(0.5)  # a diagnosis does I/O: DNS, a TCP connect
        self.calls.append(type(exc).__name__)
        return f"diagnosis #{len(self.calls)}: {type(exc).__name__}"


async def test_api_failures_are_diagnosed_once_per_streak_and_leader_steps_down(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="spegeld.election")
    api, gossip = MemoryLeaseApi(), FakeGossip()
    diagnose = Diagnoser()
    node = make_node(api, gossip, "a", diagnose=diagnose)
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await start(nursery, node)
            await wait_for(node.elector.is_leader, 1, "leadership")
            await trio.sleep(5)
            last_success = sent_at(api.lease(NS, NAME))
            api.failure = KubeUnreachable("connection refused")
            before = api.requests_by["a"]
            step_down = await wait_for(lambda: not node.elector.is_leader(), 20, "step-down")
            now = trio.current_time()
            assert now == pytest.approx(last_success + 10.0, abs=0.02)
            assert node.changes == [True, False]
            assert "spegeld_coordinator 0" in node.metrics.render()
            assert step_down < 10.0
            # Retries every retry period while leading: at most 10 / 2 of them.
            assert api.requests_by["a"] - before <= 5

            # Not leading: the retries back off, doubling up to 30 s.
            times: list[float] = []
            original = api._call

            async def timed(caller: str) -> None:
                times.append(trio.current_time())
                await original(caller)

            api._call = timed  # type: ignore[method-assign]
            await trio.sleep(200)
            gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
            assert gaps[-3:] == [30.0, 30.0, 30.0]
            assert all(g <= 30.0 for g in gaps)
            assert gaps == sorted(gaps)

            stats = node.elector.statistics()
            assert stats.role == "unreachable"
            assert stats.last_error == "diagnosis #1: KubeUnreachable"
            assert stats.consecutive_failures >= 8
            assert stats.next_attempt_in is not None
            assert 0 < stats.next_attempt_in <= 30

            api.failure = KubeStatusError(403, "Forbidden", "leases is forbidden")
            await wait_for(lambda: len(diagnose.calls) == 2, 40, "a second diagnosis")
            api.failure = None
            await wait_for(node.elector.is_leader, 40, "leadership again")
            nursery.cancel_scope.cancel()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "election: Lease request failed: diagnosis #1: KubeUnreachable; retrying with backoff",
        "election: Lease request failed: diagnosis #2: KubeStatusError; retrying with backoff",
    ]
    assert diagnose.calls == ["KubeUnreachable", "KubeStatusError"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos.count("election: the Kubernetes API answers again") == 1
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) >= 8  # the repeated failures went to DEBUG
    assert node.changes == [True, False, True]


async def test_no_gossip_view_seeds_from_the_lease_without_polling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    api = MemoryLeaseApi()
    leader_gossip, lonely_gossip = FakeGossip(), FakeGossip(members=False)
    leader = make_node(api, leader_gossip, "a")
    seeds: list[str] = []
    joiner = make_node(api, lonely_gossip, "b", on_holder=seeds.append)
    with trio.fail_after(300):
        async with trio.open_nursery() as nursery:
            await start(nursery, leader)
            await wait_for(leader.elector.is_leader, 1, "leadership")
            await start(nursery, joiner)
            await trio.sleep(61)
            assert seeds == ["a-gossip:7946"]
            assert not joiner.elector.is_leader()
            # one read at start, then at most one per lease duration: 1 + 61 // 15
            assert api.requests_by["b"] == 5
            stats = joiner.elector.statistics()
            assert (stats.role, stats.holder) == ("follower", "a")
            nursery.cancel_scope.cancel()


async def test_a_malformed_lease_is_a_failure_not_a_crash(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    api, gossip = MemoryLeaseApi(), FakeGossip()
    await api.create_lease(
        NS, {"metadata": {"name": NAME}, "spec": {"holderIdentity": 7, "renewTime": "never"}}
    )
    node = make_node(api, gossip, "a")
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await start(nursery, node)
            await trio.sleep(20)
            stats = node.elector.statistics()
            assert stats.role == "unreachable"
            assert stats.last_error is not None
            assert "holderIdentity" in stats.last_error
            assert not node.elector.is_leader()
            nursery.cancel_scope.cancel()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
