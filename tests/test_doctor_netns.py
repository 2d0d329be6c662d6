"""`spegeld doctor` names each API fault class of DESIGN.md §7, across network namespaces.

The Kubernetes API test server (tests/kubeapi) runs in one namespace, doctor in
another, both ends of every connection inside namespaces this test creates (no
default route: nothing can leave for a foreign address). Each fault is real:

- DROP and REJECT are nftables rules in the API server's namespace;
- an unresolvable name uses a resolv.conf for the node namespace whose nameserver
  is the API namespace's address, where nothing serves DNS;
- a revoked token and a token without `update` come from the server's token table;
- a CA the server's certificate does not chain to;
- a second server whose clock (and so its Date header) runs 10 minutes ahead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from spegeld.harness import HarnessUnavailable, Network
from tests.kubeapi._process import (
    KubeApiProcess,
    lease_account,
    service_account_jwt,
    write_kubeconfig,
)

pytestmark = [pytest.mark.slow]

SUBNET = "10.215.0"  # private to the namespaces this test creates
API_PORT = 6443
SKEWED_PORT = 6444
TIMEOUT = 2.0  # doctor --timeout
FAULT_TABLE = "spegeld_test_fault"
REPO = Path(__file__).resolve().parent.parent


TOKENS = {
    "spegeld": service_account_jwt("spegeld", time.time() + 3600),
    "limited": service_account_jwt("limited", time.time() + 3600),
    "revoked": service_account_jwt("revoked", time.time() - 7200),
}


def accounts() -> list[dict[str, Any]]:
    return [
        lease_account("spegeld", TOKENS["spegeld"]),
        lease_account("limited", TOKENS["limited"], ("get", "create")),
    ]


class Lab:
    def __init__(self, network: Network, tmp_path: Path) -> None:
        self.network = network
        self.api_ns, self.node_ns = network.nodes
        self.api_ip = network.address(0)
        self.tmp = tmp_path
        self.server = KubeApiProcess(
            tmp_path / "api", self.api_ip, API_PORT, accounts(), netns=self.api_ns
        )
        self.skewed = KubeApiProcess(
            tmp_path / "skewed",
            self.api_ip,
            SKEWED_PORT,
            accounts(),
            "--clock-offset",
            "600",
            netns=self.api_ns,
        )

    def config(self, name: str, *, token: str = TOKENS["spegeld"], server: str | None = None,
               ca_pem: str | None = None) -> Path:  # fmt: skip
        return write_kubeconfig(self.tmp / f"kubeconfig-{name}", server or self.server.url,
                                ca_pem or self.server.ca_pem, token)  # fmt: skip

    def doctor(self, config: Path) -> tuple[int, dict[str, dict[str, Any]], float]:
        started = time.monotonic()
        done = subprocess.run(
            ["ip", "netns", "exec", self.node_ns, sys.executable, "-m", "spegeld", "doctor",
             "--json", "--only", "api", "--timeout", str(TIMEOUT), "--kubeconfig", str(config)],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "KUBERNETES_SERVICE_HOST": ""},
        )  # fmt: skip
        took = time.monotonic() - started
        assert "Traceback" not in done.stderr, done.stderr
        checks = {c["check"]: c for c in json.loads(done.stdout)["checks"]}
        return done.returncode, checks, took

    def fault(self, rule: str) -> None:
        self.network.nft(self.api_ns, f"""
table inet {FAULT_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        tcp dport {API_PORT} {rule}
    }}
}}
""")  # fmt: skip

    def clear_fault(self) -> None:
        subprocess.run(["ip", "netns", "exec", self.api_ns, "nft", "delete", "table", "inet",
                        FAULT_TABLE], capture_output=True, timeout=30, check=True)  # fmt: skip

    def close(self) -> None:
        self.server.stop()
        self.skewed.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    network = Network(2, SUBNET, prefix="spgd")
    resolv_dir: Path | None = None
    try:
        try:
            network.create()
        except HarnessUnavailable as exc:
            pytest.fail(f"{exc} (this test must not be skipped)")
        # The node namespace's resolver is our own API namespace, where nothing serves
        # DNS: a lookup fails at once and no query leaves for a real resolver.
        resolv_dir = Path("/etc/netns") / network.nodes[1]
        resolv_dir.mkdir(parents=True)
        (resolv_dir / "resolv.conf").write_text(f"nameserver {network.address(0)}\n")
        built = Lab(network, tmp_path_factory.mktemp("doctor-netns"))
        try:
            yield built
        finally:
            built.close()
    finally:
        if resolv_dir is not None:
            shutil.rmtree(resolv_dir, ignore_errors=True)
        network.close()


def test_a_healthy_api_passes_every_check(lab: Lab) -> None:
    code, checks, _ = lab.doctor(lab.config("healthy"))
    assert code == 0, checks
    assert {name: c["status"] for name, c in checks.items()} == {
        "api.dns": "ok", "api.tcp": "ok", "api.tls": "ok", "api.health": "ok",
        "api.clock": "ok", "api.auth": "ok", "api.rbac": "ok", "api.namespace": "ok",
    }  # fmt: skip


def test_dropped_packets_are_named_with_the_policy_remedy_within_the_timeout(lab: Lab) -> None:
    lab.fault("drop")
    try:
        code, checks, took = lab.doctor(lab.config("healthy"))
    finally:
        lab.clear_fault()
    tcp = checks["api.tcp"]
    assert code == 1
    assert tcp["status"] == "fail"
    assert tcp["verdict"].startswith("packets dropped")
    assert "toEntities: [kube-apiserver]" in tcp["remedy"]
    assert "kind: NetworkPolicy" in tcp["remedy"]
    assert f"{lab.api_ip}:{API_PORT}" in tcp["remedy"]
    assert checks["api.tls"]["status"] == "skip"
    # one connect timeout plus process start-up: well inside the doctor's bound
    assert took < TIMEOUT * 3 + 5, took


def test_reject_is_refused(lab: Lab) -> None:
    lab.fault("reject with tcp reset")
    try:
        code, checks, took = lab.doctor(lab.config("healthy"))
    finally:
        lab.clear_fault()
    assert code == 1
    assert checks["api.tcp"]["verdict"].startswith("connection refused")
    assert took < TIMEOUT + 5


def test_an_unresolvable_name_is_a_dns_failure(lab: Lab) -> None:
    name = "kube-api.spegeld.test"
    code, checks, _ = lab.doctor(lab.config("dns", server=f"https://{name}:{API_PORT}"))
    assert code == 1
    dns = checks["api.dns"]
    assert dns["status"] == "fail"
    assert dns["verdict"] == f"DNS failure: {name} does not resolve"
    assert f"nameservers: {lab.api_ip}" in dns["evidence"]
    assert checks["api.tcp"]["status"] == "skip"


def test_a_revoked_token_is_401(lab: Lab) -> None:
    code, checks, _ = lab.doctor(lab.config("revoked", token=TOKENS["revoked"]))
    assert code == 1
    auth = checks["api.auth"]
    assert auth["status"] == "fail"
    assert auth["verdict"].startswith("401")
    # expired two hours before the module was imported: 120 min ago, or a little more
    assert re.match(r"token expired 12\d min ago \(", auth["evidence"][0]), auth["evidence"]
    assert "create token" in auth["remedy"]


def test_a_token_without_update_is_403_naming_the_verb_and_printing_the_role(lab: Lab) -> None:
    code, checks, _ = lab.doctor(lab.config("limited", token=TOKENS["limited"]))
    assert code == 1
    rbac = checks["api.rbac"]
    assert rbac["status"] == "fail"
    assert rbac["verdict"] == "403: RBAC forbids update on leases in spegeld"
    assert "update: denied" in rbac["evidence"]
    role, binding = [d for d in yaml.safe_load_all(rbac["remedy"].partition("\n")[2]) if d]
    assert role["kind"] == "Role" and "update" in role["rules"][0]["verbs"]
    assert binding["subjects"][0] == {
        "kind": "ServiceAccount", "name": "limited", "namespace": "spegeld"
    }  # fmt: skip


def test_a_certificate_from_another_ca_is_a_tls_failure(lab: Lab) -> None:
    other = trustme.CA().cert_pem.bytes().decode()
    code, checks, _ = lab.doctor(lab.config("other-ca", ca_pem=other))
    assert code == 1
    tls = checks["api.tls"]
    assert tls["status"] == "fail"
    assert "not signed by the CA" in tls["verdict"]
    assert any(line.startswith("server certificate: subject") for line in tls["evidence"])
    assert checks["api.health"]["status"] == "skip"


def test_a_server_date_10_minutes_off_is_clock_skew(lab: Lab) -> None:
    config = lab.config("skewed", server=lab.skewed.url, ca_pem=lab.skewed.ca_pem)
    code, checks, _ = lab.doctor(config)
    assert code == 1
    clock = checks["api.clock"]
    assert clock["status"] == "fail"
    skew = int(clock["verdict"].removeprefix("clock skew of ").removesuffix(" s"))
    assert 598 <= skew <= 602  # Date has one-second resolution
    assert "timedatectl" in clock["remedy"]
