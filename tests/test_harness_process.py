"""The harness's process lifecycle (ManagedProcess): ready by a deadline, stopped by PID,
and nothing left running when an object is dropped or the interpreter exits.

A tiny Python child stands in for containerd/Distribution/spegeld here: the lifecycle is
the same code for all three, and only a child we script can ignore SIGTERM or never get
ready on cue.  The real programs run through it in test_harness.py,
test_harness_registry.py and every daemon test.
"""

from __future__ import annotations

import ast
import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import spegeld_harness
from spegeld_harness import ManagedProcess

HARNESS_DIR = Path(spegeld_harness.__file__).parent
# House style: small modules.
MAX_MODULE_LINES = 500
# Bound for every wait on a child here: each one normally takes milliseconds.
WAIT = 10.0


class Child(ManagedProcess):
    """``python -c SCRIPT``; ready once ``base/ready`` exists."""

    kind = "child"

    def __init__(self, base: Path, script: str, **timeouts: float) -> None:
        super().__init__(
            ready_timeout=timeouts.get("ready_timeout", WAIT),
            stop_timeout=timeouts.get("stop_timeout", WAIT),
        )
        self.base = base
        self.script = script

    @property
    def log_path(self) -> Path:
        return self.base / "child.log"

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.base / "ready")]

    def _prepare(self) -> None:
        (self.base / "ready").unlink(missing_ok=True)

    def _probe(self) -> str | None:
        return None if (self.base / "ready").exists() else "no ready file"


# Gets ready, then sleeps; exits 0 on SIGTERM.
SLEEPER = textwrap.dedent("""
    import pathlib, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("sleeper up", flush=True)
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(300)
""")
# Gets ready, then ignores SIGTERM: only SIGKILL ends it.
STUBBORN = SLEEPER.replace("lambda *_: sys.exit(0)", "signal.SIG_IGN")
# Never gets ready.
NEVER_READY = 'import time\nprint("warming up forever", flush=True)\ntime.sleep(300)\n'


def gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (reaped, not a zombie), waiting up to WAIT."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.01)
    return False


def test_start_stop_restart_and_exit_code(tmp_path: Path) -> None:
    with Child(tmp_path, SLEEPER) as child:
        first = child.pid
        assert first is not None and child.running
        assert child.last_start_seconds is not None
        assert child.restart() is child
        assert child.pid not in (None, first)
        assert gone(first)
        second = child.pid
        assert second is not None
        assert child.stop() == 0, "SIGTERM ends it cleanly"
        assert child.pid is None and child.stop() is None
        assert gone(second)
    assert "sleeper up" in child.log_tail()
    assert child.closed
    with pytest.raises(RuntimeError, match="closed"):
        child.start()


def test_sigterm_ignored_means_sigkill_after_the_deadline(tmp_path: Path) -> None:
    child = Child(tmp_path, STUBBORN, stop_timeout=0.3).start()
    pid = child.pid
    assert pid is not None
    started = time.monotonic()
    assert child.stop() == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - started < WAIT
    assert gone(pid)
    child.close()


def test_not_ready_in_time_is_killed_and_reported_with_the_log(tmp_path: Path) -> None:
    child = Child(tmp_path, NEVER_READY, ready_timeout=0.5)
    with pytest.raises(RuntimeError, match=r"(?s)child not ready after 0\.5s \(no ready file\)"
                       r".*last lines of .*child\.log.*warming up forever"):  # fmt: skip
        child.start()
    assert child.pid is None
    assert child.poll() is None, "killed and reaped, nothing left to poll"
    child.close()


def test_exit_during_startup_is_reported_with_the_log(tmp_path: Path) -> None:
    child = Child(tmp_path, 'print("bad config", flush=True)\nraise SystemExit(3)')
    with pytest.raises(RuntimeError, match=r"(?s)child exited with 3 during startup.*bad config"):
        child.start()
    assert child.pid is None
    child.close()


def _start_and_drop(base: Path) -> int:
    child = Child(base, SLEEPER).start()
    assert child.pid is not None
    return child.pid


def test_a_dropped_object_does_not_leak_its_process(tmp_path: Path) -> None:
    """No module keeps instances alive: dropping the last reference stops the child."""
    pid = _start_and_drop(tmp_path)
    gc.collect()
    assert gone(pid)


def test_interpreter_exit_stops_what_was_left_running(tmp_path: Path) -> None:
    """A script that never closes its harness objects leaves nothing behind; a detached
    one (``spegeld demo --keep``) is left running."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_harness_process import Child, SLEEPER
        base = Path(sys.argv[1])
        (base / "left").mkdir(); (base / "kept").mkdir()
        left = Child(base / "left", SLEEPER).start()
        kept = Child(base / "kept", SLEEPER).start()
        print(left.pid, kept.pid, flush=True)
        kept.detach()
    """)  # left is still referenced at exit: only the exit hook can stop it
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True, text=True, timeout=WAIT * 3, check=True,
    )  # fmt: skip
    left, kept = map(int, out.stdout.split())
    try:
        assert gone(left), "the interpreter's exit stopped the child it still held"
        os.kill(kept, 0)  # raises if the detached child is gone
    finally:
        os.kill(kept, signal.SIGKILL)  # ours: started by the script above
    assert gone(kept)


def test_close_removes_owned_dirs_and_detach_keeps_them(tmp_path: Path) -> None:
    owned = tmp_path / "owned"
    owned.mkdir()
    child = Child(tmp_path, SLEEPER)
    child._own_dir(owned)
    child.close()
    assert not owned.exists()
    owned.mkdir()
    child = Child(tmp_path, SLEEPER)
    child._own_dir(owned)
    child.detach()
    assert owned.is_dir() and child.closed


def test_harness_modules_are_small_and_hold_no_global_process_state() -> None:
    for module in sorted(HARNESS_DIR.glob("*.py")):
        source = module.read_text()
        lines = source.count("\n")
        assert lines <= MAX_MODULE_LINES, f"{module.name}: {lines} lines"
        tree = ast.parse(source)
        imported = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        } | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "atexit" not in imported, f"{module.name}: leftovers are each object's own"
