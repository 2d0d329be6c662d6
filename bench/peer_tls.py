"""What TLS would cost on the proxied path: one blob over loopback, plain vs TLS 1.3.

    .venv/bin/python bench/peer_tls.py              # 256 MiB, 5 rounds
    .venv/bin/python bench/peer_tls.py --mib 64 --rounds 3

The peer side is what a holder does: plain, one ``socket.sendfile`` of the blob file (what
spegeld's peer listener does today); TLS, the same call on an ``ssl.SSLSocket``, which
cannot use sendfile and falls back to reading the file and encrypting it in user space
(Python's ``ssl`` has no kernel TLS). The proxy side is what spegeld's proxy does: a trio
stream read in 1 MiB pieces, every byte hashed with SHA-256; for TLS, through
``trio.SSLStream`` (the way a trio daemon would speak TLS). The certificate is a fresh
self-signed ECDSA P-256 one the client pins, as per-node certificates whose fingerprints
travel in gossip would be; the cipher is what OpenSSL negotiates (AES-256-GCM on x86-64
with AES-NI). Each side's CPU seconds per GB are its thread's own.

Nothing here is spegeld's code: it measures the two transports under the same proxy-shaped
reader, so the ratio is what switching the peer path to TLS would cost at most.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MIB = 1024 * 1024
RECEIVE = MIB  # the proxy's body read size (mirror/_peer.py RECEIVE_SIZE)
HOST = "127.0.0.1"


def self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spegeld-node")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("spegeld-node")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "node.crt", directory / "node.key"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem


def serve_once(
    listener: socket.socket, blob: Path, context: ssl.SSLContext | None, cpu: list[float]
) -> None:
    """Accept one connection and send the blob: sendfile, or sendfile's TLS fallback."""
    conn, _ = listener.accept()
    start = time.thread_time()
    try:
        sock: socket.socket = conn
        if context is not None:
            sock = context.wrap_socket(conn, server_side=True)
        with blob.open("rb") as file:
            sock.sendfile(file)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # until the client has read everything and closed
    finally:
        cpu.append(time.thread_time() - start)
        conn.close()


async def fetch(port: int, size: int, context: ssl.SSLContext | None) -> str:
    stream: trio.abc.Stream = await trio.open_tcp_stream(HOST, port)
    if context is not None:
        stream = trio.SSLStream(stream, context, server_hostname="spegeld-node")
        await stream.do_handshake()
    hasher = hashlib.sha256()
    remaining = size
    while remaining > 0:
        chunk = await stream.receive_some(min(RECEIVE, remaining))
        if not chunk:
            raise RuntimeError(f"closed with {remaining} bytes to go")
        hasher.update(chunk)
        remaining -= len(chunk)
    await trio.aclose_forcefully(stream)
    return hasher.hexdigest()


def one_round(
    blob: Path, size: int, want: str, server_ctx: ssl.SSLContext | None,
    client_ctx: ssl.SSLContext | None,
) -> tuple[float, float, float]:  # fmt: skip
    """(MB/s, server CPU s/GB, client CPU s/GB) of one download."""
    with socket.create_server((HOST, 0)) as listener:
        port = listener.getsockname()[1]
        server_cpu: list[float] = []
        server = threading.Thread(target=serve_once, args=(listener, blob, server_ctx, server_cpu))
        server.start()
        started, cpu0 = time.perf_counter(), time.thread_time()
        got = trio.run(fetch, port, size, client_ctx)
        elapsed, client_cpu = time.perf_counter() - started, time.thread_time() - cpu0
        server.join(30)
    if got != want:
        raise SystemExit("the bytes do not match the blob")
    gb = size / 1e9
    return size / 1e6 / elapsed, server_cpu[0] / gb, client_cpu / gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="blob size in MiB (256)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, interleaved (5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spegeld-tls-") as tmp:
        directory = Path(tmp)
        blob = directory / "blob"
        blob.write_bytes(os.urandom(args.mib * MIB))
        size = blob.stat().st_size
        want = hashlib.sha256(blob.read_bytes()).hexdigest()
        cert, key, pem = self_signed(directory)
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cadata=pem.decode())
        client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        results: dict[str, list[tuple[float, float, float]]] = {"plain": [], "tls": []}
        cipher = ""
        for _ in range(args.rounds):
            results["plain"].append(one_round(blob, size, want, None, None))
            results["tls"].append(one_round(blob, size, want, server_ctx, client_ctx))
        with socket.create_server((HOST, 0)) as probe:
            port = probe.getsockname()[1]
            with socket.create_connection((HOST, port)) as raw:
                conn, _ = probe.accept()
                done = threading.Thread(
                    target=lambda: server_ctx.wrap_socket(conn, server_side=True).close()
                )
                done.start()
                with client_ctx.wrap_socket(raw, server_hostname="spegeld-node") as tls:
                    cipher = str(tls.cipher())
                done.join(10)
                conn.close()
    print(f"{args.mib} MiB blob over loopback, {args.rounds} interleaved rounds, "
          f"OpenSSL {ssl.OPENSSL_VERSION}; TLS cipher {cipher}")  # fmt: skip
    print(f"{'transport':<10} {'MB/s median (min-max)':>24} {'peer CPU s/GB':>14} "
          f"{'proxy CPU s/GB':>15}")  # fmt: skip
    medians = {}
    for name, rows in results.items():
        rates = [r[0] for r in rows]
        medians[name] = statistics.median(rates)
        rate = f"{medians[name]:.0f} ({min(rates):.0f}-{max(rates):.0f})"
        peer_cpu = statistics.median(r[1] for r in rows)
        proxy_cpu = statistics.median(r[2] for r in rows)
        print(f"{name:<10} {rate:>24} {peer_cpu:>14.2f} {proxy_cpu:>15.2f}")
    print(f"TLS / plain: {medians['tls'] / medians['plain']:.2f}")


if __name__ == "__main__":
    main()
