"""systemd integration against the real kernel objects systemd uses: an AF_UNIX datagram
socket as NOTIFY_SOCKET, listening sockets inherited as fd 3+ by a child process, a
credentials directory, and real streams for the journal check."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from spegeld.errors import ConfigError
from spegeld.systemd import (
    MAX_STATUS_CHARS,
    Notifier,
    PriorityPrefix,
    credential_path,
    listen_fds,
    log_format,
    serve_watchdog,
    stderr_is_journal,
    watchdog_interval,
)

RECEIVE_TIMEOUT = 2.0  # seconds a test waits for one datagram that should already be queued


@contextmanager
def notify_socket(address: str | bytes) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(RECEIVE_TIMEOUT)
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def nothing_queued(sock: socket.socket) -> bool:
    try:
        sock.recv(4096, socket.MSG_DONTWAIT)
    except (BlockingIOError, TimeoutError):  # TimeoutError: the socket has a timeout set
        return True
    return False


# --- sd_notify ---------------------------------------------------------------------------


def test_notifier_sends_each_state_to_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": path, "OTHER": "kept"}
    with notify_socket(path) as sock, Notifier.from_environ(env) as notifier:
        assert env == {"OTHER": "kept"}, "NOTIFY_SOCKET is removed for children"
        assert notifier.enabled
        assert notifier.ready("serving 3 images")
        assert receive(sock) == "READY=1\nSTATUS=serving 3 images"
        assert notifier.status("12 peers, coordinator node-a")
        assert receive(sock) == "STATUS=12 peers, coordinator node-a"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = dict(line.split("=", 1) for line in receive(sock).split("\n"))
        assert fields.keys() == {"RELOADING", "MONOTONIC_USEC"}
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
        assert notifier.ready()
        assert receive(sock) == "READY=1"
        assert notifier.watchdog()
        assert receive(sock) == "WATCHDOG=1"
        assert notifier.stopping("draining 2 responses")
        assert receive(sock) == "STOPPING=1\nSTATUS=draining 2 responses"
        assert nothing_queued(sock)


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"spegeld-test-{uuid.uuid4().hex}"
    with notify_socket(b"\0" + name.encode()) as sock:
        with Notifier(f"@{name}") as notifier:
            assert notifier.ready()
        assert receive(sock) == "READY=1"


def test_status_is_one_bounded_line(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with notify_socket(path) as sock, Notifier(path) as notifier:
        notifier.status("last error:\ncontainerd\r\n refused\x00\tREADY=1")
        assert receive(sock) == "STATUS=last error: containerd refused READY=1"
        notifier.status("é" * 1000)
        text = receive(sock)
        assert "\n" not in text
        value = text.removeprefix("STATUS=")
        assert len(value) == MAX_STATUS_CHARS
        assert value.endswith("…")


def test_without_notify_socket_nothing_is_sent() -> None:
    env: dict[str, str] = {}
    with Notifier.from_environ(env) as notifier:
        assert not notifier.enabled
        assert not notifier.ready()
        assert not notifier.watchdog()


@pytest.mark.parametrize("address", ["relative/notify", "vsock:2:1234", "/" + "x" * 200, ""])
def test_unusable_addresses_disable_notifications(address: str) -> None:
    with Notifier(address) as notifier:
        assert not notifier.enabled
        assert not notifier.ready()


def test_send_failures_are_logged_once_and_never_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="spegeld.systemd")
    with Notifier(str(tmp_path / "nobody-listens")) as notifier:
        assert notifier.enabled
        results = [notifier.ready(), notifier.status("x"), notifier.watchdog()]
    assert results == [False, False, False]
    failures = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].levelno == logging.DEBUG


# --- watchdog ------------------------------------------------------------------------


def test_watchdog_interval_from_the_environment() -> None:
    own = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.4
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": own}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}) is None
    env = {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": own}
    assert watchdog_interval(env, unset=True) == 0.4
    assert env == {}


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "abc"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": str(10**15)},
        {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "me"},
    ],
)
def test_malformed_watchdog_variables_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="WATCHDOG_"):
        watchdog_interval(env)


class PingRecorder:
    """Timestamps datagrams in a thread, so a blocked trio loop cannot delay the record."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self.times: list[float] = []
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 20
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            self.times.append(time.monotonic())
            self.messages.append(data.decode())

    def __enter__(self) -> PingRecorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:], strict=False)]


async def test_watchdog_pings_at_half_the_interval(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    interval = watchdog_interval({"WATCHDOG_USEC": "400000"})
    assert interval == 0.4
    with trio.fail_after(10), notify_socket(path) as sock, Notifier(path) as notifier:
        with PingRecorder(sock) as recorder:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_watchdog, notifier, interval)
                await trio.sleep(1.5)
                nursery.cancel_scope.cancel()
            await trio.sleep(0.1)  # let the thread stamp the last datagram
    assert set(recorder.messages) == {"WATCHDOG=1"}
    # One at start, then one per 0.2 s: 8 in 1.5 s; a busy 2-core machine may lose one.
    assert 7 <= len(recorder.times) <= 9, recorder.times
    gaps = recorder.gaps()
    assert max(gaps) < interval, f"a gap of {max(gaps):.3f} s would let systemd kill us"
    assert min(gaps) > 0.15, f"pings too eager: {min(gaps):.3f} s"


async def test_a_blocked_loop_stops_the_pings(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with trio.fail_after(10), notify_socket(path) as sock, Notifier(path) as notifier:
        with PingRecorder(sock) as recorder:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_watchdog, notifier, 0.2)
                await trio.sleep(0.35)
                pings_before = len(recorder.times)
                time.sleep(1.0)  # noqa: ASYNC251 -- on purpose: a wedged loop
                await trio.sleep(0.35)
                nursery.cancel_scope.cancel()
            await trio.sleep(0.1)
    assert pings_before >= 3
    assert max(recorder.gaps()) >= 0.9, "pings went on while the loop was blocked"
    assert len(recorder.times) > pings_before + 1, "pings resume once the loop runs again"


async def test_serve_watchdog_refuses_a_nonpositive_interval() -> None:
    with Notifier(None) as notifier, pytest.raises(ValueError, match="positive"):
        await serve_watchdog(notifier, 0.0)


# --- socket activation ---------------------------------------------------------------

# Runs in the child: adopt the inherited sockets, report, then echo one connection.
CHILD = """
import json, os, sys, trio
from spegeld.errors import ConfigError
from spegeld.systemd import listen_fds

# Before trio.run, as the CLI reads its environment: errors must be clean here too.
try:
    found = listen_fds()
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
    sys.exit(2)
print(json.dumps({
    "names": [s.name for s in found],
    "left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "inheritable": [os.get_inheritable(s.socket.fileno()) for s in found],
}), flush=True)

async def main():
    if found:
        listener = found[0].listener()
        with trio.fail_after(10):
            stream = await listener.accept()
            data = await stream.receive_some(100)
            await stream.send_all(b"echo:" + data)
            await stream.aclose()
    for s in found:
        s.socket.close()

trio.run(main)
"""

# The wrapper puts the passed fds at 3, 4, … and execs the child with LISTEN_PID set to its
# own pid, which the exec keeps: what systemd does between fork and exec.
WRAPPER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",") if fd]
temp = [os.dup(fd) for fd in fds]  # out of the way of 3, 4, … first
for i, fd in enumerate(temp):
    os.dup2(fd, 3 + i)
    os.set_inheritable(3 + i, True)  # dup2 onto itself keeps the dup's close-on-exec
for fd in set(fds + temp) - set(range(3, 3 + len(fds))):
    os.close(fd)
pid = sys.argv[2]
os.environ["LISTEN_PID"] = str(os.getpid()) if pid == "self" else pid
os.execv(sys.executable, [sys.executable, "-W", "error", "-c", sys.argv[3]])
"""


def spawn_activated(
    fds: list[int], *, pid: str = "self", names: str | None = None
) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["LISTEN_FDS"] = str(len(fds))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, ",".join(map(str, fds)), pid, CHILD],
        pass_fds=fds,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def first_line(proc: subprocess.Popen[str]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"child said nothing; stderr: {err}")
    result: dict[str, object] = json.loads(line)
    return result


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """The child's exit code and stderr: a clean exit writes nothing there."""
    try:
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def listening_tcp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_inherited_listening_socket_is_served() -> None:
    with listening_tcp() as registry, listening_tcp() as extra:
        port = registry.getsockname()[1]
        proc = spawn_activated([registry.fileno(), extra.fileno()], names="registry:extra")
        registry.close()  # only the child holds the port now
        try:
            report = first_line(proc)
            assert report == {
                "names": ["registry", "extra"],
                "left": [],  # LISTEN_* unset, as sd_listen_fds(unset_environment=1)
                "inheritable": [False, False],  # CLOEXEC: a child of ours gets none
            }
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"ping")
                client.settimeout(10)
                assert client.recv(100) == b"echo:ping"
        finally:
            assert finish(proc) == (0, "")


def test_variables_for_another_process_are_ignored() -> None:
    with listening_tcp() as sock:
        proc = spawn_activated([sock.fileno()], pid=str(os.getpid()))
        try:
            assert first_line(proc) == {"names": [], "left": [], "inheritable": []}
        finally:
            assert finish(proc) == (0, "")


def test_missing_names_default_to_unknown() -> None:
    with listening_tcp() as sock:
        port = sock.getsockname()[1]
        proc = spawn_activated([sock.fileno()])
        sock.close()
        try:
            assert first_line(proc)["names"] == ["unknown"]
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.sendall(b"x")
                client.settimeout(10)
                assert client.recv(100) == b"echo:x"
        finally:
            assert finish(proc) == (0, "")


def _udp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _unlistened_tcp() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def _unix_stream(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("udp", "fd 3 (registry) is not a stream socket"),
        ("unlistened", "fd 3 (registry) is not listening"),
        ("unix", "fd 3 (registry) is not an IPv4 or IPv6 socket"),
        ("file", "fd 3 (registry) is not a socket"),
    ],
)
def test_unusable_inherited_fds_are_clear_errors(kind: str, message: str, tmp_path: Path) -> None:
    if kind == "file":
        handle: socket.socket | int = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
    elif kind == "udp":
        handle = _udp()
    elif kind == "unlistened":
        handle = _unlistened_tcp()
    else:
        handle = _unix_stream(tmp_path / "sock")
    fd = handle if isinstance(handle, int) else handle.fileno()
    try:
        proc = spawn_activated([fd], names="registry")
        try:
            error = first_line(proc)["error"]
            assert isinstance(error, str)
            assert error.startswith(f"socket activation {message}"), error
            assert "\n" not in error
        finally:
            assert finish(proc) == (2, "")
    finally:
        if isinstance(handle, int):
            os.close(handle)
        else:
            handle.close()


def test_a_bad_second_fd_fails_cleanly_after_a_good_first() -> None:
    with listening_tcp() as good, _udp() as bad:
        proc = spawn_activated([good.fileno(), bad.fileno()], names="registry:extra")
        try:
            error = first_line(proc)["error"]
            assert error == (
                "socket activation fd 4 (extra) is not a stream socket: the mirror needs "
                "ListenStream=, not ListenDatagram="
            )
        finally:
            assert finish(proc) == (2, "")


def test_listen_variables_are_checked_before_any_fd_is_touched() -> None:
    own = str(os.getpid())
    assert listen_fds({}) == []
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "registry"}
    assert listen_fds(env) == []
    assert env == {}, "unset even when meant for another process"
    assert listen_fds({"LISTEN_PID": own, "LISTEN_FDS": "0"}) == []
    kept = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    listen_fds(kept, unset=False)
    assert kept == {"LISTEN_PID": "1", "LISTEN_FDS": "1"}
    for bad, match in [
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, "LISTEN_PID"),
        ({"LISTEN_PID": own, "LISTEN_FDS": "many"}, "LISTEN_FDS"),
        ({"LISTEN_PID": own, "LISTEN_FDS": "100000"}, "LISTEN_FDS"),
        ({"LISTEN_PID": own, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "one"}, "LISTEN_FDNAMES"),
    ]:
        with pytest.raises(ConfigError, match=match):
            listen_fds(bad)


# --- credentials ---------------------------------------------------------------------


def test_credentials_directory_lookup(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "gossip-key").write_text("1:" + "ab" * 32 + "\n")
    (creds / "kubeconfig").write_text("absent")  # SetCredential=kubeconfig:absent
    (creds / "empty").write_text("")
    (creds / "short").write_text("apiVersion: v1\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert credential_path("gossip-key", env) == creds / "gossip-key"
    assert credential_path("short", env) == creds / "short"
    assert credential_path("kubeconfig", env) is None
    assert credential_path("empty", env) is None
    assert credential_path("missing", env) is None
    assert credential_path("gossip-key", {}) is None
    (creds / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\n" * 3)
    assert credential_path("kubeconfig", env) == creds / "kubeconfig"


@pytest.mark.parametrize("name", ["", "../etc/passwd", "a/b", ".", ".."])
def test_credential_names_must_be_plain(name: str) -> None:
    with pytest.raises(ConfigError, match="not a plain file name"):
        credential_path(name, {"CREDENTIALS_DIRECTORY": "/nonexistent"})


def test_unreadable_credential_directory_is_a_clear_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="cannot be read"):
        credential_path("kubeconfig", {"CREDENTIALS_DIRECTORY": str(not_a_dir)})


# --- logging -------------------------------------------------------------------------


def test_log_format_follows_the_flag_then_the_stream(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    with (
        open(terminal, "w", closefd=True) as tty,
        (tmp_path / "log").open("w") as file,
    ):
        assert log_format("text", {}, file) == "text"
        assert log_format("json", {}, tty) == "json"
        assert log_format(None, {}, file) == "json"
        assert log_format(None, {}, tty) == "text"
        info = os.fstat(tty.fileno())
        journal = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert log_format(None, journal, tty) == "json"
        with pytest.raises(ConfigError, match="xml"):
            log_format("xml", {}, file)
    os.close(controller)


def test_journal_stream_must_be_stderr_itself(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        info = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert stderr_is_journal(env, a)
        assert stderr_is_journal(env, a.fileno())
        assert not stderr_is_journal(env, b), "inherited variable, redirected stderr"
        assert not stderr_is_journal({}, a)
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, a)


def test_priority_prefix_for_journald() -> None:
    formatter = PriorityPrefix(logging.Formatter("%(levelname)s %(message)s"))

    def line(level: int) -> str:
        record = logging.LogRecord("spegeld", level, __file__, 1, "hello %s", ("x",), None)
        return formatter.format(record)

    assert line(logging.CRITICAL) == "<2>CRITICAL hello x"
    assert line(logging.ERROR) == "<3>ERROR hello x"
    assert line(logging.WARNING) == "<4>WARNING hello x"
    assert line(logging.INFO) == "<6>INFO hello x"
    assert line(logging.DEBUG) == "<7>DEBUG hello x"
