"""The node-side checks: containerd, its configuration, and the mirror answering."""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from spegeld.config import ContainerdConfig
from spegeld.containerd import ContentInfo, open_containerd, socket_problem
from spegeld.errors import ContainerdError, RemoteProtocolError
from spegeld.oci import parse_reference
from spegeld.store import ContentPath, ContentSource, ask_containerd, choose_content_path

from . import _remedies
from ._model import CheckResult, Status, skipped

BLOB_CHECK_LIMIT = 4 << 20  # bytes; the smallest local blob is fetched whole and verified
CRI_V2 = "io.containerd.grpc.v1.cri"  # containerd 1.x / 2.x config version 2
CRI_V3_IMAGES = "io.containerd.cri.v1.images"  # containerd 2.x config versions 3 and 4
# What containerd 2.x on Linux uses when neither config_path nor mirrors are set
# (plugins/cri/images/plugin.go); 1.x leaves it empty and ignores hosts.toml.
CRI_DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d:/etc/docker/certs.d"
_MAJOR = re.compile(r"v?(\d+)\.")  # "v2.3.7", "1.6.20~ds1"


@dataclass(frozen=True, slots=True)
class NodeTarget:
    containerd: ContainerdConfig
    containerd_config: Path
    hosts_dir: Path | None  # None: take containerd's config_path
    mirror: tuple[str, int]  # where this node's spegeld mirror listens (containerd's side)


@dataclass(slots=True)
class _Found:
    """What the containerd checks learn that later checks use."""

    blob: ContentInfo | None = None
    repository: str = "spegeld/doctor"
    upstream: str = ""  # the registry of the local image the blob check fetches
    config_paths: tuple[Path, ...] = ()  # containerd's hosts dirs, in its order
    containerd_major: int | None = None


def _r(
    check: str, title: str, status: Status, verdict: str, *evidence: str, fix: str = ""
) -> CheckResult:
    return CheckResult(check, title, status, verdict, tuple(evidence), fix)


async def check_node(target: NodeTarget, timeout: float) -> list[CheckResult]:
    found = _Found()
    results = await _containerd_checks(target, timeout, found)
    results += _config_checks(target, found)
    results += await _mirror_checks(target, timeout, found)
    return results


async def _containerd_checks(
    target: NodeTarget, timeout: float, found: _Found
) -> list[CheckResult]:
    cfg = target.containerd
    problem = socket_problem(cfg.socket)
    if problem is not None:
        return [
            _r(
                "containerd.socket",
                "containerd socket",
                Status.FAIL,
                str(problem),
                fix="Start containerd, or point --containerd-sock at its socket.",
            ),
            skipped("containerd.api", "containerd", "no socket"),
        ]
    results = [
        _r(
            "containerd.socket",
            "containerd socket",
            Status.OK,
            "present and writable",
            str(cfg.socket),
        )
    ]
    try:
        with trio.fail_after(timeout * 2):
            async with open_containerd(cfg.socket, cfg.namespace) as client:
                version = await client.version()
                images = await client.list_images()
                content = await client.list_content()
                reported, why_not = await ask_containerd(client)
    except (ContainerdError, trio.TooSlowError) as exc:
        text = str(exc) or "no answer in time"
        results.append(
            _r(
                "containerd.api",
                "containerd",
                Status.FAIL,
                text,
                fix="Check `systemctl status containerd` (on Talos: talosctl service cri).",
            )
        )
        return results
    major = _MAJOR.match(version.version)
    found.containerd_major = int(major.group(1)) if major else None
    status = Status.OK if images else Status.WARN
    verdict = f"{len(images)} images in namespace {cfg.namespace}"
    if not images:
        verdict += ": nothing to share yet (is the namespace right? kubelet uses k8s.io)"
    results.append(
        _r("containerd.api", "containerd", status, verdict, f"containerd {version.version}")
    )
    blobs = sorted((c for c in content if 0 < c.size <= BLOB_CHECK_LIMIT), key=lambda c: c.size)
    if blobs:
        found.blob = blobs[0]
    for image in images:
        try:
            ref = parse_reference(image.name)
        except RemoteProtocolError:
            continue
        found.repository, found.upstream = ref.repository, ref.registry
        break
    results.append(_content_dir_check(choose_content_path(cfg.content_path, reported, why_not)))
    return results


def _content_dir_check(found: ContentPath) -> CheckResult:
    """Which content directory is used, how it was found, and whether it is readable."""
    blobs = found.path / "blobs" / "sha256"
    how = {
        ContentSource.FLAG: "found by: flag (--containerd-content-path)",
        ContentSource.INTROSPECTION: "found by: containerd introspection",
        ContentSource.DEFAULT: "found by: default (containerd did not report one)",
    }[found.source]
    evidence = [str(found.path), how]
    if found.problem:
        evidence.append(f"asking containerd: {found.problem}")
    if found.disagrees:
        evidence.append(f"containerd reports: {found.reported}")
    readable = os.access(blobs, os.R_OK | os.X_OK)
    if found.disagrees:
        state = "readable" if readable else "not readable"
        return _r(
            "containerd.content",
            "content directory",
            Status.WARN,
            f"--containerd-content-path is not where containerd keeps its content ({state})",
            *evidence,
            fix=_remedies.content_path_disagrees(found.path, found.reported),
        )
    if readable:
        return _r(
            "containerd.content",
            "content directory",
            Status.OK,
            "readable: blobs go out with sendfile",
            *evidence,
        )
    return _r(
        "containerd.content",
        "content directory",
        Status.WARN,
        "not readable: blobs are streamed over gRPC instead (several times slower)",
        *evidence,
        fix=_remedies.content_unreadable(found.path, str(found.source)),
    )


def _config_checks(target: NodeTarget, found: _Found) -> list[CheckResult]:
    path = target.containerd_config
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        config = skipped(
            "containerd.config",
            "containerd config",
            f"{path} does not exist (Talos generates it: use `spegeld configure talos`)",
        )
        return [config, _hosts_check(target, found)]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        config = _r(
            "containerd.config", "containerd config", Status.WARN, f"{path} cannot be read: {exc}"
        )
        return [config, _hosts_check(target, found)]
    plugins = raw.get("plugins", {}) if isinstance(raw.get("plugins"), dict) else {}
    version = raw.get("version", 1)
    split = isinstance(version, int) and version >= 3  # 2.x: the CRI plugin is split
    if split:
        images: dict[str, Any] = plugins.get(CRI_V3_IMAGES, {})
        registry: dict[str, Any] = images.get("registry", {})
        discard = images.get("discard_unpacked_layers")
    else:
        cri: dict[str, Any] = plugins.get(CRI_V2, {})
        registry = cri.get("registry", {})
        discard = cri.get("containerd", {}).get("discard_unpacked_layers")
    config_path = registry.get("config_path")
    plugin = CRI_V3_IMAGES if split else CRI_V2
    results: list[CheckResult] = []
    defaulted = (
        not config_path
        and not registry.get("mirrors")
        and (split or (found.containerd_major or 0) >= 2)
    )
    if defaulted:
        config_path = CRI_DEFAULT_CONFIG_PATH
    if config_path:
        found.config_paths = tuple(Path(p) for p in str(config_path).split(":") if p)
        verdict = (
            f"registry config_path unset: containerd 2.x uses {config_path}"
            if defaulted
            else f"registry config_path = {config_path}"
        )
        results.append(_r("containerd.config", "containerd config", Status.OK, verdict, str(path)))
    else:
        results.append(
            _r(
                "containerd.config",
                "containerd config",
                Status.FAIL,
                "registry config_path is not set: containerd ignores hosts.toml, "
                "so it never asks spegeld",
                str(path),
                fix=f'Set config_path = "/etc/containerd/certs.d" in [plugins."{plugin}".registry] '
                "and restart containerd.",
            )
        )
    if discard is True:
        results.append(
            _r(
                "containerd.discard",
                "unpacked layers",
                Status.FAIL,
                "discard_unpacked_layers = true: containerd deletes layers after unpacking, "
                "so there is nothing to share",
                str(path),
                fix="Set discard_unpacked_layers = false and restart containerd.",
            )
        )
    else:
        state = "false" if discard is False else "unset (false by default)"
        results.append(
            _r(
                "containerd.discard",
                "unpacked layers",
                Status.OK,
                f"discard_unpacked_layers {state}",
            )
        )
    results.append(_hosts_check(target, found))
    return results


def _targets_of(hosts_toml: Path) -> list[str]:
    try:
        raw = tomllib.loads(hosts_toml.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []
    hosts = raw.get("host", {})
    return [str(url) for url in hosts] if isinstance(hosts, dict) else []


def _hosts_check(target: NodeTarget, found: _Found) -> CheckResult:
    if target.hosts_dir is not None:
        directories: tuple[Path, ...] = (target.hosts_dir,)
    else:
        directories = found.config_paths or (Path("/etc/containerd/certs.d"),)
    directory = directories[0]  # where `spegeld configure containerd` should write
    host, port = target.mirror
    ours = {f"{h}:{port}" for h in (host, "127.0.0.1", "localhost", "[::1]")}
    pointing: list[str] = []
    others: list[str] = []
    for hosts_toml in sorted(h for d in directories for h in d.glob("*/hosts.toml")):
        urls = _targets_of(hosts_toml)
        if any(url.split("://", 1)[-1].rstrip("/") in ours for url in urls):
            pointing.append(hosts_toml.parent.name)
        else:
            others.append(hosts_toml.parent.name)
    if pointing:
        return _r(
            "mirror.hosts",
            "containerd mirror",
            Status.OK,
            f"{len(pointing)} registries point at this spegeld",
            ", ".join(pointing[:8]),
            ":".join(map(str, directories)),
        )
    return _r(
        "mirror.hosts",
        "containerd mirror",
        Status.WARN,
        "no hosts.toml points at this spegeld: containerd pulls straight from registries",
        f"{':'.join(map(str, directories))}: {', '.join(others) or 'no hosts.toml files'}",
        fix=f"spegeld configure containerd --config-path {directory} --mirror-target http://127.0.0.1:{port}",
    )


async def _mirror_checks(target: NodeTarget, timeout: float, found: _Found) -> list[CheckResult]:
    host, port = target.mirror
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    results: list[CheckResult] = []
    async with httpx.AsyncClient(base_url=base, timeout=timeout, trust_env=False) as http:
        try:
            health = await http.get("/healthz")
            ready = await http.get("/readyz")
        except httpx.HTTPError as exc:
            results.append(
                _r(
                    "registry.port",
                    "mirror port",
                    Status.FAIL,
                    f"{base}: {str(exc) or type(exc).__name__}",
                    fix="Is `spegeld run` running with this --registry-addr? "
                    "(systemctl status spegeld)",
                )
            )
            results.append(
                skipped("registry.blob", "blob through the mirror", "the mirror does not answer")
            )
            return results
        status = (
            Status.OK if health.status_code == 200 and ready.status_code == 200 else Status.WARN
        )
        results.append(
            _r(
                "registry.port",
                "mirror port",
                status,
                f"/healthz {health.status_code}, /readyz {ready.status_code}",
                base,
            )
        )
        results.append(await _blob_check(http, found))
    return results


async def _blob_check(http: httpx.AsyncClient, found: _Found) -> CheckResult:
    blob = found.blob
    if blob is None:
        return skipped("registry.blob", "blob through the mirror", "no local blob to fetch")
    path = f"/v2/{found.repository}/blobs/{blob.digest}"
    params = {"ns": found.upstream} if found.upstream else {}
    try:
        response = await http.get(path, params=params)
    except httpx.HTTPError as exc:
        return _r("registry.blob", "blob through the mirror", Status.FAIL, f"GET {path}: {exc}")
    algorithm, _, expected = str(blob.digest).partition(":")
    actual = hashlib.new(algorithm, response.content).hexdigest()
    if response.status_code == 200 and actual == expected:
        return _r(
            "registry.blob",
            "blob through the mirror",
            Status.OK,
            f"served {len(response.content)} bytes, digest verified",
            str(blob.digest),
        )
    return _r(
        "registry.blob",
        "blob through the mirror",
        Status.FAIL,
        f"GET {path} answered {response.status_code} ({len(response.content)} bytes, "
        f"digest {'ok' if actual == expected else 'wrong'})",
    )
