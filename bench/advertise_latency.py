"""Time from a layer's commit on node A to its availability through node B's mirror.

Run as root (it starts private containerds, a Distribution registry and two daemons)::

    .venv/bin/python bench/advertise_latency.py            # 10 runs per version and method
    .venv/bin/python bench/advertise_latency.py --quick    # smoke run: 3 runs

Method.  For each containerd version (Debian's 1.6, and the 2.3 built by
``scripts/build-components``): two private containerds and two real ``spegeld run``
daemons on 127.0.0.2 and 127.0.0.3, B seeded with A's gossip address, one cluster key.
Each run commits fresh content on A, and two threads time it with ``time.monotonic``:
one polls A's content directory every 1 ms for the blob's file (containerd renames it
into ``blobs/sha256`` just before the metadata commit that publishes ``/content/create``),
two more send ``HEAD /v2/<repo>/blobs/<digest>`` to A's and to B's mirror every 2 ms,
each over one kept-alive connection.  A answers 200 once its index holds the blob; B
once A's advertisement has reached B's gossip table and A serves the blob.  Latency =
first 200 - A's file; A's own figure splits the store's part from gossip's.

* ``pull``: ``ctr images pull --plain-http`` of a fresh image (4 layers of 4 MiB, random
  bytes, another seed each run) from a local Distribution registry, straight to A (no
  mirror).  The latency is that of the layer committed first, the one that waits longest
  for its image on 1.6.  The pull's own duration is printed beside it.
* ``ingest``: ``ctr content ingest`` of a fresh 1 MiB blob that no image will name.
  1.6 publishes no content event, so there the blob is never served (the run waits
  ``--ingest-wait`` seconds, then counts it as not served).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from spegeld_harness import (
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    containerd_unavailable_reason,
    write_cluster_key,
)

FILE_POLL = 0.001  # seconds between looks for the blob's file on A
HEAD_POLL = 0.002  # seconds between HEADs to B's mirror ("every few ms")
RUN_TIMEOUT = 30.0  # seconds a pull run may take before it counts as failed
PEERS_TIMEOUT = 20.0  # seconds for A and B to see each other alive
LAYER_SIZE = 4 * 1024 * 1024
LAYERS = 4
INGEST_SIZE = 1024 * 1024
REPO = "bench/latency"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timeline:
    """When each digest's file appeared on A, and when A and B first served it (monotonic)."""

    committed: dict[str, float] = field(default_factory=dict)
    served_a: dict[str, float] = field(default_factory=dict)
    served: dict[str, float] = field(default_factory=dict)  # by B's mirror


def _watch(
    digests: list[str],
    a: PrivateContainerd,
    nodes: tuple[SpegeldProcess, SpegeldProcess],
    ns: str,
    deadline: float,
) -> tuple[Timeline, Callable[[], None]]:
    """Start the pollers; the returned function waits for them (bounded by ``deadline``)."""
    timeline = Timeline()

    def files() -> None:
        waiting = {d: a.blob_path(d) for d in digests}
        while waiting and time.monotonic() < deadline:
            for digest, path in list(waiting.items()):
                if path.exists():
                    timeline.committed[digest] = time.monotonic()
                    del waiting[digest]
            time.sleep(FILE_POLL)

    def heads(node: SpegeldProcess, served: dict[str, float]) -> None:
        waiting = set(digests)
        conn = http.client.HTTPConnection(node.host, node.port, timeout=5)
        try:
            while waiting and time.monotonic() < deadline:
                for digest in sorted(waiting):
                    conn.request("HEAD", f"/v2/{REPO}/blobs/{digest}?ns={ns}")
                    response = conn.getresponse()
                    response.read()
                    if response.status == 200:
                        served[digest] = time.monotonic()
                        waiting.discard(digest)
                time.sleep(HEAD_POLL)
        finally:
            conn.close()

    threads = [
        threading.Thread(target=files),
        threading.Thread(target=heads, args=(nodes[0], timeline.served_a)),
        threading.Thread(target=heads, args=(nodes[1], timeline.served)),
    ]
    for thread in threads:
        thread.start()

    def join() -> None:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 5)

    return timeline, join


def _latencies(timeline: Timeline, digest: str) -> tuple[float | None, float | None]:
    """(commit → served by A itself, commit → served by B), in seconds."""
    committed = timeline.committed.get(digest)
    if committed is None:
        return None, None
    a, b = timeline.served_a.get(digest), timeline.served.get(digest)
    return (a - committed if a else None), (b - committed if b else None)


def pull_run(
    n: int, a: PrivateContainerd, nodes: tuple[SpegeldProcess, SpegeldProcess],
    upstream: UpstreamRegistry,
) -> tuple[float | None, float | None, float]:  # fmt: skip
    """(first committed layer → served by A, → served by B, pull duration), in seconds."""
    image = build_image(f"example.com/{REPO}:r{n}", [LAYER_SIZE] * LAYERS, seed=1000 + n)
    ref = upstream.push(image, REPO, f"r{n}")
    layers = list(image.platforms[0].layers)
    timeline, join = _watch(layers, a, nodes, upstream.address, time.monotonic() + RUN_TIMEOUT)
    start = time.monotonic()
    a.ctr("images", "pull", "--plain-http", ref, timeout=RUN_TIMEOUT)
    pulled = time.monotonic() - start
    join()
    if not timeline.committed:
        return None, None, pulled
    first = min(timeline.committed, key=timeline.committed.__getitem__)
    latencies = _latencies(timeline, first)
    if None in latencies:
        status, _, _ = nodes[0].get(
            f"/v2/{REPO}/blobs/{first}?ns={upstream.address}", method="HEAD"
        )
        print(
            f"  run {n}: {first} committed on A but not served (A: {latencies[0]}, B: "
            f"{latencies[1]}; A answers {status} now; served on A: {sorted(timeline.served_a)}; "
            f"committed: {timeline.committed})",
            file=sys.stderr,
        )
    return (*latencies, pulled)


def ingest_run(
    a: PrivateContainerd, nodes: tuple[SpegeldProcess, SpegeldProcess], wait: float
) -> tuple[float | None, float | None]:
    """(commit → served by A, → served by B), in seconds; None: not served within ``wait``."""
    data = os.urandom(INGEST_SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    timeline, join = _watch([digest], a, nodes, "example.com", time.monotonic() + wait)
    a.ctr(
        "content", "ingest", "--expected-digest", digest,
        "--expected-size", str(len(data)), f"bench-{digest[7:19]}", input=data,
    )  # fmt: skip
    join()
    return _latencies(timeline, digest)


def _component_dir(name: str) -> Path:
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-components"), "--print-path", name],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"{name} is not built: run scripts/build-components {name}")
    return Path(result.stdout.strip())


def _wait_peers(a: SpegeldProcess, b: SpegeldProcess) -> None:
    deadline = time.monotonic() + PEERS_TIMEOUT
    while time.monotonic() < deadline:
        views = [node.status()["gossip"]["peers"] for node in (a, b)]
        if all(len(v) == 1 and v[0]["state"] == "alive" for v in views):
            return
        time.sleep(0.05)
    sys.exit("A and B did not see each other alive")


def _fmt(values: list[float | None]) -> str:
    got = sorted(v for v in values if v is not None)
    missing = len(values) - len(got)
    if not got:
        return f"not served in any of {len(values)} runs"
    text = (
        f"median {statistics.median(got) * 1000:7.1f} ms   min {got[0] * 1000:7.1f}   "
        f"max {got[-1] * 1000:7.1f}   (n={len(got)})"
    )
    return text + (f"   not served: {missing}" if missing else "")


def bench_version(label: str, bin_dir: Path | None, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="spg-lat-") as tmp:
        base = Path(tmp)
        with (
            PrivateContainerd(base / "a-containerd", bin_dir=bin_dir) as ca,
            PrivateContainerd(base / "b-containerd", bin_dir=bin_dir) as cb,
            UpstreamRegistry(base / "upstream") as upstream,
        ):
            key = write_cluster_key(base / "cluster.key")
            a = SpegeldProcess(base / "node-a", ca, host="127.0.0.2", key_file=key)
            with a:
                b = SpegeldProcess(
                    base / "node-b", cb, host="127.0.0.3", key_file=key,
                    peers=[a.gossip_address],
                )  # fmt: skip
                with b:
                    _wait_peers(a, b)
                    pulls = [pull_run(n, ca, (a, b), upstream) for n in range(args.runs)]
                    ingests = [ingest_run(ca, (a, b), args.ingest_wait) for _ in range(args.runs)]
        print(f"containerd {ca.version} ({label})")
        print(f"  pull:   commit → served by B  {_fmt([p[1] for p in pulls])}")
        print(f"          commit → served by A  {_fmt([p[0] for p in pulls])}")
        print(f"          pull duration         {_fmt([p[2] for p in pulls])}")
        print(f"  ingest: commit → served by B  {_fmt([i[1] for i in ingests])}")
        print(f"          commit → served by A  {_fmt([i[0] for i in ingests])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per version and method")
    parser.add_argument("--quick", action="store_true", help="3 runs per version and method")
    parser.add_argument(
        "--ingest-wait", type=float, default=3.0,
        help="seconds an ingest run waits for B to serve the blob",
    )  # fmt: skip
    parser.add_argument("--only", choices=["1.6", "2.3"], help="one containerd version only")
    args = parser.parse_args()
    if args.quick:
        args.runs = 3
    reason = containerd_unavailable_reason()
    if reason is not None:
        sys.exit(reason)
    print(
        f"{LAYERS} layers x {LAYER_SIZE // 2**20} MiB per pull, {INGEST_SIZE // 2**20} MiB per "
        f"ingest, {args.runs} runs each; HEAD to B every {HEAD_POLL * 1000:.0f} ms"
    )
    if args.only in (None, "1.6"):
        bench_version("Debian", None, args)
    if args.only in (None, "2.3"):
        bench_version("built", _component_dir("containerd"), args)


if __name__ == "__main__":
    main()
