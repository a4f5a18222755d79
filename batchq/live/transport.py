"""The run's client: sends one request body, returns the answer.

Everything else talks to the small ``Transport`` protocol, so the runner does
not care whether the endpoint is OpenAI, a local vLLM or the built-in one.
aiohttp's exceptions are translated here, in one place, into batchq's:
a failure to connect at all is ``EndpointUnreachable``, one after
connecting is ``TransportError``, no full answer in time ``RequestTimeout``.

The base URL is taken as the OpenAI SDKs take it, ending in ``/v1`` (or
DashScope's ``.../compatible-mode/v1``); an endpoint path such as
``/v1/chat/completions`` is appended without its ``/v1``.

An answer is trusted only as far as it makes sense. Redirects are followed
by hand: 307 and 308 (which keep the method and body) to the same host, at
most a few times; a 301, 302 or 303 would turn the POST into a GET without a
body, and a redirect to another host would hand it the API key, so those
fail, naming where they pointed. A body is read in chunks and abandoned past
``max_response_bytes``, counted after decompression, which aiohttp does in
bounded steps: memory stays bounded whatever the endpoint sends. (An
uncompressed body of a small stated length, the usual answer, is read at once:
aiohttp reads no more than the length stated.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from batchq import __version__
from batchq.config import ENDPOINTS, strip_secrets, with_path
from batchq.errors import (
    ConfigError,
    EndpointUnreachable,
    Redirected,
    RequestTimeout,
    ResponseTooLarge,
    TransportError,
)
from batchq.records import hidden, key_scrubber, scrubbers

MAX_REDIRECTS = 5
CHUNK = 1 << 16
#: Answers up to this size are read side by side; a larger one first takes one of
#: BIG_READERS permits, so that memory does not grow as --concurrency × --max-response-bytes.
SMALL_ANSWER = 1 << 20
BIG_READERS = 2


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


def authorization(base_url: str, api_key: str | None) -> dict[str, str]:
    """The header that carries ``api_key`` to ``base_url`` (none without a key).

    Raises ConfigError when the URL holds a user and password too: aiohttp would send
    them as the one Authorization header, and refuses the key's beside them.
    """
    if not api_key:
        return {}
    url = URL(base_url)
    if url.user is not None or url.password is not None:
        raise ConfigError(
            "--base-url has a user and password in it and an API key is set too, and a "
            "request carries only one of them: take the user:password out of --base-url, "
            "or unset the key's variable (--api-key-env)"
        )
    return {"Authorization": f"Bearer {api_key}"}


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
        max_response_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        base = base_url.rstrip("/")
        # Built once: per request there is nothing left to parse or format.
        self._urls = {path: URL(with_path(base, path.removeprefix("/v1"))) for path in ENDPOINTS}
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"batchq/{__version__}",
        }
        self._headers.update(authorization(base, api_key))
        # What an endpoint echoes of the key is removed as it arrives, before any excerpt of
        # an answer could cut the key in two and leave half of it unrecognisable.
        self._scrubber = key_scrubber(api_key)
        self._url_secrets = scrubbers(*strip_secrets(base)[1])  # aiohttp's errors name the URL
        self._concurrency = concurrency
        self._max_bytes = max_response_bytes
        self._big_readers = asyncio.Semaphore(BIG_READERS)
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
        url = self._urls[path]
        try:
            for _ in range(MAX_REDIRECTS + 1):
                async with self._session.post(url, data=body, allow_redirects=False) as resp:
                    headers = self._clean_headers(resp.headers)
                    request_id = headers.get("x-request-id")
                    if resp.status in (307, 308):
                        url = _follow(url, resp.status, headers.get("Location"), request_id)
                        continue
                    if resp.status in (301, 302, 303):
                        where = headers.get("Location", "nowhere")
                        raise Redirected(
                            f"HTTP {resp.status}: the endpoint redirects to {where[:200]}, which "
                            "would turn the POST into a GET; set --base-url to where it points",
                            status=resp.status,
                            request_id=request_id,
                        )
                    data = await self._read(resp, request_id)
                    if self._scrubber is not None:
                        data = self._scrubber.raw(data)
                    return Response(resp.status, headers, data, request_id)
            raise Redirected(
                self._said(f"more than {MAX_REDIRECTS} redirects in a row, the last to {url}"),
                status=resp.status,
            )
        except aiohttp.ConnectionTimeoutError as exc:
            said = self._said(f"no connection within the connect timeout ({exc})")
            raise EndpointUnreachable(said) from exc
        except TimeoutError as exc:
            raise RequestTimeout("no full answer within the request timeout") from exc
        except aiohttp.ClientConnectorError as exc:
            raise EndpointUnreachable(f"cannot connect to {exc.host}:{exc.port}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            said = self._said(f"connection failed: {type(exc).__name__}: {exc}")
            raise TransportError(said) from exc

    def _said(self, message: str) -> str:
        return hidden(message, self._url_secrets)

    def _clean_headers(self, headers: CIMultiDictProxy[str]) -> Mapping[str, str]:
        scrubber = self._scrubber
        if scrubber is None or not any(scrubber.key in value for value in headers.values()):
            return headers
        return CIMultiDict((name, scrubber.text(value)) for name, value in headers.items())

    async def _read(self, resp: aiohttp.ClientResponse, request_id: str | None) -> bytes:
        """The whole body, or ResponseTooLarge as soon as it passes the bound."""
        headers = resp.headers
        declared = resp.content_length if "Content-Encoding" not in headers else None
        if declared is not None and declared > self._max_bytes:
            raise self._too_large(resp, request_id)  # said so up front: read none of it
        if declared is not None and declared <= SMALL_ANSWER and "Transfer-Encoding" not in headers:
            # The usual answer: a plain body of a small stated length, which aiohttp reads
            # exactly, so it is within both bounds already. One read instead of the loop
            # below, which cost ~3% of a request's CPU against a fast endpoint.
            return await resp.read()
        chunks = []
        size = 0
        big = False
        try:
            async for chunk in resp.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > self._max_bytes:
                    raise self._too_large(resp, request_id)
                if size > SMALL_ANSWER and not big:
                    # Meanwhile the socket is not read: the endpoint waits, not our memory.
                    await self._big_readers.acquire()
                    big = True
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            if big:
                self._big_readers.release()

    def _too_large(self, resp: aiohttp.ClientResponse, request_id: str | None) -> ResponseTooLarge:
        resp.close()  # drop the connection rather than read the rest
        return ResponseTooLarge(
            f"HTTP {resp.status}: the answer is larger than --max-response-bytes "
            f"({self._max_bytes:,} bytes after decompression); not kept",
            status=resp.status,
            request_id=request_id,
        )


def _follow(url: URL, status: int, location: str | None, request_id: str | None) -> URL:
    """Where a 307/308 points, if batchq may send the request and its key there."""
    try:
        target = url.join(URL(location)) if location else None
    except ValueError:  # not a URL at all
        target = None
    if (
        target is None
        or target.host != url.host
        or target.scheme not in ("http", "https")
        or (url.scheme, target.scheme) == ("https", "http")  # never downgrade
    ):
        raise Redirected(
            f"HTTP {status}: the endpoint redirects to {(location or 'nowhere')[:200]}; "
            "batchq sends requests and the API key only to the --base-url host; set "
            "--base-url to it if you trust it",
            status=status,
            request_id=request_id,
        )
    return target
