"""`spegeld doctor` names each API fault class of DESIGN.md §7, against a real kube-apiserver.

etcd and kube-apiserver (scripts/build-components) run in one network namespace, doctor
in another: both ends of every connection are inside namespaces this test creates (no
default route: nothing can leave for a foreign address). RBAC comes from
deploy/rbac.yaml and the kubeconfig from the steps of deploy/README.md (TokenRequest).
Each fault is real:

- DROP and REJECT are nftables rules in the API server's namespace;
- no route: an ``unreachable``, ``prohibit`` or ``blackhole`` route to the server in the
  node namespace, or its subnet route deleted; an ICMP unreachable from the far side is
  an nftables ``reject with icmpx type host-unreachable`` in the API server's namespace;
- an unhealthy API server: its etcd frozen with SIGSTOP, until its own /readyz fails;
- an unresolvable name uses a resolv.conf for the node namespace whose nameserver is the
  API namespace's address, where nothing serves DNS;
- a revoked token: a TokenRequest token whose ServiceAccount was then deleted; an
  expired token: signed with the apiserver's own key, expired two hours ago;
- a ServiceAccount whose Role lacks ``update`` (403, from RBAC's own answer);
- a CA the server's certificate does not chain to;
- an expired serving certificate: the apiserver restarted with one (then restarted back);
- a missing namespace: an account allowed Leases everywhere, pointed at a namespace that
  does not exist.

Still on the API test server (tests/kubeapi), and why: the clock-skew test. The real
apiserver's ``Date`` comes from this machine's clock, and the test cannot move the clock
of one namespace (time namespaces do not cover CLOCK_REALTIME); the stand-in's
``--clock-offset`` shifts its Date header alone.
"""

from __future__ import annotations

import contextlib
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
from spegeld_harness import HarnessUnavailable, Network

from tests.kubeapi._process import (
    KubeApiProcess,
    lease_account,
    service_account_jwt,
    write_kubeconfig,
)
from tests.realkube._accounts import add_account, follow_readme, signed_expired_token
from tests.realkube._apiserver import RealKubeApi

pytestmark = [pytest.mark.slow, pytest.mark.kubeapiserver]

SUBNET = "10.215.0"  # private to the namespaces this test creates
API_PORT = 6443
SKEWED_PORT = 6444
TIMEOUT = 2.0  # doctor --timeout
FAULT_TABLE = "spegeld_test_fault"
EXPIRED_AGO = 7200.0  # the hand-signed token expired two hours before the module started
MISSING_NAMESPACE = "spegeld-absent"
REPO = Path(__file__).resolve().parent.parent


class Lab:
    def __init__(self, network: Network, tmp: Path) -> None:
        self.network = network
        self.api_ns, self.node_ns = network.nodes
        self.api_ip = network.address(0)
        self.tmp = tmp
        self.api = RealKubeApi(tmp / "api", self.api_ip, API_PORT, netns=self.api_ns)
        self.api.start()
        print(f"\n[doctor] etcd + kube-apiserver ready in {self.api.start_seconds:.1f} s, "
              f"RSS MiB {self.api.rss_mib()}")  # fmt: skip
        self.healthy = follow_readme(self.api, tmp / "readme")
        add_account(self.api, "limited", ("get", "create"))
        add_account(self.api, "wide", ("get", "create", "update"), cluster_wide=True)
        add_account(self.api, "revoked", ("get", "create", "update"))
        self.tokens = {
            name: self.api.kubectl("-n", "spegeld", "create", "token", name).strip()
            for name in ("limited", "wide", "revoked")
        }
        self.tokens["expired"] = signed_expired_token(
            self.api, "spegeld", time.time() - EXPIRED_AGO
        )
        self.api.kubectl("-n", "spegeld", "delete", "serviceaccount", "revoked")
        token = service_account_jwt("spegeld", time.time() + 3600)
        self.skewed = KubeApiProcess(
            tmp / "skewed", self.api_ip, SKEWED_PORT, [lease_account("spegeld", token)],
            "--clock-offset", "600", netns=self.api_ns,
        )  # fmt: skip
        self.skewed_config = self.skewed.kubeconfig(tmp / "kubeconfig-skewed", token)

    def config(self, name: str, *, token: str | None = None, server: str | None = None,
               ca_pem: str | None = None) -> Path:  # fmt: skip
        if token is None and server is None and ca_pem is None:
            return self.healthy
        return write_kubeconfig(self.tmp / f"kubeconfig-{name}", server or self.api.url,
                                ca_pem or self.api.ca_pem, token or self.tokens["limited"])  # fmt: skip

    def doctor(self, config: Path, *extra: str) -> tuple[int, dict[str, dict[str, Any]], float]:
        started = time.monotonic()
        done = subprocess.run(
            ["ip", "netns", "exec", self.node_ns, sys.executable, "-m", "spegeld", "doctor",
             "--json", "--only", "api", "--timeout", str(TIMEOUT), "--kubeconfig", str(config),
             *extra],
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

    @contextlib.contextmanager
    def no_route(self, how: str) -> Iterator[None]:
        """The node namespace loses its way to the API server: a route of type ``how``
        (ip-route(8)) for the server's address, or (``missing``) no route at all: the
        node's subnet route deleted. Restored on the way out."""
        subnet = f"{SUBNET}.0/24"
        undo: tuple[str, ...]
        if how == "missing":
            self._node_ip("route", "del", subnet, "dev", "eth0")
            undo = ("route", "add", subnet, "dev", "eth0", "proto", "kernel", "scope", "link",
                    "src", self.network.address(1))  # fmt: skip
        else:
            self._node_ip("route", "add", how, f"{self.api_ip}/32")
            undo = ("route", "del", how, f"{self.api_ip}/32")
        try:
            yield
        finally:
            self._node_ip(*undo)

    def _node_ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.node_ns, *args], capture_output=True, timeout=30,
                       check=True)  # fmt: skip

    def close(self) -> None:
        self.skewed.stop()
        self.api.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    network = Network(2, SUBNET, prefix="spgd")
    resolv_dir: Path | None = None
    built: Lab | None = None
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
        tmp = tmp_path_factory.mktemp("doctor-netns")
        try:
            built = Lab(network, tmp)
        except BaseException:
            for child in ("api/apiserver.log", "api/etcd.log"):
                if (tmp / child).exists():
                    print((tmp / child).read_text(errors="replace")[-3000:])
            raise
        yield built
    finally:
        if built is not None:
            built.close()
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
    assert any("v1.36" in line for line in checks["api.health"]["evidence"])
    # the README's one-year TokenRequest token, as the apiserver signed it
    assert re.match(r"token valid until 20\d\d-", checks["api.auth"]["evidence"][0])


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


def _connect_ms(evidence: str) -> int:
    """The connect time in doctor's TCP evidence, "IP:PORT: <kernel's words> after N ms"."""
    found = re.search(r" after (\d+) ms$", evidence)
    assert found, evidence
    return int(found.group(1))


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("unreachable", "No route to host"),  # EHOSTUNREACH
        ("prohibit", "Permission denied"),  # EACCES
        ("blackhole", "Invalid argument"),  # EINVAL
        ("missing", "Network is unreachable"),  # ENETUNREACH
    ],
)
def test_no_route_on_the_node_is_named_with_the_kernels_answer(
    lab: Lab, how: str, said: str
) -> None:
    with lab.no_route(how):
        code, checks, _ = lab.doctor(lab.config("healthy"))
    tcp = checks["api.tcp"]
    assert code == 1
    assert tcp["status"] == "fail"
    assert tcp["verdict"] == f"no route: this node's kernel has no usable route to {lab.api_ip}"
    first, route = tcp["evidence"]
    assert first.startswith(f"{lab.api_ip}:{API_PORT}: {said} after "), first
    # the kernel refuses at once: no timeout was waited out
    assert _connect_ms(first) < TIMEOUT * 1000 / 2, first
    assert route == f"route: RTNETLINK answers: {said}"
    assert f"ip route get {lab.api_ip}" in tcp["remedy"]
    assert checks["api.tls"]["status"] == "skip"


def test_an_icmp_unreachable_from_the_far_side_is_no_route_with_the_route_used(lab: Lab) -> None:
    # The API server's host answers the SYN with ICMP host-unreachable: the node has a
    # route, the network says no.
    lab.fault("reject with icmpx type host-unreachable")
    try:
        code, checks, _ = lab.doctor(lab.config("healthy"))
    finally:
        lab.clear_fault()
    tcp = checks["api.tcp"]
    assert code == 1
    assert tcp["status"] == "fail"
    assert tcp["verdict"] == "no route: an ICMP unreachable came back from the network"
    first, route = tcp["evidence"]
    # trio words a connect that fails later (the ICMP came back) "Error connecting to …"
    assert first.startswith(f"{lab.api_ip}:{API_PORT}: "), first
    assert "No route to host after " in first, first
    assert _connect_ms(first) < TIMEOUT * 1000 / 2, first
    assert route.startswith(f"route: {lab.api_ip} dev eth0 src {lab.network.address(1)}"), route
    assert f"traceroute -T -p {API_PORT} {lab.api_ip}" in tcp["remedy"]
    assert "nft list ruleset" in tcp["remedy"]


def test_an_apiserver_whose_etcd_is_stopped_is_unhealthy_naming_etcd(lab: Lab) -> None:
    # etcd frozen (SIGSTOP) until the apiserver's own /readyz fails on it; kube-apiserver
    # keeps answering, and its /readyz takes 4 s (2 s per etcd check) to say 500.
    # --timeout 2: doctor waits up to 6 s for /readyz and gets the server's answer;
    # --timeout 1: it waits 3 s, gets none, and still names the stall and where to look.
    # One after the other: two /readyz in flight together can share one etcd check, and
    # the second then answers before its 4 s.
    with lab.api.etcd_stopped():
        code, checks, _ = lab.doctor(lab.config("healthy"))
        quick_code, quick_checks, _ = lab.doctor(lab.config("healthy"), "--timeout", "1")
    health = checks["api.health"]
    assert code == 1
    assert checks["api.tls"]["status"] == "ok"
    assert health["status"] == "fail"
    assert health["verdict"] == (
        "API server unhealthy: /readyz answered 500, failing: etcd, etcd-readiness"
    )
    assert "/readyz: 500 [-]etcd failed: reason withheld" in health["evidence"], health
    assert any(line.startswith("version v1.36") for line in health["evidence"])
    assert "cannot use its etcd" in health["remedy"]
    assert "etcdctl endpoint health" in health["remedy"]
    # the Date came with the answer; the Lease checks would only time out on etcd too
    assert checks["api.clock"]["status"] == "ok"
    assert {checks[name]["status"] for name in ("api.auth", "api.rbac", "api.namespace")} == {
        "skip"
    }

    quick_health = quick_checks["api.health"]
    assert quick_code == 1
    assert quick_checks["api.tls"]["status"] == "ok"
    assert quick_health["status"] == "fail"
    assert quick_health["verdict"].startswith("no HTTP answer"), quick_health
    assert "waited up to 3.0 s" in quick_health["remedy"]
    assert "etcdctl endpoint health" in quick_health["remedy"]
    # etcd_stopped() waited for /readyz to say ok again: the next test's server is healthy


def test_an_unresolvable_name_is_a_dns_failure(lab: Lab) -> None:
    name = "kube-api.spegeld.test"
    code, checks, _ = lab.doctor(lab.config("dns", server=f"https://{name}:{API_PORT}"))
    assert code == 1
    dns = checks["api.dns"]
    assert dns["status"] == "fail"
    assert dns["verdict"] == f"DNS failure: {name} does not resolve"
    assert f"nameservers: {lab.api_ip}" in dns["evidence"]
    assert checks["api.tcp"]["status"] == "skip"


def test_a_token_whose_serviceaccount_was_deleted_is_401(lab: Lab) -> None:
    code, checks, _ = lab.doctor(lab.config("revoked", token=lab.tokens["revoked"]))
    assert code == 1
    auth = checks["api.auth"]
    assert auth["status"] == "fail"
    assert auth["verdict"].startswith("401")
    # unexpired, yet rejected: the evidence says so, the remedy mints a new one
    assert auth["evidence"][0].startswith("token valid until"), auth["evidence"]
    assert "create token" in auth["remedy"]
    assert checks["api.rbac"]["status"] == "skip"
    # /readyz refuses the token too: readiness is unknown, not the first failure
    assert checks["api.health"]["status"] == "skip", checks["api.health"]


def test_an_expired_token_is_401_with_its_age(lab: Lab) -> None:
    code, checks, _ = lab.doctor(lab.config("expired", token=lab.tokens["expired"]))
    assert code == 1
    auth = checks["api.auth"]
    assert auth["status"] == "fail"
    assert auth["verdict"].startswith("401")
    # expired two hours before the module started: 120 min ago, or a little more
    assert re.match(r"token expired 12\d min ago \(", auth["evidence"][0]), auth["evidence"]
    assert "create token" in auth["remedy"]


def test_a_token_without_update_is_403_naming_the_verb_and_printing_the_role(lab: Lab) -> None:
    code, checks, _ = lab.doctor(lab.config("limited", token=lab.tokens["limited"]))
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
    # The printed remedy, applied by the admin, is accepted by the real server and fixes it.
    # Its Role and RoleBinding carry deploy/rbac.yaml's names, so applying it rebinds them
    # to this account: re-apply deploy/rbac.yaml afterwards.
    lab.api.kubectl("apply", "-f", "-", stdin=rbac["remedy"].partition("\n")[2])
    try:
        code, checks, _ = lab.doctor(lab.config("limited", token=lab.tokens["limited"]))
        assert checks["api.rbac"]["status"] == "ok", checks["api.rbac"]
    finally:
        lab.api.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"))


def test_a_missing_namespace_is_named(lab: Lab) -> None:
    config = lab.config("wide", token=lab.tokens["wide"])
    code, checks, _ = lab.doctor(config, "--lease-namespace", MISSING_NAMESPACE)
    assert code == 1
    namespace = checks["api.namespace"]
    assert namespace["status"] == "fail", checks
    assert namespace["verdict"] == f"namespace {MISSING_NAMESPACE} is missing"
    assert f"kubectl create namespace {MISSING_NAMESPACE}" in namespace["remedy"]


def test_a_certificate_from_another_ca_is_a_tls_failure(lab: Lab) -> None:
    other = trustme.CA().cert_pem.bytes().decode()
    code, checks, _ = lab.doctor(lab.config("other-ca", ca_pem=other, token=lab.tokens["wide"]))
    assert code == 1
    tls = checks["api.tls"]
    assert tls["status"] == "fail"
    assert "not signed by the CA" in tls["verdict"]
    assert any(line.startswith("server certificate: subject") for line in tls["evidence"])
    assert checks["api.health"]["status"] == "skip"


def test_an_expired_serving_certificate_is_a_tls_failure(lab: Lab) -> None:
    lab.api.start_apiserver(expired_cert=True)
    try:
        code, checks, _ = lab.doctor(lab.config("healthy"))
    finally:
        lab.api.start_apiserver()
    assert code == 1
    tls = checks["api.tls"]
    assert tls["status"] == "fail"
    assert tls["verdict"].startswith("TLS: the certificate has expired"), tls
    assert any(line.startswith("valid ") for line in tls["evidence"]), tls["evidence"]
    assert checks["api.health"]["status"] == "skip"


def test_a_server_date_10_minutes_off_is_clock_skew(lab: Lab) -> None:
    # The API test server: the only way to skew one server's clock here (module docstring).
    code, checks, _ = lab.doctor(lab.skewed_config)
    assert code == 1
    clock = checks["api.clock"]
    assert clock["status"] == "fail"
    skew = int(clock["verdict"].removeprefix("clock skew of ").removesuffix(" s"))
    assert 598 <= skew <= 602  # Date has one-second resolution
    assert "timedatectl" in clock["remedy"]
