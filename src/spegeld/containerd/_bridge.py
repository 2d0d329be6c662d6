"""The one place asyncio lives in spegeld.

grpclib, the gRPC library that speaks containerd's API, is asyncio-only, and
anyio's trio backend cannot run it. trio-asyncio runs an asyncio loop on top
of trio, so each grpclib call becomes a trio-native awaitable here. Everything
outside this module is trio; ruff bans ``asyncio`` imports elsewhere (TID251).

Streams are driven one ``run_aio_coroutine`` per message, never through
``trio_asyncio.aio_as_trio(async_generator)``: that adapter reports a cancelled
read as done at once and relies on the asyncio side ending in ``CancelledError``,
but grpclib turns the cancellation of a stream whose connection was just lost into
``StreamTerminatedError``. trio-asyncio then reschedules a trio task that is no longer
waiting, which is an ``AssertionError`` or a ``TrioInternalError`` that ends the whole
process (tests/test_containerd_restart_load.py shows it within a few restarts).
``run_aio_coroutine`` instead waits for the asyncio task to finish whatever it does.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import h2.exceptions
import trio
import trio_asyncio
from grpclib.client import Channel
from grpclib.config import Configuration

T = TypeVar("T")

logger = logging.getLogger(__name__)

CLOSE_GRACE = 2.0  # seconds to close the HTTP/2 connection when shutting down
STREAM_CLOSE_GRACE = 1.0  # seconds to reset and release one stream when its reader stops


class ConnectionLost(Exception):
    """The asyncio side ended a call without a result: its task was cancelled under us."""


class CallTimeout(Exception):
    """containerd did not answer (or send the next message) within the deadline."""


class AioBridge:
    """Runs asyncio coroutines and async iterators from trio, on one trio-asyncio loop."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    async def _run(self, coro: Awaitable[T]) -> T:
        try:
            result: T = await self._loop.run_aio_coroutine(coro)
        except asyncio.CancelledError as exc:
            # trio-asyncio turns a cancellation that trio asked for into trio.Cancelled;
            # one that arrives here came from the asyncio side (grpclib's stream wrapper
            # cancels the task it runs in when the connection drops).
            raise ConnectionLost("the containerd connection was lost mid-call") from exc
        return result

    async def call(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        answer_within: float = math.inf,
        **kwargs: Any,
    ) -> T:
        async def run() -> T:
            return await fn(*args, **kwargs)

        with trio.move_on_after(answer_within) as scope:
            with self._renewing_exhausted(fn):
                return await self._run(run())
        assert scope.cancelled_caught
        raise CallTimeout(f"no answer within {answer_within:g} s")

    async def iterate_unary_stream(
        self,
        method: Any,
        request: Any,
        *,
        metadata: dict[str, str],
        open_timeout: float = math.inf,
        idle_timeout: float = math.inf,
    ) -> AsyncGenerator[Any, None]:
        """Yield the replies of a server-streaming grpclib method, one at a time.

        ``open_timeout`` bounds the wait for the first reply, ``idle_timeout`` each wait
        for the next one (time the caller spends between replies does not count). The
        stream is reset and released on the asyncio side however the caller stops: at
        the end, on an error, on ``aclose()`` or on cancellation.
        """
        stream = method.open(metadata=metadata)

        async def start() -> None:
            await stream.__aenter__()
            await stream.send_message(request, end=True)

        async def finish(exc: BaseException | None) -> None:
            await stream.__aexit__(type(exc) if exc else None, exc, None)

        with trio.move_on_after(open_timeout) as scope, self._renewing_exhausted(method):
            await self._run(start())
        if scope.cancelled_caught:
            raise CallTimeout(f"could not open a stream within {open_timeout:g} s")
        error: BaseException | None = None
        try:
            timeout = open_timeout
            while True:
                replies = []  # a list, so this frame holds no reply across the yield
                with trio.move_on_after(timeout) as scope:
                    replies.append(await self._run(stream.recv_message()))
                if scope.cancelled_caught:
                    raise CallTimeout(f"no reply within {timeout:g} s")
                if replies[0] is None:
                    break
                timeout = idle_timeout
                yield replies.pop()
        except BaseException as exc:
            error = exc
            raise
        finally:
            if error is None:
                # The normal end: the trailers carry containerd's status, an error or OK.
                with trio.move_on_after(idle_timeout) as scope:
                    await self._run(finish(None))
                if scope.cancelled_caught:
                    raise CallTimeout(f"no trailers within {idle_timeout:g} s")
            else:
                # Stopped early (an error, ``aclose()`` at a yield, a cancellation):
                # grpclib resets the stream instead of draining it.
                with trio.move_on_after(STREAM_CLOSE_GRACE, shield=True):
                    try:
                        await self._run(finish(error))
                    except Exception as cleanup:  # the stream is broken; the first error wins
                        logger.debug("releasing a broken containerd stream: %r", cleanup)

    @contextmanager
    def _renewing_exhausted(self, method: Any) -> Iterator[None]:
        """An HTTP/2 connection has 2**30 client streams; grpclib does not redial when they
        run out (one per 256 KiB read: about 256 TiB served over gRPC). Drop the spent
        connection so the next call dials a new one, and report this call as lost."""
        try:
            yield
        except h2.exceptions.NoAvailableStreamIDError as exc:
            channel = getattr(method, "channel", None)
            if isinstance(channel, Channel):
                channel.close()  # closes the transport; the next request reconnects
            raise ConnectionLost("the containerd connection ran out of stream IDs") from exc

    async def open_channel(self, socket_path: str, config: Configuration | None = None) -> Channel:
        async def create() -> Channel:
            # Channel reconnects on the next call after its connection drops,
            # which is what lets the client survive a containerd restart.
            return Channel(path=socket_path, config=config)

        return await self.call(create)

    async def close_channel(self, channel: Channel) -> None:
        async def close() -> None:
            channel.close()
            await asyncio.sleep(0)

        with trio.move_on_after(CLOSE_GRACE, shield=True):
            await self.call(close)


@asynccontextmanager
async def open_bridge() -> AsyncIterator[AioBridge]:
    # open_loop runs nurseries, which would wrap anything the body raises in an
    # ExceptionGroup; carry the body's own exception out unwrapped instead.
    body_error: BaseException | None = None
    async with trio_asyncio.open_loop() as loop:
        try:
            yield AioBridge(loop)
        except BaseException as exc:
            body_error = exc
    if body_error is not None:
        raise body_error
