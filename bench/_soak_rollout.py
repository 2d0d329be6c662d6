"""The soak's rollout: images rolled through the cluster, node after node, as kubelet would.

A random first node pulls each image from the upstream, then the others, ``--parallel`` at
a time, each a real ``ctr images pull`` inside its namespace through the mirror. A pull cut
by a fault on its own node is retried after the fault (the rules: ``bench/soak.py``).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _faults import CUTTING_FAULTS, Injector
from _soak_report import ContentCheck
from spegeld_harness import BuiltImage, Cluster, CtrError, Node, build_image

MiB = 1 << 20
# Seconds one ctr pull may take before it counts as hung: 64 MiB over the 100 Mbit/s
# upstream takes 5.4 s, a SIGSTOPped mirror holds containerd at most 8 s.
PULL_TIMEOUT = 300.0
PULL_ATTEMPTS = 4  # a pull cut by a kill on its own node; more would hide a real failure
FAULT_WAIT = 120.0  # seconds a cut pull waits for its node's fault to end before retrying


def say(text: str) -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class SoakImage:
    repository: str
    image: BuiltImage
    ref: str

    @property
    def blob_bytes(self) -> int:
        plat = self.image.platforms[0]
        return sum(self.image.blobs[d].size for d in (*plat.layers, plat.config))


def make_images(rng: random.Random, count: int, low: int, high: int, work: Path) -> list[Any]:
    """``count`` images, total size log-uniform in [low, high] MiB, 1-5 layers each."""
    built = []
    for i in range(count):
        total = int(MiB * low * (high / low) ** rng.random())
        layers = rng.randint(1, 5 if high > 8 else 3)
        cuts = sorted(rng.sample(range(1, total), layers - 1)) if layers > 1 else []
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
        name = f"soak.local/img-{i:02d}:v1"
        built.append(
            build_image(
                name,
                sizes,
                seed=rng.randrange(1 << 30),
                compresslevel=0,
                workdir=work / f"img-{i:02d}",
            )
        )
    return built


class Rollout:
    def __init__(
        self,
        cluster: Cluster,
        images: list[SoakImage],
        injector: Injector,
        content: ContentCheck,
        rng: random.Random,
        args: argparse.Namespace,
        hit_file: Path,
    ) -> None:
        self.cluster = cluster
        self.images = images
        self.injector = injector
        self.content = content
        self.rng = rng
        self.args = args
        self.hit_file = hit_file
        self.current = images[0]
        self.stop = threading.Event()
        self.pulls: list[dict[str, Any]] = []
        self.rounds_done = 0
        self.images_rolled = 0
        self.error: str | None = None

    def blob_path(self) -> str:
        layers = self.current.image.platforms[0].layers
        biggest = max(layers, key=lambda d: self.current.image.blobs[d].size)
        return f"/v2/{self.current.repository}/blobs/{biggest}?ns={self.cluster.upstream_address}"

    def run(self, t0: float) -> None:
        try:
            while not self.stop.is_set():
                order = self.rng.sample(self.images, len(self.images))
                for item in order:
                    if self.stop.is_set():
                        return
                    self._roll(item)
                self.rounds_done += 1
                say(f"round {self.rounds_done} done at {time.monotonic() - t0:.0f} s")
                if time.monotonic() - t0 >= self.args.duration:
                    return
                for node in self.cluster.nodes:
                    self._remove(node)
        except BaseException as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise

    def _roll(self, item: SoakImage) -> None:
        self.current = item
        self.hit_file.write_text(
            f"/v2/{item.repository}/manifests/v1?ns={self.cluster.upstream_address}\n"
        )
        order = self.rng.sample(self.cluster.nodes, len(self.cluster.nodes))
        now = time.monotonic()
        for node in list(order):
            if any(f.kind == "corrupt-peer" for f in self.injector.faults_at(node.name, now, now)):
                # The corrupting node pulls first, so that the others' pulls (from their
                # mirrors, from peers) meet it: the fault is exercised, not left to chance.
                order.remove(node)
                order.insert(0, node)
        batches = [order[:1]] + [
            order[i : i + self.args.parallel] for i in range(1, len(order), self.args.parallel)
        ]
        for batch in batches:
            threads = [threading.Thread(target=self._pull, args=(n, item)) for n in batch]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.images_rolled += 1

    def _pull(self, node: Node, item: SoakImage) -> None:
        first = time.monotonic()
        retried: list[str] = []
        record: dict[str, Any] = {
            "node": node.name,
            "image": item.repository,
            "mib": round(item.blob_bytes / MiB, 1),
            "start": first,
        }
        for attempt in range(1, PULL_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                node.containerd.ctr(
                    "images",
                    "pull",
                    "--hosts-dir",
                    str(node.hosts_dir),
                    item.ref,
                    timeout=PULL_TIMEOUT,
                )
            except (CtrError, subprocess.TimeoutExpired) as exc:
                cutting = [
                    f.kind
                    for f in self.injector.faults_at(node.name, started, time.monotonic() + 0.5)
                    if f.kind in CUTTING_FAULTS
                ]
                message = getattr(exc, "stderr", None) or str(exc)
                if cutting and attempt < PULL_ATTEMPTS and not self.stop.is_set():
                    retried.append(f"{'+'.join(sorted(set(cutting)))}: {message.strip()[-200:]}")
                    self._wait_fault_end(node)
                    continue
                lying = self._corrupt_peers(node, started, time.monotonic() + 0.5)
                if lying and attempt < PULL_ATTEMPTS and not self.stop.is_set():
                    # A lying peer's bytes reach containerd before the digest can be
                    # checked (all but the last chunk), so the attempt that detects it
                    # fails; kubelet retries. The retry runs while the peer still lies:
                    # it must succeed because the liar is no longer asked.
                    retried.append(f"corrupt-peer@{'+'.join(lying)}: {message.strip()[-200:]}")
                    continue
                record.update(ok=False, error=str(message).strip()[-2000:], attempts=attempt)
                record["recovered_on_retry"] = self._diagnose(node, item)
                say(
                    f"  !! pull {item.repository} on {node.name} failed: "
                    f"{str(message).strip()[-300:]}"
                )
                break
            record.update(ok=True, attempts=attempt)
            break
        record["end"] = time.monotonic()
        record["seconds"] = round(record["end"] - first, 3)
        record["retried_because"] = retried
        self.pulls.append(record)
        self.content.check(node)

    def _corrupt_peers(self, node: Node, start: float, end: float) -> list[str]:
        """The other nodes that served corrupt bytes to their peers during [start, end]."""
        return sorted(
            other.name
            for other in self.cluster.nodes
            if other is not node
            and any(
                f.kind == "corrupt-peer" for f in self.injector.faults_at(other.name, start, end)
            )
        )

    def _diagnose(self, node: Node, item: SoakImage) -> bool:
        """Pull once more, for the report only: is the failure transient (a retry, as
        kubelet would make, completes) or does it persist? The failed pull stays failed."""
        try:
            node.containerd.ctr(
                "images", "pull", "--hosts-dir", str(node.hosts_dir), item.ref, timeout=PULL_TIMEOUT
            )
        except (CtrError, subprocess.TimeoutExpired):
            return False
        return True

    def _wait_fault_end(self, node: Node) -> None:
        deadline = time.monotonic() + FAULT_WAIT
        while time.monotonic() < deadline and not self.stop.is_set():
            now = time.monotonic()
            on = [
                f for f in self.injector.faults_at(node.name, now, now) if f.kind in CUTTING_FAULTS
            ]
            if not on and node.containerd.running:
                return
            time.sleep(0.2)

    def _remove(self, node: Node) -> None:
        for item in self.images:
            for _ in range(PULL_ATTEMPTS):
                try:
                    node.containerd.ctr("images", "rm", "--sync", item.ref, timeout=120)
                    break
                except (CtrError, subprocess.TimeoutExpired):
                    self._wait_fault_end(node)
