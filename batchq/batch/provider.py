"""The provider's Files and Batches API over HTTP: the batch executor's only client.

OpenAI and DashScope's compatible mode serve the same routes under the
job's base URL (``/files``, ``/batches``). Every call but one is safe to
repeat, and is repeated on a dropped connection, a 429 or a 5xx with
exponential backoff. The exception is ``create``: the providers take no
idempotency key, so a create whose answer is lost may still have made a
batch, which would be billed twice if created again. ``create`` therefore
tries once and raises ``Uncertain`` when it cannot tell; the executor looks
for the batch before it tries again.

A secret never leaves here in a message: the API key is scrubbed from every
excerpt of an answer.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import orjson

from batchq import __version__
from batchq.config import strip_secrets, with_path
from batchq.errors import FatalEndpointError, StorageError
from batchq.records import hidden, scrubbers

JSONObject = dict[str, Any]
T = TypeVar("T")
CHUNK = 1 << 16
MAX_PAGES = 100  # of the batch list (100 a page) searched for a batch whose create was lost


class Uncertain(Exception):
    """A create whose answer was lost: the batch may or may not exist."""


class ProviderError(FatalEndpointError):
    """The provider refused a Files or Batches call for good (exit 3)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Provider:
    """One ``ClientSession`` to the provider for the whole run."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float,
        connect_timeout: float,
        attempts: int = 8,
        backoff: float = 1.0,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"User-Agent": f"batchq/{__version__}"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # aiohttp's errors name the URL: a credential in its query, too
        self._scrubbers = scrubbers(api_key, *strip_secrets(base_url)[1])
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=connect_timeout)
        self._attempts = attempts
        self._backoff = backoff
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Provider:
        self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def upload(self, path: Path, filename: str) -> JSONObject:
        """Upload a batch input file, streamed from disk; its file object (``id``, ``bytes``)."""

        async def once() -> JSONObject:
            try:
                f = path.open("rb")
            except OSError as exc:
                raise StorageError.from_os("open", path, exc) from None
            with f:
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", f, filename=filename, content_type="application/jsonl")
                return await self._json_once("POST", "/files", data=form)

        return _with_id(await self._retrying("POST /files", once), "POST /files")

    async def create(
        self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]
    ) -> JSONObject:
        """Create a batch, trying once. Raises ``Uncertain`` if the answer is lost."""
        body = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": metadata,
        }
        try:
            answer = await self._json_once("POST", "/batches", json=body)
        except _Retryable as exc:
            raise Uncertain(str(exc)) from None
        return _with_id(answer, "POST /batches")

    async def retrieve(self, batch_id: str) -> JSONObject:
        return await self._json("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> JSONObject:
        """Ask for a batch to stop; repeating it is harmless (a cancelled batch stays so)."""
        return await self._json("POST", f"/batches/{batch_id}/cancel")

    async def batches(self) -> AsyncIterator[JSONObject]:
        """Every batch of the account, newest first, page by page (at most ``MAX_PAGES``:
        a provider that ignores ``after`` must not keep a run paging forever)."""
        after: str | None = None
        for _ in range(MAX_PAGES):
            query = {"limit": "100"} | ({"after": after} if after else {})
            page = await self._json("GET", "/batches", params=query)
            data = page.get("data")
            batches = [b for b in data if isinstance(b, dict)] if isinstance(data, list) else []
            for batch in batches:
                yield batch
            last = page.get("last_id") or (batches[-1].get("id") if batches else None)
            if not page.get("has_more") or not isinstance(last, str) or last == after:
                return
            after = last

    async def file(self, file_id: str) -> JSONObject:
        return await self._json("GET", f"/files/{file_id}")

    async def download(self, file_id: str, target: Path, size: int | None) -> None:
        """Save a file's content to ``target``; a short download is fetched again, whole."""
        await self._retrying(
            f"GET /files/{file_id}/content", lambda: self._download_once(file_id, target, size)
        )

    async def _download_once(self, file_id: str, target: Path, size: int | None) -> None:
        session = self._open()
        try:
            async with session.get(with_path(self._base, f"/files/{file_id}/content")) as response:
                if response.status == 429 or response.status >= 500:
                    raise _Retryable(
                        f"HTTP {response.status}", _retry_after(response.headers.get("Retry-After"))
                    )
                if response.status != 200:
                    self._refuse(
                        "GET", f"/files/{file_id}/content", response, await response.read()
                    )
                # Content-Length counts the bytes sent: compressed, they say nothing of the file.
                sent = None if response.headers.get("Content-Encoding") else response.content_length
                expected = sent if size is None else size
                written = 0
                try:
                    with target.open("wb") as f:
                        async for block in response.content.iter_chunked(CHUNK):
                            f.write(block)
                            written += len(block)
                except OSError as exc:
                    raise StorageError.from_os("write", target, exc) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(_describe(exc)) from None
        if expected is not None and written != expected:
            raise _Retryable(f"got {written:,} of {expected:,} bytes")

    async def _json(self, method: str, path: str, **kwargs: Any) -> JSONObject:
        return await self._retrying(
            f"{method} {path}", lambda: self._json_once(method, path, **kwargs)
        )

    async def _retrying(self, what: str, once: Callable[[], Awaitable[T]]) -> T:
        """``once()`` until it answers, backing off after each retryable failure."""
        for attempt in range(1, self._attempts + 1):
            try:
                return await once()
            except _Retryable as exc:
                if attempt == self._attempts:
                    message = f"{what} failed {attempt} times: {exc}"
                    raise ProviderError(hidden(message, self._scrubbers)) from None
                await self._wait(attempt, exc.retry_after)
        raise AssertionError("unreachable")

    async def _json_once(self, method: str, path: str, **kwargs: Any) -> JSONObject:
        session = self._open()
        try:
            async with session.request(method, with_path(self._base, path), **kwargs) as response:
                body = await response.read()
                if response.status == 429 or response.status >= 500:
                    raise _Retryable(
                        f"HTTP {response.status}", _retry_after(response.headers.get("Retry-After"))
                    )
                if not 200 <= response.status < 300:
                    self._refuse(method, path, response, body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retryable(_describe(exc)) from None
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise _Retryable(f"HTTP {response.status} that is not a JSON object")
        return answer

    def _refuse(self, method: str, path: str, response: Any, body: bytes) -> None:
        """A 4xx (other than 429): the call is refused for good; say what the provider said."""
        message = body[:300].decode("utf-8", "replace")
        try:
            error = orjson.loads(body).get("error")
            message = str(error.get("message") or message) if isinstance(error, dict) else message
        except (orjson.JSONDecodeError, AttributeError):
            pass
        message = hidden(message, self._scrubbers)
        raise ProviderError(
            f"the provider refused {method} {path} (HTTP {response.status}): {message}",
            response.status,
        )

    async def _wait(self, attempt: int, retry_after: float | None) -> None:
        delay = min(30.0, self._backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
        await asyncio.sleep(min(retry_after, 60.0) if retry_after is not None else delay)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Provider used outside 'async with'")
        return self._session


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _with_id(answer: JSONObject, what: str) -> JSONObject:
    """The answer of a call that makes something, which must say the new thing's id."""
    if not isinstance(answer.get("id"), str) or not answer["id"]:
        raise ProviderError(f"{what} answered without the id of what it made")
    return answer


def _retry_after(value: str | None) -> float | None:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"[:200]
