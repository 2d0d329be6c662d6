"""Chaos soak: a real cluster rolls images out while a seeded fault injector attacks it.

Run as root (network namespaces, nft, tc, containerd)::

    .venv/bin/python bench/soak.py --duration 900               # 5 nodes, 20 images
    .venv/bin/python bench/soak.py --quick --json-out soak.json # 4 nodes, about 90 s
    .venv/bin/python bench/soak.py --quick --containerd 2.3     # the nodes on containerd 2.3

The cluster is ``spegeld_harness.Cluster``: every node a network namespace with its own
containerd (``--containerd``: Debian's 1.6 from PATH, the default, or the 2.3 that
``scripts/build-components`` builds) and ``spegeld run``, the upstream a Distribution
registry behind a 100 Mbit/s ``tc tbf`` link. Images of mixed sizes (1-64 MiB, 1-5
layers; ``--quick``: 1-4 MiB) are pushed to the upstream, then rolled out one after the
other (``bench/_soak_rollout.py``): a random first node pulls from the upstream, then the
others, ``--parallel`` at a time, each a real
``ctr images pull`` inside its namespace through the mirror. When all images are out, they
are removed from every node and the next round starts, until ``--duration`` has passed
(and at least one full round is done).

Meanwhile the injector (``bench/_faults.py``, seeded by ``--seed``) kills -9 and restarts
containerd, SIGKILLs (and restarts) and SIGSTOPs (then SIGCONTs) spegeld, cuts a node
from its peers with nft, puts a byte-flipping proxy in front of one node's registry port
for its peers, floods gossip ports with garbage UDP, holds slowloris connections and sends
the hostile HTTP set (``bench/_soak_agent.py``). Every sender runs inside the cluster's
namespaces. Definitions of the reported times are in ``bench/_soak_report.py``.

The run fails (exit 1) unless: no spegeld exits that the injector did not cause, and every
one it killed starts again; no containerd holds a blob whose bytes do not hash to its
digest; every pull completes (a pull cut by a containerd or spegeld kill on its own node
is retried after the fault ends, and a pull that met a peer serving corrupt bytes is
retried at once, as kubelet would, while that peer still lies; at most ``PULL_ATTEMPTS``
attempts in all, and the report says so); every daemon's
peak RSS and open fds stay under ``RSS_LIMIT_MIB`` and ``FD_LIMIT``; every daemon answers
/healthz at the end; every fault kind was injected.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from _faults import AGENT, KINDS, Daemons, Injector, plan
from _soak_report import (
    ContentCheck,
    Resources,
    error_lines,
    final_checks,
    hostile_answers,
    mirror_waits,
    pull_times,
    render,
)
from _soak_rollout import Rollout, SoakImage, make_images
from _spegel import component_path
from spegeld_harness import (
    Cluster,
    HarnessUnavailable,
    missing_requirement,
)

MiB = 1 << 20
REGISTRY_PORT = 5000
# --containerd: None runs Debian's containerd from PATH; a name, the build of that component.
CONTAINERDS: dict[str, str | None] = {"1.6": None, "2.3": "containerd"}
# MiB. Measured peak (VmHWM) 70 MiB in a 120 s run of the full configuration, under
# 300 slowloris connections and parallel 64 MiB proxied pulls; the Python runtime alone is
# about 57 MiB. Twice the peak plus room for a few more proxied streams' hash backlogs
# (8 MiB each): a daemon past this grows with the load instead of being bounded by it.
RSS_LIMIT_MIB = 160
FD_LIMIT = 1100  # the server's connection cap (1024) plus the daemon's own files and sockets
SAMPLE_INTERVAL = 1.0  # seconds between /proc samples and exit checks
PROBE_INTERVAL = 0.5  # seconds between a node's mirror probes
PROBE_TIMEOUT = 30.0  # seconds a probe waits for the status line
JOIN_TIMEOUT = 30.0  # seconds the rollout gets to stop after Ctrl-C or a failure


def say(text: str) -> None:
    print(text, flush=True)


def start_probes(cluster: Cluster, work: Path, hit_file: Path, seconds: float) -> dict[str, Any]:
    probes: dict[str, Any] = {}
    for node in cluster.nodes:
        out = work / f"probe-{node.name}.jsonl"
        argv = [
            "ip",
            "netns",
            "exec",
            node.netns,
            sys.executable,
            str(AGENT),
            "probe",
            "--target",
            f"{node.address}:{REGISTRY_PORT}",
            "--ns",
            cluster.upstream_address,
            "--hit-file",
            str(hit_file),
            "--out",
            str(out),
            "--interval",
            str(PROBE_INTERVAL),
            "--timeout",
            str(PROBE_TIMEOUT),
            "--duration",
            str(seconds),
        ]
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        cluster.track(proc.pid)
        probes[node.name] = (proc, out)
    return probes


def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    low, high = (1, 4) if args.quick else (1, 64)
    say(f"building {args.images} images ({low}-{high} MiB, seed {args.seed})")
    built = make_images(rng, args.images, low, high, work / "images")
    summary: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    }
    with Cluster(
        nodes_wanted=args.nodes,
        base_dir=work / "cluster",
        containerd_bin_dir=args.containerd_bin_dir,
        progress=say,
    ) as cluster:
        summary["containerd_version"] = version = cluster.containerd_version
        if not version.lstrip("v").startswith(args.containerd + "."):
            raise HarnessUnavailable(f"--containerd {args.containerd}, but the nodes run {version}")
        images = [
            SoakImage(f"soak/img-{i:02d}", b, cluster.push(b, f"soak/img-{i:02d}", "v1"))
            for i, b in enumerate(built)
        ]
        hit_file = work / "hit-path"
        resources, content = Resources(), ContentCheck()
        daemons = Daemons(cluster, say)
        corrupt_node = rng.randrange(len(cluster.nodes))
        events = plan(
            rng,
            nodes=len(cluster.nodes),
            duration=args.duration,
            quick=args.quick,
            corrupt_node=corrupt_node,
        )
        say(
            f"plan: {len(events)} faults over {args.duration:.0f} s; corrupt peer "
            f"{cluster.nodes[corrupt_node].name}"
        )
        injector = Injector(cluster, daemons, work, say, blob_path=lambda: "")
        rollout = Rollout(cluster, images, injector, content, rng, args, hit_file)
        injector.blob_path = rollout.blob_path
        probes: dict[str, Any] = {}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(SAMPLE_INTERVAL):
                daemons.check()
                resources.sample(cluster.nodes)

        sampler = threading.Thread(target=sample, daemon=True)
        t0 = time.monotonic()
        workers = [
            sampler,
            threading.Thread(target=injector.run, args=(events, t0), daemon=True),
            threading.Thread(target=rollout.run, args=(t0,), daemon=True),
        ]
        undone: list[str] = []
        try:
            probes.update(start_probes(cluster, work, hit_file, args.duration * 4 + 600))
            for worker in workers:
                worker.start()
            while workers[2].is_alive():
                workers[2].join(1.0)
            say(f"rollout ended at {time.monotonic() - t0:.0f} s: {rollout.rounds_done} rounds")
        finally:
            # A second Ctrl-C must not cut the undoing short (stopped daemons, nft tables).
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            rollout.stop.set()
            undone = injector.restore()
            _join(workers[2])
            for proc, _ in probes.values():
                proc.kill()
                proc.wait(10)
            sampling.set()
            _join(sampler)
        daemons.check()  # the last word on exits (not after Ctrl-C: no restarts then)
        summary["wall_seconds"] = round(time.monotonic() - t0, 1)
        summary["restored"] = undone
        summary.update(final_checks(cluster, resources, content))
        summary.update(
            images=[
                {
                    "repository": i.repository,
                    "mib": round(i.blob_bytes / MiB, 1),
                    "layers": len(i.image.platforms[0].layers),
                }
                for i in images
            ],
            rounds=rollout.rounds_done,
            images_rolled=rollout.images_rolled,
            rollout_error=rollout.error,
            pulls=[
                {**p, "start": round(p["start"] - t0, 2), "end": round(p["end"] - t0, 2)}
                for p in rollout.pulls
            ],
            faults=[
                {
                    "kind": f.kind,
                    "node": f.node,
                    "start": round(f.start - t0, 2),
                    "seconds": round(f.end - f.start, 2),
                    "detail": f.detail,
                }
                for f in injector.injected
            ],
            skipped_faults=injector.skipped,
            corrupt_node=cluster.nodes[corrupt_node].name,
            unexpected_exits=daemons.unexpected,
            restart_failures=daemons.restart_failures,
            spegeld_pids=daemons.pids,
            mirror_wait=mirror_waits({n: p for n, (_, p) in probes.items()}, injector.injected),
            pull_seconds=pull_times(rollout.pulls, injector.injected),
            hostile_answers=hostile_answers(injector.injected),
            log_errors=error_lines(
                {n.name: n.spegeld.log_path for n in cluster.nodes if n.spegeld is not None}
            ),
        )
    return summary


def verdict(summary: dict[str, Any]) -> dict[str, bool]:
    res = summary["resources"].values()
    injected = {f["kind"] for f in summary["faults"] if "error" not in f["detail"]}
    return {
        "no unexpected spegeld exits": not summary["unexpected_exits"],
        "every killed spegeld started again": not summary["restart_failures"],
        "no corrupt blob committed": not summary["corrupt_blobs"],
        "every pull completed": all(p.get("ok") for p in summary["pulls"])
        and summary["rounds"] >= 1
        and summary["rollout_error"] is None,
        f"peak RSS <= {RSS_LIMIT_MIB} MiB": all(r["peak_rss_mib"] <= RSS_LIMIT_MIB for r in res),
        f"peak fds <= {FD_LIMIT}": all(r["peak_fds"] <= FD_LIMIT for r in res),
        "every daemon answers /healthz": all(s == 200 for s in summary["healthz"].values()),
        "every fault kind injected": injected >= set(KINDS),
    }


def containerd_bin_dir(version: str) -> Path | None:
    """Where the nodes' containerd and ctr are: None (PATH) or the pinned build's dir."""
    component = CONTAINERDS[version]
    if component is None:
        return None
    found, why = component_path(component)
    if found is None:
        raise HarnessUnavailable(
            f"containerd {version} is not built: run scripts/build-components {component} ({why})"
        )
    return found


def _join(thread: threading.Thread) -> None:
    if thread.ident is not None:  # started (Ctrl-C may come before)
        thread.join(JOIN_TIMEOUT)


def _interrupted(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=float, help="seconds of faults and pulls (default 900; --quick: 60)"
    )
    parser.add_argument("--nodes", type=int, help="cluster size (default 5; --quick: 4)")
    parser.add_argument("--images", type=int, help="images to roll (default 20; --quick: 4)")
    parser.add_argument("--seed", type=int, default=1, help="the fault plan and images")
    parser.add_argument("--parallel", type=int, default=2, help="pulls at once after the first")
    parser.add_argument("--quick", action="store_true", help="a short run: every fault once")
    parser.add_argument(
        "--containerd",
        choices=sorted(CONTAINERDS),
        default="1.6",
        help="the nodes' containerd: Debian's 1.6 (default) or the 2.3 scripts/setup builds",
    )
    parser.add_argument("--json-out", type=Path, help="write the summary (JSON) here")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--keep-work", action="store_true", help="keep the logs and images")
    args = parser.parse_args()
    args.duration = args.duration or (60.0 if args.quick else 900.0)
    args.nodes = args.nodes or (4 if args.quick else 5)
    args.images = args.images or (4 if args.quick else 20)
    if not 2 <= args.nodes <= 20 or args.images < 1 or args.parallel < 1 or args.duration < 10:
        parser.error("need 2 <= nodes <= 20, images >= 1, parallel >= 1, duration >= 10")
    try:
        args.containerd_bin_dir = containerd_bin_dir(args.containerd)
    except HarnessUnavailable as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    problem = missing_requirement(args.containerd_bin_dir)
    if problem is not None:
        print(f"soak: {problem}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    work = Path(tempfile.mkdtemp(prefix="spegeld-soak-", dir=args.work_dir))
    say(
        f"soak: {args.nodes} nodes on containerd {args.containerd}, {args.images} images, "
        f"{args.duration:.0f} s, seed {args.seed}; load {os.getloadavg()[0]:.2f}; work dir {work}"
    )
    try:
        summary = soak(args, work)
    except (HarnessUnavailable, KeyboardInterrupt) as exc:
        print(f"soak: stopped: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    summary["verdict"] = verdict(summary)
    summary["passed"] = all(summary["verdict"].values())
    for line in render(summary):
        say(line)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(summary, indent=1, default=str))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
