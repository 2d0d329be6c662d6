"""Rendering of containerd hosts.toml files and of the Talos machine-config patch (pure)."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spegeld.errors import ConfigError
from spegeld.mirrorconfig._urls import MirroredRegistry, parse_mirror_target

__all__ = [
    "DEFAULT_DIRECTORY",
    "DIAL_TIMEOUT",
    "HOSTS_TOML",
    "MARKER",
    "OLD_CONTAINERD_IPV6",
    "TALOS_CRI_PART",
    "HostsFile",
    "is_spegeld_file",
    "keep_existing_hosts",
    "render_hosts_files",
    "render_hosts_toml",
    "old_containerd_cannot_read",
    "render_talos_patch",
]

MARKER = "# Written by spegeld"
HOSTS_TOML = "hosts.toml"
# containerd's directory for every registry that has no directory of its own.
DEFAULT_DIRECTORY = "_default"
# Short, so a node whose spegeld is down falls back to the registry at once. Only
# containerd 2.1+ (and 2.0.7+) reads it; 1.6 and 1.7 skip unknown keys.
DIAL_TIMEOUT = "200ms"
# Talos merges this legacy customization part into its CRI config (Talos 1.8+ runs
# containerd 2, whose CRI image settings live in the io.containerd.cri.v1.images plugin).
TALOS_CRI_PART = "/etc/cri/conf.d/20-customization.part"
TALOS_CRI_CONTENT = '[plugins."io.containerd.cri.v1.images"]\n  discard_unpacked_layers = false\n'


@dataclass(frozen=True, slots=True)
class HostsFile:
    """One ``<directory>/hosts.toml`` under containerd's hosts directory."""

    directory: str
    content: str

    @property
    def relative_path(self) -> str:
        return f"{self.directory}/{HOSTS_TOML}"


def is_spegeld_file(data: bytes) -> bool:
    """Whether a hosts.toml is one spegeld wrote: it starts with the marker comment."""
    return data.startswith(MARKER.encode())


def _quoted(text: str) -> str:
    """A TOML basic string, which is also a YAML double-quoted scalar (JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _check_no_loop(mirror_target: str, registries: Sequence[MirroredRegistry]) -> None:
    target_host = mirror_target.split("://", 1)[1]
    for registry in registries:
        if registry.host == target_host:
            raise ConfigError(
                f"mirror target {mirror_target} is also a mirrored registry "
                f"({registry.url}): containerd would ask the mirror for itself"
            )


def render_hosts_toml(
    mirror_target: str, registry: MirroredRegistry | None, *, resolve_tags: bool = True
) -> str:
    """hosts.toml for one registry, or for ``_default`` (every registry) when None."""
    target = parse_mirror_target(mirror_target)
    if registry is not None:
        _check_no_loop(target, [registry])
        scope = f"for {registry.host}"
    else:
        scope = "for every registry without a directory of its own"
    capabilities = '["pull", "resolve"]' if resolve_tags else '["pull"]'
    lines = [
        f"{MARKER} {scope}:",
        "# containerd tries this node's spegeld mirror first, then the registry.",
        "# Undo with `spegeld configure containerd --remove` (restores a hosts.toml it replaced).",
        "# dial_timeout is honoured by containerd 2.1+ (and 2.0.7+); 1.6 and 1.7 ignore it.",
    ]
    if not resolve_tags:
        lines.append('# capabilities = ["pull"]: tags resolve at the registry; digests come here.')
    if old_containerd_cannot_read(target):
        lines += [f"# {line}" for line in OLD_CONTAINERD_IPV6.splitlines()]
    if registry is not None:
        lines.append(f"server = {_quoted(registry.server)}")
    lines += [
        "",
        f"[host.{_quoted(target)}]",
        f"  capabilities = {capabilities}",
        f"  dial_timeout = {_quoted(DIAL_TIMEOUT)}",
    ]
    return "\n".join(lines) + "\n"


# containerd 1.6 and 1.7 read hosts.toml with go-toml v1, whose table-header lexer ends
# the key at the first "]" even inside quotes (and does not unescape \u005d there):
# "[host."http://[::1]:5000"]" fails with "table key cannot contain ']'" and the whole
# file is ignored. An inline table under [host] would suit them, but 2.x only takes hosts
# from table headers. So the file is standard TOML (2.x reads it) and says so.
OLD_CONTAINERD_IPV6 = (
    "containerd 1.6 and 1.7 cannot read an IPv6 literal in a [host] key (go-toml v1):\n"
    "they ignore this file and pull from the registry. With them, give the mirror as\n"
    "http://127.0.0.1:PORT (IPv6-only nodes have IPv4 loopback too) and run spegeld\n"
    "with --registry-addr 127.0.0.1:PORT."
)


def old_containerd_cannot_read(mirror_target: str) -> bool:
    """Whether containerd 1.6 and 1.7 would ignore a hosts.toml naming this mirror."""
    return "[" in mirror_target


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quoted(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{_quoted(k)} = {_toml_value(v, where)}" for k, v in value.items())
        return "{ " + ", ".join(items) + " }" if value else "{}"
    raise ConfigError(f"{where}: cannot carry over a {type(value).__name__} value")


def keep_existing_hosts(ours: str, existing: bytes, where: str) -> str:
    """``ours`` with the mirrors of an existing hosts.toml appended, tried after ours.

    Like Spegel's prepend-existing: the node's own mirrors stay in place, in their order,
    after this node's spegeld. Our ``server`` line stays (the registry itself is always
    the last resort); a host equal to our mirror target is dropped (it is already first).
    """
    try:
        document = tomllib.loads(existing.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"{where} is not valid TOML, so its mirrors cannot be kept: {exc}"
        ) from None
    hosts = document.get("host", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{where}: [host] is not a table")
    ours_hosts = tomllib.loads(ours).get("host", {})
    lines = [
        ours.rstrip("\n"),
        "",
        f"# Kept from the node's earlier {HOSTS_TOML}, tried after spegeld:",
    ]
    kept = 0
    for url, table in hosts.items():
        if url in ours_hosts:
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: host {url!r} is not a table")
        lines += ["", f"[host.{_quoted(url)}]"]
        lines += [f"  {_quoted(k)} = {_toml_value(v, where)}" for k, v in table.items()]
        kept += 1
    return "\n".join(lines) + "\n" if kept else ours


def render_hosts_files(
    mirror_target: str, registries: Sequence[MirroredRegistry], *, resolve_tags: bool = True
) -> tuple[HostsFile, ...]:
    """One hosts.toml per registry, or a single ``_default`` one when none is given."""
    target = parse_mirror_target(mirror_target)
    _check_no_loop(target, registries)
    if not registries:
        content = render_hosts_toml(target, None, resolve_tags=resolve_tags)
        return (HostsFile(DEFAULT_DIRECTORY, content),)
    return tuple(
        HostsFile(r.directory, render_hosts_toml(target, r, resolve_tags=resolve_tags))
        for r in registries
    )


def render_talos_patch(
    mirror_target: str, registries: Sequence[MirroredRegistry], *, resolve_tags: bool = True
) -> str:
    """A Talos strategic-merge patch: registry mirrors plus the CRI part that keeps layers.

    No registries means Talos's ``"*"`` mirror (Talos 1.4+), which covers every registry
    without an entry of its own.
    """
    target = parse_mirror_target(mirror_target)
    _check_no_loop(target, registries)
    names = [r.host for r in registries] or ["*"]
    lines = [
        f"{MARKER}: a Talos machine-config patch that points containerd at this node's",
        "# spegeld mirror. Apply with: talosctl patch machineconfig --nodes NODE --patch @FILE",
        "# (Talos generates /etc/cri/conf.d/hosts itself and keeps it read-only.)",
        "#",
        "# machine.registries.mirrors: containerd tries the mirror first, then the registry.",
    ]
    if not registries:
        lines.append('# The "*" entry (Talos 1.4+) covers every registry without its own entry.')
    if not resolve_tags:
        lines += [
            "# Talos gives every mirror endpoint both pull and resolve; it has no pull-only",
            "# setting, so run the daemon with --no-resolve-tags to keep tags at the registry.",
        ]
    lines += [
        "# machine.files: containerd keeps layer blobs after unpacking, so spegeld can serve",
        "# them (Talos 1.8+ sets discard_unpacked_layers = true for containerd 2, whose",
        "# plugin name this is; Talos 1.7 and older put the key in a table containerd 1.7",
        "# does not read, so they keep layers anyway). Talos writes machine.files at boot,",
        "# so this part may need a reboot. If the config already has a",
        f"# {TALOS_CRI_PART} entry, add these two lines to its content:",
        "# Talos takes one entry for that path.",
        "#",
        "# Talos 1.12+ deprecates machine.registries for RegistryMirrorConfig documents; the",
        "# same mirrors as those, to use instead of machine.registries:",
    ]
    for name in names:
        lines += [
            "#   ---",
            "#   apiVersion: v1alpha1",
            "#   kind: RegistryMirrorConfig",
            f"#   name: {_quoted(name)}",
            "#   endpoints:",
            f"#     - url: {_quoted(target)}",
        ]
    lines += [
        "machine:",
        "  registries:",
        "    mirrors:",
    ]
    for name in names:
        lines += [
            f"      {_quoted(name)}:",
            "        endpoints:",
            f"          - {_quoted(target)}",
        ]
    lines += [
        "  files:",
        "    - op: create",
        f"      path: {TALOS_CRI_PART}",
        "      content: |",
        *(f"        {line}" for line in TALOS_CRI_CONTENT.splitlines()),
    ]
    return "\n".join(lines) + "\n"
