"""A loopback TCP relay that limits the bytes it passes back to the client per second.

Why a stand-in: the test needs a pull that is slow on purpose, so that a blob sits in
containerd's ingest area long enough to be seen and shared. The Cluster harness gets that
with network namespaces and ``tc``, which costs several seconds of setup per test; this
relay gives the same slow link between one containerd and a real Distribution on
loopback. It only forwards bytes: the registry, containerd and the pull are all real.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

CHUNK = 16 * 1024  # bytes per send toward the client: the unit the rate is metered in
ACCEPT_POLL = 0.2  # seconds between checks of the stop flag while waiting to accept


class SlowRelay:
    """Forward ``127.0.0.1:port`` to ``target``, at most ``rate`` bytes/s toward the client."""

    def __init__(self, target: tuple[str, int], rate: float) -> None:
        self.target = target
        self.rate = rate
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(ACCEPT_POLL)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> SlowRelay:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            client.settimeout(None)
            upstream.settimeout(None)
            self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream, None)
            self._spawn(self._pump, upstream, client, self.rate)

    def _pump(self, source: socket.socket, sink: socket.socket, rate: float | None) -> None:
        started = time.monotonic()
        sent = 0
        try:
            while not self._stop.is_set():
                data = source.recv(CHUNK)
                if not data:
                    break
                sink.sendall(data)
                sent += len(data)
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)
