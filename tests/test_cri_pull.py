"""The node's real path: kubelet's ``crictl pull`` through CRI, on containerd 1.6 and 2.3.

Each node runs a private containerd with the CRI plugin on (no CNI: pod networking is never
ready, and the image service does not need it), its registry ``config_path`` at the hosts dir
that the real ``spegeld configure containerd`` wrote, and a real ``spegeld run`` on its own
loopback address.  Node A pulls from the upstream (Distribution) through its mirror; the
upstream is stopped; node B pulls through its mirror and every byte comes from A.  On 2.3
CRI pulls with its default ``use_local_image_pull = false``: through the transfer service.

CRI on writes ``/etc/cni`` and ``/opt/containerd`` on the host unless told otherwise: the
harness points every such path into the node's directory, and this test checks that no host
path CRI is known to create appeared.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from spegeld_harness import (
    PrivateContainerd,
    SpegeldProcess,
    UpstreamRegistry,
    build_image,
    free_port,
    host_platform,
)

from tests._components import component_binary

from ._support import configure_hosts, wait_for

pytestmark = [pytest.mark.containerd, pytest.mark.slow]

IMAGE = build_image("example.com/team/cri:v1", [2_000_000, 700_000, 300_000], seed=71)
HOST = host_platform()
# Host paths a CRI-enabled containerd creates by default (CNI conf/bin, CDI spec dirs, NRI's
# socket dir); the harness must point all of them into the node's own directory.
HOST_PATHS = ("/etc/cni", "/opt/cni", "/etc/cdi", "/var/run/cdi", "/var/run/nri", "/etc/nri")
CRICTL_TIMEOUT = 120.0  # seconds; a pull here takes well under 5 s
INDEX_TIMEOUT = 10.0  # seconds for A's spegeld to index what CRI pulled


def crictl(node: PrivateContainerd, *args: str) -> str:
    """``crictl`` against this node's CRI endpoint; its stdout, or the test fails with why."""
    endpoint = f"unix://{node.cri_socket}"
    config = node.base_dir / "crictl.yaml"
    config.write_text(f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 60\n")
    argv = [str(component_binary("crictl")), "--config", str(config),
            "--runtime-endpoint", endpoint, "--image-endpoint", endpoint, *args]  # fmt: skip
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=CRICTL_TIMEOUT, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(argv)} exited {result.returncode}: {result.stderr}\n{node.log_tail()}"
    )
    return result.stdout


@pytest.fixture
def cri_nodes(
    tmp_path: Path, containerd_bin_dir: Path | None
) -> Iterator[tuple[PrivateContainerd, PrivateContainerd]]:
    before = {p for p in HOST_PATHS if Path(p).exists()}
    a = PrivateContainerd(tmp_path / "a-containerd", bin_dir=containerd_bin_dir, cri=True)
    b = PrivateContainerd(tmp_path / "b-containerd", bin_dir=containerd_bin_dir, cri=True)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.close()
        b.close()
    appeared = {p for p in HOST_PATHS if Path(p).exists()} - before
    assert not appeared, f"CRI created host paths: {sorted(appeared)}"


def test_crictl_pull_through_the_mirror_then_from_the_peer_with_the_upstream_down(
    tmp_path: Path,
    upstream: UpstreamRegistry,
    cri_nodes: tuple[PrivateContainerd, PrivateContainerd],
) -> None:
    containerd_a, containerd_b = cri_nodes
    ref = upstream.push(IMAGE, "team/cri", "v1")
    port_a, port_b = free_port("127.0.0.2"), free_port("127.0.0.3")
    # The upstream is stopped for the peer pull, so the tag can only come from the one
    # peer that holds it: a quorum of 1 (the default 2 sends a lone holder's tag upstream).
    spegeld_a = SpegeldProcess(
        tmp_path / "node-a", containerd_a, host="127.0.0.2", peer_port=port_a,
        extra_args=["--static-peer", f"127.0.0.3:{port_b}", "--tag-quorum", "1"],
    )  # fmt: skip
    spegeld_b = SpegeldProcess(
        tmp_path / "node-b", containerd_b, host="127.0.0.3", peer_port=port_b,
        extra_args=["--static-peer", f"127.0.0.2:{port_a}", "--tag-quorum", "1"],
    )  # fmt: skip
    with spegeld_a, spegeld_b:
        # The real CLI writes the hosts dir CRI's config_path names.
        configure_hosts(containerd_a.hosts_dir, spegeld_a.url, upstream.url)
        configure_hosts(containerd_b.hosts_dir, spegeld_b.url, upstream.url)
        want = IMAGE.digests(HOST)
        pulled = {IMAGE.platforms[0].config, *IMAGE.platforms[0].layers}

        # Node A: CRI asks its mirror first (a miss), then the upstream.
        log_start = upstream.log_position()
        crictl(containerd_a, "pull", ref)
        assert upstream.blob_bytes_served(log_start) == sum(IMAGE.blobs[d].size for d in pulled)
        assert spegeld_a.metric('spegel_mirror_requests_total{registry="other",cache="miss",'
                                'source="external"}') >= 1  # fmt: skip
        # discard_unpacked_layers = false: CRI kept every layer after unpacking it.
        assert want <= containerd_a.content_digests()
        wait_for(
            lambda: spegeld_a.status()["store"]["tags"] >= 1, INDEX_TIMEOUT, "A to index the pull"
        )

        # The upstream goes away; node B's CRI pull comes entirely from A.
        upstream.stop()
        crictl(containerd_b, "pull", ref)
        listed = json.loads(crictl(containerd_b, "images", "--output", "json"))["images"]
        assert [image["repoTags"] for image in listed] == [[ref]]
        assert want <= containerd_b.content_digests()
        blobs = sorted((containerd_b.content_path / "blobs" / "sha256").iterdir())
        assert {f"sha256:{p.name}" for p in blobs} >= want
        for blob in blobs:  # every blob B holds hashes to its name
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        for digest in want:
            assert containerd_b.blob_path(digest).read_bytes() == IMAGE.read_blob(digest)
        peer_bytes = spegeld_b.metric('spegeld_bytes_served_total{source="peer"}')
        assert peer_bytes >= sum(IMAGE.blobs[d].size for d in pulled)
        hit = f'spegel_mirror_requests_total{{registry="{upstream.address}",cache="hit",source="internal"}}'
        assert spegeld_a.metric(hit) >= len(want)
        assert spegeld_a.stop() == 0
        assert spegeld_b.stop() == 0


def default_config_2x(containerd_bin: Path, tmp_path: Path, hosts_dir: Path | None) -> Path:
    """``containerd config default`` of this build (version 4 on 2.3), and with ``hosts_dir``
    its CRI registry ``config_path`` set to it, as a node admin would after running
    ``spegeld configure containerd``; checked by containerd's own loader (``config dump``)."""
    text = subprocess.run(
        [str(containerd_bin), "config", "default"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    config = tmp_path / ("default-configured.toml" if hosts_dir else "default.toml")
    if hosts_dir is not None:
        unset = "[plugins.'io.containerd.cri.v1.images'.registry]\n      config_path = ''"
        assert text.count(unset) == 1, text
        text = text.replace(unset, unset.replace("''", f"'{hosts_dir}'"))
    config.write_text(text)
    dumped = subprocess.run(
        [str(containerd_bin), "--config", str(config), "config", "dump"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert f"config_path = '{hosts_dir or ''}'" in dumped
    return config


@pytest.mark.containerd2
def test_doctor_on_a_containerd_23_node_with_cri_finds_no_failure(tmp_path: Path) -> None:
    bin_dir = component_binary("containerd").parent
    node = PrivateContainerd(tmp_path / "containerd", bin_dir=bin_dir, cri=True)
    with node:
        node.import_image(IMAGE.write_oci_archive(tmp_path / "image.tar"))
        spegeld = SpegeldProcess(tmp_path / "node", node)
        with spegeld:
            configure_hosts(node.hosts_dir, spegeld.url, "http://127.0.0.1:5000")
            configs = {
                "harness (version 3)": node.config_path,
                "default + config_path": default_config_2x(bin_dir / "containerd", tmp_path,
                                                           node.hosts_dir),
                "default, config_path unset": default_config_2x(bin_dir / "containerd", tmp_path,
                                                                None),
            }  # fmt: skip
            for name, config in configs.items():
                result = subprocess.run(
                    [sys.executable, "-m", "spegeld", "doctor", "--json", "--only", "node",
                     "--timeout", "3", "--containerd-sock", str(node.socket),
                     "--containerd-content-path", str(node.content_path),
                     "--containerd-config", str(config), "--registry-addr", spegeld.address],
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                data = json.loads(result.stdout)
                statuses = {c["check"]: c["status"] for c in data["checks"]}
                assert result.returncode == 0 and "fail" not in statuses.values(), (name, data)
                (cfg,) = [c for c in data["checks"] if c["check"] == "containerd.config"]
                if name == "default, config_path unset":
                    # containerd 2.x falls back to its default hosts dirs, which are not ours.
                    assert "/etc/containerd/certs.d:/etc/docker/certs.d" in cfg["verdict"]
                    assert statuses["mirror.hosts"] == "warn"
                else:
                    assert str(node.hosts_dir) in cfg["verdict"], (name, cfg)
                    assert statuses == dict.fromkeys(statuses, "ok"), (name, data)
                    (api,) = [c for c in data["checks"] if c["check"] == "containerd.api"]
                    assert node.version in " ".join(api["evidence"])
            assert spegeld.stop() == 0
