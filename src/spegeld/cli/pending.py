"""Commands of the CLI contract (DESIGN.md §9) whose work lands in later issues.

Each accepts no work yet: it says plainly that it is not built and exits 2.
"""

from __future__ import annotations

import click

from spegeld.cli._root import not_built

_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@click.command(context_settings=_PASS_THROUGH)
def doctor() -> None:
    """Check everything spegeld depends on and name what is wrong. (Not built yet.)"""
    not_built("spegeld doctor", "issue 5, election and doctor")
