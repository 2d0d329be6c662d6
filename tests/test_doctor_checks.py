"""The doctor's checks on loopback: real containerd, a real daemon, real gossip pings.

The API fault classes that need a firewall or a resolver (dropped, no route, DNS) are
in tests/test_doctor_netns.py, inside network namespaces.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from spegeld_harness import PrivateContainerd, SpegeldProcess, build_image, free_port

from spegeld.cli import cli
from spegeld.config import ContainerdConfig
from spegeld.doctor import (
    ApiTarget,
    CheckResult,
    NodeTarget,
    Report,
    Status,
    check_api,
    check_node,
    ping_peer,
)
from spegeld.gossip import GossipConfig, GossipCore, GossipRouter, Keyring
from spegeld.kube import Credentials

IMAGE = build_image("example.com/doctor/app:v1", [200_000, 50_000], seed=5)


def result(status: Status) -> CheckResult:
    return CheckResult("x", "x", status, "verdict")


def test_exit_code_is_1_only_when_a_check_fails() -> None:
    assert Report((result(Status.OK), result(Status.WARN), result(Status.SKIP))).exit_code == 0
    failing = Report((result(Status.OK), result(Status.FAIL)))
    assert failing.exit_code == 1
    data = failing.to_json()
    assert data["ok"] is False
    assert data["summary"] == {"ok": 1, "warn": 0, "fail": 1, "skip": 0}
    assert json.loads(json.dumps(data))["checks"][1]["status"] == "fail"


# --- gossip: a sealed ping to a real GossipRouter ------------------------------------


def keyring(fill: bytes) -> Keyring:
    return Keyring([(1, fill * 32)])


async def test_a_peer_with_our_key_answers_another_key_is_silent_a_closed_port_refuses(
    nursery: trio.Nursery,
) -> None:
    port = free_port("127.0.0.1", kind=2)  # SOCK_DGRAM
    core = GossipCore(
        GossipConfig(
            node="peer-1", addr=("127.0.0.1", port), mirror="127.0.0.1:5000", incarnation=7
        ),
        keyring(b"k"),
        random.Random(3),
        trio.current_time(),
    )
    await nursery.start(GossipRouter(core, ("127.0.0.1", port)).run)
    with trio.fail_after(10):
        answered = await ping_peer(keyring(b"k"), ("127.0.0.1", port), 1.0)
        assert answered.status is Status.OK, answered
        assert "peer-1" in answered.verdict
        silent = await ping_peer(keyring(b"x"), ("127.0.0.1", port), 0.5)
        assert silent.status is Status.FAIL
        assert "another cluster key" in silent.verdict
        closed = await ping_peer(keyring(b"k"), ("127.0.0.1", free_port("127.0.0.1", 2)), 1.0)
        assert closed.status is Status.FAIL
        assert "refused" in closed.verdict


# --- the API on loopback: no credentials, and a refused port ------------------------


async def test_without_credentials_the_api_is_skipped_not_failed() -> None:
    (skipped,) = await check_api(ApiTarget(None), 1.0)
    assert skipped.status is Status.SKIP
    assert "election is off" in skipped.verdict


def credentials(server: str) -> Credentials:
    return Credentials(
        server=server,
        source="test",
        ca_pem=None,
        insecure_skip_tls_verify=False,
        tls_server_name=None,
        token="t",
        token_file=None,
        client_cert_pem=None,
        client_key_pem=None,
        namespace=None,
        warnings=(),
    )


async def test_a_closed_api_port_is_refused_and_later_steps_are_skipped() -> None:
    port = free_port("127.0.0.1")
    with trio.fail_after(10):
        results = await check_api(ApiTarget(credentials(f"https://127.0.0.1:{port}")), 2.0)
    by_check = {r.check: r for r in results}
    assert by_check["api.dns"].status is Status.OK
    assert by_check["api.tcp"].status is Status.FAIL
    assert by_check["api.tcp"].verdict.startswith("connection refused")
    assert f"127.0.0.1:{port}" in by_check["api.tcp"].remedy
    later = [r for r in results if r.check not in ("api.dns", "api.tcp")]
    assert later and all(r.status is Status.SKIP for r in later)


# --- the node: containerd, its config, the mirror, a blob through it ---------------


@pytest.fixture
def containerd(any_containerd: PrivateContainerd) -> PrivateContainerd:
    """The node checks run on containerd 1.6 and on 2.3 (ids "1.6", "2.3")."""
    return any_containerd


@pytest.fixture
def daemon(containerd: PrivateContainerd, tmp_path: Path) -> Iterator[SpegeldProcess]:
    containerd.import_image(IMAGE.write_oci_archive(tmp_path / "image.tar"))
    node = SpegeldProcess(tmp_path / "node", containerd)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def configure_containerd(
    tmp_path: Path, daemon: SpegeldProcess, *, discard: bool, major: int = 1
) -> Path:
    """The hosts dir by the real CLI, and a containerd config naming it in the CRI plugin
    of a containerd of this ``major`` version (2.x: version 3, the images plugin)."""
    hosts = tmp_path / "certs.d"
    subprocess.run(
        [sys.executable, "-m", "spegeld", "configure", "containerd", "--config-path", str(hosts),
         "--mirror-target", f"http://127.0.0.1:{daemon.port}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    config = tmp_path / "config.toml"
    flag = "true" if discard else "false"
    if major >= 2:
        config.write_text(
            "version = 3\n"
            '[plugins."io.containerd.cri.v1.images"]\n'
            f"  discard_unpacked_layers = {flag}\n"
            '[plugins."io.containerd.cri.v1.images".registry]\n'
            f'  config_path = "{hosts}"\n'
        )
        return config
    config.write_text(
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
        f"  discard_unpacked_layers = {flag}\n"
        '[plugins."io.containerd.grpc.v1.cri".registry]\n'
        f'  config_path = "{hosts}"\n'
    )
    return config


async def test_a_healthy_node_passes_every_node_check(
    containerd: PrivateContainerd, daemon: SpegeldProcess, tmp_path: Path
) -> None:
    config = configure_containerd(tmp_path, daemon, discard=False, major=containerd.major)
    target = NodeTarget(
        ContainerdConfig(socket=containerd.socket, content_path=containerd.content_path),
        config,
        None,
        ("127.0.0.1", daemon.port),
    )
    with trio.fail_after(30):
        results = await check_node(target, 3.0)
    statuses = {r.check: r.status for r in results}
    assert statuses == {
        "containerd.socket": Status.OK,
        "containerd.api": Status.OK,
        "containerd.content": Status.OK,
        "containerd.config": Status.OK,
        "containerd.discard": Status.OK,
        "mirror.hosts": Status.OK,
        "registry.port": Status.OK,
        "registry.blob": Status.OK,
    }, results
    blob = next(r for r in results if r.check == "registry.blob")
    assert "digest verified" in blob.verdict


async def test_a_misconfigured_node_is_named(
    containerd: PrivateContainerd, daemon: SpegeldProcess, tmp_path: Path
) -> None:
    config = configure_containerd(tmp_path, daemon, discard=True, major=containerd.major)
    config.write_text(config.read_text().replace("config_path", "# config_path"))
    target = NodeTarget(
        ContainerdConfig(socket=tmp_path / "no.sock", content_path=tmp_path / "none"),
        config,
        tmp_path / "empty-hosts",
        ("127.0.0.1", free_port("127.0.0.1")),
    )
    with trio.fail_after(30):
        results = await check_node(target, 1.0)
    by_check = {r.check: r for r in results}
    assert by_check["containerd.socket"].status is Status.FAIL
    assert "does not exist" in by_check["containerd.socket"].verdict
    if containerd.major >= 2:
        # containerd 2.x itself falls back to its default hosts dirs: not a failure.
        assert by_check["containerd.config"].status is Status.OK
        default = "/etc/containerd/certs.d:/etc/docker/certs.d"  # plugins/cri/images/plugin.go
        assert default in by_check["containerd.config"].verdict
    else:
        assert by_check["containerd.config"].status is Status.FAIL
        assert "config_path is not set" in by_check["containerd.config"].verdict
    assert by_check["containerd.discard"].status is Status.FAIL
    assert by_check["mirror.hosts"].status is Status.WARN
    assert "spegeld configure containerd" in by_check["mirror.hosts"].remedy
    assert by_check["registry.port"].status is Status.FAIL


def test_doctor_cli_reports_a_healthy_node_as_json_and_exits_0(
    containerd: PrivateContainerd, daemon: SpegeldProcess, tmp_path: Path
) -> None:
    config = configure_containerd(tmp_path, daemon, discard=False, major=containerd.major)
    result = CliRunner(catch_exceptions=False).invoke(
        cli,
        ["doctor", "--json", "--timeout", "2",
         "--containerd-sock", str(containerd.socket),
         "--containerd-content-path", str(containerd.content_path),
         "--containerd-config", str(config),
         "--registry-addr", f"127.0.0.1:{daemon.port}",
         "--insecure-gossip", "--peer", daemon.gossip_address,
         "--state-dir", str(tmp_path / "doctor-state")],
        env={"KUBERNETES_SERVICE_HOST": ""},
    )  # fmt: skip
    data = json.loads(result.stdout)
    assert result.exit_code == 0, data
    statuses = {c["check"]: c["status"] for c in data["checks"]}
    assert statuses["api"] == "skip"
    assert statuses["registry.blob"] == "ok"
    assert statuses["gossip.key"] == "warn"  # --insecure-gossip: said, not failed
    (peer,) = [c for c in data["checks"] if c["check"] == "gossip.peers"]
    assert peer["status"] == "ok"
    assert f"answered as {daemon.base_dir.name}" in peer["verdict"]


async def test_a_vanished_token_file_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    """Past TLS, the doctor needs the token; a token file that is gone is reported."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    async def answer(stream: trio.SSLStream[trio.SocketStream]) -> None:
        # The doctor never gets as far as sending a request: it handshakes, then stops.
        with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(4096)
        await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1"), answer, 0, context
        )
        port = listener.transport_listener.socket.getsockname()[1]
        creds = Credentials(
            server=f"https://127.0.0.1:{port}", source="test", ca_pem=ca.cert_pem.bytes(),
            insecure_skip_tls_verify=False, tls_server_name=None, token=None,
            token_file=tmp_path / "gone", client_cert_pem=None, client_key_pem=None,
            namespace=None, warnings=(),
        )  # fmt: skip
        with trio.fail_after(20):
            results = await check_api(ApiTarget(creds), 2.0)
        nursery.cancel_scope.cancel()
    by_check = {r.check: r for r in results}
    assert by_check["api.tls"].status is Status.OK
    assert by_check["api.auth"].status is Status.FAIL
    assert "cannot be used" in by_check["api.auth"].verdict
    assert str(tmp_path / "gone") in by_check["api.auth"].verdict
    assert by_check["api.rbac"].status is Status.SKIP
