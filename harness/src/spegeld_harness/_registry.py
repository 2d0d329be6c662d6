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

**Request log.**  Distribution writes two lines per request into ``registry.log``:

* a logrus line on stderr, ``time="…" level=info msg="response completed" …
  http.request.method=GET http.request.uri=/v2/… http.response.status=200
  http.response.written=N …`` (``level=error msg="response completed with error"`` for 4xx/5xx);
  requests that match no route (``GET /nonexistent``) get none;
* an access-log line on stdout in Apache combined format (gorilla/handlers), for *every*
  request, written when the handler returns::

      127.0.0.1 - - [27/Nov/2026:03:26:22 +0000] "GET /v2/a/blobs/sha256:… HTTP/1.1" 200 300 "" "ua"

  The size is the number of response-body bytes the handler wrote: the blob size for a full
  blob GET, the range length for a 206, the bytes written before a client hung up.  For a
  HEAD it is the body length the handler *would* have sent (Go drops it), so only GETs
  count as bytes served.

:meth:`UpstreamRegistry.requests` parses the access-log lines.  A request's line appears just
*after* the client has read the whole response, so by default the parser first sends a marker
request (``GET /v2/?spegeld-sync=N``, filtered out of the results) and waits until its line is
in the log: anything that completed before the call is then reliably in the results.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self, TypeVar

from spegeld_harness._images import BuiltImage

__all__ = [
    "RegistryError",
    "RegistryRequest",
    "RegistryResponse",
    "UpstreamRegistry",
    "default_repository",
    "parse_access_log",
    "registry_unavailable_reason",
]

INSTALL_HINT: Final = "install Debian's docker-registry: apt-get install -y docker-registry"
SKOPEO_HINT: Final = "install skopeo: apt-get install -y skopeo"
SYNC_PATH: Final = "/v2/?spegeld-sync="

_CHUNK: Final = 1 << 20
_CLONE_NEWNET: Final = 0x40000000
_NETNS_DIR: Final = Path("/run/netns")
# Distribution's repository name grammar (reference.NameRegexp without a domain).
_REPO_COMPONENT: Final = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE: Final = re.compile(rf"^{_REPO_COMPONENT}(?:/{_REPO_COMPONENT})*$")
_TAG_RE: Final = re.compile(r"^[\w][\w.-]{0,127}$")
_BLOB_PATH_RE: Final = re.compile(r"^/v2/.+/blobs/[a-z0-9]+:[0-9a-f]+$")
# gorilla/handlers combined log format: remote ident user [time] "method uri proto" status size
# "referer" "user agent".  Quoted fields escape '"' and '\' with a backslash.
_ACCESS_RE: Final = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]*)\] "(?P<method>[A-Z]+) (?P<uri>\S+) '
    r'(?P<proto>[^"]*)" (?P<status>\d{3}) (?P<size>\d+|-)'
    r'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?$'
)

T = TypeVar("T")


class RegistryError(RuntimeError):
    """The registry answered a request with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: bytes, note: str = "") -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        text = body[:500].decode(errors="replace").strip()
        super().__init__(f"{method} {path} -> {status}: {text}{note}")


@dataclass(frozen=True)
class RegistryRequest:
    """One access-log line of the registry."""

    method: str
    uri: str  # as sent: path plus query string
    status: int
    size: int  # response-body bytes the handler wrote (see the module docstring)
    remote: str
    user_agent: str

    @property
    def path(self) -> str:
        return self.uri.partition("?")[0]

    @property
    def is_blob_get(self) -> bool:
        return self.method == "GET" and bool(_BLOB_PATH_RE.match(self.path))

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class RegistryResponse:
    """A response read completely (see :meth:`UpstreamRegistry.request`)."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def parse_access_log(text: str) -> list[RegistryRequest]:
    """The access-log lines in ``text`` (other lines are skipped), oldest first."""
    out: list[RegistryRequest] = []
    for line in text.splitlines():
        m = _ACCESS_RE.match(line)
        if m is None:
            continue
        size = m["size"]
        out.append(
            RegistryRequest(
                method=m["method"],
                uri=m["uri"],
                status=int(m["status"]),
                size=0 if size == "-" else int(size),
                remote=m["remote"],
                user_agent=re.sub(r"\\(.)", r"\1", m["agent"] or ""),
            )
        )
    return out


def registry_unavailable_reason(registry_bin: str = "docker-registry") -> str | None:
    """Why an UpstreamRegistry can't run here, or None if it can (for pytest skips)."""
    if shutil.which(registry_bin) is None:
        return f"{registry_bin} not found on PATH; {INSTALL_HINT}"
    return None


def default_repository(image: BuiltImage) -> str:
    """``image.repository`` without a leading registry host (``example.com:5000/a/b`` -> ``a/b``).

    The first component is a host when it has a ``.`` or ``:`` or is ``localhost`` (the
    Docker rule).
    """
    first, sep, rest = image.repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return rest
    return image.repository


# -- network namespaces ---------------------------------------------------------------------


def _in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in the network namespace ``netns`` (None: here), in a throwaway thread.

    setns(2) only moves the calling thread, so a short-lived thread enters the namespace,
    runs ``fn`` (e.g. creates and connects a socket, which stays in that namespace) and
    ends.  Needs CAP_SYS_ADMIN.
    """
    if netns is None:
        return fn()
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(_NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pick_port(host: str, netns: str | None) -> int:
    """A free TCP port on ``host``: bind port 0, read it back, close."""

    def pick() -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port: int = s.getsockname()[1]
            return port

    return _in_netns(netns, pick)


class _Connection(http.client.HTTPConnection):
    """http.client with 1 MiB send blocks, connecting from inside ``netns`` if given.

    http.client never looks at ``http_proxy`` & co., so requests go straight to the
    registry's address.
    """

    def __init__(self, host: str, port: int, netns: str | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, blocksize=_CHUNK)
        self._netns = netns

    def connect(self) -> None:
        if self._netns is None:
            super().connect()
            return
        addr = (self.host, self.port)
        self.sock = _in_netns(self._netns, lambda: socket.create_connection(addr, self.timeout))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus ``REGISTRY_*`` (config overrides) and proxy settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REGISTRY_") and k.lower() not in _PROXY_VARS
    }
    env.update(extra or {})
    return env


_PROXY_VARS: Final = frozenset({"http_proxy", "https_proxy", "all_proxy", "no_proxy"})


# Instances with a live process, stopped at interpreter exit.
_LIVE: set[UpstreamRegistry] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for r in live:
        with contextlib.suppress(Exception):
            r.close()


class UpstreamRegistry:
    """One Distribution registry on ``host:port``; own config, storage and log; stopped by PID.

    ``with UpstreamRegistry() as reg:`` starts it and, on exit, stops it and removes the temp
    dirs it created itself (a given ``base_dir`` is left in place).  ``port=None`` picks a free
    port once; it stays the same across :meth:`restart`.  With ``netns`` the registry runs via
    ``ip netns exec NETNS`` and every request this object makes (readiness, pushes, log sync)
    is made from inside that namespace; skopeo runs there too.
    """

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
        self._owned_dirs: list[Path] = []
        if base_dir is None:
            base = Path(tempfile.mkdtemp(prefix="spg-reg-", dir="/tmp"))
            self._owned_dirs.append(base)
        else:
            base = Path(base_dir).absolute()
            base.mkdir(parents=True, exist_ok=True)
        self.base_dir: Final = base
        self.host: Final = host
        self.netns: Final = netns
        self._auto_port = port is None
        self.port: int = _pick_port(host, netns) if port is None else port
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.request_timeout = request_timeout
        self.log_level = log_level
        self._registry_bin = registry_bin
        self._skopeo_bin = skopeo_bin
        self._secret = secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        self._started_once = False
        self._sync_ids = itertools.count(1)
        self.last_start_seconds: float | None = None

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
        return _hostport(self.host, self.port)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.address}"

    def reference(self, repository: str, tag: str) -> str:
        """``127.0.0.1:PORT/<repository>:<tag>``."""
        return f"{self.address}/{repository}:{tag}"

    @property
    def pid(self) -> int | None:
        """PID of the running registry, or None."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    # -- lifecycle --------------------------------------------------------------------------------

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
        if self._closed:
            raise RuntimeError("UpstreamRegistry is closed")
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
                self._start_once()
            except RuntimeError as e:
                if attempt + 1 < attempts and "address already in use" in str(e):
                    self.port = _pick_port(self.host, self.netns)
                    continue
                raise
            break
        self._started_once = True
        return self

    def _start_once(self) -> None:
        self._write_config()
        self.storage_path.mkdir(exist_ok=True)
        argv = [self._registry_bin, "serve", str(self.config_path)]
        if self.netns is not None:
            # ip netns exec exec()s the command: the PID we get is the registry's.
            argv = ["ip", "netns", "exec", self.netns, *argv]
        t0 = time.monotonic()
        with self.log_path.open("ab") as log:
            start_offset = log.tell()
            log.write(f"--- spegeld harness: starting registry at {time.ctime()}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=_child_env(),
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._wait_ready(t0, start_offset)
        except BaseException:
            self.kill()
            raise
        self.last_start_seconds = time.monotonic() - t0

    def _wait_ready(self, t0: float, log_offset: int) -> None:
        assert self._proc is not None
        deadline = t0 + self.ready_timeout
        delay = 0.005
        last_error = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"registry on {self.address} exited with {code} during startup"
                    f"\n{self._log_tail(since=log_offset)}"
                )
            try:
                resp = self.request("GET", "/v2/", timeout=0.5)
            except OSError as e:
                last_error = f"{type(e).__name__}: {e}"
            else:
                if resp.status == 200:
                    return
                last_error = f"GET /v2/ -> {resp.status}"
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"registry not ready on {self.url} after {self.ready_timeout:.1f}s"
                    f" ({last_error})\n{self._log_tail(since=log_offset)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)

    def _log_tail(self, lines: int = 30, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no registry log at {self.log_path}: {e})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last lines of {self.log_path}:\n{tail}"

    def log_tail(self, lines: int = 30) -> str:
        """The end of the registry's log (for failure messages)."""
        return self._log_tail(lines)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM our registry (by PID), SIGKILL after ``timeout``; reap it."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.stop_timeout if timeout is None else timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self._forget()

    def kill(self) -> None:
        """SIGKILL our registry (a crash: uploads in flight are left half-written)."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        finally:
            self._forget()

    def _forget(self) -> None:
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def detach(self) -> None:
        """Leave the process running after this interpreter exits (``spegeld demo --keep``)."""
        self._closed = True
        self._owned_dirs.clear()
        self._forget()

    def restart(self) -> Self:
        """Stop (if running) and start again: same storage, same port."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the temp dirs this object created (not a caller's base_dir)."""
        try:
            self.stop()
        finally:
            self._closed = True
            for d in self._owned_dirs:
                shutil.rmtree(d, ignore_errors=True)
            self._owned_dirs.clear()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UpstreamRegistry(url={self.url!r}, pid={self.pid})"

    # -- HTTP -------------------------------------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> _Connection:
        return _Connection(
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

        Config and layer blobs go up as monolithic uploads (``POST .../blobs/uploads/`` then
        ``PUT <location>&digest=``), streamed from :meth:`BuiltImage.open_blob`; blobs the
        registry already has (``HEAD``) are skipped.  Then each platform manifest is PUT by
        digest and the top object (index or manifest) by tag, each with its media type as
        Content-Type.  Raises :class:`RegistryError` if the registry computes a different
        digest for anything.  ``repository`` defaults to :func:`default_repository`, ``tag`` to
        ``image.tag``.
        """
        repo, tag = self._target(image, repository, tag)
        manifests = {p.manifest for p in image.platforms} | {image.digest}
        conn = self._connect()
        try:
            for digest in sorted(d for d in image.blobs if d not in manifests):
                self._push_blob(conn, image, repo, digest)
            if image.is_index:
                for p in image.platforms:
                    self._put_manifest(conn, image, repo, p.manifest, p.manifest)
            self._put_manifest(conn, image, repo, image.digest, tag)
        finally:
            conn.close()
        return self.reference(repo, tag)

    def _target(
        self, image: BuiltImage, repository: str | None, tag: str | None
    ) -> tuple[str, str]:
        repo = default_repository(image) if repository is None else repository
        tag = image.tag if tag is None else tag
        if not _REPO_RE.match(repo):
            raise ValueError(f"not a valid repository name for the registry: {repo!r}")
        if not _TAG_RE.match(tag):
            raise ValueError(f"not a valid tag: {tag!r}")
        return repo, tag

    def _roundtrip(
        self,
        conn: _Connection,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        body: bytes | IO[bytes] | None = None,
        expect: tuple[int, ...] = (200,),
    ) -> http.client.HTTPResponse:
        try:
            conn.request(method, path, body=body, headers=dict(headers))
            resp = conn.getresponse()
            data = resp.read()
        except OSError as e:
            conn.close()
            raise RuntimeError(f"{method} {path} on {self.url} failed: {e}") from e
        if resp.status not in expect:
            raise RegistryError(method, path, resp.status, data)
        return resp

    def _push_blob(self, conn: _Connection, image: BuiltImage, repo: str, digest: str) -> None:
        blob_path = f"/v2/{repo}/blobs/{digest}"
        head = self._roundtrip(conn, "HEAD", blob_path, {}, expect=(200, 404))
        if head.status == 200:
            return
        started = self._roundtrip(
            conn, "POST", f"/v2/{repo}/blobs/uploads/", {"Content-Length": "0"}, expect=(202,)
        )
        location = started.headers.get("Location")
        if not location:
            raise RegistryError("POST", f"/v2/{repo}/blobs/uploads/", 202, b"", " (no Location)")
        # Distribution answers with an absolute URL built from our Host header: keep the path.
        loc = urllib.parse.urlsplit(location)
        sep = "&" if loc.query else "?"
        query = f"{loc.query}{sep}digest={urllib.parse.quote(digest, safe=':')}"
        put_path = f"{loc.path}?{query}"
        size = image.blobs[digest].size
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        with image.open_blob(digest) as f:
            done = self._roundtrip(conn, "PUT", put_path, headers, body=f, expect=(201,))
        got = done.headers.get("Docker-Content-Digest")
        if got != digest:
            raise RegistryError("PUT", put_path, 201, b"", f" (stored as {got}, not {digest})")

    def _put_manifest(
        self, conn: _Connection, image: BuiltImage, repo: str, digest: str, ref: str
    ) -> None:
        path = f"/v2/{repo}/manifests/{ref}"
        headers = {"Content-Type": image.blobs[digest].media_type}
        resp = self._roundtrip(
            conn, "PUT", path, headers, body=image.read_blob(digest), expect=(201,)
        )
        got = resp.headers.get("Docker-Content-Digest")
        if got != digest:
            raise RegistryError("PUT", path, 201, b"", f" (stored as {got}, not {digest})")

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
        repo, tag = self._target(image, repository, tag)
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
                env=_child_env({"CONTAINERS_REGISTRIES_CONF": str(registries_conf)}),
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
            raise RegistryError(
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
            raise RegistryError("GET", marker, resp.status, resp.body)
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
