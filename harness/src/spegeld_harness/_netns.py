"""Network namespaces for fault tests: a bridge namespace and node namespaces on it.

Every namespace gets a random suffix and is deleted by ``close()``. The node
namespaces have no default route, so nothing inside them can reach a foreign
address; both ends of every connection must run inside (``ip netns exec``).
"""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spegeld_harness._containerd import HarnessUnavailable, PrivateContainerd
from spegeld_harness._spegeld import SpegeldProcess

COMMAND_TIMEOUT = 30.0


def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, stdin: str | None = None) -> str:
    result = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


class Network:
    """``nodes`` namespaces with ``<subnet>.<i+1>/24`` on ``eth0``, bridged; close() deletes."""

    def __init__(self, nodes: int, subnet: str, prefix: str = "spgt") -> None:
        suffix = secrets.token_hex(3)
        self.subnet = subnet  # "10.213.0": a /24 private to these namespaces
        self.bridge = f"{prefix}-br-{suffix}"
        self.nodes = [f"{prefix}-n{i}-{suffix}" for i in range(nodes)]
        self._created: list[str] = []

    def address(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    def create(self) -> None:
        missing = [tool for tool in ("ip", "nft", "curl") if shutil.which(tool) is None]
        if missing:
            raise HarnessUnavailable(
                f"{', '.join(missing)} not found: apt-get install -y iproute2 nftables curl"
            )
        for name in [self.bridge, *self.nodes]:
            result = subprocess.run(
                ["ip", "netns", "add", name],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                raise HarnessUnavailable(
                    f"cannot create network namespace {name}: {result.stderr.strip()} "
                    "(needs root with CAP_SYS_ADMIN and CAP_NET_ADMIN)"
                )
            self._created.append(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
        for i, node in enumerate(self.nodes):
            # Both ends are created inside our namespaces, never in the host's.
            run(["ip", "-n", node, "link", "add", "eth0", "type", "veth",
                 "peer", "name", f"p{i}", "netns", self.bridge])  # fmt: skip
            run(["ip", "-n", self.bridge, "link", "set", f"p{i}", "master", "br0"])
            run(["ip", "-n", self.bridge, "link", "set", f"p{i}", "up"])
            self._add_address(node, i)
            run(["ip", "-n", node, "link", "set", "eth0", "up"])

    def _add_address(self, node: str, i: int) -> None:
        run(["ip", "-n", node, "addr", "add", f"{self.address(i)}/24", "dev", "eth0"])

    def nft(self, node: str, ruleset: str) -> None:
        run(["ip", "netns", "exec", node, "nft", "-f", "-"], stdin=ruleset)

    def add_loss(self, node: str, port: int, percent: int, table: str) -> None:
        """Drop ``percent`` % of the UDP datagrams arriving for ``port``, counting both."""
        self.nft(node, f"""
table inet {table} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {port} counter
        udp dport {port} numgen random mod 100 < {percent} counter drop
    }}
}}
""")  # fmt: skip

    def counters(self, node: str, table: str) -> list[int]:
        """The packet counts of ``table``'s counters, in rule order."""
        listing = json.loads(run(["ip", "netns", "exec", node, "nft", "-j", "list", "table",
                                  "inet", table]))  # fmt: skip
        counts = []
        for item in listing["nftables"]:
            rule = item.get("rule")
            if rule is None:
                continue
            for expr in rule["expr"]:
                if "counter" in expr:
                    counts.append(int(expr["counter"]["packets"]))
        return counts

    def close(self) -> None:
        problems = []
        for name in reversed(self._created):
            result = subprocess.run(
                ["ip", "netns", "del", name],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if result.returncode != 0:
                problems.append(f"{name}: {result.stderr.strip()}")
        self._created.clear()
        left = set(run(["ip", "netns", "list"]).split()) & {self.bridge, *self.nodes}
        if problems or left:
            raise RuntimeError(f"namespaces not deleted: {problems} {sorted(left)}")


def in_netns_wrapper(path: Path, netns: str, program: str) -> Path:
    """An executable that runs ``program`` inside ``netns`` (exec all the way down, so
    the PID the harness gets is the program's own, and it stops the right process)."""
    path.write_text(f'#!/bin/sh\nexec ip netns exec {netns} {program} "$@"\n')
    path.chmod(0o755)
    return path


class NetnsContainerd(PrivateContainerd):
    """A private containerd inside ``netns``; its ctr runs there too. ``bin_dir``: the
    ``containerd`` and ``ctr`` of that directory (a 2.x build), else Debian's from PATH."""

    def __init__(self, base_dir: Path, netns: str, bin_dir: Path | None = None) -> None:
        base_dir.mkdir(parents=True, exist_ok=True)
        containerd, ctr = "containerd", "ctr"
        if bin_dir is not None:
            # One version for both: a 1.6 ctr against a 2.x daemon (or back) is not the
            # pairing either release is tested with.
            containerd = shlex.quote(str(Path(bin_dir) / "containerd"))
            ctr = shlex.quote(str(Path(bin_dir) / "ctr"))
        super().__init__(
            base_dir,
            containerd_bin=str(in_netns_wrapper(base_dir / "containerd-in-netns", netns,
                                                containerd)),
            ctr_bin=str(in_netns_wrapper(base_dir / "ctr-in-netns", netns, ctr)),
        )  # fmt: skip
        self.netns = netns


PEER_PORT = 5001  # spegeld's default --peer-addr port


class NetnsSpegeld(SpegeldProcess):
    """``spegeld run`` inside a namespace; every request to it is a curl from inside too."""

    def __init__(
        self, netns: str, base_dir: Path, containerd: PrivateContainerd, **kwargs: Any
    ) -> None:
        # The namespace's own ports: the default, not a port probed in the root namespace.
        kwargs.setdefault("peer_port", PEER_PORT)
        super().__init__(base_dir, containerd, **kwargs)
        self.netns = netns

    def argv(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *super().argv()]

    def get(
        self, path: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        # curl's --head, not --request HEAD: the latter waits for a body that never comes.
        verb = ["--head"] if method == "HEAD" else ["--request", method]
        # --globoff: a [v6] host in the URL is an address, not a curl glob.
        argv = ["ip", "netns", "exec", self.netns, "curl", "--silent", "--include", "--globoff",
                "--noproxy", "*", "--max-time", "10", *verb]  # fmt: skip
        for name, value in (headers or {}).items():
            argv += ["--header", f"{name}: {value}"]
        result = subprocess.run(
            [*argv, f"{self.url}{path}"], capture_output=True, timeout=30, check=False
        )
        if result.returncode == 7:
            raise ConnectionRefusedError(f"curl in {self.netns}: cannot connect to {self.url}")
        if result.returncode == 28:
            raise TimeoutError(f"curl in {self.netns}: {self.url}{path} timed out")
        if result.returncode != 0:
            raise OSError(f"curl in {self.netns} exited with {result.returncode}")
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        found = {}
        for line in lines:
            name, _, value = line.partition(":")
            found[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), found, body
