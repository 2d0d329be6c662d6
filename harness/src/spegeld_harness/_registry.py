"""The upstream registry for tests, the demo and benchmarks: Debian's ``docker-registry``.

That is CNCF Distribution 2.8.2, run with our own config: filesystem storage under
``base_dir``, deletes enabled, no auth, no proxy section (it never reaches out anywhere), no
debug server, no blob-descriptor cache, no upload purging, no storage health checks.
``REGISTRY_*`` environment variables (which would override the config file) are not passed on.

Plain synchronous code (subprocess, http.client): usable from sync fixtures, scripts and trio
tests alike.  Layout: ``base_dir`` (given, or a fresh ``/tmp/spg-reg-*``) holds ``config.yml``,
``registry.log`` (stdout and stderr), ``storage/`` and ``tmp/`` (skopeo scratch space).

Images are pushed with the registry's own API (:meth:`UpstreamRegistry.push`: monolithic blob
uploads streamed from disk, then manifests by digest, then the top object by tag) or with
``skopeo copy --all --preserve-digests`` (:meth:`UpstreamRegistry.push_with_skopeo`).  Either
way every digest stays identical to the :class:`~spegeld_harness.BuiltImage`.

The request log (which requests the registry served, and how many bytes) is parsed by
``_registry_log``; pushing with the registry API lives in ``_registry_push``, connections
(from inside a network namespace if need be) in ``_registry_http``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Self

from spegeld_harness._images import BuiltImage
from spegeld_harness._process import ManagedProcess
from spegeld_harness._registry_http import (
    Connection,
    RegistryResponse,
    UpstreamError,
    child_env,
    hostport,
    pick_port,
)
from spegeld_harness._registry_log import SYNC_PATH, RegistryRequest, parse_access_log
from spegeld_harness._registry_push import default_repository, push_image, resolve_target

__all__ = [
    "UpstreamError",
    "RegistryRequest",
    "RegistryResponse",
    "UpstreamRegistry",
    "default_repository",
    "parse_access_log",
    "registry_unavailable_reason",
]

INSTALL_HINT: Final = "install Debian's docker-registry: apt-get install -y docker-registry"
SKOPEO_HINT: Final = "install skopeo: apt-get install -y skopeo"


def registry_unavailable_reason(registry_bin: str = "docker-registry") -> str | None:
    """Why an UpstreamRegistry can't run here, or None if it can (for pytest skips)."""
    if shutil.which(registry_bin) is None:
        return f"{registry_bin} not found on PATH; {INSTALL_HINT}"
    return None


class UpstreamRegistry(ManagedProcess):
    """One Distribution registry on ``host:port``; own config, storage and log; stopped by PID.

    ``with UpstreamRegistry() as reg:`` starts it and, on exit, stops it and removes the temp
    dirs it created itself (a given ``base_dir`` is left in place).  ``port=None`` picks a free
    port once; it stays the same across :meth:`restart`.  With ``netns`` the registry runs via
    ``ip netns exec NETNS`` and every request this object makes (readiness, pushes, log sync)
    is made from inside that namespace; skopeo runs there too.
    """

    kind = "registry"

    def __init__(
        self,
        base_dir: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        netns: str | None = None,
        ready_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        request_timeout: float = 30.0,
        log_level: str = "info",
        registry_bin: str = "docker-registry",
        skopeo_bin: str = "skopeo",
    ) -> None:
        super().__init__(ready_timeout=ready_timeout, stop_timeout=stop_timeout)
        if base_dir is None:
            base = self._own_dir(Path(tempfile.mkdtemp(prefix="spg-reg-", dir="/tmp")))
        else:
            base = Path(base_dir).absolute()
            base.mkdir(parents=True, exist_ok=True)
        self.base_dir: Final = base
        self.host: Final = host
        self.netns: Final = netns
        self._auto_port = port is None
        self.port: int = pick_port(host, netns) if port is None else port
        self.request_timeout = request_timeout
        self.log_level = log_level
        self._registry_bin = registry_bin
        self._skopeo_bin = skopeo_bin
        self._secret = secrets.token_hex(16)
        self._started_once = False
        self._sync_ids = itertools.count(1)

    # -- paths and addresses --------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.base_dir / "config.yml"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "registry.log"

    @property
    def storage_path(self) -> Path:
        """The filesystem driver's root directory (``docker/registry/v2/...`` below it)."""
        return self.base_dir / "storage"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: the registry part of image references."""
        return hostport(self.host, self.port)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.address}"

    def reference(self, repository: str, tag: str) -> str:
        """``127.0.0.1:PORT/<repository>:<tag>``."""
        return f"{self.address}/{repository}:{tag}"

    # -- lifecycle (the rest is ManagedProcess) -------------------------------------------------

    def _write_config(self) -> None:
        def q(value: str | Path) -> str:
            # A JSON string is a valid YAML double-quoted scalar.
            s = str(value)
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        self.config_path.write_text(
            f"""version: 0.1
log:
  level: {self.log_level}
  formatter: text
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {q(self.storage_path)}
  delete:
    enabled: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: {q(self.address)}
  secret: {q(self._secret)}
health:
  storagedriver:
    enabled: false
"""
        )

    def start(self) -> Self:
        """Start the registry and wait until ``GET /v2/`` answers 200."""
        self._check_open()
        if self.running:
            return self
        reason = registry_unavailable_reason(self._registry_bin)
        if reason is not None:
            raise RuntimeError(reason)
        # A port picked by us can be taken by someone else before the registry binds it:
        # pick another one (only before the first successful start; restarts keep the port).
        attempts = 3 if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                super().start()
            except RuntimeError as e:
                if attempt + 1 < attempts and "address already in use" in str(e):
                    self.port = pick_port(self.host, self.netns)
                    continue
                raise
            break
        self._started_once = True
        return self

    def argv(self) -> list[str]:
        argv = [self._registry_bin, "serve", str(self.config_path)]
        if self.netns is not None:
            # ip netns exec exec()s the command: the PID we get is the registry's.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        return argv

    def _prepare(self) -> None:
        self._write_config()
        self.storage_path.mkdir(exist_ok=True)

    def _spawn_env(self) -> dict[str, str]:
        return child_env()

    def _spawn_cwd(self) -> Path:
        return self.base_dir

    def _label(self) -> str:
        return f"registry on {self.address}"

    def _probe(self) -> str | None:
        """Ready when ``GET /v2/`` answers 200."""
        try:
            resp = self.request("GET", "/v2/", timeout=0.5)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return None if resp.status == 200 else f"GET /v2/ -> {resp.status}"

    def __repr__(self) -> str:
        return f"UpstreamRegistry(url={self.url!r}, pid={self.pid})"

    # -- HTTP -------------------------------------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> Connection:
        return Connection(
            self.host, self.port, self.netns, self.request_timeout if timeout is None else timeout
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> RegistryResponse:
        """One request on a fresh connection, response read completely (small bodies only)."""
        conn = self._connect(timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return RegistryResponse(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    # -- push -------------------------------------------------------------------------------------

    def push(self, image: BuiltImage, repository: str | None = None, tag: str | None = None) -> str:
        """Push ``image`` (every platform) with the registry API; returns ``ADDR/repo:tag``.

        See ``_registry_push``: blobs the registry has are skipped, manifests go up by digest,
        the top object by tag.  Raises :class:`UpstreamError` if the registry computes a
        different digest for anything.  ``repository`` defaults to :func:`default_repository`,
        ``tag`` to ``image.tag``.
        """
        repo, tag = resolve_target(image, repository, tag)
        conn = self._connect()
        try:
            push_image(conn, image, repo, tag)
        finally:
            conn.close()
        return self.reference(repo, tag)

    def push_with_skopeo(
        self,
        image: BuiltImage,
        repository: str | None = None,
        tag: str | None = None,
        *,
        timeout: float | None = 600.0,
    ) -> str:
        """Push ``image`` with ``skopeo copy --all --preserve-digests``; returns ``ADDR/repo:tag``.

        Writes the image as an OCI archive under ``base_dir/tmp`` and copies it with
        ``oci-archive:FILE`` (no ``:tag``: the archive holds one image, and skopeo can't
        match a tag on a Docker manifest list in an OCI layout).  skopeo gets an empty
        registries.conf and policy checks off, so host configuration can't redirect it.
        Checks the pushed tag resolves to ``image.digest`` afterwards.
        """
        if shutil.which(self._skopeo_bin) is None:
            raise RuntimeError(f"{self._skopeo_bin} not found on PATH; {SKOPEO_HINT}")
        repo, tag = resolve_target(image, repository, tag)
        ref = self.reference(repo, tag)
        scratch = Path(tempfile.mkdtemp(prefix="skopeo-", dir=self._tmp_dir()))
        try:
            archive = image.write_oci_archive(scratch / "image.tar")
            registries_conf = scratch / "registries.conf"
            registries_conf.write_text("")
            registries_d = scratch / "registries.d"
            registries_d.mkdir()
            argv = [
                self._skopeo_bin,
                "--insecure-policy",
                "--tmpdir",
                str(scratch),
                "--registries.d",
                str(registries_d),
                "copy",
                "--all",
                "--preserve-digests",
                "--dest-tls-verify=false",
                "--quiet",
                f"oci-archive:{archive}",
                f"docker://{ref}",
            ]
            if self.netns is not None:
                argv = ["ip", "netns", "exec", self.netns, *argv]
            res = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                env=child_env({"CONTAINERS_REGISTRIES_CONF": str(registries_conf)}),
            )
            if res.returncode != 0:
                out = (res.stderr or res.stdout).decode(errors="replace").strip()
                raise RuntimeError(
                    f"{' '.join(argv)} exited with {res.returncode}: {out}\n{self._log_tail(10)}"
                )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        resp = self.request(
            "HEAD", f"/v2/{repo}/manifests/{tag}", headers={"Accept": image.media_type}
        )
        got = resp.header("Docker-Content-Digest")
        if resp.status != 200 or got != image.digest:
            raise UpstreamError(
                "HEAD", f"/v2/{repo}/manifests/{tag}", resp.status, b"", f" (digest {got})"
            )
        return ref

    def _tmp_dir(self) -> Path:
        d = self.base_dir / "tmp"
        d.mkdir(exist_ok=True)
        return d

    # -- request log ------------------------------------------------------------------------------

    def log_position(self) -> int:
        """The log's current size: pass it as ``since`` to see only later requests."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def sync_log(self, timeout: float = 5.0) -> None:
        """Make every request that completed before this call visible in the log.

        Sends ``GET /v2/?spegeld-sync=N`` and waits until its access-log line appears.  A
        no-op when the registry isn't running (its log is final then).
        """
        if not self.running:
            return
        marker = f"{SYNC_PATH}{os.getpid()}-{next(self._sync_ids)}"
        start = self.log_position()
        resp = self.request("GET", marker, timeout=timeout)
        if resp.status != 200:
            raise UpstreamError("GET", marker, resp.status, resp.body)
        needle = f'"GET {marker} '.encode()
        deadline = time.monotonic() + timeout
        while True:
            with self.log_path.open("rb") as f:
                f.seek(start)
                if needle in f.read():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"registry didn't log {marker} within {timeout:.1f}s\n{self._log_tail()}"
                )
            time.sleep(0.002)

    def requests(self, since: int = 0, *, sync: bool = True) -> list[RegistryRequest]:
        """Every request in the access log (from byte offset ``since``), oldest first.

        With ``sync`` (the default) first waits for :meth:`sync_log`, so every request that
        completed before the call is included.  The sync markers themselves are left out.
        """
        if sync:
            self.sync_log()
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return []
        # Only whole lines: the last one may be half-written.
        text = data[: data.rfind(b"\n") + 1].decode(errors="replace")
        return [r for r in parse_access_log(text) if not r.uri.startswith(SYNC_PATH)]

    def requests_seen(self, since: int = 0, *, sync: bool = True) -> list[str]:
        """``"METHOD /path"`` (query string dropped) for each request, oldest first."""
        return [str(r) for r in self.requests(since, sync=sync)]

    def blob_bytes_served(self, since: int = 0, *, sync: bool = True) -> int:
        """Response-body bytes of blob GETs (200 and 206): the upstream bytes of a pull.

        From the access log's size field: the bytes the registry handed to the socket, so a
        transfer the client aborted counts what was written before the abort.
        """
        return sum(
            r.size
            for r in self.requests(since, sync=sync)
            if r.is_blob_get and r.status in (200, 206)
        )
