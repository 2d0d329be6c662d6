"""Benchmark spegeld's registry mirror against Distribution and a bare sendfile server.

Run as root (it starts private containerd instances)::

    .venv/bin/python bench/registry.py            # 256 MiB blob, 5 rounds, 2000 HEADs
    .venv/bin/python bench/registry.py --quick    # smoke run: 32 MiB, 3 rounds, 300 HEADs

In one run, on one blob (a layer of random bytes, gzip level 0, imported into a private
containerd and pushed to a Distribution registry), it measures:

* **local**: a real ``spegeld run`` (node 1, ``127.0.0.2``) over that containerd, serving the
  blob from containerd's content directory with ``os.sendfile``. Node 1 runs gossip (with a
  temporary key) and no seeds: a node alone, so a miss has no peer to ask;
* **Distribution**: ``docker-registry`` (CNCF Distribution) serving the same blob;
* **sendfile**: the limit, a bare server (this script with ``--serve-sendfile``, in its own
  process, a thread per connection) that answers every GET with a fixed header and one
  blocking ``os.sendfile`` of the same file. Its sockets get the options trio gives every
  socket (``TCP_NODELAY``, ``TCP_NOTSENT_LOWAT`` 16 KiB); a second instance without them is
  shown too, because that option alone changes loopback sendfile throughput a lot;
* **proxied**: a second ``spegeld run`` (node 2, ``127.0.0.3``) with an empty containerd and
  ``--static-peer`` node 1's peer listener: it streams the blob from node 1 and verifies its
  digest. Both hold the cluster key, so every request to node 1 is signed and checked
  (node authentication, the default);
* **proxied, no node auth**: the same path without a cluster key: a keyless node over
  containerd 1 (``127.0.0.23``, the same files) and a keyless proxy over containerd 2
  (``127.0.0.24``); ``proxied / proxied, no node auth`` is what authentication costs;
* **fresh**: a third ``spegeld run`` (node 3, ``127.0.0.20``) started on an *empty*
  containerd, one whose ``blobs/sha256`` directory does not exist yet (a new node); the
  image is imported only after it is ready. It must serve from the file as node 1 does;
* manifest ``HEAD`` latency over one keep-alive connection: a hit (by tag, on node 1), a
  miss (an unknown digest; node 1 has no peers), both against Distribution, and (not a
  target) a hit proxied by node 2 from node 1.

Three clients download, each the same for every server. **drain** reads with
``recv(MSG_TRUNC)``: the kernel discards the bytes without copying them to user space, so
the client costs little and the figure is what the server can push; the targets use it.
**recv_into** reads into a reused 1 MiB buffer, and **curl** writes to ``/dev/null``: both copy
every byte, as a real consumer does. Each download opens a new connection; its time runs from
connect to last byte. Rounds are interleaved (every client and server once per round); the
median of the rounds is reported, with the CPU time per GB of the serving process(es), of the
client, and of the rest of the machine (``/proc/PID/stat``, ``getrusage``, ``/proc/stat``):
"rest" shows when other work on a shared machine competed for the CPUs. One more download
per server with recv_into and with curl hashes the bytes and checks the sha256. As a
reference for the proxy, which must hash every byte, it also times hashlib's SHA-256 over
the blob in memory on one core.

**Spegel v0.7.4** (``bench/_spegel.py``) runs in the same run when its binary is built
(``scripts/build-components --print-path spegel``; ``--no-spegel`` leaves it out): two
``spegel registry`` nodes, Spegel 1 over containerd 1 (which holds the blob) and Spegel 2 over
containerd 2 (empty), bootstrapped statically. Containerd 1 and 2 are then the built 2.3 and
serve spegeld's nodes 1 and 2 too, so both systems read the very same files. Spegel ignores
loopback addresses for its peers, so the whole benchmark then runs in a private network
namespace whose ``lo`` also carries two ``10.253.0.x`` addresses for Spegel's nodes (still
loopback traffic). It adds: Spegel's local and proxied blob GET, its manifest HEAD hit, its
proxied hit, and its miss, both for one repeated unknown digest (Spegel caches a lookup for
5 s) and for a new unknown digest on every request (a DHT lookup each time; Spegel waits at
most ``--mirror-resolve-timeout`` 20 ms for a peer).

``--baseline-ref REF`` (repeatable) adds a proxy node that runs the ``src/`` of a git ref
(e.g. ``HEAD``), or of a directory holding a ``spegeld`` package, next to the working tree's,
so a change to the proxy path is measured in the same run.
``--wait-quiet SECONDS`` first waits (up to that long) for the machine to be less than 25 %
busy. ``--profile`` runs the spegeld nodes under cProfile (their figures then include the
profiler's cost) and prints the top functions of each.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import platform
import pstats
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _spegel  # bench/_spegel.py, beside this script
from spegeld_harness import (
    PrivateContainerd,
    UpstreamRegistry,
    build_image,
    containerd_unavailable_reason,
    default_repository,
    registry_unavailable_reason,
)

REGISTRY = "bench.example.com"
IMAGE = f"{REGISTRY}/bench/big:v1"
MIB = 1024 * 1024
NODE1_HOST = "127.0.0.2"
NODE2_HOST = "127.0.0.3"
SENDFILE_HOST = "127.0.0.4"
FRESH_HOST = "127.0.0.20"  # node 3: started on an empty containerd, the image arrives later
# Tag quorum nodes (empty containerds, static peers node 1 and node 3): --tag-quorum 1 and 2.
QUORUM_HOSTS = {1: "127.0.0.21", 2: "127.0.0.22"}
BASELINE_FIRST_HOST = 5  # baseline proxy nodes listen on 127.0.0.5, 127.0.0.6, ...
NOAUTH_HOSTS = ("127.0.0.23", "127.0.0.24")  # a keyless holder (node 1's files) and its proxy
UNUSED_PEER = "127.0.0.1:9"  # a static peer never asked (its node holds what is asked for)
RECV_BUFFER = 1024 * 1024
DRAIN_SIZE = 4 * 1024 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
TRIO_NOTSENT_LOWAT = 16 * 1024  # what trio sets on every SocketStream
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json"
)
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


# -- the bare sendfile server (runs in its own process) ----------------------------------------


def serve_sendfile(path: str, address: str, *, trio_options: bool) -> None:
    """Answer every request with ``path``: fixed header, blocking ``os.sendfile``."""
    host, _, port = address.rpartition(":")
    size = os.stat(path).st_size
    head = (
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        f"content-length: {size}\r\n\r\n"
    ).encode()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(64)
    print(f"listening on {address}", flush=True)

    def handle(conn: socket.socket) -> None:
        if trio_options:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, TRIO_NOTSENT_LOWAT)
        fd = os.open(path, os.O_RDONLY)
        try:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(65536)
                    if not data:
                        return
                    pending += data
                request, _, pending = pending.partition(b"\r\n\r\n")
                conn.sendall(head)
                if request.startswith(b"HEAD "):
                    continue
                offset = 0
                while offset < size:
                    sent = os.sendfile(conn.fileno(), fd, offset, size - offset)
                    if sent == 0:
                        return
                    offset += sent
        except OSError:
            pass
        finally:
            os.close(fd)
            conn.close()

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# -- processes ---------------------------------------------------------------------------------


class Process:
    """A child process we started; stopped by its PID (SIGTERM, then SIGKILL)."""

    def __init__(
        self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.log = log
        self.peer = ""  # a spegeld node's peer listener (--peer-addr): what peers fetch from
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from ``/proc/PID/stat`` (all its threads)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle (``/proc/stat``, all CPUs)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_quiet(timeout: float, below: float) -> float:
    """Wait up to ``timeout`` s for 5 s in which the machine is less than ``below`` busy
    (a fraction of all CPUs); return the last 5 s sample, or a 1 s sample if not waiting."""
    cpus = os.cpu_count() or 1
    deadline = time.monotonic() + timeout
    while True:
        window = 5.0 if timeout > 0 else 1.0
        before = machine_busy()
        time.sleep(window)
        busy = (machine_busy() - before) / window / cpus
        if busy < below or time.monotonic() > deadline:
            if timeout > 0:
                state = "quiet" if busy < below else "still busy, going ahead"
                print(f"   machine {busy:.0%} busy: {state}", flush=True)
            return busy


def free_port(host: str, kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(proc: Process, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise SystemExit(f"{proc.name} exited during start-up:\n{proc.log_tail()}")
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{proc.name} not ready at {url} after {timeout}s:\n{proc.log_tail()}")
        time.sleep(0.05)


def start_spegeld(
    name: str,
    work: Path,
    containerd: PrivateContainerd,
    host: str,
    peers: list[str],
    *,
    profile: Path | None = None,
    src: Path | None = None,
    extra: tuple[str, ...] = (),
    key: Path | None = None,
) -> tuple[Process, str]:
    """A node; its mirror address is returned, its peer listener's is ``Process.peer``.

    ``key``: the cluster key file (peer requests signed and checked); None: a static node
    without one (unsigned, unchecked), or a gossip node alone with a key of its own.
    """
    port = free_port(host)
    peer = f"{host}:{free_port(host)}"
    state = work / f"{name}-state"
    state.mkdir()
    argv = [PYTHON]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", str(profile)]
    argv += ["-m", "spegeld", "run", "--node-name", name]
    argv += ["--containerd-sock", str(containerd.socket)]
    argv += ["--containerd-content-path", str(containerd.content_path)]
    argv += ["--registry-addr", f"{host}:{port}", "--advertise-addr", host]
    if src is None or "--peer-addr" in (src / "spegeld" / "cli" / "run.py").read_text():
        argv += ["--peer-addr", peer]  # an older baseline has no peer listener
    else:
        peer = f"{host}:{port}"
    argv += ["--state-dir", str(state), "--grace-period", "2", "--log-format", "json"]
    argv += [*extra]
    if peers:  # a static router: asks these peers on every miss, no gossip
        for static in peers:
            argv += ["--static-peer", static]
    else:  # gossip with no seeds: a node alone on purpose, so a miss has nobody to ask
        if key is None:
            key = work / f"{name}-gossip.key"
            key.touch(mode=0o600)
            key.write_text(secrets.token_hex(32) + "\n")
        argv += ["--gossip-addr", f"{host}:{free_port(host, socket.SOCK_DGRAM)}"]
    if key is not None:
        argv += ["--cluster-key-file", str(key)]
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    proc = Process(name, argv, work / f"{name}.log", env)
    proc.peer = peer
    address = f"{host}:{port}"
    try:
        wait_http(proc, f"http://{address}/readyz")
    except BaseException:
        proc.stop()
        raise
    return proc, address


def export_src(ref: str, dest: Path) -> Path:
    """``src/`` of git ``ref``, unpacked under ``dest`` (only reads the repository)."""
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


# -- clients -----------------------------------------------------------------------------------


@dataclass
class Download:
    nbytes: int
    seconds: float  # connect to last byte
    client_cpu: float = 0.0  # seconds
    sha256: str | None = None


def split_url(url: str) -> tuple[str, int, str]:
    rest = url.removeprefix("http://")
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port), "/" + path


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def socket_get(url: str, *, drain: bool = False, verify: bool = False) -> Download:
    """GET on a fresh connection; the body is discarded by the kernel (``drain``: MSG_TRUNC,
    no copy) or read with ``recv_into`` into one reused buffer (hashed with ``verify``)."""
    host, port, target = split_url(url)
    buf = bytearray(DRAIN_SIZE if drain else RECV_BUFFER)
    view = memoryview(buf)
    flags = socket.MSG_TRUNC if drain else 0
    hasher = hashlib.sha256() if verify else None
    cpu0 = own_cpu()
    t0 = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: */*\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        pending = b""
        while b"\r\n\r\n" not in pending:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError(f"{url}: closed before the response head")
            pending += data
        head, _, body = pending.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if lines[0].split()[1] != "200":
            raise RuntimeError(f"{url}: {lines[0]}")
        fields = {k.strip().lower(): v for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        if hasher is not None:
            hasher.update(body)
        remaining = length - len(body)
        while remaining > 0:
            n = sock.recv_into(view, min(len(buf), remaining), flags)
            if n == 0:
                raise RuntimeError(f"{url}: closed with {remaining} bytes to go")
            if hasher is not None:
                hasher.update(view[:n])
            remaining -= n
    seconds = time.perf_counter() - t0
    digest = "sha256:" + hasher.hexdigest() if hasher else None
    return Download(length, seconds, own_cpu() - cpu0, digest)


def drain_get(url: str, *, verify: bool = False) -> Download:
    if verify:
        raise ValueError("drain cannot verify: it never sees the bytes")
    return socket_get(url, drain=True)


def recv_into_get(url: str, *, verify: bool = False) -> Download:
    return socket_get(url, verify=verify)


def curl_get(url: str, *, verify: bool = False) -> Download:
    """``curl -o /dev/null``, timed by curl itself (``time_total``: connect to last byte)."""
    argv = ["curl", "-sSf", "-H", "Accept: */*", url]
    cpu0 = children_cpu()
    if verify:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        hasher = hashlib.sha256()
        nbytes = 0
        t0 = time.perf_counter()
        while chunk := proc.stdout.read(RECV_BUFFER):
            hasher.update(chunk)
            nbytes += len(chunk)
        if proc.wait() != 0:
            raise RuntimeError(f"curl {url} exited with {proc.returncode}")
        seconds = time.perf_counter() - t0
        return Download(nbytes, seconds, children_cpu() - cpu0, "sha256:" + hasher.hexdigest())
    argv[1:1] = ["-o", "/dev/null", "-w", "%{size_download} %{time_total}"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout.split()
    return Download(int(out[0]), float(out[1]), children_cpu() - cpu0)


CLIENTS: dict[str, Callable[..., Download]] = {
    "drain": drain_get,
    "recv_into": recv_into_get,
    "curl": curl_get,
}
VERIFYING_CLIENTS = ("recv_into", "curl")


def head_latencies(
    url: str, count: int, warmup: int, expect: int, *, fresh: bool = False
) -> list[float]:
    """Seconds per ``HEAD`` over one keep-alive HTTP/1.1 connection (raw socket). With
    ``fresh``, ``url`` holds ``{digest}``, replaced by a new random digest on every request."""
    host, port, target = split_url(url)

    def request_for(target: str) -> bytes:
        return (
            f"HEAD {target} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {ACCEPT}\r\n"
            "User-Agent: spegeld-bench\r\n\r\n"
        ).encode()

    request = request_for(target)
    times = []
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + count):
            if fresh:
                request = request_for(target.format(digest="sha256:" + secrets.token_hex(32)))
            t0 = time.perf_counter_ns()
            sock.sendall(request)
            pending = b""
            while not pending.endswith(b"\r\n\r\n"):
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError(f"HEAD {url}: connection closed after {i} requests")
                pending += data
            t1 = time.perf_counter_ns()
            status = int(pending.split(b" ", 2)[1])
            if status != expect:
                raise RuntimeError(f"HEAD {url}: {status}, expected {expect}")
            if i >= warmup:
                times.append((t1 - t0) / 1e9)
    return times


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = -(-p * len(ordered) // 100)  # ceil
    return ordered[max(0, min(len(ordered) - 1, int(rank) - 1))]


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Server:
    key: str
    label: str
    url: str
    pids: dict[str, int]  # process name -> pid, whose CPU time is charged to this server
    mb_per_s: dict[str, list[float]] = field(default_factory=dict)  # client -> per round
    client_cpu: dict[str, float] = field(default_factory=dict)  # client -> s/GB, summed
    server_cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> name -> s
    other_cpu: dict[str, float] = field(default_factory=dict)  # client -> s, rest of machine
    nbytes: dict[str, int] = field(default_factory=dict)  # client -> bytes timed
    verified: dict[str, str] = field(default_factory=dict)  # client -> "ok" / problem

    def median(self, client: str) -> float:
        return statistics.median(self.mb_per_s[client])

    def cpu_per_gb(self, client: str, name: str) -> float:
        return self.server_cpu[client][name] / (self.nbytes[client] / 1e9)

    def client_cpu_per_gb(self, client: str) -> float:
        return self.client_cpu[client] / (self.nbytes[client] / 1e9)

    def other_cpu_per_gb(self, client: str) -> float:
        return self.other_cpu[client] / (self.nbytes[client] / 1e9)


@dataclass
class Latency:
    label: str
    url: str
    expect: int
    count: int
    fresh: bool = False  # a new unknown digest per request (url holds "{digest}")
    seconds: list[float] = field(default_factory=list)

    def ms(self, p: float) -> float:
        return percentile(self.seconds, p) * 1000


def timed_download(server: Server, client: str) -> Download:
    before = {name: cpu_seconds(pid) for name, pid in server.pids.items()}
    busy = machine_busy()
    got = CLIENTS[client](server.url)
    busy = machine_busy() - busy
    cpu = server.server_cpu.setdefault(client, {})
    for name, pid in server.pids.items():
        used = cpu_seconds(pid) - before[name]
        cpu[name] = cpu.get(name, 0.0) + used
        busy -= used
    busy -= got.client_cpu
    server.other_cpu[client] = server.other_cpu.get(client, 0.0) + busy
    server.mb_per_s.setdefault(client, []).append(got.nbytes / got.seconds / 1e6)
    server.client_cpu[client] = server.client_cpu.get(client, 0.0) + got.client_cpu
    server.nbytes[client] = server.nbytes.get(client, 0) + got.nbytes
    return got


def measure(args: argparse.Namespace, work: Path) -> tuple[list[Server], list[Latency], Any]:
    stack = contextlib.ExitStack()
    processes: list[Process] = []
    info: dict[str, Any] = {"profiles": {}}
    if args.spegel is not None:
        info["spegel"] = f"{_spegel.VERSION} ({args.spegel})"
    info["busy_before"] = wait_quiet(args.wait_quiet, args.quiet_below)
    try:
        print(f"   building a {args.blob_mib} MiB layer...", flush=True)
        image = build_image(
            IMAGE, [args.blob_mib * MIB], workdir=work / "image", compresslevel=0, seed=7
        )
        layer = image.platforms[0].layers[0]
        size = image.blobs[layer].size
        info.update(layer=layer, size=size)
        archive = image.write_oci_archive(work / "image.tar")

        spegel_cd = args.spegel_containerd  # the built 2.3 when Spegel runs, else Debian's
        node1_cd = stack.enter_context(PrivateContainerd(work / "containerd-1", bin_dir=spegel_cd))
        info["containerd_1_2"] = node1_cd.version
        t0 = time.perf_counter()
        node1_cd.import_image(archive)
        print(f"   imported into containerd 1 in {time.perf_counter() - t0:.1f}s", flush=True)
        blob_file = node1_cd.blob_path(layer)
        if not blob_file.is_file():
            raise SystemExit(f"{layer} is not in containerd 1's content directory")
        node2_cd = stack.enter_context(PrivateContainerd(work / "containerd-2", bin_dir=spegel_cd))

        upstream = stack.enter_context(UpstreamRegistry(work / "distribution", log_level="warn"))
        t0 = time.perf_counter()
        upstream.push(image)
        print(f"   pushed to Distribution in {time.perf_counter() - t0:.1f}s", flush=True)
        repo = default_repository(image)
        assert upstream.pid is not None
        if args.spegel is not None:  # as a pull would have labelled them (bench/_spegel.py)
            _spegel.label_sources(node1_cd, REGISTRY, repo, list(image.blobs))

        bare: dict[str, tuple[Process, str]] = {}
        for key, extra in (("sendfile", []), ("sendfile-plain", ["--plain"])):
            address = f"{SENDFILE_HOST}:{free_port(SENDFILE_HOST)}"
            argv = [PYTHON, __file__, "--serve-sendfile", str(blob_file), address, *extra]
            proc = Process(key, argv, work / f"{key}.log")
            processes.append(proc)
            bare[key] = (proc, address)

        profiles: dict[str, Path] = {}

        def profile_path(name: str) -> Path | None:
            if not args.profile:
                return None
            profiles[name] = work / f"{name}.prof"
            return profiles[name]

        cluster_key = work / "cluster.key"  # nodes 1, 2, 3 and the quorum nodes: one cluster
        cluster_key.touch(mode=0o600)
        cluster_key.write_text(secrets.token_hex(32) + "\n")
        node1, node1_addr = start_spegeld(
            "node-1",
            work,
            node1_cd,
            NODE1_HOST,
            [],
            profile=profile_path("node-1"),
            key=cluster_key,
        )
        processes.append(node1)
        node2, node2_addr = start_spegeld(
            "node-2", work, node2_cd, NODE2_HOST, [node1.peer], profile=profile_path("node-2"),
            extra=("--tag-quorum", "1"),  # one holder: a tag from peers needs a quorum of 1
            key=cluster_key,  # signed requests to node 1's peer listener: the default
        )  # fmt: skip
        processes.append(node2)
        # The same blob files served by a holder without a cluster key, to a proxy without
        # one: the proxied path with no node authentication, for the ratio. The holder is
        # static (its peer is never asked: it holds the blob) so it runs keyless.
        holder_n, _ = start_spegeld("node-1n", work, node1_cd, NOAUTH_HOSTS[0], [UNUSED_PEER])
        processes.append(holder_n)
        node2n, node2n_addr = start_spegeld(
            "node-2n", work, node2_cd, NOAUTH_HOSTS[1], [holder_n.peer],
            profile=profile_path("node-2n"),
        )  # fmt: skip
        processes.append(node2n)
        node3_cd = stack.enter_context(PrivateContainerd(work / "containerd-3"))
        if (node3_cd.content_path / "blobs").exists():
            raise SystemExit("containerd 3 is not empty at start")
        node3, node3_addr = start_spegeld(
            "node-3",
            work,
            node3_cd,
            FRESH_HOST,
            [],
            profile=profile_path("node-3"),
            key=cluster_key,
        )
        processes.append(node3)
        t0 = time.perf_counter()
        node3_cd.import_image(archive)  # after node 3 is ready: a fresh node's first pull
        print(f"   imported into containerd 3 (after node 3 started) in"
              f" {time.perf_counter() - t0:.1f}s", flush=True)  # fmt: skip
        archive.unlink()
        quorum_addrs: dict[int, str] = {}  # the same two holders, a tag quorum of 1 and of 2
        for quorum, host in QUORUM_HOSTS.items():
            cd = stack.enter_context(PrivateContainerd(work / f"containerd-q{quorum}"))
            proc, quorum_addrs[quorum] = start_spegeld(
                f"node-q{quorum}", work, cd, host, [node1.peer, node3.peer],
                extra=("--tag-quorum", str(quorum)), key=cluster_key,
            )  # fmt: skip
            processes.append(proc)
        baselines: list[tuple[str, Process, str]] = []  # (ref, process, address)
        for i, ref in enumerate(args.baseline_ref):
            cd = stack.enter_context(PrivateContainerd(work / f"containerd-b{i}"))
            src = Path(ref) if Path(ref).is_dir() else export_src(ref, work / f"baseline-{i}")
            host = f"127.0.0.{BASELINE_FIRST_HOST + i}"
            # Unsigned, as an older node's requests are: to the keyless holder.
            proc, address = start_spegeld(f"node-b{i}", work, cd, host, [holder_n.peer], src=src)
            processes.append(proc)
            baselines.append((ref, proc, address))
        spegel_nodes: tuple[_spegel.SpegelNode, _spegel.SpegelNode] | None = None
        if args.spegel is not None:
            spegel_nodes = _spegel.start_pair(
                args.spegel,
                work,
                (node1_cd, _spegel.NODE_ADDRS[0]),
                (node2_cd, _spegel.NODE_ADDRS[1]),
                mirrored=[f"http://{REGISTRY}"],
            )
            stack.callback(spegel_nodes[1].stop)
            stack.callback(spegel_nodes[0].stop)
            info["spegel_argv"] = " ".join(spegel_nodes[1].argv)
            print(
                f"   Spegel 1 {spegel_nodes[0].registry_addr} (pid {spegel_nodes[0].pid}),"
                f" Spegel 2 {spegel_nodes[1].registry_addr} (pid {spegel_nodes[1].pid}),"
                f" containerd {info['containerd_1_2']}",
                flush=True,
            )
        for proc, address in bare.values():
            wait_http(proc, f"http://{address}/")
        print(
            f"   node 1 {node1_addr} (pid {node1.pid}), node 2 {node2_addr} (pid {node2.pid}),"
            f" Distribution {upstream.address} (pid {upstream.pid}),"
            f" sendfile {bare['sendfile'][1]} (pid {bare['sendfile'][0].pid})",
            flush=True,
        )

        blob = f"/v2/{repo}/blobs/{layer}"
        mirror_blob = f"{blob}?ns={REGISTRY}"
        sf_proc, sf_addr = bare["sendfile"]
        plain_proc, plain_addr = bare["sendfile-plain"]
        servers = [
            Server(
                "sendfile",
                "bare sendfile server (the limit)",
                f"http://{sf_addr}{blob}",
                {"server": sf_proc.pid},
            ),
            Server(
                "sendfile-plain",
                "bare sendfile, default socket options",
                f"http://{plain_addr}{blob}",
                {"server": plain_proc.pid},
            ),
            Server(
                "distribution",
                "Distribution registry",
                f"{upstream.url}{blob}",
                {"server": upstream.pid},
            ),
            Server(
                "local",
                "spegeld local (sendfile)",
                f"http://{node1_addr}{mirror_blob}",
                {"server": node1.pid},
            ),
            Server(
                "fresh",
                "spegeld local, fresh node (sendfile)",
                f"http://{node3_addr}{mirror_blob}",
                {"server": node3.pid},
            ),
            Server(
                "proxied",
                "spegeld proxied from a peer",
                f"http://{node2_addr}{mirror_blob}",
                {"server": node2.pid, "peer": node1.pid},
            ),
            Server(
                "proxied-noauth",
                "spegeld proxied, no node auth",
                f"http://{node2n_addr}{mirror_blob}",
                {"server": node2n.pid, "peer": holder_n.pid},
            ),
        ]
        for i, (ref, proc, address) in enumerate(baselines):
            servers.append(
                Server(
                    f"baseline-{i}",
                    f"spegeld proxied, {Path(ref).name or ref} code",
                    f"http://{address}{mirror_blob}",
                    {"server": proc.pid, "peer": node1.pid},
                )
            )

        if spegel_nodes is not None:
            sp1, sp2 = spegel_nodes
            servers.append(
                Server(
                    "spegel-local",
                    f"Spegel {_spegel.VERSION} local",
                    f"http://{sp1.registry_addr}{mirror_blob}",
                    {"server": sp1.pid},
                )
            )
            servers.append(
                Server(
                    "spegel-proxied",
                    f"Spegel {_spegel.VERSION} proxied from a peer",
                    f"http://{sp2.registry_addr}{mirror_blob}",
                    {"server": sp2.pid, "peer": sp1.pid},
                )
            )

        # Node 3 learns of the image from containerd's events; wait until it serves it.
        deadline = time.monotonic() + 30
        while True:
            try:
                if socket_get(f"http://{node3_addr}{mirror_blob}", drain=True).nbytes == size:
                    break
            except RuntimeError:  # 404 until the import's events reach node 3
                pass
            if time.monotonic() > deadline:
                raise SystemExit("node 3 never served the image imported after it started")
            time.sleep(0.1)
        # One verified download per server and copying client; it also warms every cache.
        for server in servers:
            for client in VERIFYING_CLIENTS:
                got = CLIENTS[client](server.url, verify=True)
                ok = got.nbytes == size and got.sha256 == layer
                server.verified[client] = "ok" if ok else f"BAD ({got.nbytes} B, {got.sha256})"
        print(f"   throughput: {args.repeat} rounds...", flush=True)
        for round_ in range(args.repeat):
            for client in args.clients:
                for server in servers:
                    got = timed_download(server, client)
                    if got.nbytes != size:
                        raise SystemExit(f"{server.label}: {got.nbytes} bytes, expected {size}")
            print(
                f"     round {round_ + 1}: "
                + "; ".join(
                    f"{c} " + ", ".join(f"{s.key} {s.mb_per_s[c][-1]:.0f}" for s in servers)
                    for c in args.clients
                ),
                flush=True,
            )

        info["sha256_mb_per_s"] = sha256_speed(blob_file, args.repeat)
        missing = "sha256:" + secrets.token_hex(32)
        tag = f"/v2/{repo}/manifests/{image.tag}"
        unknown = f"/v2/{repo}/manifests/{missing}"
        n = args.heads
        latencies = [
            Latency(
                "spegeld hit (HEAD manifest by tag)",
                f"http://{node1_addr}{tag}?ns={REGISTRY}",
                200,
                n,
            ),
            Latency(
                "spegeld miss (unknown digest, no peers)",
                f"http://{node1_addr}{unknown}?ns={REGISTRY}",
                404,
                n,
            ),
            Latency("Distribution hit (HEAD manifest by tag)", f"{upstream.url}{tag}", 200, n),
            Latency("Distribution miss (unknown digest)", f"{upstream.url}{unknown}", 404, n),
            Latency(
                "spegeld proxied hit (node 2 asks node 1)",
                f"http://{node2_addr}{tag}?ns={REGISTRY}",
                200,
                max(50, n // 4),
            ),
        ]
        latencies += [
            Latency(
                f"spegeld proxied tag, quorum {quorum} (nodes 1, 3)",
                f"http://{address}{tag}?ns={REGISTRY}",
                200,
                max(50, n // 4),
            )
            for quorum, address in quorum_addrs.items()
        ]
        fresh = f"/v2/{repo}/manifests/{{digest}}?ns={REGISTRY}"
        latencies.append(
            Latency(
                "spegeld miss (new unknown digest each)",
                f"http://{node1_addr}{fresh}",
                404,
                n,
                True,
            )
        )
        if spegel_nodes is not None:
            sp1_url, sp2_url = (f"http://{node.registry_addr}" for node in spegel_nodes)
            latencies += [
                Latency(
                    "Spegel hit (HEAD manifest by tag)", f"{sp1_url}{tag}?ns={REGISTRY}", 200, n
                ),
                Latency(
                    "Spegel miss (unknown digest, 1 peer)",
                    f"{sp1_url}{unknown}?ns={REGISTRY}",
                    404,
                    n,
                ),
                Latency("Spegel miss (new unknown digest each)", f"{sp1_url}{fresh}", 404, n, True),
                Latency(
                    "Spegel proxied hit (2 asks 1)",
                    f"{sp2_url}{tag}?ns={REGISTRY}",
                    200,
                    max(50, n // 4),
                ),
            ]
        print(f"   latency: {n} HEADs per case...", flush=True)
        for lat in latencies:
            lat.seconds = head_latencies(
                lat.url, lat.count, max(10, lat.count // 10), lat.expect, fresh=lat.fresh
            )
        if spegel_nodes is not None:  # Spegel's 20 ms resolve wait: its only peer stopped
            latencies.append(spegel_stopped_peer_misses(spegel_nodes, f"{fresh}", n))

        # Stop the spegeld nodes gracefully, so cProfile writes its output.
        for proc in processes:
            proc.stop()
        for name, path in profiles.items():
            if path.exists():
                info["profiles"][name] = profile_text(path, args.profile_lines)
        return servers, latencies, info
    finally:
        for proc in reversed(processes):
            with contextlib.suppress(Exception):
                proc.stop()
        stack.close()


def spegel_stopped_peer_misses(
    nodes: tuple[_spegel.SpegelNode, _spegel.SpegelNode], fresh: str, n: int
) -> Latency:
    """Misses on Spegel 1 (a new unknown digest each) while Spegel 2, its only DHT peer, is
    stopped (SIGSTOP): the lookup never ends, so Spegel answers when its resolve timeout
    (20 ms) expires. The count is smaller: each request takes that long."""
    one, two = nodes
    lat = Latency(
        "Spegel miss (new digest, peer stopped)",
        f"http://{one.registry_addr}{fresh}",
        404,
        max(50, n // 10),
        True,
    )
    os.kill(two.pid, signal.SIGSTOP)
    try:
        lat.seconds = head_latencies(lat.url, lat.count, 10, lat.expect, fresh=True)
    finally:
        os.kill(two.pid, signal.SIGCONT)
    return lat


def sha256_speed(path: Path, repeat: int) -> float:
    """Median MB/s of hashlib's SHA-256 over the blob, held in memory, in 1 MiB updates:
    one core's ceiling for anything that verifies the blob as it streams."""
    data = memoryview(path.read_bytes())
    speeds = []
    for _ in range(repeat):
        sha = hashlib.sha256()
        t0 = time.perf_counter()
        for start in range(0, len(data), RECV_BUFFER):
            sha.update(data[start : start + RECV_BUFFER])
        speeds.append(len(data) / (time.perf_counter() - t0) / 1e6)
    return statistics.median(speeds)


def profile_text(path: Path, limit: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(limit)
    return buf.getvalue()


# -- report ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(
    args: argparse.Namespace, servers: list[Server], latencies: list[Latency], info: Any
) -> None:
    by_key = {s.key: s for s in servers}
    primary = args.clients[0]
    print()
    print(
        f"Blob GET, {info['size'] / MIB:.1f} MiB ({info['layer'][:19]}...), warm page cache,"
        f" median of {args.repeat} rounds, MB/s (10^6 B/s); CPU in s per GB served"
    )
    head = f"{'server':<38}" + "".join(f" {c:>16}" for c in args.clients)
    head += f" {'server':>6} {'peer':>5} {'client':>6} {'rest':>5}  sha256"
    print(head)
    print(
        " " * 38
        + "".join(f" {'median (min-max)':>16}" for _ in args.clients)
        + f" {'CPU s/GB (' + primary + ')':>26}"
    )
    print("-" * len(head))
    for s in servers:
        line = f"{s.label:<38}"
        for c in args.clients:
            runs = s.mb_per_s[c]
            line += f" {s.median(c):6.0f} ({min(runs):.0f}-{max(runs):.0f})".rjust(17)
        peer = f"{s.cpu_per_gb(primary, 'peer'):5.2f}" if "peer" in s.pids else " " * 5
        line += f" {s.cpu_per_gb(primary, 'server'):6.2f} {peer}"
        line += f" {s.client_cpu_per_gb(primary):6.2f} {s.other_cpu_per_gb(primary):5.2f}"
        line += "  " + " ".join(f"{c}:{s.verified[c]}" for c in VERIFYING_CLIENTS)
        print(line)
    print()
    ratios = [
        ("local / Distribution", "local", "distribution", 1.5),
        ("local / bare sendfile", "local", "sendfile", 0.8),
        ("fresh node / Distribution", "fresh", "distribution", 1.5),
        ("fresh node / bare sendfile", "fresh", "sendfile", 0.8),
        ("proxied / Distribution", "proxied", "distribution", 0.6),
        ("proxied, no node auth / Distribution", "proxied-noauth", "distribution", 0.0),
        ("proxied / proxied, no node auth", "proxied", "proxied-noauth", 0.0),
        ("bare sendfile / Distribution", "sendfile", "distribution", 0.0),
    ]
    if "spegel-local" in by_key:
        ratios += [
            ("spegeld local / Spegel local", "local", "spegel-local", 0.0),
            ("spegeld proxied / Spegel proxied", "proxied", "spegel-proxied", 0.0),
            ("Spegel local / Distribution", "spegel-local", "distribution", 0.0),
            ("Spegel local / bare sendfile", "spegel-local", "sendfile", 0.0),
            ("Spegel proxied / Distribution", "spegel-proxied", "distribution", 0.0),
        ]
    for i, ref in enumerate(args.baseline_ref):
        name = Path(ref).name or ref
        key = f"baseline-{i}"
        ratios.append((f"proxied ({name} code) / Distribution", key, "distribution", 0.0))
        ratios.append((f"proxied / proxied ({name} code)", "proxied", key, 0.0))
    head = (
        f"{'ratio':<40}"
        + "".join(f" {c:>9}" for c in args.clients)
        + f" {'target':>7}  verdict ({primary})"
    )
    print(head)
    print("-" * len(head))
    for label, a, b, target in ratios:
        values = [by_key[a].median(c) / by_key[b].median(c) for c in args.clients]
        line = f"{label:<40}" + "".join(f" {v:9.2f}" for v in values)
        if target:
            line += f" {'>= ' + str(target):>7}  {verdict(values[0] >= target)}"
        print(line)
    sha = info["sha256_mb_per_s"]
    proxied = by_key["proxied"].median(primary)
    print(
        f"SHA-256 of the blob in memory, one core (hashlib): {sha:.0f} MB/s;"
        f" proxied ({primary}) / SHA-256: {proxied / sha:.2f}"
    )
    print()
    print("Manifest HEAD latency, one keep-alive connection, ms (after 10 % warm-up requests)")
    head = f"{'request':<42} {'count':>5} {'p50':>7} {'p99':>7} {'max':>7}  target"
    print(head)
    print("-" * len(head))
    targets = {0: (2.0, 10.0, "p50 <= 2, p99 <= 10"), 1: (None, 2.0, "p99 <= 2")}
    for i, lat in enumerate(latencies):
        p50, p99 = lat.ms(50), lat.ms(99)
        line = f"{lat.label:<42} {lat.count:5d} {p50:7.3f} {p99:7.3f} {lat.ms(100):7.2f}"
        if i in targets:
            p50_max, p99_max, text = targets[i]
            ok = (p50_max is None or p50 <= p50_max) and p99 <= p99_max
            line += f"  {text}: {verdict(ok)}"
        print(line)
    by_label = {lat.label.split(" (")[0]: lat for lat in latencies}
    one, two = (by_label.get(f"spegeld proxied tag, quorum {q}") for q in (1, 2))
    if one is not None and two is not None:
        print(f"{'tag quorum 2 / quorum 1 (proxied tag HEAD)':<42} {'':5} "
              f"{two.ms(50) / one.ms(50):7.2f} {two.ms(99) / one.ms(99):7.2f}")  # fmt: skip
    pairs = [
        ("hit", "spegeld hit", "Spegel hit"),
        ("proxied hit", "spegeld proxied hit", "Spegel proxied hit"),
    ]
    if "Spegel hit" in by_label:
        same = [
            lat
            for lat in latencies
            if lat.label.startswith(("spegeld miss (unknown", "Spegel miss (unknown"))
        ]
        new = [lat for lat in latencies if "new unknown digest" in lat.label]
        print()
        print(f"{'spegeld / Spegel latency':<42} {'p50':>7} {'p99':>7}")
        for what, a, b in pairs:
            la, lb = by_label[a], by_label[b]
            print(f"{what:<42} {la.ms(50) / lb.ms(50):7.2f} {la.ms(99) / lb.ms(99):7.2f}")
        stopped = [new[0], next(lat for lat in latencies if "peer stopped" in lat.label)]
        cases = [("miss, same digest", same), ("miss, new digest each", new)]
        cases.append(("miss, new digest; Spegel's peer stopped", stopped))
        for what, (la, lb) in cases:
            print(f"{what:<42} {la.ms(50) / lb.ms(50):7.2f} {la.ms(99) / lb.ms(99):7.2f}")
    print()
    print(f"containerd 1 and 2: {info['containerd_1_2']}; Spegel: {info.get('spegel', 'not run')}")
    if "spegel_argv" in info:
        print(f"Spegel 2 ran: {info['spegel_argv']}")
    print(
        "CPU s/GB: CPU time per GB delivered, of the serving process (server), of node 1 when"
        " it feeds the proxy (peer), of the client, and of everything else on the machine"
        f" (rest: other processes, kernel work not charged to these). Machine busy before the"
        f" run: {info['busy_before']:.0%} of {os.cpu_count()} CPUs."
    )
    for name, text in info["profiles"].items():
        print(f"\n-- cProfile of {name}, by own time --\n{text}")


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 32 MiB, 3 rounds, 300 HEADs"
    )
    parser.add_argument("--blob-mib", type=int, default=None, help="blob size (256)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds of downloads (5)")
    parser.add_argument("--heads", type=int, default=None, help="HEAD requests per case (2000)")
    parser.add_argument(
        "--clients",
        default="drain,recv_into,curl",
        help="comma-separated download clients, the first one judges the targets"
        " (default: drain,recv_into,curl)",
    )
    parser.add_argument(
        "--baseline-ref",
        action="append",
        default=[],
        metavar="REF",
        help="also run a proxy node on the src/ of this git ref (e.g. HEAD), or on a directory"
        " that holds a spegeld package; repeatable",
    )
    parser.add_argument(
        "--profile", action="store_true", help="run the spegeld nodes under cProfile"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the machine to be less busy than --quiet-below",
    )
    parser.add_argument(
        "--quiet-below",
        type=float,
        default=0.25,
        metavar="FRACTION",
        help="what --wait-quiet calls quiet: busy fraction of all CPUs (0.25)",
    )
    parser.add_argument("--profile-lines", type=int, default=30, help="lines of each profile")
    parser.add_argument(
        "--no-spegel",
        action="store_true",
        help="leave Spegel out (skipped anyway when scripts/build-components has not built it)",
    )
    parser.add_argument(
        "--serve-sendfile", nargs=2, metavar=("FILE", "ADDR"), help=argparse.SUPPRESS
    )
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.blob_mib is None:
        args.blob_mib = 32 if args.quick else 256
    if args.repeat is None:
        args.repeat = 3 if args.quick else 5
    if args.heads is None:
        args.heads = 300 if args.quick else 2000
    if args.blob_mib < 1 or args.repeat < 1 or args.heads < 10:
        parser.error("--blob-mib and --repeat must be positive, --heads at least 10")
    args.clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    unknown = [c for c in args.clients if c not in CLIENTS]
    if unknown or not args.clients:
        parser.error(f"--clients: choose from {', '.join(CLIENTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sendfile:
        serve_sendfile(*args.serve_sendfile, trio_options=not args.plain)
        return 0
    for reason in (containerd_unavailable_reason(), registry_unavailable_reason()):
        if reason is not None:
            print(f"cannot run: {reason}", file=sys.stderr)
            return 2
    if shutil.which("curl") is None:
        print("cannot run: curl not found (apt-get install -y curl)", file=sys.stderr)
        return 2
    args.spegel, args.spegel_containerd = None, None
    if not args.no_spegel:
        binary, why = _spegel.spegel_binary()
        cd_dir, cd_why = _spegel.component_path("containerd")
        if binary is None or cd_dir is None:
            print(f"Spegel skipped: {why or 'containerd 2.3 not built: ' + cd_why}", flush=True)
        else:
            _spegel.enter_private_netns()  # before any thread or child process
            args.spegel, args.spegel_containerd = binary, cd_dir
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True, check=False)
    print(
        f"spegeld registry benchmark: {time.strftime('%Y-%m-%d %H:%M:%S %Z')},"
        f" {platform.node()}, {os.cpu_count()} CPUs, Linux {platform.release()},"
        f" Python {platform.python_version()}, {curl.stdout.split(' (')[0]}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="spg-bench-reg-", dir="/tmp"))
    try:
        servers, latencies, info = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, servers, latencies, info)
    bad = [f"{s.label} ({c})" for s in servers for c, v in s.verified.items() if v != "ok"]
    if bad:
        print("CHECK FAILED: sha256 mismatch for " + ", ".join(bad))
        return 1
    print("check: one recv_into and one curl download per server matched the blob's sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
