"""The API server's packets are dropped: the daemons stay up, share images, and say why.

Three namespaces on a bridge: a real etcd + kube-apiserver (tests/realkube, RBAC from
deploy/rbac.yaml, the kubeconfig minted by TokenRequest as deploy/README.md says) in one,
two nodes (containerd + ``spegeld run`` each) in the others, the nodes seeding each other
with ``--peer``.
An nftables DROP on the API port is in place before the daemons start, the
situation behind ``dial tcp 10.10.0.1:443: i/o timeout``. Shown:

- both daemons become ready and gossip with each other (the election is not on
  the serving path);
- each logs the classified diagnosis ("packets dropped") once, not per retry, and
  reports it in ``/status``;
- ``ctr`` on node B pulls node A's image through B's mirror, every byte from A;
- once the rule is removed, a coordinator is elected without any restart.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from spegeld_harness import (
    HarnessUnavailable,
    NetnsContainerd,
    NetnsSpegeld,
    Network,
    build_image,
    host_platform,
    write_cluster_key,
)

from tests._support import wait_for
from tests.realkube._accounts import follow_readme
from tests.realkube._apiserver import RealKubeApi

pytestmark = [pytest.mark.containerd, pytest.mark.slow, pytest.mark.kubeapiserver]

SUBNET = "10.216.0"  # private to the namespaces this test creates
API_PORT = 6443
REGISTRY_PORT = 5000
GOSSIP_PORT = 7946
DROP_TABLE = "spegeld_test_drop"
POLL = 0.1


class Lab:
    def __init__(self, network: Network, tmp: Path) -> None:
        self.network = network
        self.api_ns, self.ns_a, self.ns_b = network.nodes
        self.api = RealKubeApi(tmp / "api", network.address(0), API_PORT, netns=self.api_ns)
        self.api.start()
        try:
            kubeconfig = follow_readme(self.api, tmp / "readme")
            self.drop()
        except BaseException:
            self.api.stop()
            raise
        key = write_cluster_key(tmp / "cluster.key")
        self.nodes: list[NetnsSpegeld] = []
        for i, netns in ((1, self.ns_a), (2, self.ns_b)):
            other = network.address(3 - i)
            containerd = NetnsContainerd(tmp / f"node-{i}-containerd", netns)
            self.nodes.append(
                NetnsSpegeld(
                    netns, tmp / f"node-{'ab'[i - 1]}", containerd,
                    host=network.address(i), port=REGISTRY_PORT, gossip_port=GOSSIP_PORT,
                    key_file=key, peers=[f"{other}:{GOSSIP_PORT}"], ready_timeout=30,
                    # No upstream: the tag comes from the one node that holds it.
                    extra_args=["--kubeconfig", str(kubeconfig), "--tag-quorum", "1"],
                )
            )  # fmt: skip

    def drop(self) -> None:
        self.network.nft(self.api_ns, f"""
table inet {DROP_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp dport {API_PORT} counter drop
    }}
}}
""")  # fmt: skip

    def undrop(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.api_ns, "nft", "delete", "table", "inet",
                        DROP_TABLE], capture_output=True, timeout=30, check=True)  # fmt: skip

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            node.containerd.close()
        self.api.stop()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    network = Network(3, SUBNET, prefix="spge")
    try:
        try:
            network.create()
        except HarnessUnavailable as exc:
            pytest.fail(f"{exc} (this test must not be skipped)")
        built = Lab(network, tmp_path)
        try:
            for node in built.nodes:
                node.containerd.start()
            # Together: each names the other as its seed, and is ready once it has joined.
            with ThreadPoolExecutor(max_workers=2) as pool:
                for started in [pool.submit(node.start) for node in built.nodes]:
                    started.result()
            yield built
        finally:
            built.close()
    finally:
        network.close()


def log_lines(node: NetnsSpegeld) -> list[dict[str, Any]]:
    lines = []
    for line in node.log_path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def dropped_warnings(node: NetnsSpegeld) -> list[str]:
    return [
        r["msg"] for r in log_lines(node)
        if r.get("level") == "warning" and "packets dropped" in r.get("msg", "")
    ]  # fmt: skip


def test_dropped_api_packets_are_diagnosed_while_images_are_shared(
    lab: Lab, tmp_path: Path
) -> None:
    node_a, node_b = lab.nodes
    for node in lab.nodes:
        assert node.get("/readyz")[0] == 200

    # Each daemon names the cause, once, and reports it.
    def diagnosed(node: NetnsSpegeld) -> bool:
        election = node.status()["election"]
        return "packets dropped" in (election.get("last_error") or "")

    took = wait_for(lambda: all(diagnosed(n) for n in lab.nodes), 30, "the diagnosis")
    status = node_a.status()["election"]
    print(f"\n[drop] diagnosed after {took:.1f} s: {status['last_error'][:150]}")
    assert status["role"] != "leader"
    assert "packets dropped" in status["preflight"]
    assert status["consecutive_failures"] >= 1

    # Images are shared all the same: B pulls A's image through B's mirror.
    image = build_image("example.com/team/dropped:v1", [300_000, 40_000], seed=71)
    node_a.containerd.import_image(image.write_oci_archive(tmp_path / "image.tar"))
    hosts_dir = tmp_path / "hosts-b"
    subprocess.run(
        [sys.executable, "-m", "spegeld", "configure", "containerd", "--config-path", str(hosts_dir),
         "--mirror-target", node_b.url, "--mirrored-registries", "https://example.com"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    layer = image.platforms[0].layers[0]
    wait_for(lambda: node_b.get(f"/v2/team/dropped/blobs/{layer}?ns=example.com")[0] == 200,
             20, "B to learn A's keys")  # fmt: skip
    node_b.containerd.ctr("images", "pull", "--hosts-dir", str(hosts_dir), image.name)
    for digest in image.digests(host_platform()):
        assert node_b.containerd.blob_path(digest).read_bytes() == image.read_blob(digest)

    # Retries go on (backoff) without repeating the warning.
    settled = [len(dropped_warnings(n)) for n in lab.nodes]
    time.sleep(12)
    for node, before in zip(lab.nodes, settled, strict=True):
        warnings = dropped_warnings(node)
        print(f"[drop] {node.base_dir.name}: {len(warnings)} warning(s) naming the drop")
        assert 1 <= len(warnings) <= 2, warnings  # the preflight, and the election's streak
        assert len(warnings) == before
        assert node.status()["election"]["consecutive_failures"] >= 2

    # Remove the rule: a coordinator is elected, no restart needed.
    pids = [node.pid for node in lab.nodes]
    lab.undrop()
    took = wait_for(
        lambda: sum(n.status()["election"]["role"] == "leader" for n in lab.nodes) == 1,
        45, "a coordinator once the API is reachable",
    )  # fmt: skip
    leader = next(n for n in lab.nodes if n.status()["election"]["role"] == "leader")
    print(f"[drop] rule removed: {leader.base_dir.name} leads after {took:.1f} s")
    assert [node.pid for node in lab.nodes] == pids
    wait_for(
        lambda: all(n.status()["coordinator"] == leader.base_dir.name for n in lab.nodes),
        10, "both nodes to name the coordinator",
    )  # fmt: skip
