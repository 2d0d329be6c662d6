"""The Talos system extension (talos/, DESIGN.md §8): Talos's rules, the OCI archive, the chroot.

Builds the extension once per session with talos/build.py (PyInstaller, about 30-60 s)
and fails, not skips, when the build fails.

The rules Talos enforces on an extension, as read in siderolabs/talos:

- ``pkg/machinery/extensions/load.go`` (``Load``/``loadManifest``): the image root holds
  only ``manifest.yaml`` and ``rootfs`` ("unexpected file" otherwise); the manifest's
  ``version`` must be ``v1alpha1``.
- ``pkg/machinery/extensions/metadata.go``: ``metadata`` has ``name``, ``version``,
  ``author``, ``description`` and ``compatibility.talos.version``.
- ``pkg/machinery/extensions/validate.go`` (``validateConstraints``): the compatibility
  string is a blang/semver v4 range (``semver.ParseRange``) after every ``v`` before a
  digit is dropped (``trim``), checked against the Talos version without pre-release
  (``coreVersion``). Range grammar (blang ``range.go``): ``||`` separates alternatives,
  spaces separate ANDed comparisons, a space after ``>``, ``<`` or ``=`` is ignored,
  comparators ``= == > >= < <= !=`` or none (equal), versions are full ``X.Y.Z``.
- ``validate.go`` (``validateContents``): no world-writable file (``perm & 0o002``), no
  special file (only directories, regular files and symlinks), and every non-directory
  under ``rootfs`` starts with one of ``AllowedPaths`` (``extensions.go``). The list
  changes between releases (``/lib/firmware`` became ``/usr/lib/firmware``; loaders,
  udev rules and others were added); every version has ``/etc/cri/conf.d`` and
  ``/usr/local``, and this extension keeps to those. Stricter here: no symlinks at all.
- ``pkg/machinery/extensions/services/services.go`` (``Spec.Validate``): ``name`` matches
  ``^[-_a-z0-9]{1,}$``; ``restart`` is ``always``, ``never`` or ``untilSuccess``
  (``restart_kind.go``); ``container.entrypoint`` is not empty; each ``depends`` item sets
  exactly one of ``service``, ``path`` (absolute), ``network`` (``addresses``,
  ``connectivity``, ``hostname``, ``etcfiles``: ``nethelpers/status.go``), ``time``,
  ``configuration``. ``container.mounts`` are OCI runtime-spec mounts (``source``,
  ``destination``, ``type``, ``options``).
- ``internal/app/machined/pkg/system/services/extension.go``: the service's root is
  ``/usr/local/lib/containers/<name>``, read-only unless ``security.writeableRootfs``; the
  container shares the host's network namespace; an ``ExtensionServiceConfig`` with the
  service's name adds its ``environment`` and bind-mounts each ``configFiles[].mountPath``
  read-only; ``configuration: true`` waits for that document. Stricter here: the
  entrypoint is absolute and an executable file inside that root.
- ``pkg/machinery/constants``: the CRI containerd's socket is
  ``/run/containerd/containerd.sock`` (namespace ``k8s.io``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from spegeld.cli import cli as cli_main
from spegeld.mirrorconfig._render import TALOS_CRI_CONTENT
from tests import _talos_bundle
from tests._components import component_binary

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TALOS = REPO / "talos"
SERVICE_NAME = "spegeld"
SERVICE_ROOT = f"usr/local/lib/containers/{SERVICE_NAME}"
SERVICE_FILE = "usr/local/etc/containers/spegeld.yaml"
# Prefixes every Talos release allows (extensions.go); others came and went.
ALLOWED_PREFIXES = ("/etc/cri/conf.d", "/usr/local")
RESTART_KINDS = {"always", "never", "untilSuccess"}
NETWORK_STATUSES = {"addresses", "connectivity", "hostname", "etcfiles"}
DEPENDENCY_KEYS = {"service", "path", "network", "time", "configuration"}
MAX_COMPRESSED = 50 * 1024 * 1024
COMMAND_TIMEOUT = 60


# --- Talos's rules, as checks that return the violations ------------------------------

_VERSION_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$"
)
_COMPARATORS = {
    "": lambda c: c == 0,
    "=": lambda c: c == 0,
    "==": lambda c: c == 0,
    "!=": lambda c: c != 0,
    ">": lambda c: c > 0,
    ">=": lambda c: c >= 0,
    "<": lambda c: c < 0,
    "<=": lambda c: c <= 0,
}
Version = tuple[int, int, int, tuple[Any, ...]]


def parse_version(text: str) -> Version:
    """A full semver X.Y.Z[-pre][+build]; pre-release identifiers compare as semver says."""
    m = _VERSION_RE.match(text)
    if m is None:
        raise ValueError(f"not a semantic version: {text!r}")
    pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in (m[4] or "").split(".") if p)
    return int(m[1]), int(m[2]), int(m[3]), pre


def _compare(a: Version, b: Version) -> int:
    if a[:3] != b[:3]:
        return -1 if a[:3] < b[:3] else 1
    # A version without pre-release ranks above one with it.
    pa, pb = a[3] or ((2, 0, ""),), b[3] or ((2, 0, ""),)
    return (pa > pb) - (pa < pb)


def _split_and_trim(text: str) -> list[str]:
    """blang's splitAndTrim: split on spaces, except after > < = (joined to the version)."""
    parts, current, last = [], "", ""
    for ch in text:
        if ch == " " and last not in ("<", ">", "="):
            if current:
                parts.append(current)
            current = ""
        elif ch != " ":
            current += ch
            last = ch
    if current:
        parts.append(current)
    return parts


def parse_range(constraint: str) -> Any:
    """Talos's constraint check: trim the ``v``s, then blang/semver ParseRange."""
    trimmed = re.sub(r"v(?=\d)", "", constraint)
    parts = _split_and_trim(trimmed)
    if not parts:
        raise ValueError("empty range")
    alternatives: list[list[tuple[Any, Version]]] = [[]]
    for part in parts:
        if part == "||":
            alternatives.append([])
            continue
        digit = next((i for i, ch in enumerate(part) if ch.isdigit()), None)
        if digit is None:
            raise ValueError(f"no version in {part!r}")
        op, version = part[:digit], part[digit:]
        if op not in _COMPARATORS:
            raise ValueError(f"unknown comparator {op!r} in {part!r}")
        alternatives[-1].append((_COMPARATORS[op], parse_version(version)))
    if any(not alt for alt in alternatives):
        raise ValueError(f"'||' at an end of {constraint!r}")

    def satisfied_by(talos_version: str) -> bool:
        core = (*parse_version(talos_version.removeprefix("v"))[:3], ())
        return any(all(cmp(_compare(core, v)) for cmp, v in alt) for alt in alternatives)

    return satisfied_by


def manifest_problems(manifest: Any) -> list[str]:
    problems = []
    if not isinstance(manifest, dict) or manifest.get("version") != "v1alpha1":
        return ["manifest version must be v1alpha1"]
    meta = manifest.get("metadata") or {}
    for key in ("name", "version", "author", "description"):
        if not isinstance(meta.get(key), str) or not meta[key].strip():
            problems.append(f"metadata.{key} missing")
    constraint = (((meta.get("compatibility") or {}).get("talos")) or {}).get("version")
    if not isinstance(constraint, str):
        problems.append("metadata.compatibility.talos.version missing")
    else:
        try:
            parse_range(constraint)
        except ValueError as e:
            problems.append(f"compatibility: {e}")
    return problems


def service_problems(spec: Any) -> list[str]:
    problems = []
    if not re.fullmatch(r"[-_a-z0-9]{1,}", str(spec.get("name", ""))):
        problems.append(f"name {spec.get('name')!r} is invalid")
    if spec.get("restart") not in RESTART_KINDS:
        problems.append(f"restart kind is invalid: {spec.get('restart')!r}")
    container = spec.get("container") or {}
    entrypoint = container.get("entrypoint", "")
    if not entrypoint or not str(entrypoint).startswith("/"):
        problems.append(f"entrypoint {entrypoint!r} is not absolute")
    for dep in spec.get("depends") or []:
        keys = set(dep) if isinstance(dep, dict) else set()
        if len(keys) != 1 or not keys <= DEPENDENCY_KEYS:
            problems.append(f"dependency {dep!r} must set exactly one of {sorted(DEPENDENCY_KEYS)}")
            continue
        if "path" in dep and not str(dep["path"]).startswith("/"):
            problems.append(f"path is not absolute: {dep['path']!r}")
        if "network" in dep and not (dep["network"] and set(dep["network"]) <= NETWORK_STATUSES):
            problems.append(f"invalid network dependency: {dep['network']!r}")
        if any(k in dep and dep[k] is not True for k in ("time", "configuration")):
            problems.append(f"{dep!r} must be true")
    for mount in container.get("mounts") or []:
        if set(mount) != {"source", "destination", "type", "options"}:
            problems.append(f"mount {mount!r} needs source, destination, type, options")
        elif not (mount["source"].startswith("/") and mount["destination"].startswith("/")):
            problems.append(f"mount {mount!r} has a relative path")
    return problems


def layer_problems(members: list[tarfile.TarInfo]) -> list[str]:
    problems = []
    for m in members:
        top = m.name.split("/", 1)[0]
        if top not in ("manifest.yaml", "rootfs"):
            problems.append(f"unexpected file {m.name!r}")
        if m.mode & 0o002:
            problems.append(f"world-writeable: {m.name}")
        if not (m.isdir() or m.isreg()):
            problems.append(f"not a regular file or directory: {m.name}")
        if m.name.startswith("rootfs/") and not m.isdir():
            path = m.name.removeprefix("rootfs")
            if not any(path.startswith(prefix + "/") for prefix in ALLOWED_PREFIXES):
                problems.append(f"path {path!r} is not allowed in extensions")
        if (m.uid, m.gid, m.mtime) != (0, 0, 0):
            problems.append(f"{m.name}: owner or time not normalised")
    return problems


# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def build_module() -> ModuleType:
    return _talos_bundle.build_module()


@pytest.fixture(scope="session")
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real build per session (shared with tests/test_deploy_image.py); its venv is
    cached in talos/.build."""
    return _talos_bundle.built_once(request, tmp_path_factory)


@pytest.fixture(scope="session")
def image_layer(built: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The layer blob as stored in the archive, extracted to a file."""
    index = json.loads(_archive_member(built.archive, "index.json"))
    manifest = json.loads(_archive_member(built.archive, _blob(index["manifests"][0]["digest"])))
    path = tmp_path_factory.mktemp("layer") / "layer.tar.gz"
    path.write_bytes(_archive_member(built.archive, _blob(manifest["layers"][0]["digest"])))
    yield path


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _archive_member(archive: Path, name: str) -> bytes:
    with tarfile.open(archive) as tar:
        f = tar.extractfile(name)
        assert f is not None, name
        return f.read()


def _layer_file(layer: Path, name: str) -> bytes:
    with tarfile.open(layer, "r:gz") as tar:
        f = tar.extractfile(name)
        assert f is not None, name
        return f.read()


def _service_spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((TALOS / "rootfs" / SERVICE_FILE).read_text())
    return spec


# --- the rule checks themselves -----------------------------------------------------------


def test_semver_range_parser_follows_blang() -> None:
    at_least_18 = parse_range(">= v1.8.0")
    assert at_least_18("v1.8.0") and at_least_18("v1.9.3") and at_least_18("v2.0.0")
    assert at_least_18("v1.8.0-beta.1")  # Talos compares the core version only
    assert not at_least_18("v1.7.6")
    window = parse_range(">=v1.8.0 <v1.10.0 || 2.1.0")
    assert window("v1.9.9") and window("v2.1.0")
    assert not window("v1.10.0") and not window("v2.0.0")
    assert parse_range("!=1.8.1")("1.8.2") and not parse_range("!=1.8.1")("1.8.1")
    for bad in ("v1.8", ">= banana", "|| >=1.0.0", ">=1.0.0 ||", "~>1.0.0", "", "=>1.0.0"):
        with pytest.raises(ValueError):
            parse_range(bad)
    assert _compare(parse_version("1.0.0-alpha"), parse_version("1.0.0")) < 0
    assert _compare(parse_version("1.0.0-alpha.2"), parse_version("1.0.0-alpha.10")) < 0


def test_rule_checks_catch_violations() -> None:
    """The checks used below can fail: each broken document yields a problem."""
    assert manifest_problems({"version": "v1", "metadata": {}})
    good = yaml.safe_load((TALOS / "manifest.yaml").read_text())
    broken = json.loads(json.dumps(good))
    broken["metadata"]["compatibility"]["talos"]["version"] = ">= 1.8"
    assert manifest_problems(broken) == ["compatibility: not a semantic version: '1.8'"]
    for change in (
        {"name": "Spegeld"},
        {"restart": "onFailure"},
        {"depends": [{"service": "cri", "time": True}]},
        {"depends": [{"network": ["dns"]}]},
        {"depends": [{"path": "var/run"}]},
        {"container": {"entrypoint": "./spegeld"}},
    ):
        assert service_problems({**_service_spec(), **change}), change
    bad = [tarfile.TarInfo("rootfs/etc/passwd"), tarfile.TarInfo("README"), tarfile.TarInfo("x")]
    bad[2].mode = 0o666
    bad[0].mtime = 1
    fifo = tarfile.TarInfo("rootfs/usr/local/fifo")
    fifo.type = tarfile.FIFOTYPE
    assert len(layer_problems([*bad, fifo])) == 6


# --- the committed files ------------------------------------------------------------------


def test_manifest_follows_talos_rules() -> None:
    manifest = yaml.safe_load((TALOS / "manifest.yaml").read_text())
    assert manifest_problems(manifest) == []
    assert manifest["metadata"]["name"] == SERVICE_NAME
    with (REPO / "pyproject.toml").open("rb") as f:
        assert manifest["metadata"]["version"] == tomllib.load(f)["project"]["version"]
    compatible = parse_range(manifest["metadata"]["compatibility"]["talos"]["version"])
    assert compatible("v1.8.0") and compatible("v1.11.2") and not compatible("v1.7.7")


def test_service_spec_follows_talos_rules_and_design() -> None:
    spec = _service_spec()
    assert service_problems(spec) == []
    assert spec["name"] == SERVICE_NAME and spec["restart"] == "always"
    assert {"service": "cri"} in spec["depends"]
    assert {"configuration": True} in spec["depends"]
    network = next(d["network"] for d in spec["depends"] if "network" in d)
    assert {"addresses", "connectivity", "etcfiles"} <= set(network)
    mounts = {m["destination"]: m for m in spec["container"]["mounts"]}
    for destination, mode in (
        ("/run/containerd", "rw"),
        ("/var/lib/containerd", "ro"),
        ("/var/lib/spegeld", "rw"),
        ("/etc/ssl/certs", "ro"),
    ):
        assert mounts[destination]["source"] == destination
        assert mounts[destination]["type"] == "bind"
        assert mode in mounts[destination]["options"], destination


def test_service_args_are_options_of_spegeld_run() -> None:
    """Every flag the service passes exists on ``spegeld run``, with the Talos paths."""
    args = _service_spec()["container"]["args"]
    assert args[0] == "run"
    run = cli_main.commands["run"]
    known = {opt for p in run.params for opt in p.opts}
    given = dict(a.removeprefix("--").split("=", 1) for a in args[1:])
    assert {f"--{k}" for k in given} <= known
    assert given["containerd-sock"] == "/run/containerd/containerd.sock"
    assert given["containerd-namespace"] == "k8s.io"
    assert given["log-format"] == "json"
    # The listeners (issue 13): the mirror on the host's loopback, where the machine-config
    # patch points containerd; the peer listener on every address, at the daemon's default.
    from spegeld.config import DEFAULT_MIRROR_ADDR, DEFAULT_PEER_ADDR

    assert given["registry-addr"] == DEFAULT_MIRROR_ADDR == "127.0.0.1:5000"
    assert given["peer-addr"] == DEFAULT_PEER_ADDR
    patch = yaml.safe_load((TALOS / "examples" / "machine-config-patch.yaml").read_text())
    endpoints = patch["machine"]["registries"]["mirrors"]["*"]["endpoints"]
    assert endpoints == [f"http://{given['registry-addr']}"]
    config = yaml.safe_load((TALOS / "examples" / "extensionserviceconfig.yaml").read_text())
    assert (config["apiVersion"], config["kind"], config["name"]) == (
        "v1alpha1",
        "ExtensionServiceConfig",
        SERVICE_NAME,
    )
    delivered = {f["mountPath"] for f in config["configFiles"] if f["content"].strip()}
    assert {given["kubeconfig"], given["cluster-key-file"]} == delivered
    assert all(re.fullmatch(r"SPEGELD_[A-Z_]+=.*", e) for e in config["environment"])


def test_cri_part_equals_what_configure_talos_writes() -> None:
    part = (TALOS / "rootfs/etc/cri/conf.d/10-spegeld.part").read_text()
    assert tomllib.loads(part) == tomllib.loads(TALOS_CRI_CONTENT)
    assert tomllib.loads(part)["plugins"]["io.containerd.cri.v1.images"] == {
        "discard_unpacked_layers": False
    }


def test_machine_config_patch_example_is_configure_talos_output() -> None:
    result = CliRunner().invoke(
        cli_main, ["configure", "talos", "--mirror-target", "http://127.0.0.1:5000"]
    )
    assert result.exit_code == 0, result.output
    assert (TALOS / "examples" / "machine-config-patch.yaml").read_text() == result.output


# --- the built image ------------------------------------------------------------------------


def test_archive_is_a_valid_oci_image(built: Any) -> None:
    proc = subprocess.run(
        ["skopeo", "inspect", f"oci-archive:{built.archive}"],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    inspected = json.loads(proc.stdout)
    assert inspected["Layers"] == [built.layer.blob.digest]
    assert inspected["Os"] == "linux"
    index = json.loads(_archive_member(built.archive, "index.json"))
    annotations = index["manifests"][0]["annotations"]
    assert annotations["org.opencontainers.image.ref.name"] == "v0.1.0"
    with tarfile.open(built.archive) as tar:
        for member in tar.getmembers():
            if member.name.startswith("blobs/sha256/") and member.isreg():
                data = tar.extractfile(member)
                assert data is not None
                assert hashlib.sha256(data.read()).hexdigest() == member.name.rsplit("/", 1)[1]
    size = built.archive.stat().st_size
    print(f"\narchive: {size / 1e6:.1f} MB")
    assert size <= MAX_COMPRESSED


def test_image_layer_follows_talos_rules(built: Any, image_layer: Path) -> None:
    with tarfile.open(image_layer, "r:gz") as tar:
        members = tar.getmembers()
    assert layer_problems(members) == []
    names = {m.name: m for m in members}
    assert manifest_problems(yaml.safe_load(_layer_file(image_layer, "manifest.yaml"))) == []
    spec = yaml.safe_load(_layer_file(image_layer, f"rootfs/{SERVICE_FILE}"))
    assert service_problems(spec) == []
    entrypoint = names[f"rootfs/{SERVICE_ROOT}{spec['container']['entrypoint']}"]
    assert entrypoint.isreg() and entrypoint.mode & 0o111
    assert "rootfs/etc/cri/conf.d/10-spegeld.part" in names
    unpacked = sum(m.size for m in members if m.name.startswith(f"rootfs/{SERVICE_ROOT}/"))
    print(f"\nservice rootfs: {unpacked / 1e6:.1f} MB unpacked")


@pytest.mark.talos
def test_image_layer_passes_talos_extension_validation(image_layer: Path, tmp_path: Path) -> None:
    """The layer as Talos unpacks it, checked by Talos's own extensions.Load/Validate and
    services.Spec.Validate (talosvalidate; see tests/test_talos_validate.py)."""
    root = tmp_path / "extension"
    with tarfile.open(image_layer, "r:gz") as tar:
        tar.extractall(root, filter="data")
    proc = subprocess.run(
        [str(component_binary("talosvalidate")), "extension", str(root)],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "extension spegeld 0.1.0 valid for Talos 1.13.0",
        "service spegeld.yaml valid",
    ]


def test_layer_is_deterministic(build_module: ModuleType, built: Any, tmp_path: Path) -> None:
    """The same staged tree gives the same bytes, whatever its times, owners and modes."""
    again = build_module.write_layer(built.stage, tmp_path / "again.tar.gz")
    assert again == built.layer
    small = tmp_path / "small"
    shutil.copytree(TALOS / "rootfs", small / "rootfs")
    shutil.copyfile(TALOS / "manifest.yaml", small / "manifest.yaml")
    first = build_module.write_layer(small, tmp_path / "1.tar.gz")
    part = small / "rootfs/etc/cri/conf.d/10-spegeld.part"
    os.utime(part, (1_000_000, 1_000_000))
    os.chown(part, 1234, 1234)
    part.chmod(0o600)
    assert build_module.write_layer(small, tmp_path / "2.tar.gz") == first
    part.write_text(part.read_text() + "# changed\n")
    assert build_module.write_layer(small, tmp_path / "3.tar.gz").diff_id != first.diff_id


_ENTER = (
    'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && '
    'mount -t proc proc "$0/proc" && exec /usr/bin/env -i /usr/sbin/chroot "$0" "$@"'
)


def _in_empty_root(root: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run in ``root``, read-only, with only a fresh proc, no network, an empty environment.

    The mounts live in a private mount namespace (unshare's default propagation), so they
    go away with the process and never show on the host; the test checks that after.
    """
    cmd = ["/usr/bin/unshare", "--mount", "--net", "--pid", "--fork", "/bin/sh", "-c"]
    cmd += [_ENTER, str(root), *args]
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return proc, time.monotonic() - start


def test_service_rootfs_runs_in_an_empty_chroot(built: Any, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(built.service_rootfs, root, symlinks=True)
    entrypoint = _service_spec()["container"]["entrypoint"]
    try:
        proc, seconds = _in_empty_root(root, entrypoint, "version")
        assert proc.returncode == 0, proc.stderr
        assert re.fullmatch(r"spegeld 0\.1\.0 \(Python 3\.11\.\d+\)\n", proc.stdout)
        print(f"\nversion in the chroot: {seconds:.2f} s")
        assert seconds < 5

        proc, _ = _in_empty_root(root, entrypoint, "run", "--help")
        assert proc.returncode == 0, proc.stderr
        assert "--containerd-sock" in proc.stdout

        # Files as the ExtensionServiceConfig would place them. With no network, the API
        # server's name does not resolve (glibc's resolver in the empty root) and the
        # mirror probe fails inside httpx on anyio's trio backend: the bundle's dynamic
        # imports and parsers all run.
        (root / "etc/spegeld/kubeconfig").write_text(_KUBECONFIG)
        (root / "etc/spegeld/kubeconfig").chmod(0o600)
        key = root / "etc/spegeld/gossip.key"
        key.write_text("1:" + "ab" * 32 + "\n")
        key.chmod(0o600)
        proc, seconds = _in_empty_root(
            root,
            entrypoint,
            "doctor",
            "--json",
            "--timeout=1",
            "--kubeconfig=/etc/spegeld/kubeconfig",
            "--cluster-key-file=/etc/spegeld/gossip.key",
        )
        assert proc.returncode in (0, 1), proc.stderr
        assert "Traceback" not in proc.stderr
        report = json.loads(proc.stdout)
        checks = {c["check"]: c for c in report["checks"]}
        assert checks["containerd.socket"]["status"] == "fail"
        assert checks["api.dns"]["status"] == "fail"
        assert "does not resolve" in checks["api.dns"]["verdict"]
        assert checks["registry.port"]["status"] == "fail"
        assert checks["gossip.key"]["status"] == "ok"
        print(f"doctor in the chroot: {seconds:.2f} s")
    finally:
        assert not os.path.ismount(root / "proc")
        assert not os.path.ismount(root)


_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
  - name: c
    cluster: {server: "https://api.spegeld-test.invalid:6443", insecure-skip-tls-verify: true}
users:
  - name: u
    user: {token: not-a-real-token}
contexts:
  - name: x
    context: {cluster: c, user: u}
current-context: x
"""


def test_standalone_binary_runs_without_python(built: Any) -> None:
    start = time.monotonic()
    proc = subprocess.run(
        [str(built.standalone), "version"],
        env={},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("spegeld 0.1.0 (Python 3.11.")
    print(f"\nstandalone version: {seconds:.2f} s, {built.standalone.stat().st_size / 1e6:.1f} MB")


def test_licence_and_notices_ship_in_the_image_and_beside_the_binary(
    built: Any, image_layer: Path
) -> None:
    """Issue 16: what the image and the binary bundle (CPython, glibc, the Python
    dependencies) comes with its licences."""
    for name in ("LICENSE", "THIRD_PARTY_NOTICES"):
        in_image = _layer_file(image_layer, f"rootfs/{SERVICE_ROOT}/usr/lib/spegeld/{name}")
        beside = (built.standalone.parent / name).read_bytes()
        assert in_image == beside and len(in_image) > 1000, name
    notices = beside.decode()
    assert "Apache License" in (built.standalone.parent / "LICENSE").read_text()
    for bundled in ("trio", "h11", "grpclib", "CPython", "libc6"):
        assert bundled in notices, bundled


def test_standalone_binary_leaves_the_harness_out(built: Any) -> None:
    """The demo's cluster harness is not part of a node: the binary says how to get it."""
    proc = subprocess.run(
        [str(built.standalone), "demo", "--nodes", "1"],
        env={},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "needs the spegeld-harness package" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_build_refuses_a_python_without_shared_libpython(
    build_module: ModuleType, tmp_path: Path
) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho True 0 3.11.9\n")
    fake.chmod(0o755)
    with pytest.raises(build_module.BuildError, match="no shared libpython"):
        build_module.check_python(str(fake))
