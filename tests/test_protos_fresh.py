"""The committed containerd stubs must equal a fresh run of scripts/gen-protos.

If this fails, run `scripts/gen-protos` and commit src/spegeld/containerd/_gen/.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen-protos"
GEN = Path("spegeld") / "containerd" / "_gen"
COMMITTED = ROOT / "src" / GEN

HINT = "the containerd stubs are stale: run scripts/gen-protos and commit the result"


def _files(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/gen-protos failed:\n{proc.stdout}{proc.stderr}"

    fresh = _files(tmp_path / GEN)
    committed = _files(COMMITTED)
    assert fresh, "scripts/gen-protos generated nothing"

    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not missing and not extra, f"{HINT} (missing: {missing}, not generated: {extra})"

    changed = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not changed, f"{HINT} (differs: {changed})"
