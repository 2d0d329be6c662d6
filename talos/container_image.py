#!/usr/bin/env python3
"""Build spegeld's container image (an OCI image archive) for the Kubernetes DaemonSet.

The image is the Talos extension's service rootfs as it is: the PyInstaller one-dir
bundle in ``/usr/lib/spegeld`` with LICENSE and THIRD_PARTY_NOTICES beside it, the ELF
interpreter and glibc at their build-host paths, empty mountpoints. No shell, no package
manager, nothing else. One layer, written by talos/build.py's deterministic layer writer
(same staged tree, same digests); the config adds Entrypoint ``spegeld`` and Cmd ``run``.

No Docker: ``ctr -n k8s.io images import`` loads the archive on a node, and
``skopeo copy oci-archive:<archive> docker://<registry>/spegeld:<tag>`` pushes it.
See deploy/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

TALOS = Path(__file__).resolve().parent
# The name ctr import gives the image (io.containerd.image.name). spegeld publishes no
# registry image: "localhost/" says so, and a kubelet never tries to pull it from
# Docker Hub; deploy/daemonset.yaml names the same reference.
DEFAULT_REPOSITORY = "localhost/spegeld"
# talos/build.py under one module name, shared with tests/test_talos.py's loader.
_BUILD_MODULE = "talos_build"


def _talos_build() -> ModuleType:
    """talos/build.py (not a package: loaded from its file, once per process)."""
    loaded = sys.modules.get(_BUILD_MODULE)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(_BUILD_MODULE, TALOS / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_BUILD_MODULE] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


talos_build = _talos_build()


@dataclass(frozen=True)
class Image:
    archive: Path  # the OCI image archive
    name: str  # the reference ctr import gives it
    layer: Any  # talos_build.Layer
    manifest: Any  # talos_build.Blob of the image manifest
    seconds: float


def run_config(version: str) -> dict[str, Any]:
    """The image config's ``config``: what a runtime runs when the pod names no command."""
    app = f"/{talos_build.APP_DIR}"
    return {
        "Entrypoint": [talos_build.ENTRYPOINT],
        "Cmd": ["run"],
        # PATH: an exec into the container (`kubectl exec … -- spegeld status`) finds it.
        "Env": [f"PATH={app}"],
        "WorkingDir": "/",
        "Labels": {
            "org.opencontainers.image.title": "spegeld",
            "org.opencontainers.image.version": version,
            "org.opencontainers.image.licenses": "Apache-2.0",
            "org.opencontainers.image.description": (
                f"spegeld node daemon; licences in {app}/LICENSE and {app}/THIRD_PARTY_NOTICES"
            ),
        },
    }


def write_image(service_rootfs: Path, version: str, out: Path, work: Path,
                name: str | None = None) -> Image:  # fmt: skip
    """The OCI archive of ``service_rootfs`` (talos/build.py's staged service root)."""
    start = time.monotonic()
    for required in (talos_build.ENTRYPOINT, f"/{talos_build.APP_DIR}/LICENSE",
                     f"/{talos_build.APP_DIR}/THIRD_PARTY_NOTICES"):  # fmt: skip
        if not (service_rootfs / required.lstrip("/")).is_file():
            raise talos_build.BuildError(f"{service_rootfs}: no {required}; build it first")
    name = name or f"{DEFAULT_REPOSITORY}:v{version}"
    _, arch = talos_build._platform()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    layer_file = work / "image-layer.tar.gz"
    layer = talos_build.write_layer(service_rootfs, layer_file)
    archive = out / f"spegeld-image-v{version}-{arch}.tar"
    manifest = talos_build.write_oci_archive(
        layer_file, layer, name, archive, run_config=run_config(version)
    )
    return Image(archive, name, layer, manifest, time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=TALOS / "dist", help="output directory")
    parser.add_argument(
        "--cache", type=Path, default=TALOS / ".build", help="build venv and work tree"
    )
    parser.add_argument(
        "--python", default="/usr/bin/python3", help="Python to bundle (shared libpython)"
    )
    parser.add_argument("--name", help=f"image reference [{DEFAULT_REPOSITORY}:v<version>]")
    args = parser.parse_args(argv)
    out, cache = args.out.resolve(), args.cache.resolve()
    try:
        # The whole talos/build.py build (the bundle, and its Talos archive and standalone
        # binary as well): the image is its service rootfs.
        built = talos_build.build(out, cache, args.python)
        version = talos_build.check_manifest_version()
        image = write_image(built.service_rootfs, version, out, cache, args.name)
    except talos_build.BuildError as e:
        print(f"talos/container_image.py: error: {e}", file=sys.stderr)
        return 1
    print(f"image archive  {image.archive}  ({image.archive.stat().st_size:,} bytes)")
    print(f"image name     {image.name}")
    print(f"manifest       {image.manifest.digest}")
    print(f"built in {built.seconds + image.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
