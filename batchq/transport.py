"""The only module that imports aiohttp: sends one request body, returns the answer.

Everything else talks to the small ``Transport`` protocol, so the runner does
not care whether the endpoint is OpenAI, a local vLLM or the built-in one.
aiohttp's exceptions are translated here, in one place, into batchq's:
a failure to connect at all is ``EndpointUnreachable``, one after
connecting is ``TransportError``, no full answer in time ``RequestTimeout``.

The base URL is taken as the OpenAI SDKs take it, ending in ``/v1`` (or
DashScope's ``.../compatible-mode/v1``); an endpoint path such as
``/v1/chat/completions`` is appended without its ``/v1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from types import TracebackType
from typing import Protocol

import aiohttp
from yarl import URL

from batchq.config import ENDPOINTS
from batchq.errors import EndpointUnreachable, RequestTimeout, TransportError


@dataclass(slots=True)
class Response:
    """An answer from the endpoint, any status."""

    status: int
    headers: Mapping[str, str]  # case-insensitive
    body: bytes
    request_id: str | None


class Transport(Protocol):
    """Sends one request body to an endpoint path."""

    async def send(self, path: str, body: bytes) -> Response: ...


class AiohttpTransport:
    """One keep-alive ``ClientSession`` for the whole run, sized to the worker pool."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        concurrency: int,
        timeout: float,
        connect_timeout: float,
    ) -> None:
        base = base_url.rstrip("/")
        # Built once: per request there is nothing left to parse or format.
        self._urls = {path: URL(base + path.removeprefix("/v1")) for path in ENDPOINTS}
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"batchq/{version('batchq')}",
        }
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AiohttpTransport:
        connector = aiohttp.TCPConnector(limit=self._concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, path: str, body: bytes) -> Response:
        assert self._session is not None, "use AiohttpTransport as an async context manager"
        try:
            async with self._session.post(self._urls[path], data=body) as resp:
                data = await resp.read()
                return Response(resp.status, resp.headers, data, resp.headers.get("x-request-id"))
        except aiohttp.ConnectionTimeoutError as exc:
            raise EndpointUnreachable(f"no connection within the connect timeout ({exc})") from exc
        except TimeoutError as exc:
            raise RequestTimeout("no full answer within the request timeout") from exc
        except aiohttp.ClientConnectorError as exc:
            raise EndpointUnreachable(f"cannot connect to {exc.host}:{exc.port}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"connection failed: {type(exc).__name__}: {exc}") from exc
