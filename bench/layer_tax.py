"""Per-layer tax: a pull through a peer against the same pull from a local Distribution.

Run as root (network namespaces, containerd)::

    .venv/bin/python bench/layer_tax.py                          # 10 MB in 4 layers, 5 rounds
    .venv/bin/python bench/layer_tax.py --layers 16 --size 10M --rounds 3
    .venv/bin/python bench/layer_tax.py --containerd 1.6

A 2-node ``spegeld_harness.Cluster`` (each node a network namespace with its own
containerd and ``spegeld run``; the upstream a Distribution registry, its link not
throttled: ``--upstream-rate 10gbit``). Every round builds a new image of ``--layers``
random layers (``--size`` in all), pushes it, and has node 1 pull it (through its mirror,
a miss: from the upstream). Once node 2's mirror finds every blob, node 2 pulls it twice,
the order alternating between rounds, ``ctr images rm --sync`` and a GC between:

* **peer**: ``ctr images pull`` through node 2's mirror, which proxies every blob from
  node 1's peer listener (signed requests);
* **local**: the same ``ctr images pull`` straight from the Distribution registry.

Then, from node 2's namespace, a keep-alive client (one ``http.client`` connection per
kind, ``--gets`` requests each, the median reported) times a single blob GET of one layer
through node 2's mirror and from the Distribution registry: this separates containerd's
behaviour from spegeld's. Per-layer tax = (peer - local) / layers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _spegel  # bench/_spegel.py, beside this script
from spegeld_harness import BuiltImage, Cluster, build_image, missing_requirement

PEER_BYTES = 'spegeld_bytes_served_total{source="peer"}'
# One blob GET timed from inside node 2's namespace: a keep-alive connection per URL,
# ``count`` GETs each, the seconds of each (headers to last byte included).
_CLIENT = r"""
import http.client, json, sys, time
host_urls = json.loads(sys.argv[1]); count = int(sys.argv[2]); out = {}
for name, (host, port, path) in host_urls.items():
    conn = http.client.HTTPConnection(host, port, timeout=10)
    times = []
    for _ in range(count):
        t = time.perf_counter()
        conn.request("GET", path)
        r = conn.getresponse(); body = r.read()
        times.append(time.perf_counter() - t)
        assert r.status == 200, (name, r.status)
    conn.close()
    out[name] = times
print(json.dumps(out))
"""


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process so far (``/proc/PID/stat`` fields 14 and 15)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """End the busy processes this script started, by PID."""
    for process in processes:
        process.kill()
        process.wait(timeout=10)


def parse_size(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="10M", help="image size, decimal (10M)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gets", type=int, default=20, help="blob GETs per kind per round")
    parser.add_argument("--containerd", choices=["1.6", "2.3"], default="2.3")
    parser.add_argument("--upstream-rate", default="10gbit")
    parser.add_argument(
        "--busy", type=int, default=0, help="spin this many busy processes (niceness: the "
        "daemons') while measuring: CPUs taken, as in a 5-node rolling pull on 2 cores",
    )  # fmt: skip
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--src", type=Path, help="run the daemons from this source tree (PYTHONPATH), e.g. "
        "an older commit's src/ from git archive, for a before/after comparison",
    )  # fmt: skip
    parser.add_argument(
        "--ab", type=Path, help="a second source tree: every round restarts both daemons "
        "from --src (or this tree), then from this one (the order alternating) and measures "
        "each in the same cluster and minute: a before/after comparison on a noisy machine",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.layers <= 64 or not 1 <= args.rounds <= 50 or not 1 <= args.gets <= 500:
        parser.error("need 1 <= layers <= 64, 1 <= rounds <= 50, 1 <= gets <= 500")
    if not 0 <= args.busy <= 8:
        parser.error("need 0 <= busy <= 8")
    bin_dir = None
    if args.containerd == "2.3":
        bin_dir, why = _spegel.component_path("containerd")
        if bin_dir is None:
            print(f"layer_tax: no containerd 2.3 ({why}); --containerd 1.6", file=sys.stderr)
            return 2
    problem = missing_requirement(bin_dir)
    if problem is not None:
        print(f"layer_tax: {problem}", file=sys.stderr)
        return 2
    if args.src is not None:
        os.environ["PYTHONPATH"] = str(args.src.absolute())  # the daemons inherit it
    size = parse_size(args.size)
    per_layer = size // args.layers
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} CPUs, Linux {platform.release()}, load {load:.1f}; "
          f"{args.size} in {args.layers} layers, {args.rounds} rounds, containerd "
          f"{args.containerd}, {args.busy} busy processes", flush=True)  # fmt: skip
    rows: list[dict[str, object]] = []
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="layer-tax-") as tmp,
        Cluster(
            nodes_wanted=2,
            upstream_rate=args.upstream_rate,
            containerd_bin_dir=bin_dir,
            spegeld_args=("--tag-quorum", "1"),
        ) as cluster,
    ):
        holder, puller = cluster.nodes
        busy = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
        ]
        stack.callback(_stop, busy)
        direct = Path(tmp) / "direct-certs.d"
        upstream = f"http://{cluster.upstream_address}"
        (direct / cluster.upstream_address).mkdir(parents=True)
        (direct / cluster.upstream_address / "hosts.toml").write_text(
            f'server = "{upstream}"\n\n[host."{upstream}"]\n  capabilities = ["pull", "resolve"]\n'
        )
        variants: list[Path | None] = [args.src] if args.ab is None else [args.src, args.ab]
        for r in range(args.rounds):
            image = build_image(f"bench.local/tax:r{r}", [per_layer] * args.layers, seed=1000 + r)
            reference = cluster.push(image, "bench/tax", f"r{r}")
            cluster.pull(holder, reference)
            order = variants if r % 2 == 0 else variants[::-1]
            for src in order:
                if args.ab is not None:
                    _run_from(cluster, src)
                cluster.wait_findable(reference, image, [puller])
                row = _measure(cluster, reference, image, direct, size, args, r)
                label = str(src) if src is not None else "this tree"
                rows.append({**row, "src": label})
                print(f"round {r} ({label}): peer {row['peer']:.3f} s, local "
                      f"{row['local']:.3f} s, ratio {row['peer'] / row['local']:.2f}, tax/layer "
                      f"{(row['peer'] - row['local']) / args.layers * 1000:.1f} ms; one "
                      f"{per_layer / 1e6:.1f} MB blob GET: mirror {row['get_mirror'] * 1000:.1f}"
                      f" ms, upstream {row['get_upstream'] * 1000:.1f} ms; server CPU per GET: "
                      f"mirror + peer {row['cpu_mirror'] * 1000:.1f} ms (mirror "
                      f"{row['cpu_edge'] * 1000:.1f}), Distribution "
                      f"{row['cpu_upstream'] * 1000:.1f} ms", flush=True)  # fmt: skip
    for src in variants:
        label = str(src) if src is not None else "this tree"
        _summary(label, [row for row in rows if row["src"] == label], args.layers)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({"args": vars(args) | {"json_out": None},
                                             "rows": rows}, indent=1, default=str))  # fmt: skip
    return 0


def _run_from(cluster: Cluster, src: Path | None) -> None:
    """Restart every node's spegeld with ``src`` (PYTHONPATH; None: this tree)."""
    for node in cluster.nodes:
        assert node.spegeld is not None
        env = {k: v for k, v in (node.spegeld.env or {}).items() if k != "PYTHONPATH"}
        if src is not None:
            env["PYTHONPATH"] = str(src.absolute())
        node.spegeld.env = env
        node.spegeld.restart()
        cluster.track(node.spegeld.pid)


def _measure(
    cluster: Cluster,
    reference: str,
    image: BuiltImage,
    direct: Path,
    size: int,
    args: argparse.Namespace,
    r: int,
) -> dict[str, float]:
    """One round for the code now running: the two pulls on node 2 (order by round), then
    the blob GETs of one layer through the mirror and from Distribution."""
    holder, puller = cluster.nodes
    times: dict[str, float] = {}
    for kind in ("peer", "local") if r % 2 == 0 else ("local", "peer"):
        hosts = puller.hosts_dir if kind == "peer" else direct
        before = puller.metric(PEER_BYTES)
        started = time.monotonic()
        puller.containerd.ctr("images", "pull", "--hosts-dir", str(hosts), reference,
                              timeout=600)  # fmt: skip
        times[kind] = time.monotonic() - started
        peer_bytes = puller.metric(PEER_BYTES) - before
        if (peer_bytes >= size) != (kind == "peer"):
            raise RuntimeError(f"{kind} pull took {peer_bytes:.0f} bytes from peers")
        puller.containerd.remove_image(reference)
        puller.containerd.gc()
    layer = image.platforms[0].layers[0]
    ns = f"?ns={cluster.upstream_address}"
    urls = {
        "mirror": [puller.address, 5000, f"/v2/bench/tax/blobs/{layer}{ns}"],
        "upstream": [cluster.upstream_address.split(":")[0], 5000,
                     f"/v2/bench/tax/blobs/{layer}"],
    }  # fmt: skip
    gets: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for kind, url in urls.items():
        servers = [puller.spegeld, holder.spegeld] if kind == "mirror" else [cluster.upstream]
        pids = [server.pid if server is not None else None for server in servers]
        before_cpu = sum(cpu_seconds(pid) for pid in pids)
        before_edge = cpu_seconds(pids[0])
        out = subprocess.run(
            ["ip", "netns", "exec", puller.netns, sys.executable, "-c", _CLIENT,
             json.dumps({kind: url}), str(args.gets)],
            capture_output=True, text=True, timeout=300, check=True,
        ).stdout  # fmt: skip
        cpu[kind] = (sum(cpu_seconds(pid) for pid in pids) - before_cpu) / args.gets
        if kind == "mirror":  # node 2's spegeld alone (the rest: node 1's, the holder)
            cpu["edge"] = (cpu_seconds(pids[0]) - before_edge) / args.gets
        gets[kind] = statistics.median(json.loads(out)[kind])
    return {"round": r, **times, **{f"get_{k}": v for k, v in gets.items()},
            **{f"cpu_{k}": v for k, v in cpu.items()}}  # fmt: skip


def _summary(label: str, rows: list[dict[str, object]], layers: int) -> None:
    def med(key: str) -> float:
        return statistics.median(float(str(row[key])) for row in rows)

    ratios = sorted(float(str(row["peer"])) / float(str(row["local"])) for row in rows)
    peer, local = med("peer"), med("local")
    print(f"{label}, median of {len(rows)}: peer {peer:.3f} s, local {local:.3f} s, ratio "
          f"{peer / local:.2f} (median of the rounds' ratios "
          f"{statistics.median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}), "
          f"tax/layer {(peer - local) / layers * 1000:.1f} ms; blob GET mirror "
          f"{med('get_mirror') * 1000:.1f} ms, upstream {med('get_upstream') * 1000:.1f} ms; "
          f"server CPU per GET mirror + peer {med('cpu_mirror') * 1000:.1f} ms (mirror "
          f"{med('cpu_edge') * 1000:.1f}), Distribution "
          f"{med('cpu_upstream') * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
