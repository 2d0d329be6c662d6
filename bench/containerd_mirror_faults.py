"""How long a pull waits on a mirror that never answers, before containerd falls back.

Two broken mirrors on loopback, each listed first in hosts.toml ahead of the real upstream
(a Distribution registry):

* ``hang``: accepts every connection and never sends a byte (a SIGSTOPped daemon, say);
* ``syn-drop``: a listening socket whose accept queue is full, so the kernel drops new
  SYNs and the dial itself hangs (what a DROP rule does, without touching the host firewall).

For each, with ``dial_timeout`` unset and set to 200 ms, it times ``crictl pull`` through
CRI and ``ctr images pull --hosts-dir`` on a private containerd (2.3 by default; ``--v16``
for Debian's 1.6).  Usage (root)::

    .venv/bin/python bench/containerd_mirror_faults.py [--v16] [--only hang|syn-drop]
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from spegeld_harness import CtrError, PrivateContainerd, UpstreamRegistry, build_image

BUILD = Path(__file__).resolve().parent.parent / "scripts" / "build-components"
PULL_LIMIT = 600.0  # seconds; a pull that waits longer is reported as such
FILLERS = 16  # connections that fill a backlog-0 accept queue (the kernel then drops SYNs)


def component(name: str) -> Path:
    out = subprocess.run([str(BUILD), "--print-path", name], capture_output=True, text=True,
                         check=True, timeout=30)  # fmt: skip
    return Path(out.stdout.strip())


@contextlib.contextmanager
def hanging_mirror(host: str) -> Iterator[int]:
    """Accepts and holds every connection, never answering."""
    server = socket.create_server((host, 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


@contextlib.contextmanager
def syn_dropping_mirror(host: str) -> Iterator[int]:
    """A port whose accept queue is full: a new connection's SYN goes unanswered."""
    server = socket.socket()
    server.bind((host, 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    for _ in range(FILLERS):
        client = socket.socket()
        client.settimeout(0.3)
        try:
            client.connect((host, port))
        except TimeoutError:
            client.close()
            break
        fillers.append(client)
    else:
        raise RuntimeError("the accept queue never filled")
    try:
        yield port
    finally:
        for client in fillers:
            client.close()
        server.close()


def write_hosts(hosts_dir: Path, upstream: UpstreamRegistry, mirror: str, dial: str) -> None:
    directory = hosts_dir / upstream.address
    directory.mkdir(parents=True, exist_ok=True)
    dial_line = f'  dial_timeout = "{dial}"\n' if dial else ""
    (directory / "hosts.toml").write_text(
        f'server = "{upstream.url}"\n\n[host."{mirror}"]\n'
        f'  capabilities = ["pull", "resolve"]\n{dial_line}'
    )


def timed_crictl(crictl: Path, node: PrivateContainerd, ref: str) -> tuple[float, str]:
    endpoint = f"unix://{node.cri_socket}"
    argv = [str(crictl), "--runtime-endpoint", endpoint, "--image-endpoint", endpoint,
            "--timeout", f"{PULL_LIMIT:.0f}s", "pull", ref]  # fmt: skip
    start = time.monotonic()
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=PULL_LIMIT + 10, check=False
        )
    except subprocess.TimeoutExpired:
        return PULL_LIMIT, "still waiting"
    outcome = "ok" if result.returncode == 0 else f"exit {result.returncode}"
    return time.monotonic() - start, outcome


def timed_ctr(node: PrivateContainerd, ref: str) -> tuple[float, str]:
    start = time.monotonic()
    try:
        node.ctr("images", "pull", "--hosts-dir", node.hosts_dir, ref, timeout=PULL_LIMIT)
    except subprocess.TimeoutExpired:
        return PULL_LIMIT, "still waiting"
    except CtrError as e:
        return time.monotonic() - start, f"exit {e.returncode}"
    return time.monotonic() - start, "ok"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--v16", action="store_true", help="Debian's containerd 1.6")
    parser.add_argument("--only", choices=["hang", "syn-drop"])
    args = parser.parse_args()
    bin_dir = None if args.v16 else component("containerd")
    crictl = component("crictl") / "crictl"
    image = build_image("example.com/faults/app:v1", [1_000_000, 200_000], seed=3)
    faults = {"hang": hanging_mirror, "syn-drop": syn_dropping_mirror}
    with tempfile.TemporaryDirectory(prefix="spg-faults-") as tmp:
        work = Path(tmp)
        with UpstreamRegistry(work / "upstream") as upstream:
            ref = upstream.push(image, "faults/app", "v1")
            for fault, open_mirror in faults.items():
                if args.only and fault != args.only:
                    continue
                for dial in ("", "200ms"):
                    for client in ("crictl", "ctr"):  # a fresh node each: nothing cached
                        base = work / f"cd-{fault}-{dial or 'unset'}-{client}"
                        with (
                            open_mirror("127.0.0.4") as port,
                            PrivateContainerd(base, bin_dir=bin_dir, cri=True) as node,
                        ):
                            mirror = f"http://127.0.0.4:{port}"
                            write_hosts(node.hosts_dir, upstream, mirror, dial)
                            if client == "crictl":
                                seconds, outcome = timed_crictl(crictl, node, ref)
                            else:
                                seconds, outcome = timed_ctr(node, ref)
                            print(
                                f"containerd {node.version} mirror={fault:8} "
                                f"dial_timeout={dial or 'unset':6} {client:6} pull "
                                f"{seconds:6.1f} s ({outcome})",
                                flush=True,
                            )


if __name__ == "__main__":
    main()
