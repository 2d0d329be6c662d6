"""A slowloris flood from one pod cannot lock containerd out of its node's mirror.

Production: containerd reaches the mirror on loopback; a hostile pod reaches it from its
own, non-loopback address. The test rebuilds exactly that with two network namespaces it
creates (and deletes) on a bridge: the server listens on 0.0.0.0 in ``n0``; a separate
hostile process in ``n1`` opens 2000 connections from 10.221.0.2 that drip a request head
one byte a second, and reconnects whenever one is closed; containerd's requests come from
127.0.0.1 inside ``n0``. Both ends of every connection are inside our namespaces.

The server and the probes run in this process: their sockets are created on a short-lived
thread that entered ``n0`` (a socket belongs to the namespace it was created in, for life).
"""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from spegeld_harness import HarnessUnavailable, Network, build_image

from spegeld.routing import StaticRouter

from ._support import image_in_memory, serving_registry

pytestmark = [pytest.mark.slow]

SUBNET = "10.221.0"  # /24, private to the namespaces this test creates
HOSTILE_CONNECTIONS = 2000
FLOOD_SECONDS = 8.0
PROBES = 20
PROBE_BOUND = 0.100  # seconds: containerd's request from loopback, during the flood
FILES_NEEDED = 3 * HOSTILE_CONNECTIONS  # hostile ends (other process) + our accepted ends
CLONE_NEWNET = 0x40000000
IMAGE = build_image("example.com/team/flood:v1", [1000], seed=9)

T = TypeVar("T")

# The hostile client: a slowloris that reconnects whenever the server closes it.
HOSTILE = r"""
import resource, socket, sys, trio
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
HEAD = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nX-Drip: " + b"a" * 1000
stats = {"connects": 0, "closed": 0, "failed": 0, "dripped": 0}

async def one():
    while True:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            stats["failed"] += 1
            await trio.sleep(1)
            continue
        stats["connects"] += 1
        async with stream:
            try:
                for i in range(len(HEAD)):
                    await stream.send_all(HEAD[i : i + 1])
                    stats["dripped"] += 1
                    with trio.move_on_after(1):
                        if await stream.receive_some(100) == b"":
                            break
            except (trio.BrokenResourceError, OSError):
                pass
        stats["closed"] += 1
        await trio.sleep(1)

async def main():
    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
            print("started", flush=True)
    print(stats, flush=True)

trio.run(main)
"""


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """``make()`` run on a fresh thread inside ``netns``; the thread ends with it, so no
    other code ever runs in the namespace by accident."""
    libc = ctypes.CDLL(None, use_errno=True)
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {netns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(timeout=10)
    if failure:
        raise failure[0]
    return result[0]


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network(2, SUBNET, prefix="spgh")
    try:
        net.create()
    except HarnessUnavailable as exc:
        net.close()
        pytest.skip(str(exc))
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def more_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < FILES_NEEDED:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {FILES_NEEDED}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, FILES_NEEDED), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def probe_sockets() -> list[socket.socket]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(PROBES)]
    for sock in socks:
        sock.setblocking(False)
    return socks


async def probe(raw: socket.socket, port: int, target: bytes) -> float:
    """One containerd-like GET from 127.0.0.1 on a new connection; seconds to the answer."""
    sock = trio.socket.from_stdlib_socket(raw)
    start = trio.current_time()
    with sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(
            b"GET " + target + b" HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := await sock.recv(65536):
            answer += chunk
    took = trio.current_time() - start
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    return took


async def test_a_slowloris_flood_from_one_pod_cannot_lock_out_containerd(
    network: Network, more_files: None, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server_ns, hostile_ns = network.nodes
    listener = trio.SocketListener(
        trio.socket.from_stdlib_socket(in_netns(server_ns, listening_socket))
    )
    port = listener.socket.getsockname()[1]
    probes = in_netns(server_ns, probe_sockets)
    target = b"/v2/team/flood/manifests/v1?ns=example.com"
    output = tmp_path / "hostile.out"
    with output.open("w") as out_file:
        hostile = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", hostile_ns, sys.executable, "-c", HOSTILE,
             network.address(0), str(port), str(HOSTILE_CONNECTIONS), str(FLOOD_SECONDS)],
            stdout=out_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        with trio.fail_after(FLOOD_SECONDS + 20):
            async with serving_registry(
                image_in_memory(IMAGE), StaticRouter([]), inherited=(listener,)
            ) as (registry, _):
                # The flood is on: the pod holds its 64 slots, the rest were closed.
                def flooded() -> bool:
                    stats = registry.statistics()
                    return stats["connections"] >= 64 and stats["refused"] >= 1000

                while not flooded():
                    assert hostile.poll() is None, output.read_text()
                    await trio.sleep(0.05)
                peak = registry.statistics()["connections"]
                times = []
                for raw in probes:
                    times.append(await probe(raw, port, target))
                    peak = max(peak, registry.statistics()["connections"])
                    await trio.sleep(0.1)
                stats = registry.statistics()
                await hostile.wait()
    finally:
        if hostile.poll() is None:
            hostile.kill()  # our own child, by its PID
            with trio.move_on_after(10, shield=True):
                await hostile.wait()
    report = output.read_text().strip().splitlines()
    figures = {
        "hostile_connections": HOSTILE_CONNECTIONS,
        "probe_ms_median": round(statistics.median(times) * 1000, 2),
        "probe_ms_max": round(max(times) * 1000, 2),
        "refused": stats["refused"],
        "peak_connections": peak,
        "hostile": report[-1] if report else "",
    }
    request.node.user_properties.extend(figures.items())
    print(figures)
    assert peak <= 64 + 1, "the pod never held more than its 64 slots (+ one probe)"
    assert max(times) < PROBE_BOUND, figures
