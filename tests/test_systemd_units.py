"""The shipped unit files, checked by systemd's own tools (no running systemd needed), and
the example config loaded by the real CLI."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner

from spegeld.cli import cli

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = UNITS / "spegeld.service"
SOCKET = UNITS / "spegeld.socket"
PEER_SOCKET = UNITS / "spegeld-peer.socket"
EXAMPLE = UNITS / "spegeld.toml.example"
README = UNITS / "README.md"
INSTALLED_BINARY = "/usr/local/bin/spegeld"
MAX_EXPOSURE = 4.9  # systemd-analyze security calls up to 4.9 "OK"

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def settings(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) in order; systemd units repeat keys, so no configparser."""
    section = ""
    found = []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(unit: Path, key: str) -> list[str]:
    return [v for _, k, v in settings(unit) if k == key]


def installable_copy(tmp_path: Path) -> Path:
    """The units with ExecStart's binary pointed at this checkout's real spegeld: verify
    insists the binary exists, and nothing else is changed."""
    real = Path(sys.executable).parent / "spegeld"
    assert real.exists(), f"{real}: the venv's console script, installed with the package"
    directory = tmp_path / "units"
    directory.mkdir()
    text = SERVICE.read_text()
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    (directory / SERVICE.name).write_text(
        text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={real} ")
    )
    for socket_unit in (SOCKET, PEER_SOCKET):
        shutil.copy(socket_unit, directory / socket_unit.name)
    return directory


@needs_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    directory = installable_copy(tmp_path)
    units = [directory / u.name for u in (SERVICE, SOCKET, PEER_SOCKET)]
    result = analyze("verify", *units)
    # verify exits 0 on warnings (unknown keys, bad values) but prints them: allow none.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_analyze
def test_the_shipped_unit_fails_verify_only_for_the_missing_binary(tmp_path: Path) -> None:
    if Path(INSTALLED_BINARY).exists():
        pytest.skip(f"{INSTALLED_BINARY} exists here: the shipped unit verifies as it is")
    result = analyze("verify", SERVICE)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line]
    assert result.returncode != 0
    assert complaints
    assert all(INSTALLED_BINARY in line for line in complaints), complaints


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    directory = installable_copy(tmp_path)
    broken = directory / SERVICE.name
    broken.write_text(broken.read_text().replace("UMask=0077", "UMsk=0077"))
    result = analyze("verify", broken, directory / SOCKET.name)
    assert "Unknown key" in result.stdout + result.stderr
    (directory / SERVICE.name).unlink()
    for socket_unit in (SOCKET, PEER_SOCKET):
        orphan = analyze("verify", directory / socket_unit.name)
        assert "spegeld.service not loaded" in orphan.stdout + orphan.stderr


def exposure(output: str) -> tuple[float, list[str]]:
    match = re.search(r"Overall exposure level for spegeld\.service: (\d+\.\d+) (\S+)", output)
    assert match, output
    exposed = [line.split()[1] for line in output.splitlines() if line.startswith("✗")]
    return float(match.group(1)), exposed


@needs_analyze
def test_security_exposure_is_ok_and_documented() -> None:
    result = analyze("security", "--offline=true", "--no-pager", SERVICE)
    assert result.returncode == 0, result.stderr
    score, exposed = exposure(result.stdout)
    print(f"systemd-analyze security: spegeld.service exposure {score:.1f}")
    assert score <= MAX_EXPOSURE, result.stdout
    readme = README.read_text()
    assert f"exposure level {score:.1f}" in readme, "systemd/README.md states the score"
    # Markdown tables escape "|" inside a cell.
    undocumented = [n for n in exposed if f"`{n}`".replace("|", "\\|") not in readme]
    assert not undocumented, f"justify these in systemd/README.md: {undocumented}"


def test_unit_keeps_the_design_contract() -> None:
    assert values(SERVICE, "Type") == ["notify"]
    assert values(SERVICE, "NotifyAccess") == ["main"]
    assert values(SERVICE, "Restart") == ["always"]
    assert values(SERVICE, "WatchdogSec") == ["30s"]
    assert values(SERVICE, "StateDirectory") == ["spegeld"]
    assert values(SERVICE, "RuntimeDirectory") == ["spegeld"]
    assert "containerd.service" in values(SERVICE, "After")[0].split()
    assert values(SERVICE, "CapabilityBoundingSet") == [""]
    assert values(SERVICE, "ProtectSystem") == ["strict"]
    assert values(SERVICE, "RestrictAddressFamilies") == ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"]
    assert "@system-service" in values(SERVICE, "SystemCallFilter")
    credentials = values(SERVICE, "LoadCredential")
    assert "gossip-key:/etc/spegeld/gossip.key" in credentials
    assert "kubeconfig:/etc/spegeld/kubeconfig" in credentials
    # The credential names the code reads, and the placeholder it treats as absent.
    from spegeld.gossip._keyfile import GOSSIP_KEY_CREDENTIAL
    from spegeld.systemd import ABSENT_CREDENTIAL, KUBECONFIG_CREDENTIAL

    assert {c.split(":")[0] for c in credentials} == {GOSSIP_KEY_CREDENTIAL, KUBECONFIG_CREDENTIAL}
    assert values(SERVICE, "SetCredential") == [
        f"{KUBECONFIG_CREDENTIAL}:{ABSENT_CREDENTIAL.decode()}"
    ]
    readme = README.read_text()
    assert INSTALLED_BINARY in readme


def test_socket_units_match_the_daemons_listeners() -> None:
    """Issue 13: the mirror socket on loopback at --registry-addr's default, the peer socket
    on every address at --peer-addr's port, each named so the daemon routes it right."""
    from spegeld.cli.run import split_inherited
    from spegeld.config import DEFAULT_MIRROR_ADDR, DEFAULT_PEER_ADDR, parse_host_port
    from spegeld.systemd import InheritedSocket

    assert values(SOCKET, "ListenStream") == [DEFAULT_MIRROR_ADDR] == ["127.0.0.1:5000"]
    peer_port = parse_host_port(DEFAULT_PEER_ADDR, "--peer-addr")[1]
    assert values(PEER_SOCKET, "ListenStream") == [str(peer_port)]  # every address
    # A socket unit not named like the service must name it, or it activates nothing.
    assert values(PEER_SOCKET, "Service") == [SERVICE.name]
    assert values(SOCKET, "Service") == []  # spegeld.socket → spegeld.service by name
    names = {"mirror": values(SOCKET, "FileDescriptorName"),
             "peer": values(PEER_SOCKET, "FileDescriptorName")}  # fmt: skip
    assert names == {"mirror": ["registry"], "peer": ["peer"]}
    with socket.socket() as a, socket.socket() as b:
        passed = [InheritedSocket(names["mirror"][0], trio.socket.from_stdlib_socket(a)),
                  InheritedSocket(names["peer"][0], trio.socket.from_stdlib_socket(b))]  # fmt: skip
        routed = split_inherited(passed)
        assert [s.name for s in routed["mirror"]] == ["registry"]
        assert [s.name for s in routed["peer"]] == ["peer"]
        assert routed["metrics"] == []


def test_execstart_command_line_parses_with_the_example_config() -> None:
    (command,) = values(SERVICE, "ExecStart")
    binary, *args = command.split()
    assert binary == INSTALLED_BINARY
    assert args == ["--config", "/etc/spegeld/spegeld.toml", "run"]
    args[1] = str(EXAMPLE)
    result = CliRunner().invoke(cli, [*args, "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _uncommented(text: str) -> str:
    """Every ``# key = value`` example line switched on."""
    return re.sub(r"(?m)^# ([a-z][a-z-]* = )", r"\1", text)


def test_example_config_loads_as_shipped_and_fully_uncommented(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    full = tmp_path / "full.toml"
    full.write_text(_uncommented(text))
    switched_on = len(re.findall(r"(?m)^[a-z][a-z-]* = ", full.read_text()))
    assert switched_on > len(re.findall(r"(?m)^[a-z][a-z-]* = ", text)) + 5
    runner = CliRunner()
    for path in (EXAMPLE, full):
        result = runner.invoke(cli, ["--config", str(path), "version"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    typo = tmp_path / "typo.toml"
    typo.write_text(text.replace("log-level =", "log-levle ="))
    result = runner.invoke(cli, ["--config", str(typo), "version"], catch_exceptions=False)
    assert result.exit_code == 2
    assert "log-levle" in result.output
