"""The DaemonSet's container image (talos/container_image.py, issue 16 item 6), in a real
containerd: imported with ``ctr images import``, run with ``ctr run`` under the pod's
security context (read-only root, every capability dropped, no new privileges, the
runtime's default seccomp profile), as deploy/daemonset.yaml runs it.

The image is written from the session's one talos/build.py build (tests/_talos_bundle.py,
shared with tests/test_talos.py). ``ctr run`` stands in for the kubelet: there is no
kubelet here, and what the image must survive (the mounts, the missing capabilities, the
read-only root) is the runtime's doing, which ``ctr`` drives through the same runc.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
import tarfile
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from spegeld_harness import CtrError, PrivateContainerd, free_port

from tests._talos_bundle import built_once, load_talos_module
from tests.realkube._apiserver import RealKubeApi

pytestmark = [pytest.mark.slow, pytest.mark.containerd]

REPO = Path(__file__).resolve().parent.parent
DAEMONSET = REPO / "deploy" / "daemonset.yaml"
# overlayfs: the snapshotter a node's containerd unpacks into by default.
SNAPSHOTTER = "overlayfs"
COMMAND_TIMEOUT = 60.0
READY_TIMEOUT = 30.0  # measured 1-4 s from `ctr run -d` to /readyz 200 here
STOP_TIMEOUT = 20.0  # SIGTERM: the daemon's grace period is 10 s at most
# ctr's default capability set (containerd oci.defaultUnixCaps): dropped one by one, since
# ctr 1.6 has no "ALL"; the test then reads CapEff of the running daemon.
DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID",
                "SETUID", "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL",
                "AUDIT_WRITE")  # fmt: skip
POD_SECURITY = ["--read-only", "--seccomp", *[a for c in DEFAULT_CAPS for a in ("--cap-drop", f"CAP_{c}")]]  # fmt: skip


@pytest.fixture(scope="module")
def image_module() -> ModuleType:
    return load_talos_module("talos_container_image", "container_image.py")


@pytest.fixture(scope="module")
def version() -> str:
    with (REPO / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


@pytest.fixture(scope="module")
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """talos/build.py's outputs: built once per session, shared with tests/test_talos.py."""
    return built_once(request, tmp_path_factory)


@pytest.fixture(scope="module")
def image(
    bundle: Any, tmp_path_factory: pytest.TempPathFactory, image_module: ModuleType, version: str
) -> Any:
    out = tmp_path_factory.mktemp("image")
    result = image_module.write_image(bundle.service_rootfs, version, out, out / "work")
    print(f"\nimage: {result.archive.stat().st_size / 1e6:.1f} MB in {result.seconds:.1f} s")
    return result


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, image: Any) -> Iterator[PrivateContainerd]:
    """One private containerd with the image imported and unpacked."""
    containerd = PrivateContainerd(tmp_path_factory.mktemp("node") / "containerd")
    containerd.start()
    try:
        started = time.monotonic()
        containerd.import_image(image.archive, no_unpack=False, snapshotter=SNAPSHOTTER)
        print(f"\nctr images import: {time.monotonic() - started:.1f} s")
        yield containerd
    finally:
        containerd.close()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealKubeApi]:
    """The real kube-apiserver with deploy/rbac.yaml applied: the pod's ServiceAccount."""
    api = RealKubeApi(tmp_path_factory.mktemp("kube"))
    api.start()
    try:
        api.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"))
        yield api
    finally:
        api.stop()


def _service_account_dir(api: RealKubeApi, directory: Path) -> Path:
    """What the kubelet projects into the pod: token, ca.crt, namespace."""
    directory.mkdir()
    token = api.kubectl("-n", "spegeld", "create", "token", "spegeld").strip()
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_text(api.ca_pem)
    (directory / "namespace").write_text("spegeld")
    return directory


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(DAEMONSET.read_text())["spec"]["template"]["spec"]
    return spec


def _mount(source: Path | str, destination: str, mode: str) -> list[str]:
    return ["--mount", f"type=bind,src={source},dst={destination},options=rbind:{mode}"]


def _run(node: PrivateContainerd, name: str, *args: str, extra: tuple[str, ...] = ()) -> str:
    """``ctr run --rm`` of the image under the pod's security context; its output."""
    return node.ctr(
        "run", "--rm", "--snapshotter", SNAPSHOTTER, *POD_SECURITY, *extra, name, f"t-{time.monotonic_ns()}",
        *args, timeout=COMMAND_TIMEOUT,
    )  # fmt: skip


def _members(archive: Path, digest: str) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(archive) as tar:
        blob = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
        assert blob is not None
        with tarfile.open(fileobj=blob, mode="r:gz") as layer:
            return {m.name: m for m in layer.getmembers()}


def test_archive_is_an_oci_image_that_runs_spegeld(image: Any, image_module: ModuleType) -> None:
    inspected = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci-archive:{image.archive}"],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
    )  # fmt: skip
    assert inspected.returncode == 0, inspected.stderr
    config = json.loads(inspected.stdout)["config"]
    assert config["Entrypoint"] == ["/usr/lib/spegeld/spegeld"]
    assert config["Cmd"] == ["run"]
    assert config["Labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"
    members = _members(image.archive, image.layer.blob.digest)
    print(f"\nlayer: {len(members)} entries, {sum(m.size for m in members.values()) / 1e6:.1f} MB")
    assert members["usr/lib/spegeld/spegeld"].mode & 0o111
    assert all((m.uid, m.gid, m.mtime) == (0, 0, 0) for m in members.values())


def test_the_image_is_deterministic(
    bundle: Any, image: Any, image_module: ModuleType, version: str, tmp_path: Path
) -> None:
    """The same staged tree gives the same image, byte for byte (as the Talos archive)."""
    again = image_module.write_image(bundle.service_rootfs, version, tmp_path, tmp_path / "w")
    assert again.manifest == image.manifest
    assert again.archive.read_bytes() == image.archive.read_bytes()


def test_licence_and_notices_are_in_the_image(image: Any) -> None:
    """Listed in the layer, and byte-equal to the repository's LICENSE and the notices
    talos/build.py generated for the bundle (CPython, glibc, the Python dependencies)."""
    members = _members(image.archive, image.layer.blob.digest)
    listed = sorted(n for n in members if re.search(r"(LICENSE|THIRD_PARTY_NOTICES)$", n))
    print(f"\n{listed}")
    # Beside the binary; the dependencies' own licence files ride along in _internal/.
    assert {"usr/lib/spegeld/LICENSE", "usr/lib/spegeld/THIRD_PARTY_NOTICES"} <= set(listed)
    with tarfile.open(image.archive) as tar:
        blob = tar.extractfile("blobs/sha256/" + image.layer.blob.digest.removeprefix("sha256:"))
        assert blob is not None
        with tarfile.open(fileobj=blob, mode="r:gz") as layer:
            licence = layer.extractfile("usr/lib/spegeld/LICENSE")
            notices = layer.extractfile("usr/lib/spegeld/THIRD_PARTY_NOTICES")
            assert licence is not None and notices is not None
            assert licence.read() == (REPO / "LICENSE").read_bytes()
            text = notices.read().decode()
    for bundled in ("trio", "h11", "grpclib", "CPython", "libc6"):
        assert bundled in text, bundled


def test_ctr_imports_the_image_and_runs_spegeld_version(
    node: PrivateContainerd, image: Any, version: str
) -> None:
    assert image.name in node.images()
    started = time.monotonic()
    out = _run(node, image.name, "spegeld", "version")
    print(f"\nctr run spegeld version: {time.monotonic() - started:.2f} s")
    assert re.fullmatch(rf"spegeld {re.escape(version)} \(Python 3\.11\.\d+\)\n", out), out
    assert _run(node, image.name, "spegeld", "--version").startswith(f"spegeld {version}")


def test_the_init_step_writes_hosts_toml_as_the_pod_runs_it(
    node: PrivateContainerd, image: Any, tmp_path: Path
) -> None:
    """deploy/daemonset.yaml's initContainer, its args as written, into a host directory."""
    (init,) = _pod()["initContainers"]
    (certs,) = init["volumeMounts"]
    host_certs = tmp_path / "certs.d"
    host_certs.mkdir()
    out = _run(node, image.name, "/usr/lib/spegeld/spegeld", *init["args"],
               extra=tuple(_mount(host_certs, certs["mountPath"], "rw")))  # fmt: skip
    assert "_default/hosts.toml" in out
    hosts = tomllib.loads((host_certs / "_default" / "hosts.toml").read_text())
    assert list(hosts["host"]) == ["http://127.0.0.1:5000"]


def _manifest_layer(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        index = tar.extractfile("index.json")
        assert index is not None
        digest = json.load(index)["manifests"][0]["digest"]
        manifest = tar.extractfile("blobs/sha256/" + digest.removeprefix("sha256:"))
        assert manifest is not None
        return str(json.load(manifest)["layers"][0]["digest"])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""  # not listening yet


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.kubeapiserver
def test_the_daemon_serves_under_the_pods_security_context(
    node: PrivateContainerd, image: Any, kube: RealKubeApi, tmp_path: Path
) -> None:
    """``spegeld run`` (the image's Entrypoint + Cmd, no command given) with the DaemonSet's
    environment and mounts: containerd's socket directory and content store read-only, the
    state directory, the key as the Secret volume gives it (0400), the ServiceAccount's
    token as the kubelet projects it, KUBERNETES_SERVICE_HOST/PORT. It gets ready, takes
    the coordinator Lease with the in-cluster credentials, serves a blob of the store
    from its file, holds no capability, and stops cleanly on SIGTERM.

    Ports: the host's loopback is shared with other tests, so the listeners move to free
    ports (SPEGELD_*_ADDR; the DaemonSet keeps the defaults); the private containerd's
    content directory is mounted at its own host path, as the DaemonSet mounts the node's.
    """
    (spegeld,) = _pod()["containers"]
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    registry = free_port("127.0.0.1")
    env = {e["name"]: e["value"] for e in spegeld["env"] if "value" in e}
    env |= {
        "SPEGELD_NODE_NAME": "node-1",  # fieldRef spec.nodeName
        "SPEGELD_ADVERTISE_ADDR": "127.0.0.1",  # fieldRef status.hostIP
        "SPEGELD_REGISTRY_ADDR": f"127.0.0.1:{registry}",
        "SPEGELD_PEER_ADDR": f"127.0.0.1:{free_port('127.0.0.1')}",
        "SPEGELD_GOSSIP_ADDR": f"127.0.0.1:{free_port('127.0.0.1')}",
        "SPEGELD_CONTAINERD_CONTENT_PATH": str(node.content_path),
        # What the kubelet sets in every pod (the kubernetes Service; here the API server).
        "KUBERNETES_SERVICE_HOST": kube.host,
        "KUBERNETES_SERVICE_PORT": str(kube.port),
    }
    key_dir, state = tmp_path / "key", tmp_path / "state"
    key_dir.mkdir()
    state.mkdir()
    key_file = key_dir / Path(env["SPEGELD_CLUSTER_KEY_FILE"]).name
    key_file.write_text("1:" + "ab" * 32 + "\n")
    key_file.chmod(volumes["gossip-key"]["secret"]["defaultMode"])
    host_side = {
        "containerd-run": node.socket.parent,
        "containerd-content": node.content_path,
        "state": state,
        "gossip-key": key_dir,
    }
    args = ["run", "-d", "--snapshotter", SNAPSHOTTER, *POD_SECURITY, "--net-host"]
    args += ["--log-uri", f"file://{tmp_path / 'spegeld.log'}"]
    for name, value in env.items():
        args += ["--env", f"{name}={value}"]
    for m in spegeld["volumeMounts"]:
        destination = (
            str(node.content_path) if m["name"] == "containerd-content" else m["mountPath"]
        )
        args += _mount(host_side[m["name"]], destination, "ro" if m.get("readOnly") else "rw")
    account = _service_account_dir(kube, tmp_path / "serviceaccount")
    args += _mount(account, "/var/run/secrets/kubernetes.io/serviceaccount", "ro")
    container = f"spegeld-deploy-{time.monotonic_ns()}"  # runc's state dir is host-wide
    log = tmp_path / "spegeld.log"
    node.ctr(*args, image.name, container, timeout=COMMAND_TIMEOUT)
    try:
        started = time.monotonic()
        while _get(f"http://127.0.0.1:{registry}/readyz") != (200, b"ready\n"):
            assert not _stopped(node, container), log.read_text()[-3000:]
            assert time.monotonic() - started < READY_TIMEOUT, log.read_text()[-3000:]
            time.sleep(0.1)
        print(f"\nready in {time.monotonic() - started:.1f} s")
        digest = _manifest_layer(image.archive)
        status, body = _get(f"http://127.0.0.1:{registry}/v2/spegeld/blobs/{digest}?ns=localhost")
        assert status == 200, log.read_text()[-3000:]
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        assert "(sendfile)" in log.read_text()  # by file, through the read-only mount

        # The in-cluster credentials: the preflight passes and the node takes the Lease.
        lease = ("-n", "spegeld", "get", "lease", "spegeld-coordinator",
                 "-o", "jsonpath={.spec.holderIdentity}")  # fmt: skip
        while kube.kubectl_run(*lease).stdout != "node-1":
            assert time.monotonic() - started < READY_TIMEOUT, log.read_text()[-3000:]
            time.sleep(0.2)
        text = log.read_text()
        assert "preflight: Kubernetes API reachable; Lease permissions ok" in text
        assert "credentials: in-cluster service account" in text

        (task,) = [line.split() for line in node.ctr("task", "ls").splitlines()[1:]
                   if line.startswith(container)]  # fmt: skip
        proc = _proc_status(int(task[1]))
        assert proc["Uid"].split()[0] == "0"
        assert {proc[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {
            "0000000000000000"
        }
        assert proc["NoNewPrivs"] == "1" and proc["Seccomp"] == "2"

        # What `kubectl exec <pod> -- spegeld status` runs: the image's PATH, the pod's env.
        exec_id = f"status-{time.monotonic_ns()}"
        report = node.ctr("task", "exec", "--exec-id", exec_id, container, "spegeld", "status",
                          "--json", timeout=COMMAND_TIMEOUT)  # fmt: skip
        assert "node-1" in json.dumps(json.loads(report))

        node.ctr("task", "kill", "--signal", "SIGTERM", container)
        started = time.monotonic()
        while not _stopped(node, container):
            assert time.monotonic() - started < STOP_TIMEOUT, log.read_text()[-3000:]
            time.sleep(0.1)
        records = [
            json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")
        ]
        assert records[-1]["msg"] == "stopped", records[-3:]
        assert all(r["level"] in ("info", "warning") for r in records), records
        assert "Traceback" not in log.read_text()
    finally:
        _remove(node, container)


def _stopped(node: PrivateContainerd, container: str) -> bool:
    for line in node.ctr("task", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == container:
            return fields[-1] == "STOPPED"
    return True


def _remove(node: PrivateContainerd, container: str) -> None:
    """Kill, delete the task (runc unmounts the rootfs) and the container; each may be gone."""
    for args in (("task", "kill", "--signal", "SIGKILL", container),
                 ("task", "delete", "--force", container),
                 ("container", "delete", container)):  # fmt: skip
        # Not running, no task, no container: nothing left to remove at that step.
        with contextlib.suppress(CtrError):
            node.ctr(*args, timeout=COMMAND_TIMEOUT)
