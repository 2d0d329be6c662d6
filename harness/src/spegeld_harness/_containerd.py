"""A private containerd per simulated node: Debian's 1.6, or a 2.x from ``bin_dir``.

Plain synchronous code (subprocess): usable from sync fixtures, scripts and trio tests alike.

Layout: ``base_dir`` (given, or a fresh ``/tmp/spg-*``) holds ``config.toml``,
``containerd.log``, ``root/``, ``state/``, ``opt/``, ``certs.d/`` (the registry hosts dir
CRI reads) and ``cri/``.  The unix sockets live in a short private ``/tmp/spg-*`` directory
when ``base_dir`` is too long for AF_UNIX (pytest's ``tmp_path`` often is).  CRI is off
unless ``cri=True``; on, every host path it would touch points into ``base_dir`` (see
``_containerd_config``).  Processes are only ever signalled by the PID this object started.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from spegeld_harness._containerd_config import ContainerdLayout, containerd_config
from spegeld_harness._process import ManagedProcess

__all__ = [
    "CtrError",
    "HarnessUnavailable",
    "PrivateContainerd",
    "containerd_unavailable_reason",
]

INSTALL_HINT: Final = "install Debian's containerd: apt-get install -y containerd runc"
# "containerd github.com/containerd/containerd 1.6.20~ds1 ..." (Debian) or
# "containerd github.com/containerd/containerd/v2 v2.3.7 ..." (a Go build).
_VERSION_RE: Final = re.compile(r"\sv?(\d+)\.(\d+)\.(\d+)")
CONTENT_PLUGIN_DIR: Final = "io.containerd.content.v1.content"
# sun_path is 108 bytes on Linux; leave room for the ".ttrpc" suffix and the NUL.
_MAX_SOCKET_PATH: Final = 100


class HarnessUnavailable(RuntimeError):
    """containerd/ctr missing, or not running as root."""


class CtrError(RuntimeError):
    """A ``ctr`` command failed."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"{' '.join(argv)} exited with {returncode}: {stderr.strip() or stdout.strip()}"
        )


def containerd_unavailable_reason(
    containerd_bin: str = "containerd", ctr_bin: str = "ctr"
) -> str | None:
    """Why a PrivateContainerd can't run here, or None if it can (for pytest skips)."""
    missing = [b for b in (containerd_bin, ctr_bin) if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not found on PATH; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "a private containerd needs root (it mounts, chowns and owns its state dirs)"
    return None


class PrivateContainerd(ManagedProcess):
    """One private containerd: own root, state, sockets, log; stopped by PID.

    ``with PrivateContainerd(tmp_path) as c:`` starts it and, on exit, stops it and removes
    any temp dirs it created itself (a given ``base_dir`` is left in place).
    """

    kind = "containerd"

    def __init__(
        self,
        base_dir: Path | str | None = None,
        *,
        namespace: str = "k8s.io",
        ready_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        log_level: str = "info",
        containerd_bin: str = "containerd",
        ctr_bin: str = "ctr",
        extra_config: str = "",
        bin_dir: Path | None = None,
        cri: bool = False,
    ) -> None:
        """``bin_dir``: run ``bin_dir/containerd`` and ``bin_dir/ctr`` (a 2.x build, say)
        instead of ``containerd_bin``/``ctr_bin`` (Debian's 1.6 from PATH).  ``cri``: enable
        the CRI plugin, its registry ``config_path`` at :attr:`hosts_dir`."""
        super().__init__(ready_timeout=ready_timeout, stop_timeout=stop_timeout)
        if bin_dir is not None:
            containerd_bin = str(Path(bin_dir) / "containerd")
            ctr_bin = str(Path(bin_dir) / "ctr")
        if base_dir is None:
            base = self._own_dir(Path(tempfile.mkdtemp(prefix="spg-", dir="/tmp")))
        else:
            base = Path(base_dir).absolute()
            base.mkdir(parents=True, exist_ok=True)
        self.base_dir: Final = base
        self.namespace = namespace
        self.log_level = log_level
        self.extra_config = extra_config
        self._containerd_bin = containerd_bin
        self._ctr_bin = ctr_bin
        self.cri = cri
        self._version: str | None = None
        self._sock_dir: Path | None = None

    # -- paths ------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.base_dir / "root"

    @property
    def state(self) -> Path:
        return self.base_dir / "state"

    @property
    def content_path(self) -> Path:
        """containerd's content store: ``<root>/io.containerd.content.v1.content``."""
        return self.root / CONTENT_PLUGIN_DIR

    def blob_path(self, digest: str) -> Path:
        """Where containerd keeps a blob (whether or not it is there)."""
        algo, _, hexpart = digest.partition(":")
        return self.content_path / "blobs" / algo / hexpart

    @property
    def config_path(self) -> Path:
        return self.base_dir / "config.toml"

    @property
    def hosts_dir(self) -> Path:
        """The registry hosts dir CRI's ``config_path`` names (``spegeld configure``'s target)."""
        return self.base_dir / "certs.d"

    @property
    def cri_socket(self) -> Path:
        """The CRI endpoint: the gRPC socket (for ``crictl --image-endpoint unix://...``)."""
        return self.socket

    @property
    def version(self) -> str:
        """containerd's version, e.g. ``"1.6.20"`` or ``"2.3.7"`` (from ``--version``)."""
        if self._version is None:
            self._version = self._read_version()
        return self._version

    @property
    def major(self) -> int:
        return int(self.version.split(".", 1)[0])

    def _read_version(self) -> str:
        try:
            result = subprocess.run(
                [self._containerd_bin, "--version"],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
        except OSError as e:
            raise HarnessUnavailable(f"cannot run {self._containerd_bin}: {e}") from e
        found = _VERSION_RE.search(result.stdout)
        if result.returncode != 0 or found is None:
            raise HarnessUnavailable(
                f"{self._containerd_bin} --version gave no version: "
                f"{(result.stdout + result.stderr).strip()!r}"
            )
        return ".".join(found.groups())

    @property
    def log_path(self) -> Path:
        return self.base_dir / "containerd.log"

    @property
    def socket(self) -> Path:
        """The gRPC socket (fixed for the life of this object, across restarts)."""
        return self._socket_dir() / "containerd.sock"

    @property
    def address(self) -> str:
        return str(self.socket)

    def _socket_dir(self) -> Path:
        if self._sock_dir is None:
            if len(str(self.base_dir / "containerd.sock.ttrpc")) <= _MAX_SOCKET_PATH:
                self._sock_dir = self.base_dir
            else:
                self._sock_dir = self._own_dir(Path(tempfile.mkdtemp(prefix="spg-", dir="/tmp")))
        return self._sock_dir

    # -- lifecycle (the rest is ManagedProcess) ---------------------------------------------

    def argv(self) -> list[str]:
        return [self._containerd_bin, "--config", str(self.config_path)]

    def _prepare(self) -> None:
        reason = containerd_unavailable_reason(self._containerd_bin, self._ctr_bin)
        if reason is not None:
            raise HarnessUnavailable(reason)
        self._write_config()
        # A SIGKILLed containerd leaves its sockets behind; containerd replaces them anyway,
        # but removing them first means a connect can only succeed against the new process.
        for stale in (self.socket, Path(str(self.socket) + ".ttrpc")):
            stale.unlink(missing_ok=True)

    def _write_config(self) -> None:
        layout = ContainerdLayout(
            base_dir=self.base_dir,
            root=self.root,
            state=self.state,
            socket=self.socket,
            debug_socket=self._socket_dir() / "debug.sock",
            hosts_dir=self.hosts_dir,
            log_level=self.log_level,
        )
        if self.cri:
            self.hosts_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            containerd_config(layout, major=self.major, cri=self.cri, extra=self.extra_config)
        )

    def _probe(self) -> str | None:
        """Ready when the gRPC socket accepts connections."""
        if not self.socket.exists():
            return f"no socket at {self.socket} yet"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(self.socket))
            except OSError as e:
                return f"{self.socket}: {e}"
        return None

    def __repr__(self) -> str:
        return f"PrivateContainerd(socket={str(self.socket)!r}, pid={self.pid})"

    # -- ctr ----------------------------------------------------------------------------------

    def ctr(
        self,
        *args: str | Path,
        namespace: str | None = None,
        timeout: float | None = 120.0,
        input: bytes | None = None,
    ) -> str:
        """Run ``ctr --address SOCK -n NAMESPACE ARGS...``; its stdout, or raise CtrError."""
        argv = self.ctr_argv(*args, namespace=namespace)
        res = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
        stdout = res.stdout.decode(errors="replace")
        if res.returncode != 0:
            stderr = res.stderr.decode(errors="replace")
            raise CtrError(argv, res.returncode, stdout, stderr)
        return stdout

    def ctr_argv(self, *args: str | Path, namespace: str | None = None) -> list[str]:
        """The argv of ``ctr`` against this containerd, for a caller that runs it itself
        (to kill it midway, say)."""
        ns = namespace or self.namespace
        return [self._ctr_bin, "--address", str(self.socket), "-n", ns, *map(str, args)]

    def import_image(
        self,
        tar_path: Path | str,
        *,
        all_platforms: bool = False,
        platform: str | None = None,
        no_unpack: bool = True,
        index_name: str | None = None,
        snapshotter: str | None = None,
        gc: bool = True,
    ) -> str:
        """``ctr images import`` an OCI / docker archive; returns ctr's stdout.

        Image names come from the archive (``io.containerd.image.name``, which
        ``BuiltImage.write_oci_archive`` sets to ``BuiltImage.name``).

        containerd 1.6 writes *every* blob of the archive into the content store, then walks
        the image with the platform matcher (host platform by default, ``platform`` if given,
        everything with ``all_platforms``) and only labels the matched children for GC.  The
        unmatched blobs are held by the import's lease and vanish at the next GC, which the
        lease's (asynchronous) deletion triggers a moment later.  ``gc=True`` runs a
        synchronous GC after the import so the store is deterministic on return.
        """
        if all_platforms and platform is not None:
            raise ValueError("all_platforms and platform are mutually exclusive")
        args: list[str | Path] = ["images", "import"]
        if all_platforms:
            args.append("--all-platforms")
        if platform is not None:
            args += ["--platform", platform]
        if no_unpack:
            args.append("--no-unpack")
        if index_name is not None:
            args += ["--index-name", index_name]
        if snapshotter is not None:
            args += ["--snapshotter", snapshotter]
        args.append(Path(tar_path).absolute())
        out = self.ctr(*args, timeout=None)
        if gc:
            self.gc()
        return out

    def remove_image(self, name: str, *, sync: bool = True) -> None:
        """``ctr images rm [--sync] NAME``; with sync, unreferenced content is GC'd on return.

        Note: ctr 1.6 exits 0 (with a warning) when the image doesn't exist.
        """
        self.ctr("images", "rm", *(["--sync"] if sync else []), name)

    def images(self) -> list[str]:
        """Image names in our namespace (``ctr images ls -q``)."""
        return self.ctr("images", "ls", "-q").split()

    def content_digests(self) -> set[str]:
        """Every blob digest in the content store (``ctr content ls -q``)."""
        return set(self.ctr("content", "ls", "-q").split())

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def gc(self) -> None:
        """Run containerd's garbage collector synchronously (create + ``--sync`` delete a lease)."""
        lease = f"spegeld-harness-gc-{os.getpid()}-{time.monotonic_ns()}"
        self.ctr("leases", "create", "--id", lease)
        self.ctr("leases", "delete", "--sync", lease)
