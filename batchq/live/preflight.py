"""Ask the endpoint, before anything is paid for, which lines it would refuse.

No completion is called. The endpoint is asked what it tells for free:

- ``GET /v1/models``: the models it serves; vLLM adds each one's
  ``max_model_len``, llama.cpp marks its models ``owned_by: llamacpp`` and
  tells its context in ``GET /props`` (``default_generation_settings.n_ctx``);
- its tokenizer, where it has one: vLLM's ``POST /tokenize`` takes the
  request's ``prompt`` or chat ``messages`` (chat template applied, as a
  completion counts them); llama.cpp's takes ``content``, after
  ``POST /apply-template`` has made chat messages into its prompt. Lines
  that cannot be counted so are estimated as ``--tpm`` estimates them;
- which endpoint paths it serves: ``POST {}`` to each path the file uses.
  An empty body is refused by every server before any work (400 or 422, no
  model, no messages) where the path is served, and answered 404, 405 or
  501 where it is not; nothing can be generated, nothing billed.

Lines are read and judged in input order, a chunk at a time, with at most
``TOKENIZE_CONCURRENCY`` tokenizer calls in flight: a tokenizer shares the
server's CPU with the completions it serves for others.

The first question is the strict one: an endpoint that cannot be reached,
refuses the key, or answers something other than JSON (a web page, a proxy's
error) stops the check with one line (``FatalEndpointError``, exit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
import orjson
from yarl import URL

from batchq import __version__
from batchq.config import JSONObject, strip_secrets, with_path
from batchq.errors import FatalEndpointError, InputError, StorageError
from batchq.live.transport import authorization
from batchq.reader import RequestTemplate, parse_line, prompt_tokens, without_bom
from batchq.records import Request, hidden, scrubbers
from batchq.show.preflight import (
    LLAMA_CPP,
    OTHER,
    VLLM,
    EndpointFacts,
    Preflight,
    judge,
    schema_of,
)

TOKENIZE_CONCURRENCY = 16
CHUNK = 256  # lines judged together; their tokenizer calls overlap
PROGRESS_EVERY = 2.0  # seconds between progress lines
ASK_TIMEOUT = 60.0  # seconds for one question; none of them computes a completion
NOT_SERVED = frozenset({404, 405, 501})
MAX_ANSWER = 32 << 20  # bytes of one answer read at most: memory stays bounded


async def check_endpoint(
    path: Path,
    template: RequestTemplate,
    *,
    base_url: str,
    api_key: str | None,
    key_env: str,
    urls: Iterable[str],
    connect_timeout: float = 30.0,
    split_out: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> Preflight:
    """Judge every line of ``path`` against what the endpoint at ``base_url`` tells.

    Args:
        urls: the endpoint paths the file's requests go to, each probed once.
        key_env: the name of the key's variable, for the message if the key is refused.
        split_out: where to write every line that would fail (bad lines too), as written,
            a bare line given the ``custom_id`` it had (``line-N``) so its result maps back.
        progress: called with a line of progress every ``PROGRESS_EVERY`` seconds.

    Raises:
        FatalEndpointError: the endpoint cannot be reached, refuses the key, or is no API.
        StorageError: ``split_out`` cannot be written.
    """
    async with Endpoint(base_url, api_key, connect_timeout=connect_timeout) as endpoint:
        facts = await endpoint.learn(sorted(set(urls)), key_env)
        report = Preflight(facts)
        with _split_file(split_out) as out:
            if split_out is not None:
                report.split_out = str(split_out)
            await _check_lines(path, template, endpoint, report, out, progress)
    return report


class Endpoint:
    """One session asking one endpoint; every question bounded by ``ASK_TIMEOUT``."""

    def __init__(self, base_url: str, api_key: str | None, *, connect_timeout: float) -> None:
        self.base = base_url.rstrip("/")
        path, query, credential = self.base.partition("?")  # a ?api-key= stays at the end
        self.root = path.rstrip("/").removesuffix("/v1") + query + credential  # /tokenize, /props
        self.shown = strip_secrets(self.base, mask="***")[0]
        self._headers = {"User-Agent": f"batchq/{__version__}"}
        self._headers.update(authorization(self.base, api_key))
        self._timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT, connect=connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(TOKENIZE_CONCURRENCY)
        self.server = OTHER
        self.tokenizer = False

    async def __aenter__(self) -> Endpoint:
        connector = aiohttp.TCPConnector(limit=TOKENIZE_CONCURRENCY)
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
        if self._session is not None:
            await self._session.close()

    async def ask(self, method: str, url: str, body: Any = None) -> tuple[int, str, Any]:
        """Status, content type and the JSON answer (``None``: not JSON, or past
        ``MAX_ANSWER``); redirects are not followed.

        Raises FatalEndpointError when no answer comes at all.
        """
        assert self._session is not None, "use Endpoint as an async context manager"
        data = None if body is None else orjson.dumps(body)
        headers = None if body is None else {"Content-Type": "application/json"}
        try:
            async with self._session.request(
                method, url, data=data, headers=headers, allow_redirects=False
            ) as resp:
                raw = await _bounded(resp)
                kind = resp.content_type
        except TimeoutError as exc:
            raise FatalEndpointError(
                f"{self.shown} did not answer within {ASK_TIMEOUT:.0f} s"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            reason = hidden(_reason(exc), scrubbers(*strip_secrets(self.base)[1]))
            raise FatalEndpointError(
                f"cannot reach {self.shown} ({reason}): is the server running, "
                "and --base-url right?"
            ) from exc
        try:
            return resp.status, kind, None if raw is None else orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, kind, None

    async def learn(self, urls: list[str], key_env: str) -> EndpointFacts:
        """What the endpoint tells of itself: models, context, tokenizer, paths served."""
        models, context = await self._models(key_env)
        if self.server == LLAMA_CPP:
            models = None  # llama.cpp answers with its one model whatever the name
            context = await self._llama_context()
        found = await self._tokenizer_context()
        if found and not context:
            context = {"": found}
        unserved = {}
        for url in urls:
            path = url.removeprefix("/v1")
            status, _, answer = await self.ask("POST", with_path(self.base, path), {})
            _check_key(status, with_path(self.shown, path), key_env)
            # Some servers (Ollama) answer a missing model 404: that path is served.
            about_model = status == 404 and "model" in str(answer).lower()
            if status in NOT_SERVED and not about_model:
                unserved[url] = status
        return EndpointFacts(
            url=self.shown,
            server=self.server,
            models=models,
            context=context,
            tokenizer=self.tokenizer,
            unserved=unserved,
            strict_schemas=_is_openai(self.base),
        )

    async def _models(self, key_env: str) -> tuple[frozenset[str] | None, dict[str, int]]:
        status, kind, answer = await self.ask("GET", with_path(self.base, "/models"))
        where = with_path(self.shown, "/models")
        _check_key(status, where, key_env)
        if 300 <= status < 400:
            raise FatalEndpointError(f"{where} answered a redirect {status}: fix --base-url")
        if answer is None and not (status == 404 and kind != "text/html"):
            # A web page, a proxy's error, or no answer we could read: not an API at all.
            # A plain 404 is an API without a list of models (the rest can still be asked).
            raise FatalEndpointError(
                f"{where} answered {status} with {kind or 'no type'}, not JSON: "
                "is --base-url the API's address (ending in /v1)?"
            )
        data = answer.get("data") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(data, list):
            return None, {}  # no list to check against; the rest still can be
        entries = [entry for entry in data if isinstance(entry, dict)]
        ids = frozenset(str(e["id"]) for e in entries if isinstance(e.get("id"), str))
        context = {
            str(e["id"]): length
            for e in entries
            if (length := _length(e.get("max_model_len"))) is not None and e.get("id") in ids
        }
        if context:
            self.server = VLLM
        elif any(e.get("owned_by") == "llamacpp" for e in entries):
            self.server = LLAMA_CPP
        return ids, context

    async def _llama_context(self) -> dict[str, int]:
        status, _, answer = await self.ask("GET", with_path(self.root, "/props"))
        settings = answer.get("default_generation_settings") if isinstance(answer, dict) else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None  # one slot's
        return {"": n_ctx} if status == 200 and (n_ctx := _length(n_ctx)) is not None else {}

    async def _tokenizer_context(self) -> int | None:
        """Find the tokenizer; the context length vLLM's reports, if any."""
        probe = {"content": "batchq"} if self.server == LLAMA_CPP else {"prompt": "batchq"}
        status, _, answer = await self.ask("POST", with_path(self.root, "/tokenize"), probe)
        if status != 200 or not isinstance(answer, dict):
            return None
        if self.server == LLAMA_CPP:
            self.tokenizer = isinstance(answer.get("tokens"), list)
            return None
        self.tokenizer = isinstance(answer.get("count"), int)
        if self.tokenizer:
            self.server = VLLM  # its /tokenize, behind a proxy whose model list says less
        return _length(answer.get("max_model_len")) if self.tokenizer else None

    async def count(self, url: str, body: JSONObject, unserved: Iterable[str]) -> list[int] | None:
        """The prompt tokens of each sequence in ``body``, as the endpoint counts them."""
        if not self.tokenizer or url in unserved:
            return None
        async with self._slots:
            try:
                if self.server == LLAMA_CPP:
                    return await self._count_llama(url, body)
                return await self._count_vllm(url, body)
            except FatalEndpointError:
                return None  # the estimate stands in; the endpoint was there a moment ago

    async def _count_vllm(self, url: str, body: JSONObject) -> list[int] | None:
        model = {"model": body["model"]} if isinstance(body.get("model"), str) else {}
        messages = _messages(url, body)
        if messages is not None:
            extra = {"tools": body["tools"]} if body.get("tools") else {}
            asks = [{**model, "messages": messages, **extra}]
        else:
            texts = _texts(url, body)
            if texts is None:
                return None
            asks = [{**model, "prompt": text} for text in texts]
        counts = []
        for ask in asks:
            status, _, answer = await self.ask("POST", with_path(self.root, "/tokenize"), ask)
            count = answer.get("count") if isinstance(answer, dict) else None
            if status != 200 or not isinstance(count, int):
                return None
            counts.append(count)
        return counts

    async def _count_llama(self, url: str, body: JSONObject) -> list[int] | None:
        messages = _messages(url, body)
        texts: list[str] | None
        if messages is not None:
            status, _, answer = await self.ask(
                "POST", with_path(self.root, "/apply-template"), {"messages": messages}
            )
            prompt = answer.get("prompt") if isinstance(answer, dict) else None
            texts = [prompt] if status == 200 and isinstance(prompt, str) else None
        else:
            texts = _texts(url, body)
        if texts is None:
            return None
        counts = []
        for text in texts:
            ask = {"content": text, "add_special": True}  # as the server tokenizes a prompt
            status, _, answer = await self.ask("POST", with_path(self.root, "/tokenize"), ask)
            tokens = answer.get("tokens") if isinstance(answer, dict) else None
            if status != 200 or not isinstance(tokens, list):
                return None
            counts.append(len(tokens))
        return counts


async def _bounded(resp: aiohttp.ClientResponse) -> bytes | None:
    """The answer, or None past ``MAX_ANSWER`` bytes (no list of models is that long)."""
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_ANSWER:
            resp.close()
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _check_key(status: int, where: str, key_env: str) -> None:
    if status in (401, 403):
        raise FatalEndpointError(
            f"{where} answered {status}: the API key was refused; set ${key_env} "
            "(or --api-key-env) to a key this endpoint takes"
        )


def _is_openai(base_url: str) -> bool:
    """OpenAI's own API, or Azure's: strict JSON schemas must fit their documented subset."""
    host = URL(base_url).host or ""
    return host == "api.openai.com" or host.endswith(".openai.azure.com")


def _reason(exc: BaseException) -> str:
    """Why no answer came, in words: "Connection refused", not aiohttp's repr."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
        return os.strerror(cause.errno)  # asyncio's strerror is "Connect call failed (...)"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror  # a name lookup's: "Name or service not known"
    return str(cause) or type(cause).__name__


def _messages(url: str, body: JSONObject) -> list[Any] | None:
    """The chat messages a request's prompt is made of, or None for a plain-text prompt."""
    if url == "/v1/chat/completions":
        messages = body.get("messages")
        return messages if isinstance(messages, list) else None
    if url != "/v1/responses":
        return None
    given = body.get("input")
    turns = [{"role": "user", "content": given}] if isinstance(given, str) else given
    if not isinstance(turns, list):
        return None
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        return [{"role": "system", "content": instructions}, *turns]
    return turns


def _texts(url: str, body: JSONObject) -> list[str] | None:
    """The plain-text prompts of a completions or embeddings request (each its own sequence)."""
    given = body.get("prompt" if url == "/v1/completions" else "input")
    if isinstance(given, str):
        return [given]
    if isinstance(given, list) and given and all(isinstance(text, str) for text in given):
        return given
    return None  # token arrays and the like: estimated


@contextlib.contextmanager
def _split_file(path: Path | None) -> Iterator[IO[bytes] | None]:
    if path is None:
        yield None
        return
    try:
        with path.open("wb") as out:
            yield out
    except OSError as exc:
        raise StorageError.from_os("write", path, exc) from exc


async def _check_lines(
    path: Path,
    template: RequestTemplate,
    endpoint: Endpoint,
    report: Preflight,
    out: IO[bytes] | None,
    progress: Callable[[str], None] | None,
) -> None:
    last = time.monotonic()
    for chunk, done in _chunks(path):
        await _check_chunk(chunk, template, endpoint, report, out)
        if progress is not None and time.monotonic() - last >= PROGRESS_EVERY:
            last = time.monotonic()
            progress(f"checked {chunk[-1][0]:,} lines ({done:.0%})")


def _chunks(path: Path) -> Iterator[tuple[list[tuple[int, bytes]], float]]:
    """The file's non-blank lines, numbered, ``CHUNK`` at a time; and the part read so far."""
    chunk: list[tuple[int, bytes]] = []
    try:
        size = max(1, path.stat().st_size)
        read = 0
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, start=1):
                read += len(raw)
                line = without_bom(raw, line_no)
                if line.strip():
                    chunk.append((line_no, line))
                if len(chunk) == CHUNK:
                    yield chunk, read / size
                    chunk = []
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if chunk:
        yield chunk, 1.0


async def _check_chunk(
    chunk: list[tuple[int, bytes]],
    template: RequestTemplate,
    endpoint: Endpoint,
    report: Preflight,
    out: IO[bytes] | None,
) -> None:
    parsed = [(raw, parse_line(raw, line_no, template)) for line_no, raw in chunk]
    requests = [(req, orjson.loads(req.body)) for _, req in parsed if isinstance(req, Request)]
    unserved = report.facts.unserved
    async with asyncio.TaskGroup() as group:
        counting = [
            group.create_task(endpoint.count(req.url, body, unserved)) for req, body in requests
        ]
    counts = iter(zip(requests, counting, strict=True))
    for raw, request in parsed:
        if not isinstance(request, Request):
            _split(out, report, raw, None)  # a bad line fails too; validate lists it already
            continue
        (_, body), task = next(counts)
        counted = task.result()
        report.checked += 1
        asked = schema_of(body)
        report.schemas += asked is not None and not (report.facts.strict_schemas and asked[1])
        if counted is None:
            report.prompt_tokens += prompt_tokens(body)
            longest = prompt_tokens(body)
        else:
            report.counted += 1
            report.prompt_tokens += sum(counted)
            longest = max(counted)
        problems = judge(report.facts, request.url, body, longest)
        report.add(request.line_no, request.custom_id, problems)
        if problems:
            _split(out, report, raw, request.custom_id)


def _split(out: IO[bytes] | None, report: Preflight, raw: bytes, custom_id: str | None) -> None:
    """Write a line that would fail, keeping the ``custom_id`` it has in this file."""
    if out is None:
        return
    line = raw.rstrip(b"\r\n")
    if custom_id is not None:
        obj = orjson.loads(line)
        if "custom_id" not in obj:
            line = orjson.dumps({"custom_id": custom_id, **obj})
    try:
        out.write(line + b"\n")
    except OSError as exc:
        raise StorageError.from_os("write", Path(report.split_out or "?"), exc) from exc
    report.split_lines += 1


def _length(value: object) -> int | None:
    """A context length as a server states it: a positive integer (JSON's ``true`` is none)."""
    return value if type(value) is int and value > 0 else None
