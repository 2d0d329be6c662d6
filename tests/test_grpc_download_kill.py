"""containerd killed (-9) in the middle of a gRPC-path download through a real daemon.

The client sees a cut response (fewer bytes than Content-Length, then the connection
closes), the daemon stays up, and once containerd is back the same GET succeeds whole.
"""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest
from spegeld_harness import PrivateContainerd, SpegeldProcess, build_image

from ._support import wait_for

pytestmark = pytest.mark.containerd

MiB = 1024 * 1024
LAYER = 64 * MiB
KILL_AFTER = 8 * MiB  # bytes received before containerd is killed: well inside the body
READ_PAUSE = 0.002  # seconds between 64 KiB reads: ~30 MiB/s, a slow client
DEADLINE = 60  # seconds for the cut download to end, a hard bound


def read_head(sock: socket.socket) -> tuple[int, int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(64 * 1024)
        assert chunk, "connection closed before the response head"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), int(headers["content-length"]), rest


def test_containerd_killed_mid_download_cuts_that_response_only(tmp_path: Path) -> None:
    containerd = PrivateContainerd(tmp_path / "containerd")
    containerd.start()
    try:
        image = build_image("example.com/big/app:v1", [LAYER], seed=97, compresslevel=0)
        containerd.import_image(image.write_oci_archive(tmp_path / "big.tar"))
        layer = image.platforms[0].layers[0]
        size = image.blobs[layer].size
        path = f"/v2/big/app/blobs/{layer}?ns=example.com"
        # A content path that is not containerd's: every blob goes over Content.Read.
        args = ["--no-election", "--containerd-content-path", str(tmp_path / "elsewhere")]
        with SpegeldProcess(tmp_path / "node", containerd, extra_args=args) as node:
            with socket.create_connection((node.host, node.port), timeout=10) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                status, length, body = read_head(sock)
                assert (status, length) == (200, size)
                received = len(body)
                killed = False
                start = time.monotonic()
                while True:
                    assert time.monotonic() - start < DEADLINE, "the cut response never ended"
                    try:
                        chunk = sock.recv(64 * 1024)
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    received += len(chunk)
                    if not killed and received >= KILL_AFTER:
                        containerd.kill()
                        killed = True
                    time.sleep(READ_PAUSE)
            assert killed, f"the body ended after {received} bytes, before the kill"
            assert received < size, "the response must be cut, not completed"
            assert node.pid is not None and node.get("/healthz")[0] == 200, "daemon alive"
            assert node.status()["store"]["grpc_reads"] >= 1

            containerd.start()
            wait_for(lambda: node.get_or_none("/readyz") == 200, 15, "ready again")
            status, _, data = node.get(path)
            assert status == 200
            assert hashlib.sha256(data).hexdigest() == layer.removeprefix("sha256:")
            assert "Traceback" not in node.log_path.read_text()
    finally:
        containerd.close()
