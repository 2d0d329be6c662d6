"""The root click group: config file loading and the one place exit codes are mapped."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from spegeld.errors import ConfigError, SpegeldError

EXIT_USAGE = 2


def fail(message: str, code: int = 1) -> None:
    """Print a one-line error and exit: for known failures, never a traceback."""
    click.echo(f"spegeld: error: {message}", err=True)
    raise click.exceptions.Exit(code)


def not_built(what: str, issue: str) -> None:
    """A command of the CLI contract that does not exist yet says so and exits 2."""
    click.echo(
        f"spegeld: {what} is not built yet (planned in {issue}); nothing was done.", err=True
    )
    raise click.exceptions.Exit(EXIT_USAGE)


def _config_key(param: click.Parameter) -> str | None:
    """A parameter's TOML key is its long flag: ``--containerd-sock`` → ``containerd_sock``."""
    if not isinstance(param, click.Option) or param.name in ("config", SHOW_VERSION):
        return None
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0].lstrip("-").replace("-", "_") if longs else None


def _options(command: click.Command) -> dict[str, click.Option]:
    found: dict[str, click.Option] = {}
    for param in command.params:
        key = _config_key(param)
        if key is not None and isinstance(param, click.Option):
            found[key] = param
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            found.update(_options(sub))
    return found


# What a TOML value may be for each click type; anything else is refused before
# click sees it (click would hand an int to os.stat, for one).
_TOML_TYPES: dict[type, tuple[type, ...]] = {
    click.Path: (str,),
    click.types.StringParamType: (str,),
    click.Choice: (str,),
    click.types.BoolParamType: (bool,),
    click.IntRange: (int,),
    click.types.IntParamType: (int,),
    click.FloatRange: (int, float),
    click.types.FloatParamType: (int, float),
}


def _check_value(path: Path, key: str, option: click.Option, value: Any) -> Any:
    values = value if option.multiple and isinstance(value, list) else [value]
    for kind, allowed in _TOML_TYPES.items():
        if isinstance(option.type, kind):
            for item in values:
                if not isinstance(item, allowed) or (
                    isinstance(item, bool) and bool not in allowed
                ):
                    wanted = " or ".join(t.__name__ for t in allowed)
                    raise ConfigError(f"config file {path}: {key} must be a {wanted}, not {item!r}")
            break
    return value


def _default_map(command: click.Command, values: dict[str, Any]) -> dict[str, Any]:
    own: dict[str, Any] = {}
    for param in command.params:
        key = _config_key(param)
        if key in values and param.name:
            own[param.name] = values[key]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            own[name] = _default_map(sub, values)
    return own


# --version's parameter name: not "version", which the default map gives the subcommand.
SHOW_VERSION = "show_version"


def version_line() -> str:
    """What ``spegeld version`` and ``spegeld --version`` print."""
    from importlib.metadata import version as dist_version

    return f"spegeld {dist_version('spegeld')} (Python {python_version()})"


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:  # resilient: shell completion is asking
        click.echo(version_line())
        ctx.exit()


class SpegeldGroup(click.Group):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `spegeld --version` beside `spegeld version`, as operators try both.
        self.params.append(
            click.Option(
                ["--version", SHOW_VERSION],
                is_flag=True,
                expose_value=False,
                is_eager=True,
                callback=_print_version,
                help="Print spegeld's version and exit.",
            )
        )

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SpegeldError as exc:
            if os.environ.get("SPEGELD_DEBUG"):
                raise
            fail(str(exc), exc.exit_code)


def load_config_file(ctx: click.Context, _param: click.Parameter, value: Path | None) -> None:
    if value is None:
        return
    from spegeld.config import load_toml

    group = ctx.command
    options = _options(group)
    try:
        values = load_toml(value, frozenset(options))
        for key, item in values.items():
            _check_value(value, key, options[key], item)
    except SpegeldError as exc:
        fail(str(exc), exc.exit_code)
    ctx.default_map = _default_map(group, values)
    ctx.meta[CONFIG_PATH] = value


CONFIG_PATH = "spegeld.config_path"


def read_config_file(ctx: click.Context) -> dict[str, Any]:
    """The ``--config`` file's values as they are now, by parameter name ({} without one).

    For SIGHUP: raises ConfigError for a file that no longer parses or checks.
    """
    from spegeld.config import load_toml

    path = ctx.find_root().meta.get(CONFIG_PATH)
    if path is None:
        return {}
    root = ctx.find_root().command
    options = _options(root)
    values = load_toml(path, frozenset(options))
    for key, item in values.items():
        _check_value(path, key, options[key], item)
    return {options[key].name: item for key, item in values.items() if options[key].name}


def python_version() -> str:
    return sys.version.split()[0]
