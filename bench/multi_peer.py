"""One large blob held by several peers, each uplink rate-limited: multi-peer against single-peer.

Run as root (network namespaces, tc, containerd)::

    .venv/bin/python bench/multi_peer.py                       # 1 GiB, 4 peers, 1gbit and 200mbit
    .venv/bin/python bench/multi_peer.py --size 256M --rates 200mbit --rounds 3

Network namespaces on one bridge: ``--peers`` holder nodes (each its own containerd with
the blob imported, and ``spegeld run``) and one client node running two ``spegeld run``
mirrors: *multi* lists every holder (``--static-peer``), so it fetches disjoint ranges
from all of them at once (``mirror/_swarm.py``); *single* lists one holder, so it takes
today's one-source path. What leaves each holder's ``eth0`` is shaped by ``tc tbf`` to
the rate under test (the peer's uplink is the bottleneck); the client's link is not.

For each rate, each round GETs the blob through both mirrors, one after the other (the
order alternating between rounds), with ``curl -o /dev/null`` inside the client's
namespace; both mirrors check the blob's digest as they stream it. Printed: seconds and
MB/s per fetch, the median rate of each, their ratio (multi / single) and the CPU
seconds each client mirror used. The ratio is the figure; absolute rates are noisy here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from spegeld_harness import NetnsContainerd, NetnsSpegeld, Network, build_image
from spegeld_harness._netns import run

MIRROR_PORT = 5000
SINGLE_PORT = 5010  # the client's second mirror, the one-source baseline
GOSSIP_PORT = 5002  # unused (static peers), but the harness wants one it need not probe
PEER_PORT = 5001
NAME = "bench.local/team/huge"
FETCH_TIMEOUT = 900  # seconds: 1 GiB at 10 Mbit/s would take 860 s


def parse_size(text: str) -> int:
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def rate_bytes(rate: str) -> float:
    """tc's ``200mbit`` / ``1gbit`` → bytes per second."""
    scale = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for suffix, factor in scale.items():
        if rate.endswith(suffix):
            return float(rate.removesuffix(suffix)) * factor / 8
    raise SystemExit(f"rate {rate!r}: use kbit, mbit or gbit")


def limit(netns: str, rate: str) -> None:
    """Shape what leaves ``netns`` through eth0. The bucket holds 10 ms at the rate (at least
    256 KiB): a smaller one caps a fast rate below its nominal value (veth sends 64 KiB
    segments, and the bucket refills per timer tick)."""
    burst = max(256 * 1024, int(rate_bytes(rate) / 100))
    run(["ip", "netns", "exec", netns, "tc", "qdisc", "replace", "dev", "eth0", "root",
         "tbf", "rate", rate, "burst", str(burst), "latency", "200ms"])  # fmt: skip


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks (100 Hz)


def fetch(netns: str, address: str, port: int, digest: str) -> tuple[int, float, int]:
    """GET the blob through a mirror from inside ``netns``: (HTTP status, seconds, bytes)."""
    url = f"http://{address}:{port}/v2/team/huge/blobs/{digest}?ns=bench.local"
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "curl", "--silent", "--noproxy", "*", "-o", "/dev/null",
         "--max-time", str(FETCH_TIMEOUT), "-w", "%{http_code} %{time_total} %{size_download}",
         url],
        capture_output=True, text=True, timeout=FETCH_TIMEOUT + 30, check=False,
    ).stdout.split()  # fmt: skip
    return int(out[0]), float(out[1]), int(out[2])


def swarm_line(log: Path) -> str:
    """The multi mirror's last account of a swarm: splits, and the bytes from each peer."""
    lines = [line for line in log.read_text().splitlines() if "came from" in line]
    return json.loads(lines[-1])["msg"].partition(" (")[2] if lines else "(no swarm logged)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="the blob's size (default 1G)")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rates", default="1gbit,200mbit", help="comma separated, tc syntax")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="one JSON document at the end")
    args = parser.parse_args()
    size = parse_size(args.size)
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for rate in rates:
        rate_bytes(rate)
    network = Network(args.peers + 1, "10.231.7", prefix="spmp")
    processes: list[NetnsSpegeld] = []
    containerds: list[NetnsContainerd] = []
    results: dict[str, object] = {"size": size, "peers": args.peers, "rates": {}}
    with tempfile.TemporaryDirectory(prefix="multi-peer-") as tmp:
        base = Path(tmp)
        try:
            started = time.monotonic()
            image = build_image(f"{NAME}:v1", [size], seed=4242, workdir=base / "image",
                                compresslevel=0)  # fmt: skip
            archive = image.write_oci_archive(base / "image.tar")
            layer = image.platforms[0].layers[0]
            blob_size = image.blobs[layer].size
            print(f"built a {blob_size} byte blob in {time.monotonic() - started:.1f} s",
                  flush=True)  # fmt: skip
            network.create()
            client_ns, client_addr = network.nodes[-1], network.address(args.peers)
            for i in range(args.peers):
                ns = network.nodes[i]
                containerd = NetnsContainerd(base / f"peer{i}-containerd", ns)
                containerd.start()
                containerds.append(containerd)
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=2) as pool:  # 2 cores
                list(pool.map(lambda c: c.import_image(archive), containerds))
            print(f"imported into {args.peers} containerds in {time.monotonic() - started:.1f} s",
                  flush=True)  # fmt: skip
            (base / "image.tar").unlink()
            for i, containerd in enumerate(containerds):
                peer = NetnsSpegeld(
                    network.nodes[i], base / f"peer{i}", containerd, host=network.address(i),
                    port=MIRROR_PORT, gossip_port=GOSSIP_PORT, ready_timeout=60,
                    extra_args=["--static-peer", f"{client_addr}:{PEER_PORT}", "--log-level",
                                "info"],
                )  # fmt: skip
                processes.append(peer.start())
            holders = [f"{network.address(i)}:{PEER_PORT}" for i in range(args.peers)]
            client_containerd = NetnsContainerd(base / "client-containerd", client_ns)
            client_containerd.start()
            containerds.append(client_containerd)
            mirrors = {}
            for kind, port, peer_port, listed in (
                ("multi", MIRROR_PORT, PEER_PORT, holders),
                ("single", SINGLE_PORT, PEER_PORT + 10, holders[:1]),
            ):
                static = [a for h in listed for a in ("--static-peer", h)]
                mirror = NetnsSpegeld(
                    client_ns, base / f"client-{kind}", client_containerd, host=client_addr,
                    port=port, peer_port=peer_port, gossip_port=GOSSIP_PORT + 10 * len(mirrors),
                    ready_timeout=60, extra_args=[*static, "--log-level", "info"],
                )  # fmt: skip
                processes.append(mirror.start())
                mirrors[kind] = mirror
            for rate in rates:
                for i in range(args.peers):
                    limit(network.nodes[i], rate)
                rows: dict[str, list[float]] = {"multi": [], "single": []}
                cpu: dict[str, list[float]] = {"multi": [], "single": []}
                for r in range(args.rounds):
                    order = ["single", "multi"] if r % 2 == 0 else ["multi", "single"]
                    for kind in order:
                        mirror = mirrors[kind]
                        before = cpu_seconds(mirror.pid)
                        status, seconds, got = fetch(client_ns, client_addr, mirror.port, layer)
                        used = cpu_seconds(mirror.pid) - before
                        if status != 200 or got != blob_size:
                            raise SystemExit(f"{kind} at {rate}: HTTP {status}, {got} bytes")
                        rate_mb = got / seconds / 1e6
                        rows[kind].append(rate_mb)
                        cpu[kind].append(used)
                        print(f"{rate:>8} round {r + 1} {kind:>6}: {seconds:7.2f} s  "
                              f"{rate_mb:7.1f} MB/s  client mirror CPU {used:.1f} s",
                              flush=True)  # fmt: skip
                        if kind == "multi":
                            print(f"{'':>24}{swarm_line(mirror.log_path)}", flush=True)
                multi, single = statistics.median(rows["multi"]), statistics.median(rows["single"])
                nominal = rate_bytes(rate) / 1e6
                print(f"{rate:>8}: multi {multi:.1f} MB/s, single {single:.1f} MB/s "
                      f"(uplink {nominal:.1f} MB/s each): ratio {multi / single:.2f}x",
                      flush=True)  # fmt: skip
                results["rates"][rate] = {  # type: ignore[index]
                    "multi_MBps": rows["multi"], "single_MBps": rows["single"],
                    "ratio": round(multi / single, 2), "uplink_MBps": nominal,
                    "client_cpu_s": cpu,
                }  # fmt: skip
        finally:
            for process in processes:
                process.stop()
            for containerd in containerds:
                containerd.close()
            network.close()
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
