"""Five real daemons elect one coordinator through a real kube-apiserver (v1.36, with etcd).

Each node is a private containerd plus ``spegeld run`` on its own loopback address,
all with one cluster key and one ServiceAccount kubeconfig minted by TokenRequest as
deploy/README.md says, under deploy/rbac.yaml's RBAC (tests/kubeapi/_electing.py,
tests/realkube). Shown:

- exactly one node leads at every sample, and every node names it;
- followers make no API requests while gossip shows a live coordinator: the apiserver's
  own audit log and its ``apiserver_request_total`` agree;
- ``kill -9`` of the coordinator: another leads within the lease duration (15 s);
- SIGTERM of the coordinator: it releases the Lease and another leads within 2 s.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests._support import wait_for
from tests.kubeapi._electing import ElectingCluster

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.kubeapiserver]

HOSTS = [f"127.0.0.{i}" for i in range(11, 16)]
LEASE_DURATION = 15.0
HANDOVER = 2.0
POLL = 0.1


class Cluster(ElectingCluster):
    def __init__(self, base: Path) -> None:
        super().__init__(base, HOSTS)


class LeaderSampler:
    """Counts leaders at every sample, in a thread, until stopped."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.samples: Counter[int] = Counter()
        self.doubles: list[list[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LeaderSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            leaders = self.cluster.leaders()
            self.samples[len(leaders)] += 1
            if len(leaders) > 1:
                self.doubles.append(leaders)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    built = Cluster(tmp_path)
    try:
        built.start()
        yield built
    finally:
        built.close()


def one_leader_named_everywhere(cluster: Cluster) -> str | None:
    leaders = cluster.leaders()
    if len(leaders) != 1:
        return None
    for node in cluster.nodes:
        status = node.status()
        if node.alive and (status is None or status["coordinator"] != leaders[0]):
            return None
    return leaders[0]


def settled(cluster: Cluster) -> bool:
    """Every live node leads or follows a live coordinator (none is still contending)."""
    roles = [s["election"]["role"] for n in cluster.nodes if (s := n.status()) is not None]
    return all(role in ("leader", "follower") for role in roles)


def test_one_coordinator_quiet_followers_failover_and_handover(cluster: Cluster) -> None:
    with LeaderSampler(cluster) as sampler:
        elected = wait_for(lambda: one_leader_named_everywhere(cluster) is not None, 30,
                           "one coordinator that every node names")  # fmt: skip
        first = cluster.leaders()[0]
        print(f"\n[election] {first} elected {elected:.2f} s after the last daemon was ready")
        shown = subprocess.run(
            [sys.executable, "-m", "spegeld", "status", "--registry-addr",
             cluster.nodes[-1].spegeld.address],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert f"coordinator: {first}" in shown
        assert "election: follower (Lease spegeld/spegeld-coordinator)" in shown
        leader = cluster.node(first).spegeld
        assert leader.metric("spegeld_coordinator") == 1
        writes = leader.metric('spegeld_kube_requests_total{verb="create",code="201"}')
        writes += leader.metric('spegeld_kube_requests_total{verb="update",code="200"}')
        assert writes >= 1  # it took the Lease with a create or an update
        assert cluster.nodes[-1].spegeld.metric("spegeld_coordinator") == 0

        # Steady state: only the leader talks to the API, one renewal per retry period.
        counted = cluster.api.request_counts()
        start = time.time()
        time.sleep(10)
        window = [r for r in cluster.api.requests() if start <= r["at"] < start + 10]
        counted_after = cluster.api.request_counts()
        kinds = Counter(r["method"] for r in window)
        metric = {key: n - counted.get(key, 0.0) for key, n in counted_after.items()}
        print(f"[election] API requests in 10 s of steady state: {dict(kinds)}; "
              f"apiserver_request_total delta (verb, code): {metric}")  # fmt: skip
        assert kinds["GET"] == 0, window  # followers do not poll
        assert 4 <= kinds["PUT"] <= 6  # renewals every 2 s
        assert len(window) <= 10  # <= 1 request per second cluster-wide
        assert {r["user"] for r in window} == {"system:serviceaccount:spegeld:spegeld"}
        assert all(r["code"] == 200 for r in window), window
        # The apiserver's own counter: no reads at all around the window, only renewals.
        assert sum(n for (verb, _), n in metric.items() if verb == "GET") == 0, metric
        assert 4 <= metric.get(("PUT", "200"), 0.0) <= 8, metric  # the window + the scrapes

        # kill -9 of the coordinator: another leads within the lease duration.
        victim = cluster.node(first)
        killed = time.monotonic()
        victim.spegeld.kill()
        victim.alive = False
        wait_for(lambda: len(cluster.leaders()) == 1, LEASE_DURATION + 5, "a new coordinator")
        failover = time.monotonic() - killed
        second = cluster.leaders()[0]
        print(f"[election] kill -9 of {first}: {second} leads after {failover:.2f} s")
        assert second != first
        assert failover <= LEASE_DURATION

        # SIGTERM: the coordinator releases the Lease and leaves gossip; handover is quick.
        wait_for(lambda: one_leader_named_everywhere(cluster) == second, 10, "agreement")
        wait_for(lambda: settled(cluster), 10, "followers to stop contending")
        stopping = cluster.node(second)
        stopped = time.monotonic()
        with ThreadPoolExecutor(max_workers=1) as pool:
            exit_code = pool.submit(stopping.spegeld.stop)
            wait_for(lambda: any(n != second for n in cluster.leaders()), HANDOVER + 3,
                     "a coordinator after SIGTERM")  # fmt: skip
            handover = time.monotonic() - stopped
            stopping.alive = False
            assert exit_code.result() == 0
        third = cluster.leaders()[0]
        print(f"[election] SIGTERM of {second}: {third} leads after {handover:.2f} s")
        assert handover <= HANDOVER
        wait_for(lambda: one_leader_named_everywhere(cluster) == third, 10, "agreement")

    print(f"[election] leaders per sample: {dict(sampler.samples)}")
    assert sampler.doubles == []
    assert sampler.samples[1] > 0
