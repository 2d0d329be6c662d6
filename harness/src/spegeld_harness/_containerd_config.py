"""The config file of a private containerd: 1.x (``version = 2``) or 2.x (``version = 3``).

Every path containerd would otherwise take on the host points into the node's own directory:
root, state, sockets, the ``opt`` plugin, and with CRI on, CNI's bin and conf dirs, CDI's
spec dirs, the image verifiers' bin dir.  ``imports = []`` keeps the host's drop-ins
(2.x reads ``/etc/containerd/conf.d/*.toml`` by default) out.  NRI is disabled: it would
create ``/var/run/nri/nri.sock`` on the host.

With CRI off, every CRI plugin is disabled (1.x: one plugin; 2.x: the images and runtime
plugins, the gRPC service and the pod sandbox controller).  With CRI on, the image service
keeps layer blobs (``discard_unpacked_layers = false``, as spegeld needs) and reads mirror
configuration from ``hosts_dir`` (``config_path``), exactly the node's real path; no CNI
config exists, so pod networking is never ready and nothing needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["ContainerdLayout", "containerd_config"]

# Not compiled into either binary (Debian's 1.6 lacks them at runtime; the 2.3 build uses
# no_btrfs,no_devmapper,no_zfs,no_aufs): disabled so their absence is not logged as an error.
STORAGE_PLUGINS: Final = (
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
)
CRI_PLUGINS_V1: Final = ("io.containerd.grpc.v1.cri",)
CRI_PLUGINS_V2: Final = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.images",
    "io.containerd.cri.v1.runtime",
    "io.containerd.podsandbox.controller.v1.podsandbox",
)
NRI_PLUGIN: Final = "io.containerd.nri.v1.nri"
# The pause image CRI pins; never pulled here (no pod is ever run), named so that the
# value is not the host default.
SANDBOX_IMAGE: Final = "registry.k8s.io/pause:3.10"
# The snapshotter crictl pull unpacks into: overlayfs, as on real nodes.
SNAPSHOTTER: Final = "overlayfs"


def _toml_str(value: str | Path) -> str:
    s = str(value)
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_list(values: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(_toml_str(v) for v in values) + "]"


@dataclass(frozen=True, slots=True)
class ContainerdLayout:
    """Where one private containerd keeps everything."""

    base_dir: Path
    root: Path
    state: Path
    socket: Path
    debug_socket: Path
    hosts_dir: Path
    log_level: str

    @property
    def cri_dir(self) -> Path:
        """CNI, CDI and verifier dirs that CRI would otherwise create or read on the host."""
        return self.base_dir / "cri"


def containerd_config(layout: ContainerdLayout, *, major: int, cri: bool, extra: str = "") -> str:
    """The TOML config for a containerd of this ``major`` version."""
    if major >= 2:
        disabled = [*STORAGE_PLUGINS, NRI_PLUGIN, *(() if cri else CRI_PLUGINS_V2)]
        version = 3
    else:
        disabled = [*STORAGE_PLUGINS, NRI_PLUGIN, *(() if cri else CRI_PLUGINS_V1)]
        version = 2
    head = f"""version = {version}
root = {_toml_str(layout.root)}
state = {_toml_str(layout.state)}
imports = []
disabled_plugins = {_toml_list(disabled)}

[grpc]
  address = {_toml_str(layout.socket)}

[ttrpc]
  address = {_toml_str(str(layout.socket) + ".ttrpc")}

[debug]
  address = {_toml_str(layout.debug_socket)}
  level = {_toml_str(layout.log_level)}

[plugins."io.containerd.internal.v1.opt"]
  path = {_toml_str(layout.base_dir / "opt")}
"""
    if cri:
        head += _cri_v2(layout) if major >= 2 else _cri_v1(layout)
    return head + extra + "\n"


def _cri_v1(layout: ContainerdLayout) -> str:
    """containerd 1.x: one plugin, ``io.containerd.grpc.v1.cri``."""
    cri = layout.cri_dir
    p = '"io.containerd.grpc.v1.cri"'
    return f"""
[plugins.{p}]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  sandbox_image = {_toml_str(SANDBOX_IMAGE)}
  enable_cdi = false
  cdi_spec_dirs = {_toml_list([str(cri / "cdi")])}

[plugins.{p}.containerd]
  snapshotter = {_toml_str(SNAPSHOTTER)}
  discard_unpacked_layers = false

[plugins.{p}.cni]
  bin_dir = {_toml_str(cri / "cni-bin")}
  conf_dir = {_toml_str(cri / "cni-conf")}

[plugins.{p}.registry]
  config_path = {_toml_str(layout.hosts_dir)}
"""


def _cri_v2(layout: ContainerdLayout) -> str:
    """containerd 2.x: ``cri.v1.images`` and ``cri.v1.runtime`` plus the gRPC service."""
    cri = layout.cri_dir
    images = '"io.containerd.cri.v1.images"'
    runtime = '"io.containerd.cri.v1.runtime"'
    return f"""
[plugins.{images}]
  snapshotter = {_toml_str(SNAPSHOTTER)}
  discard_unpacked_layers = false

[plugins.{images}.pinned_images]
  sandbox = {_toml_str(SANDBOX_IMAGE)}

[plugins.{images}.registry]
  config_path = {_toml_str(layout.hosts_dir)}

[plugins.{runtime}]
  cdi_spec_dirs = {_toml_list([str(cri / "cdi")])}

[plugins.{runtime}.cni]
  bin_dirs = {_toml_list([str(cri / "cni-bin")])}
  conf_dir = {_toml_str(cri / "cni-conf")}

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.image-verifier.v1.bindir"]
  bin_dir = {_toml_str(cri / "image-verifier")}
"""
