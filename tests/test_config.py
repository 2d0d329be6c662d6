"""Configuration: the TOML file, SPEGELD_* variables, flags, and the CLI contract around them.

Precedence is observed without containerd: ``spegeld images`` checks its socket
path before anything else and names it in the error, so each source points
``--containerd-sock`` at its own non-existent path and the message says who won.
"""

from __future__ import annotations

import os
import re
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from spegeld import config
from spegeld.cli import cli
from spegeld.cli.images import images
from spegeld.errors import ConfigError, SpegeldError

KNOWN = frozenset({"containerd_sock", "containerd_namespace", "nodes"})


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SPEGELD_* variable from the outer shell may steer these tests."""
    for name in list(os.environ):
        if name.startswith("SPEGELD_"):
            monkeypatch.delenv(name)


def invoke(*args: str, env: dict[str, str] | None = None, **extra: Any) -> Result:
    return CliRunner(catch_exceptions=False).invoke(cli, list(args), env=env, **extra)


def one_line_error(result: Result) -> str:
    """The whole of stderr, asserted to be one line and not a traceback."""
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    return path


# --- load_toml --------------------------------------------------------------------------


def test_envvar_names() -> None:
    assert config.envvar("--containerd-sock") == "SPEGELD_CONTAINERD_SOCK"
    assert config.envvar("--containerd-content-path") == "SPEGELD_CONTAINERD_CONTENT_PATH"
    assert config.envvar("nodes") == "SPEGELD_NODES"


def test_load_toml_accepts_flag_and_identifier_spellings(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        'containerd-sock = "/a.sock"\ncontainerd_namespace = "ns"\nnodes = 3\n',
    )
    assert config.load_toml(path, KNOWN) == {
        "containerd_sock": "/a.sock",
        "containerd_namespace": "ns",
        "nodes": 3,
    }


def test_load_toml_empty_file_is_no_defaults(tmp_path: Path) -> None:
    assert config.load_toml(write(tmp_path / "c.toml", ""), KNOWN) == {}


@pytest.mark.parametrize("key", ["containerd-socket", "CONTAINERD_SOCK", "images", "x"])
def test_load_toml_unknown_key(tmp_path: Path, key: str) -> None:
    path = write(tmp_path / "c.toml", f'{key} = "v"\n')
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{key}'")) as info:
        config.load_toml(path, KNOWN)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_load_toml_table_is_an_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[containerd]\nsock = "/a"\n')
    with pytest.raises(ConfigError, match="unknown key 'containerd'"):
        config.load_toml(path, KNOWN)


def test_load_toml_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "containerd-sock = \n")
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        config.load_toml(path, KNOWN)
    assert isinstance(info.value.__cause__, Exception)


def test_load_toml_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=f"config file {re.escape(str(path))} does not exist"):
        config.load_toml(path, KNOWN)


def test_load_toml_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", b'containerd-sock = "\xff"\n')
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load_toml(path, KNOWN)


def test_load_toml_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        config.load_toml(tmp_path, KNOWN)


def test_config_error_is_a_usage_error() -> None:
    assert issubclass(ConfigError, SpegeldError)
    assert ConfigError.exit_code == 2


# --- the config file through the CLI ----------------------------------------------------


def test_cli_unknown_key_exits_2_naming_it(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", 'containerd-sock = "/x"\ncontainerd-sockk = "/y"\n')
    result = invoke("--config", str(path), "images")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert line.startswith("spegeld: error: ")
    assert "unknown key 'containerd-sockk'" in line
    assert str(path) in line
    assert result.stdout == ""


def test_cli_invalid_toml_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "containerd-sock = [\n")
    result = invoke("--config", str(path), "images")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert f"config file {path} is not valid TOML" in line


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = invoke("--config", str(path), "images")
    assert result.exit_code == 2
    assert one_line_error(result) == f"spegeld: error: config file {path} does not exist"


def test_cli_missing_config_from_the_environment_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    result = invoke("images", env={"SPEGELD_CONFIG": str(path)})
    assert result.exit_code == 2
    assert f"config file {path} does not exist" in one_line_error(result)


def test_cli_config_keys_of_other_commands_are_accepted(tmp_path: Path) -> None:
    # One file serves every command: `nodes` belongs to demo, not images.
    sock = tmp_path / "file.sock"
    path = write(tmp_path / "c.toml", f'nodes = 3\ncontainerd-sock = "{sock}"\n')
    result = invoke("--config", str(path), "images")
    assert result.exit_code == 1
    assert f"containerd socket {sock} does not exist" in one_line_error(result)


def test_cli_config_value_of_the_wrong_type_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", "containerd-sock = 5\n")
    result = invoke("--config", str(path), "images")
    assert result.exit_code == 2
    assert "containerd" in one_line_error(result)


# --- precedence: flag > SPEGELD_* > config file > default --------------------------------


@pytest.fixture
def socks(tmp_path: Path) -> dict[str, Path]:
    return {source: tmp_path / source / "containerd.sock" for source in ("flag", "env", "file")}


def _images_with(
    tmp_path: Path, socks: dict[str, Path], *, flag: bool, env: bool, file: bool
) -> Result:
    args: list[str] = []
    if file:
        path = write(tmp_path / "spegeld.toml", f'containerd-sock = "{socks["file"]}"\n')
        args += ["--config", str(path)]
    args.append("images")
    if flag:
        args += ["--containerd-sock", str(socks["flag"])]
    environ = {"SPEGELD_CONTAINERD_SOCK": str(socks["env"])} if env else None
    return invoke(*args, env=environ)


@pytest.mark.parametrize(
    ("flag", "env", "file", "winner"),
    [
        (True, True, True, "flag"),
        (True, False, True, "flag"),
        (True, True, False, "flag"),
        (True, False, False, "flag"),
        (False, True, True, "env"),
        (False, True, False, "env"),
        (False, False, True, "file"),
    ],
)
def test_containerd_sock_precedence(
    tmp_path: Path, socks: dict[str, Path], flag: bool, env: bool, file: bool, winner: str
) -> None:
    result = _images_with(tmp_path, socks, flag=flag, env=env, file=file)
    assert result.exit_code == 1
    line = one_line_error(result)
    assert f"containerd socket {socks[winner]} does not exist" in line
    for loser in {"flag", "env", "file"} - {winner}:
        assert str(socks[loser]) not in line


def test_containerd_sock_default(
    tmp_path: Path, socks: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    (param,) = [p for p in images.params if p.name == "containerd_sock"]
    assert param.default == config.DEFAULT_CONTAINERD_SOCK
    # The real default may be a live containerd; swap in one we know is absent.
    fake_default = tmp_path / "default" / "containerd.sock"
    monkeypatch.setattr(param, "default", fake_default)
    result = _images_with(tmp_path, socks, flag=False, env=False, file=False)
    assert result.exit_code == 1
    assert f"containerd socket {fake_default} does not exist" in one_line_error(result)


def test_config_file_spelled_with_underscores(tmp_path: Path) -> None:
    sock = tmp_path / "u.sock"
    path = write(tmp_path / "c.toml", f'containerd_sock = "{sock}"\n')
    result = invoke("--config", str(path), "images")
    assert result.exit_code == 1
    assert f"containerd socket {sock} does not exist" in one_line_error(result)


def test_config_file_from_spegeld_config(tmp_path: Path) -> None:
    sock = tmp_path / "via-env-config.sock"
    path = write(tmp_path / "c.toml", f'containerd-sock = "{sock}"\n')
    result = invoke("images", env={"SPEGELD_CONFIG": str(path)})
    assert result.exit_code == 1
    assert f"containerd socket {sock} does not exist" in one_line_error(result)


def test_spegeld_debug_shows_the_exception(tmp_path: Path) -> None:
    sock = tmp_path / "debug.sock"
    with pytest.raises(SpegeldError, match=re.escape(f"containerd socket {sock} does not exist")):
        invoke("images", "--containerd-sock", str(sock), env={"SPEGELD_DEBUG": "1"})


# --- the command-line contract ----------------------------------------------------------

COMMANDS = ["run", "doctor", "configure", "status", "images", "demo", "version"]


def test_help_lists_every_command() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    listed = re.findall(r"^  (\w+)\s", result.stdout.split("Commands:")[1], re.MULTILINE)
    assert sorted(listed) == sorted(COMMANDS)
    assert "SPEGELD_CONFIG" in result.stdout


def test_short_help_flag() -> None:
    assert invoke("-h").stdout == invoke("--help").stdout


@pytest.mark.parametrize(
    "args",
    [
        ["doctor", "extra"],
        ["doctor", "--timeout", "0"],
        ["doctor", "--peer", "not-an-address"],
        ["doctor", "--lease-namespace", "Not_A_Label"],
        ["run", "--lease-name", "-bad-"],
        # Names getaddrinfo cannot even encode ended the gossip task at runtime.
        ["run", "--peer", "a..b:7946"],
        ["run", "--peer-dns", "a..b"],
        ["run", "--peer-dns", "peers.example:notaport"],
        ["run", "--static-peer", f"{'x' * 64}.example:5000"],
    ],
    ids=" ".join,
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.strip()


def test_configure_lists_its_subcommands() -> None:
    result = invoke("configure", "--help")
    assert result.exit_code == 0
    assert re.search(r"^  containerd\s", result.stdout, re.MULTILINE)
    assert re.search(r"^  talos\s", result.stdout, re.MULTILINE)


def test_version() -> None:
    result = invoke("version")
    assert result.exit_code == 0
    assert result.stderr == ""
    expected = re.escape(f"spegeld {dist_version('spegeld')} (Python ") + r"\d+\.\d+\.\d+\S*\)"
    assert re.fullmatch(expected, result.stdout.strip())


IMAGES_OPTIONS = [p for p in images.params if isinstance(p, click.Option)]


def _long_flag(option: click.Option) -> str:
    return next(o for o in option.opts if o.startswith("--"))


@pytest.mark.parametrize(
    "flag",
    [_long_flag(o) for o in IMAGES_OPTIONS],
)
def test_images_help_shows_each_options_environment_variable(flag: str) -> None:
    result = invoke("images", "--help", terminal_width=500, max_content_width=500)
    assert result.exit_code == 0
    (row,) = [line for line in result.stdout.splitlines() if line.strip().startswith(flag + " ")]
    assert f"env var: {config.envvar(flag)}" in row


def test_images_has_the_options_this_file_expects() -> None:
    assert {_long_flag(o) for o in IMAGES_OPTIONS} == {
        "--containerd-sock",
        "--containerd-namespace",
        "--containerd-content-path",
        "--json",
    }


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("10.0.0.1", True),
        ("fd00::1", True),
        ("node-1.cluster.local", True),
        ("node-1.cluster.local.", True),
        ("a..b", False),
        ("-a.b", False),
        ("a" * 64, False),
        (".".join(["a" * 63] * 4), False),  # 255 characters
        ("bad_name", False),
        ("", False),
    ],
)
def test_is_host(text: str, ok: bool) -> None:
    assert config.is_host(text) is ok
