"""Mirror configuration: containerd hosts.toml files and the Talos machine-config patch.

Rendering and validation are pure (``_urls``, ``_render``); ``_files`` is the small
filesystem side that writes, backs up and removes hosts.toml files.

containerd (1.5+) reads ``<config_path>/<registry>/hosts.toml`` on every pull, falling
back to ``<config_path>/_default/hosts.toml`` for a registry without a directory (the
directory is the registry host, ``host:port`` when a port is given). Each
``[host."<mirror>"]`` entry is tried before ``server``, and containerd appends
``?ns=<registry>`` to every request it sends to such a mirror (remotes/docker/resolver.go),
which is how spegeld learns which registry a request is for.

``dial_timeout = "200ms"`` makes a pull fall back quickly when the local spegeld is down.
containerd 2.1+ (and 2.0.7+) honours it; 1.6 and 1.7 do not know the key and ignore it,
since their TOML decoding is not strict (checked in v1.6.20 and v1.7.34,
remotes/docker/config/hosts.go), so there the default dial timeout (30 s) applies.

On Talos, ``/etc/cri/conf.d/hosts`` is generated from the machine config and read-only,
so spegeld prints a patch instead: ``machine.registries.mirrors`` (``"*"`` for every
registry) plus the CRI part that sets ``discard_unpacked_layers = false``.

An IPv6 mirror (``http://[::1]:5000``) is written as TOML has it, which containerd 2.x
reads; 1.6 and 1.7 cannot (``OLD_CONTAINERD_IPV6`` says why, in the file and from
``spegeld configure``): with them the mirror stays on ``127.0.0.1``.
"""

from spegeld.mirrorconfig._files import (
    BACKUP_NAME,
    Change,
    FileChange,
    HostsDirError,
    HostsReport,
    apply_hosts_files,
    remove_hosts_files,
)
from spegeld.mirrorconfig._render import (
    DEFAULT_DIRECTORY,
    DIAL_TIMEOUT,
    HOSTS_TOML,
    MARKER,
    OLD_CONTAINERD_IPV6,
    TALOS_CRI_PART,
    HostsFile,
    is_spegeld_file,
    old_containerd_cannot_read,
    render_hosts_files,
    render_hosts_toml,
    render_talos_patch,
)
from spegeld.mirrorconfig._urls import (
    MirroredRegistry,
    parse_mirror_target,
    parse_registries,
    parse_registry,
)

__all__ = [
    "BACKUP_NAME",
    "DEFAULT_DIRECTORY",
    "DIAL_TIMEOUT",
    "HOSTS_TOML",
    "MARKER",
    "OLD_CONTAINERD_IPV6",
    "TALOS_CRI_PART",
    "Change",
    "FileChange",
    "HostsDirError",
    "HostsFile",
    "HostsReport",
    "MirroredRegistry",
    "apply_hosts_files",
    "is_spegeld_file",
    "old_containerd_cannot_read",
    "parse_mirror_target",
    "parse_registries",
    "parse_registry",
    "remove_hosts_files",
    "render_hosts_files",
    "render_hosts_toml",
    "render_talos_patch",
]
