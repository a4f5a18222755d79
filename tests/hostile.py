"""An endpoint that misbehaves as each test scripts it, on real sockets.

Real endpoints are proxies, gateways, captive portals and half-configured
servers as often as they are OpenAI. Each test gives this server a handler
that misbehaves in one way; the server runs it on 127.0.0.1, on a free port,
in its own thread (so `batchq` can run as a subprocess meanwhile), and keeps
what it received.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    body: bytes
    authorization: str | None


class HostileServer:
    """Serves ``handler`` for every path until ``close``."""

    def __init__(self, handler: Handler, gauges: Handler | None = None) -> None:
        self.seen: list[Seen] = []
        self.gauge_reads: list[Seen] = []  # GET /metrics: --concurrency auto reads the load
        self._handler = handler
        self._gauges = gauges  # what /metrics answers (None: 404, a server without gauges)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        port = self._runner.addresses[0][1]
        self.origin = f"http://127.0.0.1:{port}"
        self.url = self.origin + "/v1"

    async def _start(self) -> web.AppRunner:
        app = web.Application(client_max_size=1 << 24)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        auth = request.headers.get("Authorization")
        received = Seen(request.method, request.path, body, auth)
        if request.path == "/metrics":
            self.gauge_reads.append(received)
            if self._gauges is None:
                return web.Response(status=404)
            return await self._gauges(request, body)
        self.seen.append(received)
        return await self._handler(request, body)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def prompt_of(body: bytes) -> str:
    """The last user message of a chat request body."""
    content: str = orjson.loads(body)["messages"][-1]["content"]
    return content


def completion(text: str, headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    """A well-formed chat completion whose reply is ``text``, ``extra`` added to the body."""
    reply = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        **extra,
    }
    return web.Response(body=orjson.dumps(reply), content_type="application/json", headers=headers)


async def echo(request: web.Request, body: bytes) -> web.StreamResponse:
    """What a well-behaved endpoint answers: the prompt, echoed."""
    return completion("Echo: " + prompt_of(body))
