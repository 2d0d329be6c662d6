"""``spegeld configure containerd|talos``: validation, rendering, the hosts directory, the CLI.

The last test hands a generated hosts directory to real containerd (``ctr images pull
--hosts-dir``) and reads from ctr's error which host it asked first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from spegeld_harness import CtrError, PrivateContainerd

from spegeld.cli import cli
from spegeld.errors import ConfigError
from spegeld.mirrorconfig import (
    BACKUP_NAME,
    MARKER,
    Change,
    HostsDirError,
    MirroredRegistry,
    apply_hosts_files,
    is_spegeld_file,
    parse_mirror_target,
    parse_registries,
    parse_registry,
    remove_hosts_files,
    render_hosts_files,
    render_hosts_toml,
    render_talos_patch,
)

TARGET = "http://127.0.0.1:5000"
FOREIGN = (
    b'# the operator\'s own\nserver = "https://docker.io"\n\n[host."https://corp-mirror:443"]\n'
)

BAD_URLS = [
    ("ftp://x", "scheme must be http or https"),
    ("http://", "no host"),
    ("http://a b", "not a hostname"),
    ("http://h/path", "path, query or fragment"),
    ("http://h:5000/v2/", "path, query or fragment"),
    ("http://h:5000?x=1", "path, query or fragment"),
    ("http://user@h", "user information"),
    ("http://user:pw@h:5000", "user information"),
    ("docker.io", "expected a URL"),
    ("http://h:99999", "out of range"),
    ("http://h:", "port must be a number"),
    ("http://h:x", "port must be a number"),
    ("http://1.2.3.256:5000", "not an IPv4 address"),
    ("http://[::1:5000", "closing ]"),
    ("http://[fe80::1%eth0]:5000", "not an IPv6 address"),
    ("http://[zz::1]:5000", "not an IPv6 address"),
    ("http://-h-:5000", "not a hostname"),
    ("http://a..b:5000", "not a hostname"),
    ("http://h_h:5000", "not a hostname"),
]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SPEGELD_* variable from the outer shell may steer these tests."""
    for name in list(os.environ):
        if name.startswith("SPEGELD_"):
            monkeypatch.delenv(name)


def invoke(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner(catch_exceptions=False).invoke(cli, [str(a) for a in args], env=env)


def one_line_error(result: Result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spegeld: error: ")
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (bytes) and directory (None) under root, by relative path."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://127.0.0.1:5000/", "http://127.0.0.1:5000"),
        (" HTTP://Node-1.Example.COM:5000 ", "http://node-1.example.com:5000"),
        ("https://[::1]:5443", "https://[::1]:5443"),
        ("http://[FD00::A]:5000", "http://[fd00::a]:5000"),
        ("http://localhost:05000", "http://localhost:5000"),
    ],
)
def test_mirror_target_is_normalized(text: str, expected: str) -> None:
    assert parse_mirror_target(text) == expected


@pytest.mark.parametrize(("text", "why"), [*BAD_URLS, ("http://h", "give the port")])
def test_bad_mirror_target_names_the_value(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_mirror_target(text)
    message = str(caught.value)
    assert message.startswith(f"mirror target {text!r} is not usable: ")
    assert why in message
    assert "\n" not in message


# A bare host is a registry (https, containerd's default), not a mirror target.
BAD_REGISTRIES = [
    *(bad for bad in BAD_URLS if bad[0] != "docker.io"),
    ("a b", "not a hostname"),
    ("h/path", "path, query or fragment"),
    ("h:x", "port must be a number"),
]


@pytest.mark.parametrize(("text", "why"), BAD_REGISTRIES)
def test_bad_registry_names_the_value(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"mirrored registry {text!r}")) as caught:
        parse_registries(f"https://docker.io,{text}")
    assert why in str(caught.value)


def test_bare_hosts_and_urls_parse_alike_for_run_and_configure() -> None:
    from spegeld.cli.run import registry_host

    assert parse_registry("docker.io") == parse_registry("https://docker.io")
    assert parse_registry(" 10.1.2.3:5000 ").url == "https://10.1.2.3:5000"
    assert parse_registry("http://10.1.2.3:5000").url == "http://10.1.2.3:5000"
    for text in ("docker.io", "https://docker.io/", "Docker.IO"):
        assert registry_host(text) == "docker.io"  # `spegeld run`'s reading: the same parser
    with pytest.raises(ConfigError, match="mirrored registry 'a b'"):
        registry_host("a b")


@pytest.mark.parametrize(
    ("text", "directory", "server"),
    [
        ("https://docker.io", "docker.io", "https://registry-1.docker.io"),
        ("https://ghcr.io", "ghcr.io", "https://ghcr.io"),
        ("https://Registry.K8s.io/", "registry.k8s.io", "https://registry.k8s.io"),
        ("http://127.0.0.1:5000", "127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("https://docker.io:443", "docker.io:443", "https://docker.io:443"),
        ("https://[2001:db8::1]:5000", "[2001:db8::1]:5000", "https://[2001:db8::1]:5000"),
    ],
)
def test_registry_directory_and_upstream(text: str, directory: str, server: str) -> None:
    registry = parse_registry(text)
    assert registry.directory == directory
    assert registry.server == server


def test_registry_list_keeps_order_and_drops_repeats_and_blanks() -> None:
    assert parse_registries("") == ()
    assert parse_registries(" , ") == ()
    got = parse_registries(" https://ghcr.io , https://docker.io,,https://ghcr.io/ ,")
    assert got == (MirroredRegistry("https", "ghcr.io"), MirroredRegistry("https", "docker.io"))


def test_one_host_with_two_schemes_is_refused() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("http://ghcr.io and https://ghcr.io name one host")
    ):
        parse_registries("http://ghcr.io,https://ghcr.io")


# --- rendering ----------------------------------------------------------------------------


def test_default_hosts_toml_mirrors_every_registry() -> None:
    (only,) = render_hosts_files(TARGET, ())
    assert only.relative_path == "_default/hosts.toml"
    assert only.content.startswith(MARKER)
    assert "spegeld configure containerd --remove" in only.content
    assert "dial_timeout is honoured by containerd 2.1+" in only.content
    assert "1.6 and 1.7 ignore it" in only.content
    assert tomllib.loads(only.content) == {
        "host": {TARGET: {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}}
    }
    assert "server" not in only.content


def test_hosts_toml_per_registry() -> None:
    registries = parse_registries("https://docker.io,http://10.1.2.3:5000,https://ghcr.io")
    files = render_hosts_files("https://[fd00::7]:5443", registries)
    assert [f.relative_path for f in files] == [
        "docker.io/hosts.toml",
        "10.1.2.3:5000/hosts.toml",
        "ghcr.io/hosts.toml",
    ]
    servers = [tomllib.loads(f.content)["server"] for f in files]
    assert servers == ["https://registry-1.docker.io", "http://10.1.2.3:5000", "https://ghcr.io"]
    for f in files:
        assert is_spegeld_file(f.content.encode())
        assert tomllib.loads(f.content)["host"] == {
            "https://[fd00::7]:5443": {"capabilities": ["pull", "resolve"], "dial_timeout": "200ms"}
        }


def test_no_resolve_tags_grants_pull_only() -> None:
    content = render_hosts_toml(TARGET, parse_registry("https://docker.io"), resolve_tags=False)
    assert tomllib.loads(content)["host"][TARGET]["capabilities"] == ["pull"]
    (default,) = render_hosts_files(TARGET, (), resolve_tags=False)
    assert tomllib.loads(default.content)["host"][TARGET]["capabilities"] == ["pull"]


def test_the_mirror_cannot_mirror_itself() -> None:
    with pytest.raises(ConfigError, match="is also a mirrored registry"):
        render_hosts_files(TARGET, parse_registries("https://docker.io,http://127.0.0.1:5000"))
    with pytest.raises(ConfigError, match="is also a mirrored registry"):
        render_talos_patch(TARGET, parse_registries("http://127.0.0.1:5000"))


def test_marker_detection() -> None:
    assert is_spegeld_file(MARKER.encode() + b" for x:\n")
    assert not is_spegeld_file(FOREIGN)
    assert not is_spegeld_file(b"\n" + MARKER.encode())


# --- the Talos patch: a strict reader for the YAML subset it uses -------------------------


def _scalar(text: str) -> Any:
    if text.startswith('"'):
        return json.loads(text)  # a YAML double-quoted scalar with JSON's escapes
    assert text and not text.startswith(("'", "[", "{", "&", "*", "!", "|", ">")), text
    assert ": " not in text and " #" not in text, text
    return text


class _Lines:
    def __init__(self, text: str) -> None:
        assert "\t" not in text
        self.raw = [line for line in text.splitlines() if line.strip() and line.lstrip()[:1] != "#"]
        self.items = [(len(line) - len(line.lstrip(" ")), line.strip()) for line in self.raw]
        self.pos = 0

    def peek(self) -> tuple[int, str] | None:
        return self.items[self.pos] if self.pos < len(self.items) else None


def _block(lines: _Lines, indent: int) -> Any:
    first = lines.peek()
    assert first is not None and first[0] == indent, (first, indent)
    if first[1].startswith("- "):
        items: list[Any] = []
        while (nxt := lines.peek()) is not None and nxt[0] == indent:
            assert nxt[1].startswith("- "), nxt
            # "- rest": rest is a scalar, or the first key of a mapping indented by 2
            lines.items[lines.pos] = (indent + 2, nxt[1][2:])
            raw = lines.raw[lines.pos]
            lines.raw[lines.pos] = raw[:indent] + "  " + raw[indent + 2 :]
            if ": " in nxt[1][2:] or nxt[1].endswith(":"):
                items.append(_mapping(lines, indent + 2))
            else:
                lines.pos += 1
                items.append(_scalar(nxt[1][2:]))
        return items
    return _mapping(lines, indent)


def _mapping(lines: _Lines, indent: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    while (nxt := lines.peek()) is not None and nxt[0] == indent:
        match = re.fullmatch(r'("(?:[^"\\]|\\.)*"|[A-Za-z][\w.-]*):(?: (.*))?', nxt[1])
        assert match is not None, nxt
        key = _scalar(match[1])
        assert key not in result, key
        lines.pos += 1
        value = match[2]
        if value == "|":
            body: list[str] = []
            while (more := lines.peek()) is not None and more[0] > indent:
                body.append(lines.raw[lines.pos][indent + 2 :])
                lines.pos += 1
            result[key] = "\n".join(body) + "\n"
        elif value is None:
            child = lines.peek()
            assert child is not None and child[0] > indent, (key, child)
            result[key] = _block(lines, child[0])
        else:
            result[key] = _scalar(value)
    rest = lines.peek()
    assert rest is None or rest[0] < indent, rest
    return result


def read_yaml_subset(text: str) -> Any:
    lines = _Lines(text)
    document = _block(lines, 0)
    assert lines.peek() is None, lines.peek()
    return document


def expected_patch(names: list[str], target: str = TARGET) -> dict[str, Any]:
    return {
        "machine": {
            "registries": {"mirrors": {n: {"endpoints": [target]} for n in names}},
            "files": [
                {
                    "op": "create",
                    "path": "/etc/cri/conf.d/20-customization.part",
                    "content": '[plugins."io.containerd.cri.v1.images"]\n'
                    "  discard_unpacked_layers = false\n",
                }
            ],
        }
    }


@pytest.mark.parametrize(
    ("registries", "names"),
    [
        ("", ["*"]),
        ("https://docker.io,http://10.0.0.1:5000,https://[fd00::1]:443", ["docker.io", "10.0.0.1:5000", "[fd00::1]:443"]),
    ],
    ids=["every registry", "listed"],
)  # fmt: skip
def test_talos_patch_structure(registries: str, names: list[str]) -> None:
    patch = render_talos_patch(TARGET, parse_registries(registries))
    assert patch.startswith(MARKER)
    assert read_yaml_subset(patch) == expected_patch(names)
    assert "RegistryMirrorConfig" in patch  # the Talos 1.12+ form, as a comment
    if importlib.util.find_spec("yaml") is not None:  # PyYAML, when the venv has it
        import yaml

        assert yaml.safe_load(patch) == expected_patch(names)


def test_yaml_subset_reader_is_strict() -> None:
    for broken in ["a:\n b: 1\n  c: 2\n", "a: 1\na: 2\n", "a:\n- x\n  - y\n", "a: b: c\n"]:
        with pytest.raises(AssertionError):
            read_yaml_subset(broken)
    assert read_yaml_subset('a:\n  - "x"\n  - k: v\n    l: |\n      t\n') == {
        "a": ["x", {"k": "v", "l": "t\n"}]
    }


def test_talos_patch_says_tags_resolve_anyway_without_resolve_tags() -> None:
    patch = render_talos_patch(TARGET, (), resolve_tags=False)
    assert "--no-resolve-tags" in patch
    assert read_yaml_subset(patch) == expected_patch(["*"])


# --- the hosts directory ------------------------------------------------------------------


def files_for(registries: str = "", target: str = TARGET, resolve_tags: bool = True) -> Any:
    return render_hosts_files(target, parse_registries(registries), resolve_tags=resolve_tags)


def test_apply_creates_then_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "certs.d"
    first = apply_hosts_files(root, files_for("https://docker.io,http://127.0.0.1:9"))
    assert [(c.path.relative_to(root), c.change) for c in first.changes] == [
        (Path("docker.io/hosts.toml"), Change.CREATED),
        (Path("127.0.0.1:9/hosts.toml"), Change.CREATED),
    ]
    before = snapshot(root)
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("hosts.toml")}
    second = apply_hosts_files(root, files_for("https://docker.io,http://127.0.0.1:9"))
    assert {c.change for c in second.changes} == {Change.UNCHANGED}
    assert snapshot(root) == before
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("hosts.toml")} == stats
    assert (root / "docker.io/hosts.toml").stat().st_mode & 0o777 == 0o644


def test_spegeld_file_is_updated_without_backup(tmp_path: Path) -> None:
    apply_hosts_files(tmp_path, files_for())
    report = apply_hosts_files(tmp_path, files_for(target="http://127.0.0.1:6000"))
    assert [c.change for c in report.changes] == [Change.UPDATED]
    assert not (tmp_path / "_default" / BACKUP_NAME).exists()
    assert "http://127.0.0.1:6000" in (tmp_path / "_default/hosts.toml").read_text()


def test_foreign_file_is_backed_up_and_restored_by_remove(tmp_path: Path) -> None:
    hosts = tmp_path / "docker.io" / "hosts.toml"
    hosts.parent.mkdir()
    hosts.write_bytes(FOREIGN)
    hosts.chmod(0o600)
    (hosts.parent / "ca.crt").write_bytes(b"certificate")
    before = snapshot(tmp_path)

    report = apply_hosts_files(tmp_path, files_for("https://docker.io"))
    assert [(c.path.name, c.change) for c in report.changes] == [
        (BACKUP_NAME, Change.BACKED_UP),
        ("hosts.toml", Change.UPDATED),
    ]
    assert (hosts.parent / BACKUP_NAME).read_bytes() == FOREIGN
    assert (hosts.parent / BACKUP_NAME).stat().st_mode & 0o777 == 0o600
    assert is_spegeld_file(hosts.read_bytes())
    # Running again leaves the backup alone: the current file is spegeld's own.
    again = apply_hosts_files(tmp_path, files_for("https://docker.io"))
    assert [c.change for c in again.changes] == [Change.UNCHANGED]

    removed = remove_hosts_files(tmp_path)
    assert [(c.path, c.change) for c in removed.changes] == [(hosts, Change.RESTORED)]
    assert snapshot(tmp_path) == before
    assert hosts.stat().st_mode & 0o777 == 0o600


def test_existing_backup_is_never_overwritten(tmp_path: Path) -> None:
    directory = tmp_path / "docker.io"
    directory.mkdir()
    (directory / "hosts.toml").write_bytes(FOREIGN)
    (directory / BACKUP_NAME).write_bytes(b"an older backup")
    before = snapshot(tmp_path)
    with pytest.raises(HostsDirError, match="already exists; move one of them away"):
        apply_hosts_files(tmp_path, files_for("https://ghcr.io,https://docker.io"))
    assert snapshot(tmp_path) == before  # refused before the first write


def test_switching_to_default_takes_out_stale_files(tmp_path: Path) -> None:
    apply_hosts_files(tmp_path, files_for("https://docker.io,https://ghcr.io"))
    foreign = tmp_path / "quay.io" / "hosts.toml"
    foreign.parent.mkdir()
    foreign.write_bytes(FOREIGN)
    report = apply_hosts_files(tmp_path, files_for())
    assert [(str(c.path.relative_to(tmp_path)), c.change) for c in report.changes] == [
        ("_default/hosts.toml", Change.CREATED),
        ("docker.io/hosts.toml", Change.REMOVED),
        ("docker.io", Change.REMOVED),
        ("ghcr.io/hosts.toml", Change.REMOVED),
        ("ghcr.io", Change.REMOVED),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_default", "quay.io"]
    assert foreign.read_bytes() == FOREIGN
    (warning,) = report.warnings
    assert str(foreign) in warning
    assert "takes precedence over _default" in warning


def test_remove_keeps_directories_with_other_files(tmp_path: Path) -> None:
    apply_hosts_files(tmp_path, files_for("https://docker.io"))
    (tmp_path / "docker.io" / "ca.crt").write_bytes(b"certificate")
    report = remove_hosts_files(tmp_path)
    assert [c.change for c in report.changes] == [Change.REMOVED]
    assert [p.name for p in (tmp_path / "docker.io").iterdir()] == ["ca.crt"]


def test_remove_when_nothing_was_written(tmp_path: Path) -> None:
    assert remove_hosts_files(tmp_path / "absent") == remove_hosts_files(tmp_path)
    assert remove_hosts_files(tmp_path).changes == ()
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "hosts.toml").write_bytes(FOREIGN)
    before = snapshot(tmp_path)
    assert remove_hosts_files(tmp_path).changes == ()
    assert snapshot(tmp_path) == before


def test_config_path_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(HostsDirError, match="is not a directory"):
        apply_hosts_files(path, files_for())


# --- the CLI ------------------------------------------------------------------------------


def configure(tmp_path: Path, *args: str | Path) -> Result:
    return invoke("configure", "containerd", "--config-path", tmp_path, *args)


def test_cli_writes_reports_and_is_idempotent(tmp_path: Path) -> None:
    args = ("--mirror-target", TARGET, "--mirrored-registries", "https://docker.io,https://ghcr.io")
    first = configure(tmp_path, *args)
    assert first.exit_code == 0, first.stderr
    assert first.stdout.splitlines() == [
        f"created    {tmp_path}/docker.io/hosts.toml",
        f"created    {tmp_path}/ghcr.io/hosts.toml",
    ]
    before = snapshot(tmp_path)
    second = configure(tmp_path, *args)
    assert second.stdout.splitlines() == [
        f"unchanged  {tmp_path}/docker.io/hosts.toml",
        f"unchanged  {tmp_path}/ghcr.io/hosts.toml",
    ]
    assert snapshot(tmp_path) == before
    removed = configure(tmp_path, "--remove")
    assert removed.exit_code == 0
    assert f"removed    {tmp_path}/docker.io/hosts.toml" in removed.stdout.splitlines()
    assert list(tmp_path.iterdir()) == []


def test_cli_backup_and_restore_are_byte_identical(tmp_path: Path) -> None:
    hosts = tmp_path / "docker.io" / "hosts.toml"
    hosts.parent.mkdir()
    hosts.write_bytes(FOREIGN)
    result = configure(tmp_path, "--mirror-target", TARGET, "--mirrored-registries", "docker.io/x")
    one_line_error(result)
    result = configure(
        tmp_path, "--mirror-target", TARGET, "--mirrored-registries", "https://docker.io"
    )
    assert result.stdout.splitlines() == [
        f"backed-up  {hosts.parent}/{BACKUP_NAME}  (not written by spegeld)",
        f"updated    {hosts}",
    ]
    result = configure(tmp_path, "--remove")
    assert result.stdout.splitlines() == [f"restored   {hosts}  (from {BACKUP_NAME})"]
    assert hosts.read_bytes() == FOREIGN
    assert sorted(p.name for p in hosts.parent.iterdir()) == ["hosts.toml"]


def test_cli_remove_when_nothing_was_written(tmp_path: Path) -> None:
    result = configure(tmp_path, "--remove")
    assert result.exit_code == 0
    assert (
        result.stdout
        == f"nothing to remove: no hosts.toml under {tmp_path} was written by spegeld\n"
    )
    assert result.stderr == ""


def test_cli_conflicting_backup_is_one_line_exit_1(tmp_path: Path) -> None:
    (tmp_path / "_default").mkdir()
    (tmp_path / "_default" / "hosts.toml").write_bytes(FOREIGN)
    (tmp_path / "_default" / BACKUP_NAME).write_bytes(FOREIGN)
    result = configure(tmp_path, "--mirror-target", TARGET)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert len(result.stderr.splitlines()) == 1
    assert "already exists" in result.stderr


def test_cli_takes_environment_twins(tmp_path: Path) -> None:
    env = {
        "SPEGELD_CONFIG_PATH": str(tmp_path),
        "SPEGELD_MIRROR_TARGET": TARGET,
        "SPEGELD_MIRRORED_REGISTRIES": "https://quay.io",
        "SPEGELD_RESOLVE_TAGS": "false",
    }
    result = invoke("configure", "containerd", env=env)
    assert result.exit_code == 0, result.stderr
    data = tomllib.loads((tmp_path / "quay.io" / "hosts.toml").read_text())
    assert data["host"][TARGET]["capabilities"] == ["pull"]
    result = invoke("configure", "containerd", env={**env, "SPEGELD_REMOVE": "1"})
    assert result.exit_code == 0
    assert list(tmp_path.iterdir()) == []


def test_cli_takes_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "spegeld.toml"
    hosts_dir = tmp_path / "hosts"
    config.write_text(f'config-path = "{hosts_dir}"\nmirror-target = "{TARGET}"\n')
    result = invoke("--config", config, "configure", "containerd")
    assert result.exit_code == 0, result.stderr
    assert (hosts_dir / "_default" / "hosts.toml").is_file()
    talos = invoke("--config", config, "configure", "talos")
    assert talos.exit_code == 0, talos.stderr


@pytest.mark.parametrize("command", ["containerd", "talos"])
def test_cli_help_names_every_environment_twin(command: str) -> None:
    result = CliRunner().invoke(
        cli, ["configure", command, "--help"], terminal_width=500, max_content_width=500
    )
    assert result.exit_code == 0
    flags = ["--mirror-target", "--mirrored-registries", "--resolve-tags"]
    if command == "containerd":
        flags += ["--config-path", "--remove"]
    for flag in flags:
        # One block per option: its help may start on the next line after a long flag.
        blocks = re.split(r"\n(?=  -)", result.stdout)
        (block,) = [b for b in blocks if b.strip().startswith(flag)]
        assert f"SPEGELD_{flag[2:].replace('-', '_').upper()}" in block, block


@pytest.mark.parametrize("command", ["containerd", "talos"])
@pytest.mark.parametrize(("bad", "_why"), BAD_URLS[:8])
def test_cli_bad_urls_exit_2_with_one_line(
    tmp_path: Path, command: str, bad: str, _why: str
) -> None:
    extra = ["--config-path", str(tmp_path)] if command == "containerd" else []
    result = invoke("configure", command, *extra, "--mirror-target", bad)
    assert repr(bad) in one_line_error(result)
    result = invoke(
        "configure", command, *extra, "--mirror-target", TARGET,
        "--mirrored-registries", f"https://docker.io,{bad}",
    )  # fmt: skip
    assert f"mirrored registry {bad!r}" in one_line_error(result)
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["containerd", "talos"])
def test_cli_without_mirror_target_points_at_the_loopback_mirror(
    tmp_path: Path, command: str
) -> None:
    """The daemon's mirror listens on 127.0.0.1:5000 by default (issue 13): so does the
    configuration written without --mirror-target."""
    extra = ["--config-path", str(tmp_path)] if command == "containerd" else []
    result = invoke("configure", command, *extra)
    assert result.exit_code == 0, result.stderr
    if command == "containerd":
        written = (tmp_path / "_default" / "hosts.toml").read_text()
    else:
        written = result.stdout
    assert "http://127.0.0.1:5000" in written


def test_cli_talos_prints_the_patch() -> None:
    result = invoke(
        "configure", "talos", "--mirror-target", TARGET, "--mirrored-registries",
        "https://docker.io,https://ghcr.io",
    )  # fmt: skip
    assert result.exit_code == 0
    assert result.stderr == ""
    assert read_yaml_subset(result.stdout) == expected_patch(["docker.io", "ghcr.io"])
    quiet = invoke("configure", "talos", "--mirror-target", TARGET, "--no-resolve-tags")
    assert read_yaml_subset(quiet.stdout) == expected_patch(["*"])
    assert "--no-resolve-tags" in quiet.stderr


# --- real containerd reads the files ------------------------------------------------------


@pytest.fixture
def refused_ports() -> Iterator[tuple[int, int]]:
    """Two loopback ports that refuse connections: bound, never listening, held till the end."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        yield sockets[0].getsockname()[1], sockets[1].getsockname()[1]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize(
    ("listed", "resolve_tags", "by_digest", "mirror_first"),
    [
        (True, True, False, True),
        (False, True, False, True),  # _default/hosts.toml
        (True, False, False, False),  # pull only: tags resolve at the registry
        (True, False, True, True),  # ...but content by digest still comes from the mirror
    ],
    ids=["registry dir", "_default", "no-resolve-tags, tag", "no-resolve-tags, digest"],
)
def test_containerd_uses_the_generated_hosts_toml(
    containerd: PrivateContainerd,
    tmp_path: Path,
    refused_ports: tuple[int, int],
    listed: bool,
    resolve_tags: bool,
    by_digest: bool,
    mirror_first: bool,
) -> None:
    # Registry and mirror both refuse connections, so ctr fails at once; its error is the
    # first host's (remotes/docker/resolver.go keeps the first error), so it names the
    # host containerd tried first. The hosts.toml gives each host's scheme (http), so
    # no --plain-http is needed.
    registry_port, mirror_port = refused_ports
    registry, mirror = f"127.0.0.1:{registry_port}", f"127.0.0.1:{mirror_port}"
    hosts_dir = tmp_path / "certs.d"
    result = configure(
        hosts_dir, "--mirror-target", f"http://{mirror}",
        "--mirrored-registries", f"http://{registry}" if listed else "",
        "--resolve-tags" if resolve_tags else "--no-resolve-tags",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ref = f"{registry}/spegeld/probe" + ("@sha256:" + "ab" * 32 if by_digest else ":v1")
    with pytest.raises(CtrError) as caught:
        containerd.ctr("images", "pull", "--hosts-dir", hosts_dir, ref, timeout=60)
    final = caught.value.stderr.strip().splitlines()[-1]
    assert final.startswith(f'ctr: failed to resolve reference "{ref}"'), caught.value.stderr
    manifest = "sha256:" + "ab" * 32 if by_digest else "v1"
    if mirror_first:
        ns = f"?ns=127.0.0.1%3A{registry_port}"
        assert f'"http://{mirror}/v2/spegeld/probe/manifests/{manifest}{ns}"' in final
        # ...and then it fell back to the registry itself:
        assert f"http://{registry}/v2/spegeld/probe/manifests/{manifest}" in caught.value.stderr
    else:
        assert f'"http://{registry}/v2/spegeld/probe/manifests/{manifest}"' in final
        assert f"http://{mirror}/" not in caught.value.stderr


# --- --keep-existing: the node's own mirrors after ours ---------------------------------

OWN_MIRRORS = b"""# the operator's own
server = "https://registry-1.docker.io"

[host."https://corp-mirror:443"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."https://corp-mirror:443".header]
    x-team = ["infra"]

[host."http://10.9.9.9:5000"]
  capabilities = ["pull"]
"""


def test_keep_existing_puts_the_nodes_mirrors_after_ours(tmp_path: Path) -> None:
    hosts = tmp_path / "docker.io" / "hosts.toml"
    hosts.parent.mkdir()
    hosts.write_bytes(OWN_MIRRORS)
    args = ("--mirror-target", TARGET, "--mirrored-registries", "docker.io", "--keep-existing")
    result = configure(tmp_path, *args)
    assert result.exit_code == 0, result.stderr
    document = tomllib.loads(hosts.read_text())
    assert list(document["host"]) == [TARGET, "https://corp-mirror:443", "http://10.9.9.9:5000"]
    original = tomllib.loads(OWN_MIRRORS.decode())
    assert (
        document["host"]["https://corp-mirror:443"] == original["host"]["https://corp-mirror:443"]
    )
    assert document["host"]["http://10.9.9.9:5000"] == {"capabilities": ["pull"]}
    assert document["server"] == "https://registry-1.docker.io"
    assert (hosts.parent / BACKUP_NAME).read_bytes() == OWN_MIRRORS
    # Again: the mirrors now come from the backup, and nothing changes.
    again = configure(tmp_path, *args)
    assert again.stdout.splitlines() == [f"unchanged  {hosts}"]
    # Without the flag the file is spegeld's alone; --remove restores the original.
    plain = configure(tmp_path, *args[:-1])
    assert list(tomllib.loads(hosts.read_text())["host"]) == [TARGET]
    assert plain.exit_code == 0
    configure(tmp_path, "--remove")
    assert hosts.read_bytes() == OWN_MIRRORS


def test_keep_existing_refuses_a_file_it_cannot_read(tmp_path: Path) -> None:
    hosts = tmp_path / "_default" / "hosts.toml"
    hosts.parent.mkdir()
    hosts.write_bytes(b"[host.\n")
    result = configure(tmp_path, "--mirror-target", TARGET, "--keep-existing")
    assert result.exit_code != 0
    assert "is not valid TOML, so its mirrors cannot be kept" in one_line_error(result)
    assert hosts.read_bytes() == b"[host.\n"  # refused before any write


def test_containerd_tries_kept_mirrors_after_ours(
    any_containerd: PrivateContainerd, tmp_path: Path, refused_ports: tuple[int, int]
) -> None:
    containerd = any_containerd
    # As above: every host refuses, so ctr's stderr shows the order containerd parsed.
    registry_port, mirror_port = refused_ports
    with socket.socket() as kept_socket:
        kept_socket.bind(("127.0.0.1", 0))  # bound, never listening: refuses
        kept = f"127.0.0.1:{kept_socket.getsockname()[1]}"
        registry, mirror = f"127.0.0.1:{registry_port}", f"127.0.0.1:{mirror_port}"
        hosts_dir = tmp_path / "certs.d"
        (hosts_dir / registry).mkdir(parents=True)
        (hosts_dir / registry / "hosts.toml").write_text(
            f'server = "http://{registry}"\n\n[host."http://{kept}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        result = configure(
            hosts_dir, "--mirror-target", f"http://{mirror}",
            "--mirrored-registries", f"http://{registry}", "--keep-existing",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        ref = f"{registry}/spegeld/probe:v1"
        mark = len(containerd.log_path.read_text())
        with pytest.raises(CtrError) as caught:
            containerd.ctr("images", "pull", "--hosts-dir", hosts_dir, ref, timeout=60)
    stderr = caught.value.stderr
    *tries, final = stderr.strip().splitlines()
    assert f'"http://{mirror}/v2/spegeld/probe/manifests/v1' in final, stderr  # ours first
    # Each host that failed before the next was tried: ctr 1.6 resolves itself and says so
    # on stderr; 2.x's transfer service resolves in the daemon, whose log says so.
    tries += containerd.log_path.read_text()[mark:].splitlines()
    order = [host for line in tries for host in (mirror, kept, registry)
             if f"http://{host}/v2/spegeld/probe/manifests/v1" in line]  # fmt: skip
    seen = list(dict.fromkeys(order))
    assert seen[:2] == [mirror, kept], (seen, stderr)  # then the kept mirror
    assert seen[2:] in ([], [registry]), seen  # then the registry (1.6 names it here)
