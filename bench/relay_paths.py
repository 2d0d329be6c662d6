"""Where the proxied path's CPU goes: relaying with and without SHA-256, by copy and by splice.

Run::

    .venv/bin/python bench/relay_paths.py                 # 256 MiB, 5 rounds
    .venv/bin/python bench/relay_paths.py --mib 64 --rounds 3

The proxy moves a blob from a peer's socket to containerd's and hashes every byte on the
way (DESIGN §3: a peer whose bytes do not hash to the digest is cut). This script measures,
in one process on loopback, the floor of that work without trio, h11 or spegeld around it:
a sender thread (``os.sendfile`` of a file: the holder), a relay in the main thread, and a
drain thread (``recv_into`` with ``MSG_TRUNC``: the kernel discards the bytes). Relays:

* **copy**: ``recv_into`` a reused 1 MiB buffer, ``sendall`` from it (what the proxy does,
  less its framework);
* **copy + sha256**: the same, hashing each chunk (``hashlib``, OpenSSL) in the relay thread;
* **splice**: ``os.splice`` socket → pipe → socket, the bytes never enter user space;
* **splice + tee + sha256**: the same, plus ``tee(2)`` (through ctypes: Python has no
  ``os.tee``) into a second pipe that is read and hashed: the zero-copy relay "with the
  hashing on the side" that docs/benchmarks.md named as the next step.

Printed per relay: median throughput and the relay thread's CPU per GB; the ratio of each
relay to **copy + sha256**, and SHA-256 of the same bytes in memory (one core) as the limit.
Linux only (splice, tee).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20  # bytes per recv/splice: the proxy's own body read size (mirror._peer)
F_SETPIPE_SZ = 1031  # fcntl.h: a 1 MiB pipe holds one chunk
SPLICE_F_MOVE, SPLICE_F_MORE = 1, 4
DRAIN_TIMEOUT = 60.0  # seconds for the drain thread to report one transfer

_libc = ctypes.CDLL(None, use_errno=True)
_libc.tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
_libc.tee.restype = ctypes.c_ssize_t

Relay = Callable[[socket.socket, socket.socket, int, bool], str]


def _serve_file(path: Path, size: int, listener: socket.socket) -> None:
    while True:
        conn, _ = listener.accept()
        with conn, path.open("rb") as f:
            offset = 0
            while offset < size:
                offset += os.sendfile(conn.fileno(), f.fileno(), offset, size - offset)


def _drain(listener: socket.socket, size: int, done: list[float], ready: threading.Event) -> None:
    sink = bytearray(CHUNK)
    while True:
        conn, _ = listener.accept()
        got = 0
        with conn:
            while got < size:
                n = conn.recv_into(sink, len(sink), socket.MSG_TRUNC)
                if not n:
                    break
                got += n
        done.append(time.perf_counter())
        ready.set()


def relay_copy(up: socket.socket, down: socket.socket, size: int, do_hash: bool) -> str:
    sha = hashlib.sha256()
    view = memoryview(bytearray(CHUNK))
    left = size
    while left:
        n = up.recv_into(view, min(CHUNK, left))
        if not n:
            raise ConnectionError("the sender closed early")
        if do_hash:
            sha.update(view[:n])
        down.sendall(view[:n])
        left -= n
    return sha.hexdigest()


def relay_splice(up: socket.socket, down: socket.socket, size: int, do_hash: bool) -> str:
    sha = hashlib.sha256()
    fds = [*os.pipe(), *os.pipe()]
    r1, w1, r2, w2 = fds
    for fd in (r1, r2):
        fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    view = memoryview(bytearray(CHUNK))
    left = size
    flags = SPLICE_F_MOVE | SPLICE_F_MORE
    try:
        while left:
            n = os.splice(up.fileno(), w1, min(CHUNK, left), flags=flags)
            if not n:
                raise ConnectionError("the sender closed early")
            if do_hash:
                teed = 0
                while teed < n:
                    got = _libc.tee(r1, w2, n - teed, 0)
                    if got < 0:
                        raise OSError(ctypes.get_errno(), "tee")
                    teed += got
                hashed = 0
                while hashed < n:
                    m = os.readv(r2, [view[: n - hashed]])
                    sha.update(view[:m])
                    hashed += m
            sent = 0
            while sent < n:
                sent += os.splice(r1, down.fileno(), n - sent, flags=flags)
            left -= n
    finally:
        for fd in fds:
            os.close(fd)
    return sha.hexdigest()


RELAYS: list[tuple[str, Relay, bool]] = [
    ("copy", relay_copy, False),
    ("copy + sha256", relay_copy, True),
    ("splice", relay_splice, False),
    ("splice + tee + sha256", relay_splice, True),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="blob size in MiB (256)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, relays interleaved (5)")
    args = parser.parse_args()
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="relay-paths-") as tmp:
        blob = Path(tmp) / "blob"
        data = os.urandom(size)
        blob.write_bytes(data)
        expected = hashlib.sha256(data).hexdigest()
        t0 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        sha_rate = size / (time.perf_counter() - t0) / 1e6
        del data
        source = socket.create_server(("127.0.0.1", 0))
        sink = socket.create_server(("127.0.0.1", 0))
        done: list[float] = []
        ready = threading.Event()
        threading.Thread(target=_serve_file, args=(blob, size, source), daemon=True).start()
        threading.Thread(target=_drain, args=(sink, size, done, ready), daemon=True).start()
        rates: dict[str, list[float]] = {name: [] for name, _, _ in RELAYS}
        cpus: dict[str, list[float]] = {name: [] for name, _, _ in RELAYS}
        for _ in range(args.rounds):
            for name, relay, do_hash in RELAYS:
                with socket.create_connection(source.getsockname()) as up, \
                        socket.create_connection(sink.getsockname()) as down:  # fmt: skip
                    for s in (up, down):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ready.clear()
                    start, cpu0 = time.perf_counter(), time.thread_time()
                    digest = relay(up, down, size, do_hash)
                    cpu = time.thread_time() - cpu0
                    down.shutdown(socket.SHUT_WR)
                    if not ready.wait(DRAIN_TIMEOUT):
                        raise SystemExit("the drain thread did not finish")
                    end = done.pop()
                if do_hash and digest != expected:
                    raise SystemExit(f"{name}: wrong digest")
                rates[name].append(size / (end - start) / 1e6)
                cpus[name].append(cpu / (size / 1e9))
    anchor = statistics.median(rates["copy + sha256"])
    print(f"relay of {args.mib} MiB on loopback, median of {args.rounds} rounds")
    print(
        f"{'relay':24s} {'MB/s':>7s} {'(min-max)':>13s} {'relay CPU s/GB':>15s} {'/ copy+sha':>11s}"
    )
    for name, _, _ in RELAYS:
        r = rates[name]
        rate, cpu = statistics.median(r), statistics.median(cpus[name])
        print(f"{name:24s} {rate:7.0f} ({min(r):4.0f}-{max(r):4.0f})"
              f" {cpu:15.2f} {rate / anchor:11.2f}")  # fmt: skip
    print(f"SHA-256 in memory, one core: {sha_rate:.0f} MB/s")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
