#!/usr/bin/env python3
"""Build spegeld's Talos system extension (an OCI image archive) and a standalone binary.

Talos has no Python, so the extension carries a PyInstaller **one-dir** build together
with its ELF interpreter and the glibc it was linked against: the service rootfs runs in
an empty root, read-only, and needs no writable ``/tmp`` (a one-file build would unpack
itself there on every start). The same PyInstaller analysis also yields a one-file
binary for systemd hosts.

No Docker: the image is written here in Python, ``manifest.yaml`` plus ``rootfs/`` in one
layer. The layer and the archive are deterministic functions of the staged tree (sorted
entries, mtime 0, uid/gid 0, normalised modes, gzip header without name or time);
PyInstaller's own output is not byte-identical between builds, so two builds give the
same digests only from the same staged tree. See talos/README.md.

Run with any Python 3.11+; the bundle is built with ``--python`` (default Debian's
``/usr/bin/python3``, which has a shared libpython) in a venv under ``--cache``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

REPO = Path(__file__).resolve().parent.parent
TALOS = REPO / "talos"
PYINSTALLER = "pyinstaller==6.22.3"
# Where Talos expects an extension service's rootfs, and our bundle inside it.
SERVICE_ROOT = "usr/local/lib/containers/spegeld"
APP_DIR = "usr/lib/spegeld"
ENTRYPOINT = f"/{APP_DIR}/spegeld"
# Empty directories the service's mounts land on (runc would create them otherwise).
MOUNTPOINTS = (
    "dev",
    "etc/spegeld",
    "etc/ssl/certs",
    "proc",
    "run/containerd",
    "sys",
    "var/lib/containerd",
    "var/lib/spegeld",
)
# glibc dlopen()s this one for pthread_exit/cancel; ldd cannot see it.
DLOPENED = ("libgcc_s.so.1",)
# Packages with modules imported by name at run time, which PyInstaller cannot see.
HIDDEN_PACKAGES = (
    "spegeld",
    "anyio",
    "trio_asyncio",
    "rich._unicode_data",
    "httpcore",
    "grpclib",
)
# spegeld_harness (the demo's and tests' private clusters) is a separate distribution that
# the build venv never installs; excluded by name too, so a node never carries it.
EXCLUDES = (
    "spegeld_harness",
    "tkinter",
    "setuptools",
    "pkg_resources",
    "distutils",
    "pip",
    "readline",
    "lib2to3",
)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
_CHUNK = 1 << 20


class BuildError(Exception):
    """A build step failed; the message says which and why."""


@dataclass(frozen=True)
class Blob:
    digest: str  # sha256:<hex>
    size: int


@dataclass(frozen=True)
class Layer:
    blob: Blob  # the gzip'd tar
    diff_id: str  # sha256 of the uncompressed tar


@dataclass(frozen=True)
class Outputs:
    archive: Path  # the OCI image archive
    standalone: Path  # the one-file binary
    stage: Path  # the staged extension: manifest.yaml + rootfs/
    service_rootfs: Path  # stage/rootfs/usr/local/lib/containers/spegeld
    layer: Layer
    seconds: float


# --- deterministic layer and OCI archive --------------------------------------------


class _Hashing:
    """Write-through that hashes and counts (the sink of tarfile or of GzipFile)."""

    def __init__(self, sink: IO[bytes] | gzip.GzipFile) -> None:
        self._sink = sink
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self._sink.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


def _walk(root: Path) -> Iterator[Path]:
    """Every path under root, parents before children, in byte order of their names."""
    for entry in sorted(root.iterdir(), key=lambda p: os.fsencode(p.name)):
        yield entry
        if entry.is_dir() and not entry.is_symlink():
            yield from _walk(entry)


def _tarinfo(path: Path, name: str) -> tarfile.TarInfo:
    """A header that depends only on the file's type, exec bit, size and target."""
    st = path.lstat()
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if path.is_symlink():
        info.type = tarfile.SYMTYPE
        info.linkname = os.readlink(path)
        info.mode = 0o777
    elif path.is_dir():
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
    elif path.is_file():
        info.size = st.st_size
        info.mode = 0o755 if st.st_mode & 0o111 else 0o644
    else:
        raise BuildError(f"{path}: not a regular file, directory or symlink")
    return info


def write_layer(stage: Path, out: Path) -> Layer:
    """Write ``stage`` (manifest.yaml, rootfs/) as a gzip'd layer tar; same tree, same bytes."""
    with out.open("wb") as raw:
        compressed = _Hashing(raw)
        # filename="" and mtime=0: the gzip header carries neither name nor time.
        with gzip.GzipFile(
            filename="", mode="wb", fileobj=cast(IO[bytes], compressed), mtime=0
        ) as gz:
            plain = _Hashing(gz)
            with tarfile.open(
                fileobj=cast(IO[bytes], plain), mode="w|", format=tarfile.PAX_FORMAT
            ) as tar:
                for path in _walk(stage):
                    info = _tarinfo(path, path.relative_to(stage).as_posix())
                    if info.isreg():
                        with path.open("rb") as data:
                            tar.addfile(info, data)
                    else:
                        tar.addfile(info)
    return Layer(Blob(compressed.digest, compressed.size), plain.digest)


def _json_blob(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> Blob:
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data))


def _platform() -> tuple[str, str]:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    return "linux", arch


def write_oci_archive(
    layer_file: Path, layer: Layer, name: str, out: Path, run_config: dict[str, Any] | None = None
) -> Blob:
    """An OCI image-layout tar (``skopeo … oci-archive:``); returns the manifest's blob.

    ``run_config`` is the image config's ``config`` (Entrypoint, Cmd, Env, Labels): empty
    for the Talos extension, which names its entrypoint in its service file.
    """
    os_name, arch = _platform()
    config = _json_blob(
        {
            "architecture": arch,
            "os": os_name,
            "config": run_config or {},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
            "created": "1970-01-01T00:00:00Z",
        }
    )
    config_blob = _digest(config)
    manifest = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, **_descriptor(config_blob)},
            "layers": [{"mediaType": OCI_LAYER, **_descriptor(layer.blob)}],
        }
    )
    manifest_blob = _digest(manifest)
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    index = _json_blob(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    **_descriptor(manifest_blob),
                    "platform": {"architecture": arch, "os": os_name},
                    "annotations": {ANNOTATION_REF_NAME: tag, ANNOTATION_IMAGE_NAME: name},
                }
            ],
        }
    )
    small = {
        "oci-layout": _json_blob({"imageLayoutVersion": "1.0.0"}),
        "index.json": index,
        _blob_path(config_blob): config,
        _blob_path(manifest_blob): manifest,
    }
    names = sorted([*small, _blob_path(layer.blob), "blobs", "blobs/sha256"])
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in names:
            info = tarfile.TarInfo(entry)
            info.mtime = 0
            info.uname = info.gname = ""
            if entry in ("blobs", "blobs/sha256"):
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif entry in small:
                info.size, info.mode = len(small[entry]), 0o644
                tar.addfile(info, io.BytesIO(small[entry]))
            else:
                info.size, info.mode = layer.blob.size, 0o644
                with layer_file.open("rb") as data:
                    tar.addfile(info, data)
    return manifest_blob


def _descriptor(blob: Blob) -> dict[str, Any]:
    return {"digest": blob.digest, "size": blob.size}


def _blob_path(blob: Blob) -> str:
    return "blobs/sha256/" + blob.digest.removeprefix("sha256:")


# --- the Python bundle ----------------------------------------------------------------


def _run(cmd: list[str], what: str, log: Path | None = None, **kw: Any) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    except OSError as e:
        raise BuildError(f"{what}: cannot run {cmd[0]}: {e.strerror}") from None
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return str(proc.stdout)


def check_python(python: str) -> str:
    """The build Python must be 3.11+ with a shared libpython (PyInstaller bundles it)."""
    probe = (
        "import sys, sysconfig; print(sys.version_info >= (3, 11), "
        "sysconfig.get_config_var('Py_ENABLE_SHARED'), sys.version.split()[0])"
    )
    out = _run([python, "-c", probe], f"probing {python}").split()
    if out[0] != "True":
        raise BuildError(f"{python} is Python {out[2]}; the build needs 3.11 or newer")
    if out[1] != "1":
        raise BuildError(
            f"{python} has no shared libpython; use Debian's /usr/bin/python3 "
            "(apt-get install python3-venv python3-dev)"
        )
    return out[2]


def ensure_venv(cache: Path, python: str) -> Path:
    """A venv with spegeld's pinned dependencies and PyInstaller, rebuilt when they change."""
    venv = cache / "venv"
    stamp_text = "\n".join(
        [
            python,
            check_python(python),
            PYINSTALLER,
            hashlib.sha256((REPO / "constraints.txt").read_bytes()).hexdigest(),
            hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest(),
        ]
    )
    stamp = venv / ".talos-build"
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
    ]
    # setuptools builds the wheel through REPO/build/lib and never prunes it: a module
    # deleted from src/ would ride along into the image from an earlier build.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    if not stamp.is_file() or stamp.read_text() != stamp_text:
        shutil.rmtree(venv, ignore_errors=True)
        _run([python, "-m", "venv", str(venv)], "creating the build venv (needs python3-venv)")
        _run([*pip, "-c", str(REPO / "constraints.txt"), PYINSTALLER, str(REPO)], "pip install")
        stamp.write_text(stamp_text)
    else:
        # The dependencies are there; only spegeld's own code may have changed.
        _run([*pip, "--no-deps", "--force-reinstall", str(REPO)], "pip install spegeld")
    return venv


_SPEC = """\
# Generated by talos/build.py.
from PyInstaller.utils.hooks import collect_submodules, copy_metadata

hidden = [m for pkg in {hidden!r} for m in collect_submodules(pkg)]
a = Analysis(
    [{entry!r}],
    hiddenimports=hidden,
    datas=copy_metadata("spegeld"),
    excludes={excludes!r},
)
pyz = PYZ(a.pure)
onedir = EXE(pyz, a.scripts, [], exclude_binaries=True, name="spegeld", console=True,
             strip=True, upx=False)
COLLECT(onedir, a.binaries, a.datas, name="spegeld", strip=True, upx=False)
EXE(pyz, a.scripts, a.binaries, a.datas, name="spegeld-standalone", console=True,
    strip=True, upx=False, runtime_tmpdir=None)
"""


def run_pyinstaller(venv: Path, cache: Path) -> tuple[Path, Path]:
    """(the one-dir bundle, the one-file binary) from one analysis."""
    work = cache / "pyinstaller"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    entry = work / "spegeld_entry.py"
    entry.write_text("from spegeld.cli import main\n\nmain()\n")
    spec = work / "spegeld.spec"
    spec.write_text(_SPEC.format(hidden=HIDDEN_PACKAGES, entry=str(entry), excludes=list(EXCLUDES)))
    dist = work / "dist"
    cmd = [str(venv / "bin" / "python"), "-m", "PyInstaller", "--noconfirm", "--log-level=WARN"]
    cmd += ["--distpath", str(dist), "--workpath", str(work / "build"), str(spec)]
    # A fixed hash seed fixes the order of base_library.zip's entries.
    env = {**os.environ, "PYTHONHASHSEED": "0", "SOURCE_DATE_EPOCH": "0"}
    _run(cmd, "PyInstaller", log=work / "pyinstaller.log", env=env)
    return dist / "spegeld", dist / "spegeld-standalone"


# --- the extension tree ---------------------------------------------------------------


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def _ldd(path: Path, internal: Path) -> list[tuple[str, Path | None]]:
    """(name, resolved path or None) for each dependency, bundled libraries first."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LD_LIBRARY_PATH": str(internal)}
    proc = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env, check=False)
    deps: list[tuple[str, Path | None]] = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>":
            deps.append((parts[0], Path(parts[2]) if parts[2].startswith("/") else None))
        elif parts and parts[0].startswith("/"):
            deps.append((parts[0], Path(parts[0])))  # the ELF interpreter
    return deps


def add_system_libraries(service_root: Path, app: Path) -> list[str]:
    """Copy the interpreter and glibc (and the bootloader's own needs) into the rootfs.

    PyInstaller leaves glibc out on purpose; an empty root has none. Each library goes to
    its path on the build host, which is where the copied ld.so looks for it. The
    bootloader is loaded before PyInstaller can point anything at ``_internal``, so its
    dependencies (libz) are copied next to libc as well.
    """
    internal = app / "_internal"
    bootloader = app / "spegeld"
    wanted: dict[str, Path] = {}
    libdir: Path | None = None
    for elf in sorted(p for p in app.rglob("*") if p.is_file() and _is_elf(p)):
        for name, resolved in _ldd(elf, internal):
            if resolved is None:
                raise BuildError(f"{elf.relative_to(app)}: {name} not found on the build host")
            inside = resolved.is_relative_to(app)
            if not inside:
                wanted[str(resolved)] = resolved
                if name == "libc.so.6":
                    libdir = resolved.parent
            elif elf == bootloader:
                wanted[f"@{name}"] = resolved
    if libdir is None:
        raise BuildError("no libc.so.6 among the bundle's dependencies")
    for name in DLOPENED:
        wanted[str(libdir / name)] = libdir / name
    copied = []
    for key, src in sorted(wanted.items()):
        target_path = libdir / src.name if key.startswith("@") else Path(key)
        dest = service_root / target_path.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.resolve(), dest)
        os.chmod(dest, 0o755)
        copied.append(str(target_path))
    return copied


def check_manifest_version() -> str:
    """The extension's version is spegeld's: both files must say the same."""
    with (REPO / "pyproject.toml").open("rb") as f:
        version = str(tomllib.load(f)["project"]["version"])
    for line in (TALOS / "manifest.yaml").read_text().splitlines():
        if line.startswith("  version:"):  # metadata.version
            found = line.split(":", 1)[1].strip().strip("\"'")
            if found != version:
                raise BuildError(
                    f"talos/manifest.yaml says version {found}, pyproject.toml says {version}"
                )
            return version
    raise BuildError("talos/manifest.yaml has no metadata.version")


def stage_extension(app: Path, stage: Path) -> Path:
    """manifest.yaml + rootfs/ (talos/rootfs and the bundle); returns the service rootfs."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    shutil.copyfile(TALOS / "manifest.yaml", stage / "manifest.yaml")
    shutil.copytree(TALOS / "rootfs", stage / "rootfs")
    service_root = stage / "rootfs" / SERVICE_ROOT
    shutil.copytree(app, service_root / APP_DIR)
    add_system_libraries(service_root, app)
    for mountpoint in MOUNTPOINTS:
        (service_root / mountpoint).mkdir(parents=True, exist_ok=True)
    for path in [stage, *_walk(stage)]:
        if not path.is_symlink():
            mode = path.stat().st_mode & 0o777
            path.chmod(0o755 if path.is_dir() or mode & 0o111 else 0o644)
    return service_root


def write_notices(venv: Path, app: Path, service_root: Path, out: Path) -> None:
    """scripts/notices.py in the build venv: its dists, CPython, the bundled libraries."""
    cmd = [str(venv / "bin" / "python"), str(REPO / "scripts" / "notices.py"), "--bundle"]
    cmd += ["--also", "pyinstaller", "--lib", str(app / "_internal"), "--lib", str(service_root)]
    _run([*cmd, "-o", str(out)], "writing THIRD_PARTY_NOTICES")


def build(out: Path, cache: Path, python: str, name: str | None = None) -> Outputs:
    """Everything: venv, PyInstaller, staged tree, layer, OCI archive, standalone binary."""
    start = time.monotonic()
    version = check_manifest_version()
    _, arch = _platform()
    name = name or f"spegeld-talos:v{version}"
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    venv = ensure_venv(cache, python)
    app, onefile = run_pyinstaller(venv, cache)
    stage = cache / "extension"
    service_root = stage_extension(app, stage)
    # LICENSE and THIRD_PARTY_NOTICES ship in the image (beside the bundle) and beside the
    # standalone binary: both carry the same dependencies, CPython and host libraries.
    notices = cache / "THIRD_PARTY_NOTICES"
    write_notices(venv, app, service_root, notices)
    for dest in (service_root / APP_DIR, out):
        shutil.copyfile(notices, dest / "THIRD_PARTY_NOTICES")
        shutil.copyfile(REPO / "LICENSE", dest / "LICENSE")
    layer_file = cache / "layer.tar.gz"
    layer = write_layer(stage, layer_file)
    archive = out / f"spegeld-talos-v{version}-{arch}.tar"
    write_oci_archive(layer_file, layer, name, archive)
    standalone = out / f"spegeld-v{version}-linux-{arch}"
    shutil.copyfile(onefile, standalone)
    standalone.chmod(0o755)
    return Outputs(archive, standalone, stage, service_root, layer, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TALOS / "dist", help="output directory")
    parser.add_argument(
        "--cache", type=Path, default=TALOS / ".build", help="build venv and work tree"
    )
    parser.add_argument(
        "--python", default="/usr/bin/python3", help="Python to bundle (shared libpython)"
    )
    parser.add_argument("--name", help="image name in the archive [spegeld-talos:v<version>]")
    args = parser.parse_args(argv)
    try:
        result = build(args.out.resolve(), args.cache.resolve(), args.python, args.name)
    except BuildError as e:
        print(f"talos/build.py: error: {e}", file=sys.stderr)
        return 1
    print(f"image archive  {result.archive}  ({result.archive.stat().st_size:,} bytes)")
    print(f"layer          {result.layer.blob.digest}  ({result.layer.blob.size:,} bytes)")
    print(f"standalone     {result.standalone}  ({result.standalone.stat().st_size:,} bytes)")
    print(f"built in {result.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
