"""Shared fixtures: the built-in endpoint, running for real on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hostile import Handler, HostileServer

from batchq.mockserver.live import MockOptions, MockServer

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
def hostile() -> Iterator[Callable[..., HostileServer]]:
    """Start misbehaving endpoints: `hostile(handler, gauges=None) -> HostileServer` (gauges:
    what /metrics answers, else 404), stopped at the end."""
    with contextlib.ExitStack() as servers:

        def start(handler: Handler, gauges: Handler | None = None) -> HostileServer:
            server = HostileServer(handler, gauges)
            servers.callback(server.close)
            return server

        yield start


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1 and a free port, in memory only; with
    ``password``, it asks every client for it (``--requirepass``)."""

    def __init__(self, password: str | None = None) -> None:
        self.password = password
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port: int = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.mkdtemp(prefix="batchq-redis-")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                *(["--requirepass", self.password] if self.password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn,
            ):
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
            assert self.process.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """One command in RESP, its raw answer (enough for FLUSHALL and KEYS)."""
        parts = [_resp("AUTH", self.password)] if self.password else []
        parts.append(_resp(*args))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            conn.sendall(b"".join(parts))
            time.sleep(0.05)
            answer = conn.recv(1 << 16)
        return answer.removeprefix(b"+OK\r\n") if self.password else answer

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def _resp(*args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        parts.append(f"${len(arg.encode())}\r\n{arg}\r\n".encode())
    return b"".join(parts)


@pytest.fixture(scope="session")
def redis_session() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        reason = (
            "REDIS TESTS SKIPPED: redis-server is not installed "
            "(make redis-server installs it as root; apt-get install redis-server)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason.replace("SKIPPED", "CANNOT RUN ON CI"), pytrace=False)
        pytest.skip(reason)
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> RedisServer:
    """The session's Redis, running and empty (a test may have killed it)."""
    if redis_session.process is None or redis_session.process.poll() is not None:
        redis_session.start()
    redis_session.command("FLUSHALL")
    return redis_session


REDIS_PASSWORD = "hunter2-redis-Zq8"


@pytest.fixture
def redis_with_password(redis_session: RedisServer) -> Iterator[RedisServer]:
    """A Redis of its own that asks for ``REDIS_PASSWORD`` (skipped as the others are)."""
    server = RedisServer(password=REDIS_PASSWORD)
    try:
        yield server
    finally:
        server.close()
