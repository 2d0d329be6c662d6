"""The soak's hostile actors, run inside a node's network namespace (``ip netns exec``).

``bench/soak.py`` starts one process per fault episode; each mode is bounded in time
and in count, prints one JSON line (what it did) on stdout and exits:

* ``corrupt-proxy``: a TCP proxy that flips one byte in the body of every response it
  relays (nft redirects the peers' connections to this node's registry port to it);
* ``slowloris``: connections that drip a request head, sit idle, or read a body slowly;
* ``hostile``: the hostile HTTP set, one connection per case, each answer recorded;
* ``udp-flood``: garbage datagrams at a gossip port;
* ``probe``: the mirror's answer time as the node's containerd would wait for it,
  one JSON line per probe in a file, until ``--duration`` ends.

Plain stdlib and threads: it runs with the venv's Python but imports nothing of spegeld,
so it behaves as a foreign client or peer would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

CONNECT_TIMEOUT = 5.0  # seconds; on the namespaces' bridge a connect takes microseconds
ANSWER_TIMEOUT = 10.0  # seconds a hostile case waits for the status line before "timeout"
RELAY_CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024  # bytes of response head the corrupting proxy parses before giving up
UDP_MAX_DATAGRAMS = 200_000  # a flood's hard count, whatever its rate and duration
HOSTILE_WORKERS = 8  # concurrent hostile cases: well under any per-source cap
MAX_SLOW_CONNECTIONS = 4000  # slowloris's hard count (fds: the agent's own limit is 1M)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _connect(address: str, timeout: float = CONNECT_TIMEOUT) -> socket.socket:
    return socket.create_connection(_split(address), timeout=timeout)


# ---- corrupt-proxy ---------------------------------------------------------------------


class Corrupter:
    """Relay server → client, flipping the byte in the middle of each response body."""

    def __init__(self, method: bytes) -> None:
        self.method = method
        self.head = b""
        self.remaining: int | None = None  # body bytes still to come, once the head is read
        self.flip_at = -1
        self.flipped = 0

    def feed(self, data: bytes) -> bytes:
        if self.remaining is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    self.remaining = 0  # not HTTP as we know it: pass it on untouched
                    data, self.head = self.head, b""
                    return data
                return b""
            head, rest = self.head[: end + 4], self.head[end + 4 :]
            self.head = b""
            self.remaining = self._body_length(head)
            self.flip_at = self.remaining // 2 if self.remaining > 0 else -1
            return head + self._body(rest)
        return self._body(data)

    def _body_length(self, head: bytes) -> int:
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if self.method == b"HEAD" or status in (204, 304) or status < 200:
            return 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                return int(value.strip())
        return 0

    def _body(self, data: bytes) -> bytes:
        assert self.remaining is not None
        if 0 <= self.flip_at < len(data):
            mutable = bytearray(data)
            mutable[self.flip_at] ^= 0xFF
            data = bytes(mutable)
            self.flipped += 1
        self.flip_at -= len(data)
        self.remaining -= len(data)
        return data


def corrupt_proxy(args: argparse.Namespace) -> dict[str, Any]:
    stats = {"connections": 0, "corrupted": 0, "errors": 0}
    lock = threading.Lock()
    listener = socket.create_server(("0.0.0.0", args.listen), reuse_port=False)
    listener.settimeout(0.2)
    deadline = time.monotonic() + args.duration

    def relay(client: socket.socket) -> None:
        try:
            with client, _connect(args.target) as upstream:
                client.settimeout(args.duration + 5)
                upstream.settimeout(args.duration + 5)
                first = client.recv(RELAY_CHUNK)
                upstream.sendall(first)
                corrupter = Corrupter(first.split(b" ", 1)[0])
                forward = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
                forward.start()
                while chunk := upstream.recv(RELAY_CHUNK):
                    out = corrupter.feed(chunk)
                    if out:
                        client.sendall(out)
                with lock:
                    stats["corrupted"] += corrupter.flipped
        except OSError:
            with lock:
                stats["errors"] += 1

    while time.monotonic() < deadline:
        try:
            client, _ = listener.accept()
        except TimeoutError:
            continue
        stats["connections"] += 1
        threading.Thread(target=relay, args=(client,), daemon=True).start()
    listener.close()
    time.sleep(0.5)  # let relays that are mid-body count what they flipped
    with lock:
        return dict(stats)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(RELAY_CHUNK):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# ---- slowloris ---------------------------------------------------------------------------


def slowloris(args: argparse.Namespace) -> dict[str, Any]:
    """Three kinds of slow client, round robin: a head dripped one byte at a time, a
    connection that sends nothing, and a full request whose body is read a byte at a time."""
    count = min(args.connections, MAX_SLOW_CONNECTIONS)
    head = f"GET {args.path} HTTP/1.1\r\nHost: soak\r\nX-Slow: ".encode()
    full = f"GET {args.path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    opened = refused = closed_by_server = 0
    progress: dict[socket.socket, int] = {}
    kinds: dict[socket.socket, str] = {}
    deadline = time.monotonic() + args.duration
    for i in range(count):
        if time.monotonic() > deadline:
            break
        try:
            sock = _connect(args.target, timeout=2.0)
        except OSError:
            refused += 1
            continue
        opened += 1
        kind = ("drip", "idle", "slow-read")[i % 3]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        if kind == "slow-read":
            try:
                sock.send(full)
            except OSError:
                closed_by_server += 1
                sock.close()
                continue
        progress[sock], kinds[sock] = 0, kind
        sel.register(sock, selectors.EVENT_READ)
    while progress and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            sock = ready
            try:
                data = sock.recv(1 if kinds[sock] == "slow-read" else 4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                closed_by_server += 1
                sel.unregister(sock)
                del progress[sock]
                sock.close()
        for sock, sent in list(progress.items()):
            if kinds[sock] == "drip" and sent < len(head):
                try:
                    sock.send(head[sent : sent + 1])
                    progress[sock] = sent + 1
                except OSError:
                    pass
        time.sleep(0.5)
    still_open = len(progress)
    for sock in progress:
        sel.unregister(sock)
        sock.close()
    return {
        "opened": opened,
        "refused": refused,
        "closed_by_server": closed_by_server,
        "open_at_end": still_open,
    }


# ---- the hostile HTTP set ----------------------------------------------------------------


def hostile_cases(ns: str, blob: str) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of every hostile request: each goes on a connection of its own."""
    huge = "a" * 5000
    blob_path = f"/v2/soak/img/blobs/{blob}?ns={ns}"

    def get(target: str, extra: str = "", method: str = "GET") -> bytes:
        return f"{method} {target} HTTP/1.1\r\nHost: soak\r\n{extra}\r\n".encode()

    return [
        ("over-long head", get("/v2/", "X-Long: " + "b" * 70_000 + "\r\n")),
        ("many headers", get("/v2/", "".join(f"X-H{i}: v\r\n" for i in range(2000)))),
        ("over-long target", get("/v2/" + "c" * 20_000 + "/manifests/latest")),
        ("bad path", get("/v3/%%%/../../etc/passwd")),
        ("traversal in name", get(f"/v2/../../../etc/passwd/blobs/{blob}?ns={ns}")),
        ("traversal encoded", get(f"/v2/soak/%2e%2e%2f%2e%2e/blobs/{blob}?ns={ns}")),
        ("traversal in digest", get(f"/v2/soak/img/blobs/sha256:../../../../etc/passwd?ns={ns}")),
        ("bad digest", get(f"/v2/soak/img/blobs/sha256:{'z' * 64}?ns={ns}")),
        ("huge ns", get(f"/v2/soak/img/manifests/latest?ns={huge}")),
        ("many ns", get("/v2/soak/img/manifests/latest?" + "&".join(["ns=a"] * 500))),
        ("ns with control bytes", get("/v2/soak/img/manifests/latest?ns=%00%0d%0aevil")),
        ("invalid range", get(blob_path, "Range: bytes=999999999999-5\r\n")),
        ("multi range", get(blob_path, "Range: bytes=0-1,5-9,20-30\r\n")),
        ("garbage range", get(blob_path, "Range: pages=all\r\n")),
        ("negative range", get(blob_path, "Range: bytes=-0\r\n")),
        ("PUT", get(blob_path, "Content-Length: 4\r\n", method="PUT") + b"abcd"),
        ("DELETE", get(blob_path, method="DELETE")),
        ("POST upload", get("/v2/soak/img/blobs/uploads/", "Content-Length: 0\r\n", "POST")),
        ("PATCH", get(blob_path, "Transfer-Encoding: chunked\r\n", "PATCH") + b"4\r\nabcd\r\n"),
        ("pipelined garbage", get("/v2/") + secrets.token_bytes(4096) + get("/v2/")),
        ("not HTTP", secrets.token_bytes(2048)),
        ("HTTP/0.9", b"GET /v2/\r\n"),
        ("bad version", b"GET /v2/ HTTP/7.3\r\nHost: soak\r\n\r\n"),
        ("no host", b"GET /v2/ HTTP/1.1\r\n\r\n"),
        ("bad content-length", get("/v2/", "Content-Length: -1\r\n")),
        ("duplicate content-length", get("/v2/", "Content-Length: 1\r\nContent-Length: 2\r\n")),
        ("chunked smuggle", get("/v2/", "Transfer-Encoding: chunked, identity\r\n") + b"zz\r\n"),
        ("header without colon", get("/v2/", "NoColonHere\r\n")),
        ("NUL in target", b"GET /v2/\x00 HTTP/1.1\r\nHost: soak\r\n\r\n"),
        ("non-ASCII name", get("/v2/s\xc3\xb6ak/manifests/latest?ns=" + ns)),
        ("loop marker", get(blob_path, "X-Spegeld-Mirrored: true\r\n")),
        ("absolute-form target", get(f"http://evil.example:80/v2/soak/img/blobs/{blob}")),
        ("half a head then close", b"GET /v2/soak/img/blobs/sha256:"),
    ]


def _answer(raw: bytes, target: str) -> str:
    try:
        with _connect(target) as sock:
            sock.settimeout(ANSWER_TIMEOUT)
            try:
                sock.sendall(raw)
                if raw.endswith(b"sha256:"):
                    sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                return f"send failed: {type(exc).__name__}"
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    return "closed" if not data else f"partial: {data[:40]!r}"
                data += chunk
            return data.split(b"\r\n", 1)[0].decode("latin-1")
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return f"error: {type(exc).__name__}"


def hostile(args: argparse.Namespace) -> dict[str, Any]:
    """Every case on its own connection, HOSTILE_WORKERS at a time (bounded in time: at
    most cases / workers x ANSWER_TIMEOUT, under a per-source connection cap)."""
    cases = hostile_cases(args.ns, args.blob)
    with ThreadPoolExecutor(max_workers=HOSTILE_WORKERS) as pool:
        found = pool.map(lambda case: _answer(case[1], args.target), cases)
        answers = dict(zip((name for name, _ in cases), found, strict=True))
    answers["healthz after"] = _answer(b"GET /healthz HTTP/1.1\r\nHost: soak\r\n\r\n", args.target)
    return {"answers": answers}


# ---- udp-flood -----------------------------------------------------------------------------


def udp_flood(args: argparse.Namespace) -> dict[str, Any]:
    """Random bytes, msgpack-looking maps and truncated headers, ``--rate`` per second."""
    rng = random.Random(args.seed)
    host, port = _split(args.target)
    sent = errors = 0
    makers: list[Callable[[], bytes]] = [
        lambda: rng.randbytes(rng.randrange(1, 1400)),
        lambda: b"\x81\xa4type\xa4ping" + rng.randbytes(rng.randrange(0, 200)),
        lambda: b"\xdf\xff\xff\xff\xff" + rng.randbytes(16),  # a map claiming 4 G entries
        lambda: b"\x00" * rng.randrange(0, 64),
        lambda: rng.randbytes(65_000),  # near the datagram limit
    ]
    deadline = time.monotonic() + args.duration
    interval = 1.0 / max(args.rate, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        next_send = time.monotonic()
        while time.monotonic() < deadline and sent + errors < UDP_MAX_DATAGRAMS:
            try:
                sock.sendto(rng.choice(makers)(), (host, port))
                sent += 1
            except OSError:
                errors += 1
            next_send += interval
            pause = next_send - time.monotonic()
            if pause > 0:
                time.sleep(pause)
    return {"sent": sent, "errors": errors}


# ---- probe -------------------------------------------------------------------------------


def probe_once(target: str, request: bytes, timeout: float) -> tuple[float, str]:
    started = time.monotonic()
    try:
        with _connect(target, timeout=timeout) as sock:
            sock.settimeout(max(0.1, timeout - (time.monotonic() - started)))
            sock.sendall(request)
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return time.monotonic() - started, "closed"
                data += chunk
            status = data.split(b" ", 2)[1].decode("latin-1")
            return time.monotonic() - started, f"status {status}"
    except TimeoutError:
        return time.monotonic() - started, "timeout"
    except ConnectionRefusedError:
        return time.monotonic() - started, "refused"
    except OSError as exc:
        return time.monotonic() - started, f"error {type(exc).__name__}"


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """HEAD requests to the mirror, alternating a miss and the manifest of the image the
    soak is rolling out (read from ``--hit-file``, rewritten by the soak as it goes)."""
    out = Path(args.out)
    deadline = time.monotonic() + args.duration
    count = 0
    with out.open("a") as log:
        while time.monotonic() < deadline and count < args.max_probes:
            path = f"/v2/soak/miss/blobs/sha256:{secrets.token_hex(32)}?ns={args.ns}"
            kind = "miss"
            if count % 2:
                with contextlib.suppress(OSError):
                    path, kind = Path(args.hit_file).read_text().strip() or path, "hit"
            request = f"HEAD {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n"
            started = time.monotonic()
            seconds, outcome = probe_once(args.target, request.encode(), args.timeout)
            line = {"t": started, "s": round(seconds, 4), "o": outcome, "k": kind}
            log.write(json.dumps(line) + "\n")
            log.flush()
            count += 1
            time.sleep(max(0.0, args.interval - seconds))
    return {"probes": count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("corrupt-proxy")
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--duration", type=float, required=True)
    p = sub.add_parser("slowloris")
    p.add_argument("--target", required=True)
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--path", default="/v2/")
    p.add_argument("--duration", type=float, required=True)
    p = sub.add_parser("hostile")
    p.add_argument("--target", required=True)
    p.add_argument("--ns", required=True)
    p.add_argument("--blob", required=True)
    p = sub.add_parser("udp-flood")
    p.add_argument("--target", required=True)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--duration", type=float, required=True)
    p = sub.add_parser("probe")
    p.add_argument("--target", required=True)
    p.add_argument("--ns", required=True)
    p.add_argument("--hit-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--max-probes", type=int, default=100_000)
    p.add_argument("--duration", type=float, required=True)
    args = parser.parse_args()
    modes: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "corrupt-proxy": corrupt_proxy,
        "slowloris": slowloris,
        "hostile": hostile,
        "udp-flood": udp_flood,
        "probe": probe,
    }
    result = modes[args.mode](args)
    print(json.dumps({"mode": args.mode, "pid": os.getpid(), **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
