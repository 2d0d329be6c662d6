"""The one place asyncio lives in spegeld.

grpclib, the gRPC library that speaks containerd's API, is asyncio-only, and
anyio's trio backend cannot run it. trio-asyncio runs an asyncio loop on top
of trio, so each grpclib call becomes a trio-native awaitable here. Everything
outside this module is trio; ruff bans ``asyncio`` imports elsewhere (TID251).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio
from grpclib.client import Channel

T = TypeVar("T")

CLOSE_GRACE = 2.0  # seconds to close the HTTP/2 connection when shutting down


class AioBridge:
    """Runs asyncio coroutines and async iterators from trio, on one trio-asyncio loop."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        async def run() -> T:
            return await fn(*args, **kwargs)

        result: T = await self._loop.run_aio_coroutine(run())
        return result

    async def iterate_unary_stream(
        self, method: Any, request: Any, *, metadata: dict[str, str]
    ) -> AsyncIterator[Any]:
        """Yield the replies of a server-streaming grpclib method, one at a time.

        The stream is closed on the asyncio side however the caller stops: at
        the end, on an error, on ``break`` or on cancellation.
        """

        async def replies() -> AsyncGenerator[Any, None]:
            async with method.open(metadata=metadata) as stream:
                await stream.send_message(request, end=True)
                async for reply in stream:
                    yield reply

        source = replies()
        try:
            async for reply in trio_asyncio.aio_as_trio(source, loop=self._loop):
                yield reply
        finally:
            with trio.move_on_after(CLOSE_GRACE, shield=True):
                await self._loop.run_aio_coroutine(source.aclose())

    async def open_channel(self, socket_path: str) -> Channel:
        async def create() -> Channel:
            # Channel reconnects on the next call after its connection drops,
            # which is what lets the client survive a containerd restart.
            return Channel(path=socket_path)

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
