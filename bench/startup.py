"""Time ``spegeld run`` from process start to ``READY=1`` with 1000 local images.

Run as root (it starts a private containerd)::

    sudo .venv/bin/python bench/startup.py            # 1000 images, 5 starts
    sudo .venv/bin/python bench/startup.py --quick    # smoke run: 100 images, 2 starts

Method.  One private containerd is filled with N small images by a single ``ctr images
import`` (the generator of ``bench/store_index.py``: two 1-4 KiB layers per image, one of
16 shared base layers).  Then ``spegeld run`` is started ``--repeat`` times, each a fresh
process with a fresh state directory, alone (``--insecure-gossip``, no seeds, no
kubeconfig), against that same containerd.  This script plays systemd: it binds the
AF_UNIX datagram socket named by ``NOTIFY_SOCKET`` and times from just before ``Popen``
to the arrival of the ``READY=1`` datagram (the daemon sends it once the store has synced
and the router is ready, what ``/readyz`` says).  A thread polls ``/healthz`` every 5 ms
for the moment the HTTP server answers.  The daemon's own JSON log gives two more points
(wall clock, millisecond resolution): its first line (the interpreter has started and
imported spegeld) and ``store synced``.  Each process is stopped with SIGTERM by PID.

References, measured in the same run: ``ctr images ls`` + ``ctr content ls`` on the same
containerd (another process listing what spegeld indexes) and ``python -c "import
spegeld.app"`` (interpreter start plus import cost, a floor for any Python daemon).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from spegeld_harness import PrivateContainerd, SpegeldProcess, containerd_unavailable_reason

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
from store_index import NAMESPACE, generate_images, time_ctr, write_many_archive

TARGET = 2.0  # DESIGN.md §11: start to READY=1 with 1000 local images
READY_TIMEOUT = 30.0
HEALTHZ_POLL = 0.005


@dataclass
class Start:
    ready: float  # Popen -> READY=1 datagram
    healthz: float | None  # Popen -> first /healthz 200
    first_log: float | None  # Popen -> the daemon's first log line
    synced: float | None  # Popen -> the "store synced" log line
    synced_msg: str


class NotifySocket:
    """The AF_UNIX datagram socket systemd would bind for ``Type=notify``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_ready(self, timeout: float) -> float | None:
        """The monotonic time a datagram with ``READY=1`` arrived, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return None
            if "READY=1" in data.decode(errors="replace").splitlines():
                return time.monotonic()
        return None

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


def poll_healthz(node: SpegeldProcess, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        if node.get_or_none("/healthz") == 200:
            out.append(time.monotonic())
            return
        stop.wait(HEALTHZ_POLL)


def log_times(node: SpegeldProcess, wall0: float) -> tuple[float | None, float | None, str]:
    """Seconds from ``wall0`` to the first log line and to ``store synced``."""
    first = synced = None
    msg = ""
    for line in node.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            at = datetime.fromisoformat(record["time"]).timestamp() - wall0
        except (ValueError, KeyError, TypeError):
            continue
        if first is None:
            first = at
        if str(record.get("msg", "")).startswith("store synced"):
            synced, msg = at, record["msg"]
            break
    return first, synced, msg


def one_start(containerd: PrivateContainerd, work: Path, i: int) -> Start:
    base = work / f"node-{i}"
    base.mkdir()
    notify = NotifySocket(base / "notify.sock")
    node = SpegeldProcess(base, containerd, env={"NOTIFY_SOCKET": str(notify.path)})
    stop = threading.Event()
    healthz: list[float] = []
    poller = threading.Thread(target=poll_healthz, args=(node, stop, healthz), daemon=True)
    try:
        wall0 = time.time()
        t0 = time.monotonic()
        node.launch()
        poller.start()
        ready_at = notify.wait_ready(READY_TIMEOUT)
        if ready_at is None:
            raise SystemExit(f"no READY=1 within {READY_TIMEOUT} s\n{node.log_tail()}")
        poller.join(READY_TIMEOUT)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(5)
        code = node.stop()
        notify.close()
        if code not in (0, None):
            print(f"   start {i}: spegeld exited with {code}", flush=True)
    # Read the log once the process is gone: `store synced` may follow READY=1 by a tick.
    first, synced, msg = log_times(node, wall0)
    return Start(
        ready=ready_at - t0,
        healthz=healthz[0] - t0 if healthz else None,
        first_log=first,
        synced=synced,
        synced_msg=msg,
    )


def time_process(argv: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        times.append(time.perf_counter() - t0)
    return times


def fmt(values: list[float]) -> str:
    return (
        f"{statistics.median(values):.3f} s | {min(values):.3f} s | {max(values):.3f} s"
        if values
        else "— | — | —"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=None, help="local images (1000)")
    parser.add_argument("--repeat", type=int, default=None, help="daemon starts (5)")
    parser.add_argument("--seed", type=int, default=1, help="seed for generated images")
    parser.add_argument("--quick", action="store_true", help="smoke run: 100 images, 2 starts")
    args = parser.parse_args(argv)
    if args.images is None:
        args.images = 100 if args.quick else 1000
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    if args.images < 1 or args.repeat < 1:
        parser.error("--images and --repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = containerd_unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    print(
        f"spegeld start-up benchmark: {time.strftime('%Y-%m-%d %H:%M:%S %Z')},"
        f" {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()},"
        f" load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="spg-startup-", dir="/tmp"))
    containerd = PrivateContainerd(work / "containerd", namespace=NAMESPACE)
    starts: list[Start] = []
    try:
        images = generate_images(args.images, args.seed)
        archive = write_many_archive(images, work / "many.tar")
        containerd.start()
        t0 = time.perf_counter()
        containerd.import_image(archive, gc=True)
        archive.unlink()
        count = len(containerd.images())
        print(f"   imported {count} images in {time.perf_counter() - t0:.1f} s", flush=True)
        if count != args.images:
            raise SystemExit(f"containerd holds {count} images, expected {args.images}")
        for i in range(args.repeat):
            start = one_start(containerd, work, i)
            print(f"   start {i}: READY=1 after {start.ready:.3f} s ({start.synced_msg})")
            starts.append(start)
        ls_images, _ = time_ctr(containerd, ["images", "ls"], args.repeat)
        ls_content, _ = time_ctr(containerd, ["content", "ls"], args.repeat)
        ctr_times = [a + b for a, b in zip(ls_images.seconds, ls_content.seconds, strict=True)]
    finally:
        containerd.close()
        shutil.rmtree(work, ignore_errors=True)
    import_times = time_process([sys.executable, "-c", "import spegeld.app"], args.repeat)
    bare_times = time_process([sys.executable, "-c", "pass"], args.repeat)

    ready = [s.ready for s in starts]
    rows = [
        ("start → first log line (interpreter, CLI imports)", [s.first_log for s in starts]),
        ("start → /healthz 200 (HTTP server up)", [s.healthz for s in starts]),
        ("start → `store synced` log line", [s.synced for s in starts]),
        ("**start → `READY=1`**", ready),
    ]
    print()
    print(f"Start-up with {args.images} local images, {args.repeat} starts")
    print()
    print("| What | median | min | max |")
    print("|---|---|---|---|")
    for label, values in rows:
        print(f"| {label} | {fmt([v for v in values if v is not None])} |")
    print(f"| reference: `ctr images ls` + `ctr content ls` | {fmt(ctr_times)} |")
    print(f"| reference: `python -c 'import spegeld.app'` | {fmt(import_times)} |")
    print(f"| reference: `python -c pass` | {fmt(bare_times)} |")
    print()
    worst = max(ready)
    verdict = "meets" if statistics.median(ready) <= TARGET and worst <= TARGET else "misses"
    print(
        f"Target ≤ {TARGET:.0f} s: {verdict} (median {statistics.median(ready):.3f} s,"
        f" max {worst:.3f} s; {statistics.median(ready) / statistics.median(ctr_times):.1f}x"
        " the ctr listing)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
