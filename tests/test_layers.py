"""The import rules of docs/architecture.md, checked on every import form.

* Packages point one way down the ranks (DESIGN.md §3):
  oci ← store ← routing ← {gossip, mirror, election} ← doctor ← app ← cli.
* A package's private modules (``_name``) and private names are its own: another package
  goes through the package's ``__init__``.
* No import cycle between modules, anywhere under ``src/`` and ``harness/src``.
* No module over 500 lines, generated code aside.
* asyncio only in the containerd bridge; the harness only in ``spegeld demo``.

Every form counts: ``import spegeld.x``, ``from spegeld import x``, ``from spegeld.x import
y`` (``y`` a module or a name), relative imports, and imports inside functions and
``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "spegeld"
HARNESS = ROOT / "harness" / "src" / "spegeld_harness"
MAX_LINES = 500

# Lower ranks may be imported by higher ones; equal ranks only within one package.
RANKS = {
    "errors": 0,
    "metrics": 0,
    "netaddr": 0,  # host:port forms and dual-stack sockets, used from config up
    "oci": 1,
    "processmetrics": 1,  # the process_* metrics from /proc, registered by app
    "config": 1,
    "mirrorconfig": 1,
    "kube": 2,
    "containerd": 2,
    "store": 3,
    "routing": 4,
    "gossip": 5,
    "mirror": 5,
    "election": 5,
    "systemd": 5,
    "status": 5,  # the typed /status model: produced by app, read by cli and doctor
    "doctor": 6,  # checks every layer below: kube, containerd, gossip, the status model
    "app": 7,
    "cli": 8,
    "__main__": 9,
}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted (a package's __init__ is the package name)
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    line: int


def _module_name(path: Path) -> str:
    base = SRC.parent if path.is_relative_to(SRC) else HARNESS.parent
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _path_of(module: str) -> Path | None:
    top, *rest = module.split(".")
    base = {"spegeld": SRC, "spegeld_harness": HARNESS}.get(top)
    if base is None:
        return None
    here = base.joinpath(*rest)
    if (here / "__init__.py").is_file():
        return here / "__init__.py"
    if here.with_suffix(".py").is_file():
        return here.with_suffix(".py")
    return None


def _imports(path: Path) -> Iterator[Import]:
    source = _module_name(path)
    package = source if path.name == "__init__.py" else source.rpartition(".")[0]
    yield from _parse_imports(path.read_text(), source, package)


def _parse_imports(text: str, source: str, package: str) -> Iterator[Import]:
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(source, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                module = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names = tuple(alias.name for alias in node.names)
            # ``from pkg import submodule`` imports the submodule itself.
            submodules = [n for n in names if _path_of(f"{module}.{n}") is not None]
            for name in submodules:
                yield Import(source, f"{module}.{name}", (), node.lineno)
            rest = tuple(n for n in names if n not in submodules)
            if rest or not submodules:
                yield Import(source, module, rest, node.lineno)


def _own(module: str) -> bool:
    return module.split(".", maxsplit=1)[0] in ("spegeld", "spegeld_harness")


def _sources(base: Path) -> list[Path]:
    return sorted(p for p in base.rglob("*.py") if "_gen" not in p.parts)


MODULES = _sources(SRC)
ALL_MODULES = MODULES + _sources(HARNESS)
GRAPH = {path: [i for i in _imports(path) if _own(i.target)] for path in ALL_MODULES}


def _package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_one_way(path: Path) -> None:
    own = _package_of(_module_name(path))
    if own == "__init__":
        return
    assert own in RANKS, f"{own} has no layer: add it to RANKS and docs/architecture.md"
    for imp in GRAPH[path]:
        if imp.target.split(".")[0] != "spegeld":
            continue  # the harness: test_the_product_leaves_the_harness_out
        other = _package_of(imp.target)
        if other in (own, "__init__"):
            continue
        assert other in RANKS, f"{path.name} imports spegeld.{other}, which has no layer"
        assert RANKS[other] < RANKS[own], (
            f"{path.relative_to(SRC)}:{imp.line} ({own}) imports {imp.target}: imports must "
            "point down the layers"
        )


@pytest.mark.parametrize("path", ALL_MODULES, ids=_module_name)
def test_private_modules_and_names_stay_in_their_package(path: Path) -> None:
    own = _module_name(path).split(".")[:2]
    for imp in GRAPH[path]:
        target = imp.target.split(".")
        if target[:2] == own and target[0] == "spegeld":
            continue  # a package uses its own private modules
        if target[0] != own[0] and target[0] == "spegeld_harness":
            continue  # cli/demo.py: checked by test_the_product_leaves_the_harness_out
        if target[0] == own[0] == "spegeld_harness":
            continue  # the harness is one package
        private = [part for part in target[1:] if part.startswith("_")]
        assert not private, (
            f"{_module_name(path)}:{imp.line} imports {imp.target}, another package's "
            "private module: export what it needs from the package instead"
        )
        hidden = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        assert not hidden, (
            f"{_module_name(path)}:{imp.line} takes private names {hidden} from {imp.target}"
        )


def test_no_import_cycles() -> None:
    edges: dict[str, set[str]] = {}
    for path, imports in GRAPH.items():
        edges.setdefault(_module_name(path), set()).update(
            i.target for i in imports if i.target != _module_name(path)
        )
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_sees_a_cycle() -> None:
    """The checker itself: a two-module cycle and a longer one are reported, a chain not."""
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


# Modules allowed over MAX_LINES, each with its reason. Generated code (containerd/_gen) is
# not counted at all.
OVERSIZED: dict[str, str] = {}


@pytest.mark.parametrize("path", ALL_MODULES, ids=_module_name)
def test_no_module_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    if _module_name(path) in OVERSIZED:
        return
    assert lines <= MAX_LINES, (
        f"{_module_name(path)} has {lines} lines: split it by responsibility "
        f"(or name it in OVERSIZED with the reason)"
    )


def test_asyncio_only_in_the_bridge() -> None:
    users = sorted(
        str(p.relative_to(SRC))
        for p in MODULES
        if "asyncio" in {i.target.split(".")[0] for i in _imports(p)}
    )
    assert users == ["containerd/_bridge.py"]


def test_the_product_leaves_the_harness_out() -> None:
    """spegeld_harness is a separate distribution: only `spegeld demo` reaches for it."""
    users = sorted(
        str(p.relative_to(SRC))
        for p in MODULES
        if any(i.target.split(".")[0] == "spegeld_harness" for i in GRAPH[p])
    )
    assert users == ["cli/demo.py"]


def test_the_harness_uses_only_public_spegeld() -> None:
    for path in _sources(HARNESS):
        for imp in GRAPH[path]:
            if imp.target.split(".")[0] == "spegeld":
                assert not any(p.startswith("_") for p in imp.target.split(".")[1:]), imp


def test_every_import_form_is_seen() -> None:
    """The resolver itself, on the forms the old check missed."""
    text = (
        "from spegeld import gossip\n"
        "from . import _node\n"
        "from ..mirror import _http\n"
        "import spegeld.store._memory\n"
        "def f():\n    from spegeld.oci import _digest\n"
    )
    targets = {i.target for i in _parse_imports(text, "spegeld.app._probe", "spegeld.app")}
    assert targets == {
        "spegeld.gossip",
        "spegeld.app._node",
        "spegeld.mirror._http",
        "spegeld.store._memory",
        "spegeld.oci._digest",
    }
