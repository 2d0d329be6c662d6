"""``spegeld demo``: spegeld on a real containerd on this machine.

Today it runs one node: a private containerd, a few generated images, and the
index spegeld builds from them. The multi-node cluster arrives with issue 7.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from spegeld.cli._options import option

# (name, layer sizes as fractions of --image-size, platforms, Docker media types)
DEMO_IMAGES = (
    ("example.com/demo/web:v1", (0.75, 0.25), None, False),
    ("example.com/demo/multiarch:v1", (0.5, 0.5), ["linux/amd64", "linux/arm64"], False),
    ("registry.local:5000/legacy/app:2.0", (1.0,), None, True),
)


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "G": 1 << 30, "GB": 1 << 30}  # fmt: skip
    number = text.strip().upper().rstrip("IB") if text.upper().endswith("IB") else text.upper()
    digits = number.rstrip("KMGB")
    unit = number[len(digits) :]
    if unit.endswith("I"):
        unit = unit[:-1]
    if not digits.isdigit() or unit not in units:
        raise click.BadParameter(f"{text!r} is not a size like 4M or 512K")
    return int(digits) * units[unit]


@click.command()
@option("--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Cluster size.")
@option("--image-size", default="4M", show_default=True, help="Bytes of layers per image.")
@option("--keep", is_flag=True, help="Leave containerd running and print how to poke at it.")
def demo(nodes: int, image_size: str, keep: bool) -> None:
    """Run spegeld against a real, private containerd on this machine (needs root)."""
    from rich.console import Console

    from spegeld.cli._root import fail, not_built

    size = _parse_size(image_size)
    if nodes > 1:
        not_built("a multi-node demo (--nodes > 1)", "issue 7, the cluster demo")
    from spegeld.harness import PrivateContainerd, build_image, containerd_unavailable_reason

    reason = containerd_unavailable_reason()
    if reason is not None:
        fail(reason)
    console = Console(markup=False, highlight=False)
    work = Path(tempfile.mkdtemp(prefix="spg-demo-", dir="/tmp"))
    node = PrivateContainerd(work / "node1")
    try:
        with console.status("starting a private containerd"):
            node.start()
        console.print(f"containerd {node.socket} is up (pid {node.pid})")
        for name, fractions, platforms, docker in DEMO_IMAGES:
            layers = [max(1, int(size * f)) for f in fractions]
            with console.status(f"building and importing {name}"):
                image = build_image(name, layers, platforms=platforms, docker_media_types=docker)
                archive = image.write_oci_archive(work / "image.tar")
                node.import_image(archive)
            kind = "Docker media types" if docker else "OCI"
            what = f"{len(platforms)}-platform index" if platforms else "single platform"
            console.print(f"imported {name} ({what}, {kind}, layers {layers})")
        console.print("")
        console.print(f"$ spegeld images --containerd-sock {node.socket}")
        _show_images(node.socket, node.content_path)
        if keep:
            console.print("")
            console.print(f"left running: containerd pid {node.pid}, state in {work}")
            console.print(f"  spegeld images --containerd-sock {node.socket}")
            console.print(f"  ctr --address {node.socket} -n k8s.io images ls")
            console.print(f"  stop it: kill {node.pid} && rm -rf {work}")
            return
    except BaseException:
        node.stop()
        shutil.rmtree(work, ignore_errors=True)
        raise
    node.stop()
    shutil.rmtree(work, ignore_errors=True)


def _show_images(socket: Path, content_path: Path) -> None:
    from spegeld.cli.images import images

    images.main(
        ["--containerd-sock", str(socket), "--containerd-content-path", str(content_path)],
        standalone_mode=False,
    )
