"""One child process of the harness: logged to a file, ready by a deadline, stopped by PID.

:class:`ManagedProcess` is the lifecycle that containerd, the Distribution registry and
``spegeld run`` share: a subclass names its command (:meth:`~ManagedProcess.argv`), its log
file and a readiness probe; the base starts it in its own session with stdout and stderr
appended to the log, polls the probe until ``ready_timeout`` (the log's tail in the error
when it fails), and stops it by the PID it started: SIGTERM (plus SIGCONT, so a stopped
process sees it), SIGKILL after ``stop_timeout``.

Nothing leaks: each instance owns a :func:`weakref.finalize` that holds its child and the
temp dirs it made (never the instance itself).  :meth:`~ManagedProcess.close` runs it
early; otherwise it runs when the instance is garbage-collected (nobody can stop the child
any more) or, at the latest, at interpreter exit.  :meth:`~ManagedProcess.detach` disarms
it (``spegeld demo --keep``).  The state is the instance's own: no module-global registry.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

__all__ = ["ManagedProcess", "terminate"]

_log = logging.getLogger(__name__)


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM ``proc`` (and SIGCONT it), SIGKILL after ``timeout``; reap it; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)  # a SIGSTOPped process must see the SIGTERM
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class _Holdings:
    """What a :class:`ManagedProcess` must give back: its child and the temp dirs it made.

    The instance's finalizer holds this, so it must never refer to the instance.
    """

    def __init__(self, stop_timeout: float) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.dirs: list[Path] = []
        self.stop_timeout = stop_timeout
        # A forked child inherits the finalizer: the processes are not its to stop.
        self.owner = os.getpid()

    def release(self) -> None:
        """Stop the child and remove the dirs (the finalizer: must not raise)."""
        if os.getpid() != self.owner:
            return
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                terminate(proc, self.stop_timeout)
            except OSError as e:
                _log.warning("could not stop pid %d: %s", proc.pid, e)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


class ManagedProcess:
    """The lifecycle of one harness child; subclasses fill in the hooks below.

    ``with X(...) as p:`` starts it and, on exit, :meth:`close`\\ s it.  :meth:`start` is
    :meth:`launch` (spawn, don't wait) then :meth:`wait_ready`.  :meth:`stop` is graceful,
    :meth:`kill` a crash; either can be followed by :meth:`start` again (same log, same
    dirs).  After :meth:`close` or :meth:`detach` the object cannot start again.
    """

    # The program's short name in messages ("containerd exited with 1 during startup").
    kind: ClassVar[str] = "process"
    # A "--- spegeld harness: starting ..." line before each start; off for JSON logs.
    log_banner: ClassVar[bool] = True
    log_tail_lines: ClassVar[int] = 30
    # Readiness polling backs off from the first delay to the last: fast local daemons are
    # ready within milliseconds; a probe that spawns a process (curl in a netns) costs more.
    probe_first_delay: ClassVar[float] = 0.005
    probe_max_delay: ClassVar[float] = 0.1

    def __init__(self, *, ready_timeout: float, stop_timeout: float) -> None:
        self.ready_timeout = ready_timeout
        self._holdings = _Holdings(stop_timeout)
        self._finalizer = weakref.finalize(self, self._holdings.release)
        self._log_offset = 0
        self._launched_at = 0.0
        self.last_start_seconds: float | None = None

    # -- hooks ------------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def argv(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> str | None:
        """None once the process is ready, else what is still missing (for the timeout)."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before each launch: check tools, write config, clear stale sockets."""

    def _spawn_env(self) -> dict[str, str] | None:
        return None

    def _spawn_cwd(self) -> Path | None:
        return None

    def _label(self) -> str:
        """Who failed, in startup errors."""
        return self.kind

    # -- state ------------------------------------------------------------------------------

    @property
    def stop_timeout(self) -> float:
        return self._holdings.stop_timeout

    @stop_timeout.setter
    def stop_timeout(self, value: float) -> None:
        self._holdings.stop_timeout = value

    @property
    def pid(self) -> int | None:
        """PID of the running process, or None (never started, stopped, or exited)."""
        proc = self._holdings.proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _own_dir(self, path: Path) -> Path:
        """Remove ``path`` at :meth:`close` (a temp dir this object created)."""
        self._holdings.dirs.append(path)
        return path

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed")

    # -- lifecycle --------------------------------------------------------------------------

    def launch(self, *, pass_fds: Sequence[int] = ()) -> Self:
        """Start the process without waiting for it to be ready (no-op if it runs)."""
        self._check_open()
        if self.running:
            return self
        self._prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._launched_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            if self.log_banner:
                log.write(f"--- spegeld harness: starting {self.kind} at {time.ctime()}\n".encode())
                log.flush()
            self._holdings.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._spawn_cwd(),
                env=self._spawn_env(),
                pass_fds=tuple(pass_fds),
                # Own session: a terminal's Ctrl-C doesn't half-kill nodes; we stop them.
                start_new_session=True,
            )
        return self

    def wait_ready(self) -> Self:
        """Poll the probe until ready; on exit or timeout kill it and raise with the log."""
        proc = self._holdings.proc
        if proc is None:
            raise RuntimeError(f"{self.kind} was not launched")
        deadline = self._launched_at + self.ready_timeout
        delay = self.probe_first_delay
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise RuntimeError(
                        f"{self._label()} exited with {code} during startup\n"
                        f"{self._log_tail(since=self._log_offset)}"
                    )
                missing = self._probe()
                if missing is None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self._label()} not ready after {self.ready_timeout:.1f}s ({missing})"
                        f"\n{self._log_tail(since=self._log_offset)}"
                    )
                time.sleep(delay)
                delay = min(delay * 1.5, self.probe_max_delay)
        except BaseException:
            self.kill()
            raise
        self.last_start_seconds = time.monotonic() - self._launched_at
        return self

    def start(self) -> Self:
        """Launch and wait until ready (no-op if it runs)."""
        self._check_open()
        if self.running:
            return self
        self.launch()
        return self.wait_ready()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM by PID, SIGKILL after ``timeout`` (default ``stop_timeout``); the exit
        code, or None if nothing was started."""
        proc = self._holdings.proc
        if proc is None:
            return None
        try:
            return terminate(proc, self.stop_timeout if timeout is None else timeout)
        finally:
            self._holdings.proc = None

    def kill(self) -> None:
        """SIGKILL by PID (a crash: sockets, locks and half-written files stay as they are)."""
        proc = self._holdings.proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        finally:
            self._holdings.proc = None

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit on its own; its exit code (TimeoutExpired if not)."""
        proc = self._holdings.proc
        if proc is None:
            raise RuntimeError(f"{self.kind} is not running")
        code = proc.wait(timeout)
        self._holdings.proc = None
        return code

    def poll(self) -> int | None:
        """The exit code if the process has ended (on its own or by a signal), else None."""
        proc = self._holdings.proc
        return proc.poll() if proc is not None else None

    def send_signal(self, signum: int) -> None:
        proc = self._holdings.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)

    def restart(self) -> Self:
        """Stop (if running) and start again: same log, same dirs."""
        self.stop()
        return self.start()

    def detach(self) -> None:
        """Leave the process and its dirs after this interpreter exits (``spegeld demo
        --keep``); the object is closed."""
        self._holdings.proc = None
        self._holdings.dirs.clear()
        self._finalizer.detach()

    def close(self) -> None:
        """Stop, and remove the temp dirs this object created (not a caller's base_dir)."""
        try:
            self.stop()
        finally:
            self._finalizer()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- log --------------------------------------------------------------------------------

    def log_tail(self, lines: int | None = None) -> str:
        """The end of the process's log (for failure messages)."""
        return self._log_tail(self.log_tail_lines if lines is None else lines)

    def _log_tail(self, lines: int | None = None, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no {self.kind} log at {self.log_path}: {e})"
        count = self.log_tail_lines if lines is None else lines
        tail = "\n".join(text.splitlines()[-count:])
        return f"--- last lines of {self.log_path}:\n{tail}"
