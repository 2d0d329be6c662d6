"""One blob GET through the proxied path's own code, without containerd or a cluster.

Run::

    .venv/bin/python bench/relay_micro.py                      # 25 MB, 40 GETs, this tree
    # before/after: one mirror per tree, the GETs taking turns between them
    git archive HEAD^ src | tar -x -C /tmp/before
    .venv/bin/python bench/relay_micro.py --src /tmp/before/src --src src --gets 60
    .venv/bin/python bench/relay_micro.py --src /tmp/before/src --src src --parallel 3

Processes on loopback: a **holder** (``HttpServer`` answering every GET with a
``FileBody`` of one file: sendfile, as a peer listener does), one **mirror** per ``--src``
tree (``HttpServer`` whose handler ``fetch``-es the blob from the holder over a
``PeerPool`` and relays it as the proxy does: every chunk hashed by ``stream_hasher``, the
last byte held back until the digest matches) and this script as the **client** (keep-alive
connections, ``recv_into`` a reused buffer: a reader cheaper than containerd, so the
servers' cost shows). Each turn GETs the blob from every server in turn (the order
alternating), ``--parallel`` GETs at once each, so a machine whose load moves (others'
tests) moves every tree's figures alike. Printed per server: the median GET time, its
ratio to the holder's own, the server's own CPU per GET (``/proc``), and the mirror's
chunks per GET (body pieces relayed).

The relay loop is this script's, so only the library code (``_peer``, ``_hashing``,
``_http``, ``_sendfile``) differs between trees; the holder runs from the first tree.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_SERVERS = r"""
import hashlib, sys
from pathlib import Path
import trio
from spegeld.mirror._http import HttpServer, Limits, Request, Response
from spegeld.mirror._messages import AbortResponse, FileBody, StreamBody
from spegeld.mirror._peer import PeerPool, fetch
from spegeld.mirror._hashing import stream_hasher
from spegeld.routing import Peer
from spegeld.routing._protocol import NodeId

role, port, path, digest = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
size = path.stat().st_size
chunks = [0]

async def holder(request: Request) -> Response:
    return Response(200, [(b"content-length", str(size).encode())], FileBody(path, 0, size))

async def main() -> None:
    pool = PeerPool()
    peer = Peer(NodeId("holder"), sys.argv[5] if len(sys.argv) > 5 else "")

    async def relay(response):
        hasher = stream_hasher(response.length)
        received, held = 0, b""
        try:
            async for chunk in response.body():
                await hasher.update(chunk)
                chunks[0] += 1
                received += len(chunk)
                if received == response.length:
                    chunk, held = chunk[:-1], chunk[-1:]
                if chunk:
                    yield chunk
            if "sha256:" + await hasher.hexdigest() != digest:
                raise AbortResponse("digest")
            yield held
        finally:
            hasher.close()
            await response.aclose()

    async def mirror(request: Request) -> Response:
        response = await fetch(peer, b"GET", b"/blob", [], connect_timeout=3,
                               response_timeout=3, idle_timeout=2, pool=pool)
        return Response(200, [(b"content-length", str(response.length).encode())],
                        StreamBody(relay(response), response.length))

    server = HttpServer(holder if role == "holder" else mirror, Limits())
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    print("ready", flush=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve, listeners)
        await trio.to_thread.run_sync(sys.stdin.read)
        print("chunks", chunks[0], flush=True)
        nursery.cancel_scope.cancel()

trio.run(main)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _get(sock: socket.socket, buf: bytearray, size: int) -> float:
    """One keep-alive GET; the seconds from the request to the body's last byte."""
    started = time.perf_counter()
    sock.sendall(b"GET /blob HTTP/1.1\r\nhost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            raise RuntimeError("closed before the head")
        head += data
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"status {status!r}")
    remaining = size - (len(head) - head.index(b"\r\n\r\n") - 4)
    view = memoryview(buf)
    while remaining > 0:
        n = sock.recv_into(view[: min(len(buf), remaining)])
        if not n:
            raise RuntimeError(f"closed with {remaining} bytes to go")
        remaining -= n
    return time.perf_counter() - started


def _get_all(conns: list[socket.socket], bufs: list[bytearray], size: int) -> float:
    """One GET on each connection at once (a thread each); the seconds until all ended."""
    if len(conns) == 1:
        return _get(conns[0], bufs[0], size)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(conns)) as pool:
        for future in [pool.submit(_get, c, b, size) for c, b in zip(conns, bufs, strict=True)]:
            future.result()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=25, help="blob size, MB (decimal)")
    parser.add_argument("--gets", type=int, default=40)
    parser.add_argument(
        "--src", type=Path, action="append", default=[], help="a source tree for a mirror "
        "(PYTHONPATH); give several for several mirrors, GETs taking turns between them",
    )  # fmt: skip
    parser.add_argument(
        "--parallel", type=int, default=1, help="GETs at once per server (a pull fetches 3 "
        "layers at once): each turn times them together, first request to last byte",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.parallel <= 8:
        parser.error("need 1 <= parallel <= 8")
    if not 1 <= args.mb <= 2000 or not 1 <= args.gets <= 1000 or len(args.src) > 4:
        parser.error("need 1 <= mb <= 2000, 1 <= gets <= 1000, at most 4 --src")
    trees: list[Path | None] = args.src or [None]
    size = args.mb * 10**6
    with tempfile.TemporaryDirectory(prefix="relay-micro-") as tmp:
        blob = Path(tmp) / "blob"
        data = os.urandom(size)
        blob.write_bytes(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        del data
        hport = _free_port()
        # The holder runs from the first tree; each mirror from its own.
        roles = [("holder", hport, trees[0])]
        roles += [(f"mirror{k}", _free_port(), tree) for k, tree in enumerate(trees)]
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            for role, port, tree in roles:
                env = dict(os.environ)
                if tree is not None:
                    env["PYTHONPATH"] = str(tree.absolute())
                procs[role] = subprocess.Popen(
                    [sys.executable, "-c", _SERVERS, role.rstrip("0123456789"), str(port),
                     str(blob), digest, f"127.0.0.1:{hport}"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                )  # fmt: skip
            for proc in procs.values():
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != b"ready":
                    raise RuntimeError("a server did not start")
            print("pids:", *(f"{role}={proc.pid}" for role, proc in procs.items()),
                  file=sys.stderr, flush=True)  # fmt: skip  # for perf or strace -p
            conns = {
                role: [socket.create_connection(("127.0.0.1", port)) for _ in range(args.parallel)]
                for role, port, _ in roles
            }
            bufs = [bytearray(1024 * 1024) for _ in range(args.parallel)]
            times: dict[str, list[float]] = {role: [] for role in conns}
            cpu = {role: 0.0 for role in conns}  # the mirror's own CPU (holder: its own)
            for i in range(args.gets + 2):  # two warm-up GETs each, not counted
                order = list(conns) if i % 2 else list(conns)[::-1]
                for role in order:
                    before = _cpu(procs[role].pid)
                    seconds = _get_all(conns[role], bufs, size)
                    if i >= 2:
                        times[role].append(seconds)
                        cpu[role] += _cpu(procs[role].pid) - before
            for conn in [conn for group in conns.values() for conn in group]:
                conn.close()
        finally:
            chunks: dict[str, int] = {}
            for role, proc in procs.items():
                out, _ = proc.communicate(b"", timeout=20)
                if out.split()[:1] == [b"chunks"]:
                    chunks[role] = int(out.split()[1])
        print(f"{args.mb} MB, {args.gets} turns of {args.parallel} GETs at once each, load "
              f"{os.getloadavg()[0]:.1f}")  # fmt: skip
        holder = statistics.median(times["holder"])
        for role, _, tree in roles:
            med = statistics.median(times[role])
            q = statistics.quantiles(times[role], n=4)
            print(f"  {role:8} {tree or 'this tree'}: GET {med * 1000:.1f} ms (IQR "
                  f"{q[0] * 1000:.1f}-{q[2] * 1000:.1f}, / holder {med / holder:.2f}); own CPU "
                  f"per GET {cpu[role] / args.gets / args.parallel * 1000:.1f} ms"
                  + (f"; {chunks[role] / (args.gets + 2) / args.parallel:.0f} chunks per GET"
                     if role in chunks and role != "holder" else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
