"""N real daemons electing a coordinator through a real kube-apiserver, on loopback.

Shared by tests/test_election_daemons.py and bench/failover.py. etcd and kube-apiserver
(tests/realkube) run on 127.0.0.1; ``deploy/rbac.yaml`` is applied and one ServiceAccount
kubeconfig is minted by following deploy/README.md (TokenRequest). Each node is a private
containerd plus ``spegeld run`` on its own loopback address, all holding one cluster key
and that kubeconfig; node 0 is the others' gossip seed. ``api.requests()`` lists every
request the ServiceAccount made, from the apiserver's audit log.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from spegeld_harness import PrivateContainerd, SpegeldProcess, write_cluster_key

from tests.realkube._accounts import follow_readme
from tests.realkube._apiserver import RealKubeApi


class Node:
    def __init__(self, containerd: PrivateContainerd, spegeld: SpegeldProcess) -> None:
        self.containerd = containerd
        self.spegeld = spegeld
        self.alive = True

    @property
    def name(self) -> str:
        return self.spegeld.base_dir.name

    def status(self) -> dict[str, Any] | None:
        if not self.alive:
            return None
        try:
            return self.spegeld.status()
        except (OSError, ValueError):
            return None  # stopping, or not answering this instant


class ElectingCluster:
    def __init__(self, base: Path, hosts: Sequence[str]) -> None:
        self.api = RealKubeApi(base / "api")
        self.api.start()
        try:
            self.kubeconfig = follow_readme(self.api, base / "readme")
            self._build_nodes(base, hosts)
        except BaseException:
            self.api.stop()
            raise

    def _build_nodes(self, base: Path, hosts: Sequence[str]) -> None:
        key = write_cluster_key(base / "cluster.key")
        self.nodes: list[Node] = []
        seed = None
        for i, host in enumerate(hosts):
            containerd = PrivateContainerd(base / f"node-{i}-containerd")
            spegeld = SpegeldProcess(
                base / f"node-{i}", containerd, host=host, key_file=key,
                peers=[] if seed is None else [seed],
                extra_args=["--kubeconfig", str(self.kubeconfig)],
            )  # fmt: skip
            seed = seed or spegeld.gossip_address
            self.nodes.append(Node(containerd, spegeld))

    def start(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
            for done in [pool.submit(n.containerd.start) for n in self.nodes]:
                done.result()
            self.nodes[0].spegeld.start()
            for done in [pool.submit(n.spegeld.start) for n in self.nodes[1:]]:
                done.result()

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def statuses(self) -> dict[str, dict[str, Any]]:
        return {n.name: s for n in self.nodes if (s := n.status()) is not None}

    def leaders(self) -> list[str]:
        return [name for name, s in self.statuses().items() if s["election"]["role"] == "leader"]

    def close(self) -> None:
        for node in self.nodes:
            node.spegeld.stop()
        for node in self.nodes:
            node.containerd.close()
        self.api.stop()
