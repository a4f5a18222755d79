"""Shared fixtures: the built-in endpoint, running for real on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hostile import Handler, HostileServer

from batchq.mockserver import MockOptions, MockServer

T = TypeVar("T")


class RunningMock:
    """A `MockServer` on its own event loop in a background thread.

    Its own thread lets sync tests drive it too, e.g. while `batchq` runs as a subprocess.
    `stats()` and `reset()` run on the server's loop, so they never race a request.
    """

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mock-server", daemon=True
        )
        self._thread.start()
        self._server = MockServer(options)
        try:
            self._run(self._server.start())
        except BaseException:
            self._stop_loop()
            raise
        self.url: str = self._server.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _on_loop(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._run(call())

    def stats(self) -> dict[str, Any]:
        """The server's counters, as GET /_mock/stats returns them."""
        return self._on_loop(self._server.stats)

    def reset(self) -> None:
        """Zero the server's counters, directive counts and rate-limit windows."""
        self._on_loop(self._server.reset)

    def close(self) -> None:
        try:
            self._run(self._server.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


MockFactory = Callable[..., RunningMock]


@pytest.fixture
def mock_server() -> Iterator[MockFactory]:
    """Start built-in endpoints: `mock_server(**MockOptions fields) -> RunningMock`.

    `record` defaults to True so tests can inspect per-prompt arrivals; every server
    started is stopped when the test ends.
    """
    with contextlib.ExitStack() as servers:

        def start(**options: Any) -> RunningMock:
            options.setdefault("record", True)
            server = RunningMock(MockOptions(**options))
            servers.callback(server.close)
            return server

        yield start


@pytest.fixture
def hostile() -> Iterator[Callable[[Handler], HostileServer]]:
    """Start misbehaving endpoints: `hostile(handler) -> HostileServer`, stopped at the end."""
    with contextlib.ExitStack() as servers:

        def start(handler: Handler) -> HostileServer:
            server = HostileServer(handler)
            servers.callback(server.close)
            return server

        yield start
