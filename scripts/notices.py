#!/usr/bin/env python3
"""Write THIRD_PARTY_NOTICES for a spegeld artifact from the installed distributions' metadata.

Run it with the Python whose environment the artifact is built from (standard library
only, so the talos build venv's interpreter runs it as is):

* ``notices.py --wheel -o THIRD_PARTY_NOTICES``: the wheel bundles no third-party code;
  the file names each runtime requirement (the closure of ``spegeld``'s Requires-Dist,
  without extras), its version and its licence. The committed copy at the top of the
  repository is this output for constraints.txt's pins (tests/test_packaging.py checks it).
* ``notices.py --bundle --also pyinstaller --lib DIR_OR_FILE ... -o FILE``: the standalone
  binary and the Talos image carry the Python dependencies, CPython and the host's shared
  libraries (glibc and the rest), so the file adds every licence text the distributions
  ship, CPython's LICENSE and the Debian copyright file of each package owning a library.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = "spegeld"
# A licence field longer than this is the licence's text pasted into METADATA, not its name.
MAX_LICENSE_NAME = 80
# dist-info entries that hold licence or notice texts (PEP 639 puts them under licenses/).
_TEXT_NAMES = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", re.IGNORECASE)
_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
RULE = "=" * 78
UNPACKAGED = "from no Debian package (a wheel's own .libs; its licence is above)"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: Iterable[str]) -> list[md.Distribution]:
    """The installed distributions ``roots`` need at run time (no extras), roots included."""
    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    for _ in range(10_000):  # bound: far more than any environment holds
        if not todo:
            break
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement whose marker excludes this interpreter
        seen[name] = dist
        for req in dist.requires or []:
            if "extra" in req.partition(";")[2]:
                continue
            found = _REQ_NAME.match(req)
            if found:
                todo.append(found.group(1))
    return sorted(seen.values(), key=lambda d: _canonical(d.metadata["Name"]))


def licence_name(dist: md.Distribution) -> str:
    meta = dist.metadata
    expression = meta.get_all("License-Expression") or []
    if expression:
        return str(expression[0])
    field = str((meta.get_all("License") or [""])[0]).strip()
    if field and "\n" not in field and len(field) <= MAX_LICENSE_NAME:
        return field
    classifiers = [
        c.rsplit("::", 1)[1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    return " OR ".join(classifiers) or "see the licence text below"


def licence_texts(dist: md.Distribution) -> Iterator[tuple[str, str]]:
    """(file name, text) for each licence or notice file in the dist-info directory."""
    for file in sorted(dist.files or [], key=str):
        parts = file.parts
        if not parts or not parts[0].endswith(".dist-info"):
            continue
        if "licenses" in parts[1:-1] or _TEXT_NAMES.match(parts[-1]):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                yield "/".join(parts[1:]), path.read_text(errors="replace")


def debian_package(library: Path) -> str | None:
    """The Debian package that installed ``library`` (by its file name), or None."""
    try:
        proc = subprocess.run(
            ["dpkg", "-S", f"*/{library.name}"], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    for line in proc.stdout.splitlines():
        package, _, path = line.partition(": ")
        if path.strip().endswith("/" + library.name) and "diversion" not in line:
            return package.split(":")[0].split(",")[0].strip()
    return None


def _libraries(paths: Iterable[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        candidates = path.rglob("*.so*") if path.is_dir() else [path]
        # Shared libraries only: extension modules (name.cpython-311-...so) are part of
        # CPython's stdlib or of a distribution listed above.
        found.extend(
            p for p in candidates if p.is_file() and p.name.startswith("lib") and ".so" in p.name
        )
    return sorted(found)


def cpython_licence() -> tuple[str, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for path in (
        stdlib / "LICENSE.txt",
        Path(f"/usr/share/doc/python{version}/copyright"),
    ):
        if path.is_file():
            return str(path), path.read_text(errors="replace")
    raise SystemExit(f"notices: CPython's licence is neither in {stdlib} nor in /usr/share/doc")


def render(dists: list[md.Distribution], bundle: bool, libraries: list[Path], title: str) -> str:
    out = [title, RULE, ""]
    if not bundle:
        out += [
            "The spegeld wheel contains only spegeld's own code (Apache-2.0, see LICENSE).",
            "pip installs its run-time requirements separately; each is under its own",
            "licence. Versions are those of constraints.txt, the tested set.",
            "",
        ]
    for dist in dists:
        name = dist.metadata["Name"]
        if _canonical(name) == ROOT:
            continue
        out.append(f"{name} {dist.version}: {licence_name(dist)}")
        if bundle:
            for file, text in licence_texts(dist):
                out += ["", f"--- {name}: {file}", "", text.rstrip(), ""]
            out += [RULE, ""]
    if bundle:
        where, text = cpython_licence()
        version = sys.version.split()[0]
        out += [f"CPython {version}: PSF-2.0 (from {where})", "", text.rstrip(), "", RULE, ""]
        packages: dict[str, list[str]] = {}
        for library in libraries:
            package = debian_package(library) or UNPACKAGED
            packages.setdefault(package, []).append(library.name)
        for package, names in sorted(packages.items()):
            listed = ", ".join(sorted(set(names)))
            if package == UNPACKAGED:
                out += [f"Shared libraries {listed}: {UNPACKAGED}", "", RULE, ""]
                continue
            out.append(f"Shared libraries {listed}: Debian package {package}")
            copyright_file = Path(f"/usr/share/doc/{package}/copyright")
            if copyright_file.is_file():
                out += ["", copyright_file.read_text(errors="replace").rstrip(), ""]
            out += [RULE, ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--wheel", action="store_true", help="requirements and licence names")
    mode.add_argument("--bundle", action="store_true", help="with texts, CPython, libraries")
    parser.add_argument("--also", action="append", default=[], help="another distribution")
    parser.add_argument("--lib", action="append", type=Path, default=[], help="bundled .so")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        md.distribution(ROOT)
    except md.PackageNotFoundError:
        print(f"notices: {ROOT} is not installed in {sys.prefix}", file=sys.stderr)
        return 1
    # --also names one distribution, not its requirements: PyInstaller's bootloader is in
    # the binary, PyInstaller's own dependencies are not.
    dists = closure([ROOT]) + [md.distribution(name) for name in args.also]
    libraries = _libraries(args.lib)
    if args.bundle and not any(lib.name.startswith("libc.so") for lib in libraries):
        # glibc is in every bundle (talos/build.py copies it); name it even when --lib
        # pointed elsewhere, so the LGPL notice is never missing.
        libraries.append(Path("/lib/libc.so.6"))
    title = "spegeld: third-party notices" + (" (bundled software)" if args.bundle else "")
    args.output.write_text(render(dists, args.bundle, libraries, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
