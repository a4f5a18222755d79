"""The provider's Files + Batches API on a virtual clock, served by `batchq mock-server`.

Two dialects share one server; the path prefix picks one, and each keeps its own files and
batches, as two provider accounts would:

* ``/v1/...``: OpenAI (platform.openai.com/docs/api-reference/batch and /files, and the
  Batch guide). Files take ``purpose=batch``, up to 200 MB and 50,000 lines; ids look like
  ``file-…`` and ``batch_…``. ``completion_window`` is ``24h`` only, and ``expires_at`` is
  ``created_at`` plus 24 h. Lines still unfinished when a batch expires go to its error file
  as ``{"response": null, "error": {"code": "batch_expired", ...}}`` (the guide's "Batch
  expiration"); a cancelled batch keeps only the lines finished before the cancel ("partial
  results ... in the output file", the cancel reference). Endpoints: chat, completions,
  embeddings and responses, the ones this server answers live.
* ``/compatible-mode/v1/...``: Alibaba Cloud Model Studio / DashScope's OpenAI-compatible
  Batch (alibabacloud.com/help/en/model-studio/batch-interfaces-compatible-with-openai).
  Only ``/v1/chat/completions`` and ``/v1/embeddings`` are batched (any other line ``url`` is
  ``url_not_found``); files go up to 500 MB and 50,000 lines; ``completion_window`` is a
  whole number of hours or days from 24h to 336h ("24h", "14d"); ids look like
  ``file-batch-…``, ``file-batch_output-…`` and ``batch_<uuid>``. What the real service
  answers, as recorded in the Cnblogs.DashScope SDK's test snapshots: ``expires_at`` is null
  in every state, the error file's id also starts ``file-batch_output-``, a batch without
  failures has ``error_file_id`` null (not ""), a cancelled batch counts its unfinished lines
  as failed and lists them in its error file, and an empty list has ``data`` null. Unfinished
  lines of an expired batch are "not executed and incur no charges": they are in no file.

In both, a batch is ``validating`` for ``batch_step_seconds`` (virtual), then either
``failed`` (its file's problems in ``errors.data``, lines numbered from 1) or
``in_progress``, one line per ``1 / batch_lines_per_second`` virtual seconds, then
``finalizing`` for another step and ``completed``. Past ``completion_window`` it is
``expired``; a cancel makes it ``cancelling`` for a step, then ``cancelled``. Lines run in a
shuffled (seeded) order, which is the output files' order: never the input's. Each line's
``response.body`` is what the live route answers for the same body (`_ENDPOINTS`), and the
live fault rates apply: a 500 or 503 drawn for a line is an error line with that status.

The virtual clock runs ``batch_time_scale`` virtual seconds per real second (86,400: a day
per second), and every state is computed from it when asked, so no task runs in the
background and a test waits for a state by polling it.

Faults for a client's tests, each a rate (fraction of the requests or batches it applies
to): lost upload, create and cancel answers (the work is done, then the connection is closed
with no answer), late failure (a valid batch fails when validation ends), expiry (a batch's
window ends halfway through its lines), truncated downloads (fewer bytes than
``Content-Length``, then the connection closes), and 429 / 5xx on every Files and Batches
route. ``batch_enqueued_tokens`` fails a batch with ``token_limit_exceeded`` when the tokens
of the unfinished batches of its model would pass it, as OpenAI's enqueued-token limit does.

The stats count files uploaded, batches created, lines billed (a 200 line of a batch that
reached its end), batches created while one of their lines was already billed or pending in
another batch (``duplicate_batches``), and ``lines_billed_twice``: a line billed by a batch
when the same custom_id and body was already billed by one, or when the same body was
answered 200 on a live route (live answers are remembered from the first upload on, or from
the start with ``record``; a live request carries no custom_id, so a job with two lines of
identical bodies sent both ways shows one).
"""

from __future__ import annotations

import hashlib
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, web

from batchq.mockserver.live import (
    _ENDPOINTS,
    _SCRIPTED_429_HEADERS,
    JSONObject,
    _BadRequest,
    _error_body,
    _Mock,
    _status_body,
)
from batchq.mockserver.structured import requested_schema

__all__ = ["BatchAPI", "VirtualClock"]

_HOUR = 3600.0
_MB = 1024 * 1024
_TERMINAL = ("completed", "failed", "expired", "cancelled")
_EXPIRED = "This request could not be executed before the completion window expired."
_CANCELLED = "This request was not executed: the batch was cancelled."
_SCRIPTED = "(scripted by the mock endpoint)"


class VirtualClock:
    """Virtual seconds since the start, running `scale` times faster than real ones.

    Kept small rather than as Unix time, so a line's finishing time is exact to far below
    its pace; `unix` turns one into the Unix time the API shows.
    """

    def __init__(self, scale: float) -> None:
        self.scale, self.epoch, self._start = scale, int(time.time()), time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._start) * self.scale

    def unix(self, moment: float) -> int:
        return self.epoch + int(moment)


def _openai_window(text: str) -> float | None:
    return 24 * _HOUR if text == "24h" else None


def _dashscope_window(text: str) -> float | None:
    match = re.fullmatch(r"([0-9]+)([hd])", text)
    if match is None:
        return None
    hours = int(match[1]) * (24 if match[2] == "d" else 1)
    return hours * _HOUR if 24 <= hours <= 336 else None


@dataclass(frozen=True, slots=True)
class _Dialect:
    name: str
    prefix: str  # where its routes live
    file_prefix: str  # ids of uploaded files ...
    output_prefix: str  # ... of output files ...
    error_prefix: str  # ... and of error files
    endpoints: frozenset[str]  # what it batches
    max_file_bytes: int
    window: Callable[[str], float | None]  # completion_window -> seconds (None: refused)
    states_expiry: bool  # expires_at set (OpenAI) or null (DashScope)
    lists_expired: bool  # unfinished lines of an expired batch go to the error file
    lists_cancelled: bool  # ... and of a cancelled one
    empty_list_data: list[Any] | None

    def batch_id(self, rng: random.Random) -> str:
        if self.name == "dashscope":
            return f"batch_{uuid.UUID(int=rng.getrandbits(128), version=4)}"
        return f"batch_{rng.getrandbits(96):024x}"


OPENAI = _Dialect(
    "openai", "/v1", "file-", "file-", "file-",
    frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}),
    200 * _MB, _openai_window, True, True, False, [],
)  # fmt: skip
DASHSCOPE = _Dialect(
    "dashscope", "/compatible-mode/v1", "file-batch-", "file-batch_output-",
    "file-batch_output-", frozenset({"/v1/chat/completions", "/v1/embeddings"}),
    500 * _MB, _dashscope_window, False, False, True, None,
)  # fmt: skip
DIALECTS = (OPENAI, DASHSCOPE)


class _Refused(Exception):
    """An API request answered with an error status and an OpenAI-shaped error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# --- Files, lines and batches ------------------------------------------------------------


@dataclass(slots=True)
class _File:
    id: str
    filename: str
    purpose: str
    created_at: int  # Unix time
    data: bytes

    def view(self) -> JSONObject:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass(frozen=True, slots=True)
class _Line:
    custom_id: str
    key: bytes  # digest of the url and the canonical body: the same request, whatever route
    status: int  # 200, or the status of the error it meets
    body: bytes  # the live route's answer to it
    tokens: int  # its charge against the enqueued-token limit


def _request_key(url: str, body: Any) -> bytes:
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(url.encode() + b"\0" + canonical, digest_size=16).digest()


@dataclass(slots=True, eq=False)
class _Batch:
    id: str
    dialect: _Dialect
    endpoint: str
    model: str  # of its first line: a batch holds one model
    input_file_id: str
    completion_window: str
    metadata: JSONObject | None
    created_at: float
    step: float  # virtual seconds validating, finalizing and cancelling take
    pace: float  # virtual seconds per line
    ends_at: float  # created_at + its completion window (earlier with the expiry fault)
    lines: list[_Line]  # in processing order, which is the output order
    errors: list[JSONObject]  # validation errors: the batch fails when validation ends
    cancelled_at: float | None = None  # when a cancel arrived
    outcome: str | None = None  # its terminal status, once reached and written
    output_file_id: str | None = None
    error_file_id: str | None = None
    done: int = 0  # lines finished at the terminal state
    epoch: int = 0  # the Unix time of the clock's start

    def _unix(self, moment: float) -> int:
        return self.epoch + int(moment)

    @property
    def validated_at(self) -> float:
        return self.created_at + self.step

    @property
    def work_ends_at(self) -> float:
        return self.validated_at + len(self.lines) * self.pace

    def finished_by(self, moment: float) -> int:
        """How many lines are finished at virtual time `moment`."""
        if moment < self.validated_at:
            return 0
        if moment >= self.work_ends_at:
            return len(self.lines)
        return min(len(self.lines), int((moment - self.validated_at) / self.pace + 1e-9))

    def status(self, now: float) -> tuple[str, float]:
        """The status at `now` and the virtual time it began."""
        if self.cancelled_at is not None:  # accepted only while validating or in progress
            gone = self.cancelled_at + self.step
            return ("cancelled", gone) if now >= gone else ("cancelling", self.cancelled_at)
        if now < self.validated_at:
            return "validating", self.created_at
        if self.errors:
            return "failed", self.validated_at
        if self.work_ends_at > self.ends_at:
            return (
                ("expired", self.ends_at)
                if now >= self.ends_at
                else ("in_progress", self.validated_at)
            )
        if now < self.work_ends_at:
            return "in_progress", self.validated_at
        completed = self.work_ends_at + self.step
        return ("completed", completed) if now >= completed else ("finalizing", self.work_ends_at)

    def finished_at_end(self) -> int:
        """Lines finished at the terminal state (cancel and expiry stop the work)."""
        if self.cancelled_at is not None:
            return self.finished_by(self.cancelled_at)
        return self.finished_by(min(self.work_ends_at, self.ends_at))

    def held(self) -> list[_Line]:
        """The lines this batch bills, or will bill unless it expires."""
        return self.lines[: self.finished_at_end()] if self.cancelled_at is not None else self.lines

    def counts(self, now: float) -> JSONObject:
        status, _ = self.status(now)
        if status in ("validating", "failed"):
            return {"total": 0, "completed": 0, "failed": 0}
        if self.outcome is not None:
            finished, listed = self.done, self._listed_leftover()
        else:
            stopped = self.cancelled_at if self.cancelled_at is not None else self.ends_at
            finished, listed = self.finished_by(min(now, stopped)), 0
        ok = sum(1 for line in self.lines[:finished] if line.status == 200)
        return {"total": len(self.lines), "completed": ok, "failed": finished - ok + listed}

    def _listed_leftover(self) -> int:
        lists = {"expired": self.dialect.lists_expired, "cancelled": self.dialect.lists_cancelled}
        return len(self.lines) - self.done if lists.get(self.outcome or "") else 0

    def view(self, now: float) -> JSONObject:
        status, since = self.status(now)
        stamps: dict[str, int | None] = dict.fromkeys(
            ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
             "cancelling_at", "cancelled_at"),
        )  # fmt: skip
        started = self.cancelled_at is None or self.cancelled_at >= self.validated_at
        if status not in ("validating", "failed") and started and self.validated_at <= now:
            stamps["in_progress_at"] = self._unix(self.validated_at)
        if status in ("finalizing", "completed"):
            stamps["finalizing_at"] = self._unix(self.work_ends_at)
        if status in ("cancelling", "cancelled") and self.cancelled_at is not None:
            stamps["cancelling_at"] = self._unix(self.cancelled_at)
        if status in _TERMINAL:
            stamps[f"{status}_at"] = self._unix(since)
        expires = self._unix(self.ends_at) if self.dialect.states_expiry else None
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self._unix(self.created_at),
            "expires_at": expires,
            **stamps,
            "request_counts": self.counts(now),
            "metadata": self.metadata,
        }


@dataclass(slots=True)
class _Account:
    """One dialect's files and batches (newest batch last)."""

    dialect: _Dialect
    files: dict[str, _File] = field(default_factory=dict)
    batches: dict[str, _Batch] = field(default_factory=dict)


@dataclass(slots=True)
class _Counters:
    files_uploaded: int = 0
    batches_created: int = 0
    duplicate_batches: int = 0
    lines_billed: int = 0
    lines_billed_twice: int = 0
    by_outcome: Counter[str] = field(default_factory=Counter)

    def view(self) -> JSONObject:
        return {
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "duplicate_batches": self.duplicate_batches,
            "lines_billed": self.lines_billed,
            "lines_billed_twice": self.lines_billed_twice,
            "by_outcome": dict(self.by_outcome),
        }


# --- Reading an input file ---------------------------------------------------------------


def _error(code: str, message: str, line: int | None, param: str | None = None) -> JSONObject:
    return {"code": code, "message": message, "param": param, "line": line}


def _read_requests(
    data: bytes, dialect: _Dialect, endpoint: str, max_lines: int
) -> tuple[list[tuple[str, str, JSONObject]], list[JSONObject]]:
    """The (custom_id, url, body) of each line, and the validation errors of the file."""
    requests: list[tuple[str, str, JSONObject]] = []
    errors: list[JSONObject] = []
    seen: set[str] = set()
    model: str | None = None
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip():
            continue
        if len(requests) + len(errors) >= max_lines:
            message = f"The input file has more than the {max_lines} requests a batch may hold."
            return requests, [*errors, _error("too_many_requests", message, number)]
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            errors.append(
                _error("invalid_json_line", "This line is not parseable as valid JSON.", number)
            )
            continue
        problem = _line_problem(line, dialect, endpoint, seen, model)
        if problem is not None:
            errors.append({**problem, "line": number})
            continue
        seen.add(line["custom_id"])
        model = model or line["body"].get("model")
        requests.append((line["custom_id"], line["url"], line["body"]))
    if not requests and not errors:
        errors.append(_error("empty_file", "The input file holds no requests.", None))
    return requests, errors


def _line_problem(
    line: Any, dialect: _Dialect, endpoint: str, seen: set[str], model: str | None
) -> JSONObject | None:
    if not isinstance(line, dict):
        return _error("invalid_request", "Each line must be a JSON object.", None)
    custom_id, url, body = line.get("custom_id"), line.get("url"), line.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return _error("invalid_request", "Missing required field 'custom_id'.", None, "custom_id")
    if line.get("method", "POST") != "POST":
        return _error("invalid_request", "The method must be POST.", None, "method")
    if not isinstance(body, dict):
        return _error("invalid_request", "Missing required field 'body'.", None, "body")
    if url not in dialect.endpoints:
        message = f"The provided url '{url}' is not supported by the Batch API."
        return _error("url_not_found", message, None, "url")
    if url != endpoint:
        message = f"The provided url '{url}' does not match the batch's endpoint '{endpoint}'."
        return _error("mismatched_endpoint", message, None, "url")
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. The custom_id"
            " parameter must be unique for each individual request in a batch."
        )
        return _error("duplicate_custom_id", message, None, "custom_id")
    if model is not None and body.get("model") != model:
        message = f"The model '{body.get('model')}' differs from the batch's model '{model}'."
        return _error("mismatched_model", message, None, "body.model")
    return None


# --- The API -----------------------------------------------------------------------------

_Handler = Callable[[web.Request, _Account], Awaitable[web.StreamResponse]]


class BatchAPI:
    """The Files + Batches routes of one mock endpoint, in both dialects."""

    def __init__(self, mock: _Mock) -> None:
        self._mock = mock
        opts = mock.options
        self.options = opts
        self.clock = VirtualClock(opts.batch_time_scale)
        self._rng = random.Random(opts.seed)  # for ids and faults, apart from the live ones
        self._ids = iter(range(1, 1 << 62))
        self.accounts = {dialect.prefix: _Account(dialect) for dialect in DIALECTS}
        self.counters = _Counters()
        self._billed: set[tuple[str, bytes]] = set()  # (custom_id, request key) billed by a batch
        self._billed_bodies: set[bytes] = set()  # request keys billed by a batch
        self._live: set[bytes] | None = set() if opts.record else None  # keys answered live

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for prefix, account in self.accounts.items():
            routes: list[tuple[str, str, _Handler]] = [
                ("POST", "/files", self._upload),
                ("GET", "/files/{file_id}", self._file),
                ("GET", "/files/{file_id}/content", self._content),
                ("DELETE", "/files/{file_id}", self._delete),
                ("POST", "/batches", self._create),
                ("GET", "/batches", self._list),
                ("GET", "/batches/{batch_id}", self._batch),
                ("POST", "/batches/{batch_id}/cancel", self._cancel),
            ]
            for method, path, handler in routes:
                router.add_route(method, prefix + path, self._route(account, handler))

    def _route(
        self, account: _Account, handler: _Handler
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            self._mock.stats.arrive(request.path, None)
            headers = {"x-request-id": f"req_{self._mock._request_id()}"}
            if not self._mock._authorized(request):
                return _json(_status_body(401), 401, headers)
            if self._happens(self.options.batch_rate_429):
                return _json(_status_body(429), 429, {**headers, **_SCRIPTED_429_HEADERS})
            if self._happens(self.options.batch_rate_5xx):
                return _json(_status_body(500), 500, headers)
            self.advance()
            try:
                return await handler(request, account)
            except _Refused as exc:
                body = _error_body(str(exc), "invalid_request_error", exc.param, exc.code)
                return _json(body, exc.status, headers)

        return route

    def _happens(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    def _token(self) -> str:
        return f"{next(self._ids):08x}{self._rng.getrandbits(64):016x}"

    # --- Files ---

    async def _upload(self, request: web.Request, account: _Account) -> web.StreamResponse:
        limit = self.options.batch_max_file_bytes or account.dialect.max_file_bytes
        purpose, filename, data = await _read_upload(request, limit)
        if purpose != "batch":
            raise _Refused(
                400, f"Invalid value for 'purpose': {purpose!r}; expected 'batch'.", "purpose"
            )
        file_id = account.dialect.file_prefix + self._token()
        file = _File(file_id, filename, purpose, self.clock.unix(self.clock.now()), data)
        account.files[file.id] = file
        self.counters.files_uploaded += 1
        if self._live is None:
            self._live = set()  # from now on, a live answer may meet a batch line
        if self._happens(self.options.batch_lost_upload_rate):
            return _drop(request)
        return _json(orjson.dumps(file.view()))

    def _stored(self, request: web.Request, account: _Account) -> _File:
        file = account.files.get(request.match_info["file_id"])
        if file is None:
            raise _Refused(404, f"No such File object: {request.match_info['file_id']}", "id")
        return file

    async def _file(self, request: web.Request, account: _Account) -> web.StreamResponse:
        return _json(orjson.dumps(self._stored(request, account).view()))

    async def _delete(self, request: web.Request, account: _Account) -> web.StreamResponse:
        file = self._stored(request, account)
        del account.files[file.id]
        return _json(orjson.dumps({"id": file.id, "object": "file", "deleted": True}))

    async def _content(self, request: web.Request, account: _Account) -> web.StreamResponse:
        data = self._stored(request, account).data
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        if data and self._happens(self.options.batch_truncated_download_rate):
            await response.write(data[: len(data) // 2])
            _drop(request)  # Content-Length promised more: the client sees the body cut
            return response
        await response.write(data)
        await response.write_eof()
        return response

    # --- Batches ---

    async def _create(self, request: web.Request, account: _Account) -> web.StreamResponse:
        wanted = await _json_body(request)
        file_id, endpoint = wanted.get("input_file_id"), wanted.get("endpoint")
        window_text, metadata = wanted.get("completion_window"), wanted.get("metadata")
        file = account.files.get(file_id) if isinstance(file_id, str) else None
        if file is None:
            raise _Refused(
                404 if isinstance(file_id, str) else 400,
                f"No such File object: {file_id}",
                "input_file_id",
            )
        if endpoint not in account.dialect.endpoints:
            raise _Refused(400, f"Invalid value for 'endpoint': {endpoint!r}.", "endpoint")
        window = account.dialect.window(window_text) if isinstance(window_text, str) else None
        if window is None or not isinstance(window_text, str):
            raise _Refused(
                400, f"Invalid value for 'completion_window': {window_text!r}.", "completion_window"
            )
        if metadata is not None and not (
            isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
        ):
            raise _Refused(400, "Invalid 'metadata': expected an object of strings.", "metadata")
        batch = self._new_batch(account, file, endpoint, window_text, window, metadata)
        account.batches[batch.id] = batch
        self.counters.batches_created += 1
        if self._happens(self.options.batch_lost_create_rate):
            return _drop(request)
        # As it was created, as a provider answers: a large file's answers take real
        # milliseconds to make, which at a day a second is past its validation already.
        return _json(orjson.dumps(batch.view(batch.created_at)))

    def _new_batch(
        self,
        account: _Account,
        file: _File,
        endpoint: str,
        window_text: str,
        window: float,
        metadata: JSONObject | None,
    ) -> _Batch:
        opts, now = self.options, self.clock.now()
        requests, errors = _read_requests(
            file.data, account.dialect, endpoint, opts.batch_max_lines
        )
        batch_id = account.dialect.batch_id(self._rng)
        lines = [] if errors else [self._answer(*request) for request in requests]
        _shuffle(lines, random.Random(f"{opts.seed}:{batch_id}"))
        pace = 1.0 / opts.batch_lines_per_second
        model = str(requests[0][2].get("model", "")) if requests else ""
        batch = _Batch(
            batch_id, account.dialect, endpoint, model, file.id, window_text, metadata, now,
            opts.batch_step_seconds, pace, now + window, lines, errors, epoch=self.clock.epoch,
        )  # fmt: skip
        if not errors:
            errors.extend(self._late_errors(batch))
        if not errors and self._happens(opts.batch_expire_rate):
            # The window closes halfway through the work, as an overloaded provider's would.
            batch.ends_at = batch.validated_at + pace * (len(lines) // 2)
        self._count_duplicate(batch)
        return batch

    def _late_errors(self, batch: _Batch) -> list[JSONObject]:
        """Errors a valid file meets when validation ends: the token limit, the fault."""
        limit = self.options.batch_enqueued_tokens
        if limit:
            others = (other for other in self._unfinished() if other.model == batch.model)
            queued = sum(line.tokens for other in others for line in other.held())
            if queued + sum(line.tokens for line in batch.lines) > limit:
                message = (
                    f"Enqueued token limit reached for {batch.model} in organization"
                    f" org-batchq-mock. Limit: {limit} enqueued tokens. Please try submitting"
                    " your batch again later."
                )
                return [_error("token_limit_exceeded", message, None)]
        if self._happens(self.options.batch_late_failure_rate):
            return [
                _error("validation_failed", f"The batch could not be validated {_SCRIPTED}.", None)
            ]
        return []

    def _unfinished(self) -> Iterator[_Batch]:
        now = self.clock.now()
        for account in self.accounts.values():
            for batch in account.batches.values():
                if batch.status(now)[0] not in _TERMINAL:
                    yield batch

    def _count_duplicate(self, batch: _Batch) -> None:
        """A batch holding a line that another batch has billed or still holds."""
        keys = {(line.custom_id, line.key) for line in batch.lines}
        if keys & self._billed or any(
            keys & {(line.custom_id, line.key) for line in other.held()}
            for other in self._unfinished()
        ):
            self.counters.duplicate_batches += 1

    def _answer(self, custom_id: str, url: str, body: JSONObject) -> _Line:
        """The live route's answer to this line, with the live faults that apply to a batch."""
        mock, endpoint, key = self._mock, _ENDPOINTS[url], _request_key(url, body)
        try:
            call = endpoint.parse(orjson.dumps(body))
        except _BadRequest as exc:
            return _Line(
                custom_id, key, 400, _error_body(str(exc), "invalid_request_error", exc.param), 0
            )
        status = 0
        if call.script is not None:  # [[mock:status=N]] and [[mock:fail=N]], counted as live
            arrival = mock._scripted[call.prompt] = mock._scripted.get(call.prompt, 0) + 1
            script = call.script
            status = script.status or (script.fail_status if arrival <= script.fail else 0)
        status = status or max(0, mock._random_fault())  # a dropped connection has no batch meaning
        if status:
            return _Line(custom_id, key, status, _status_body(status), call.budget)
        if (schema := requested_schema(call.body)) is not None:
            call = mock._structured(call, schema)  # fitting JSON, or not at the set rate
        reply, _, _ = endpoint.reply(call, mock._request_id())
        return _Line(custom_id, key, 200, orjson.dumps(reply), call.budget)

    def _find(self, request: web.Request, account: _Account) -> _Batch:
        batch = account.batches.get(request.match_info["batch_id"])
        if batch is None:
            raise _Refused(
                404, f"No batch found with id '{request.match_info['batch_id']}'.", "batch_id"
            )
        return batch

    async def _batch(self, request: web.Request, account: _Account) -> web.StreamResponse:
        return _json(orjson.dumps(self._find(request, account).view(self._now())))

    async def _cancel(self, request: web.Request, account: _Account) -> web.StreamResponse:
        batch, now = self._find(request, account), self._now()
        status, _ = batch.status(now)
        if status in ("validating", "in_progress"):
            batch.cancelled_at = now
        elif status != "cancelling":
            raise _Refused(409, f"Cannot cancel a batch with status '{status}'.", None)
        if self._happens(self.options.batch_lost_cancel_rate):
            return _drop(request)
        return _json(orjson.dumps(batch.view(now)))

    async def _list(self, request: web.Request, account: _Account) -> web.StreamResponse:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            raise _Refused(400, "Invalid 'limit': expected an integer from 1 to 100.", "limit")
        newest_first = list(reversed(account.batches.values()))
        after = request.query.get("after")
        if after is not None:
            ids = [batch.id for batch in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else []
        now = self._now()
        page = [batch.view(now) for batch in newest_first[:limit]]
        return _json(
            orjson.dumps(
                {
                    "object": "list",
                    "data": page or account.dialect.empty_list_data,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": len(newest_first) > limit,
                }
            )
        )

    # --- The clock's consequences, and billing ---

    def _now(self) -> float:
        """The virtual time a view shows, its ends written: the route's ``advance`` read the
        clock a moment before, and a batch that ended in between (a step is ~50 ms of real time
        at a scale of 100) showed "cancelled" or "completed" with no file yet."""
        now = self.clock.now()
        self.advance(now)
        return now

    def advance(self, now: float | None = None) -> None:
        """Write the files of every batch that has reached its end by ``now`` (the clock's,
        if None), and bill its lines."""
        now = self.clock.now() if now is None else now
        for account in self.accounts.values():
            for batch in account.batches.values():
                status, since = batch.status(now)
                if batch.outcome is None and status in _TERMINAL:
                    self._finish(account, batch, status, since)

    def _finish(self, account: _Account, batch: _Batch, status: str, at: float) -> None:
        batch.outcome, batch.done = status, batch.finished_at_end()
        self.counters.by_outcome[status] += 1
        if status == "failed":
            return
        finished, leftover = batch.lines[: batch.done], batch.lines[batch.done :]
        output = [self._output_line(line) for line in finished if line.status == 200]
        errors = [self._output_line(line) for line in finished if line.status != 200]
        leftover_error = {
            "expired": ("batch_expired", _EXPIRED),
            "cancelled": ("batch_cancelled", _CANCELLED),
        }
        if batch._listed_leftover():
            code, message = leftover_error[status]
            errors += [self._leftover_line(line, code, message) for line in leftover]
        if output:
            batch.output_file_id = self._store(
                account, account.dialect.output_prefix, batch, output, at
            )
        if errors:
            batch.error_file_id = self._store(
                account, account.dialect.error_prefix, batch, errors, at
            )
        for line in finished:
            if line.status == 200:
                self._bill(line)

    def _store(
        self, account: _Account, prefix: str, batch: _Batch, lines: list[bytes], at: float
    ) -> str:
        name, data = f"{batch.id}_output.jsonl", b"".join(lines)
        file = _File(prefix + self._token(), name, "batch_output", self.clock.unix(at), data)
        account.files[file.id] = file
        return file.id

    def _output_line(self, line: _Line) -> bytes:
        rid = self._mock._request_id()
        response = {
            "status_code": line.status,
            "request_id": f"req_{rid}",
            "body": orjson.Fragment(line.body),
        }
        record = {
            "id": f"batch_req_{rid}",
            "custom_id": line.custom_id,
            "response": response,
            "error": None,
        }
        return orjson.dumps(record) + b"\n"

    def _leftover_line(self, line: _Line, code: str, message: str) -> bytes:
        error = {"code": code, "message": message}
        record = {
            "id": f"batch_req_{self._mock._request_id()}",
            "custom_id": line.custom_id,
            "response": None,
            "error": error,
        }
        return orjson.dumps(record) + b"\n"

    def _bill(self, line: _Line) -> None:
        self.counters.lines_billed += 1
        twice = (line.custom_id, line.key) in self._billed or (
            self._live is not None and line.key in self._live
        )
        self.counters.lines_billed_twice += twice
        self._billed.add((line.custom_id, line.key))
        self._billed_bodies.add(line.key)

    def live_answered(self, path: str, body: JSONObject) -> None:
        """A live route answered 200: billed twice if a batch billed the same request."""
        if self._live is None:
            return
        url = path.removeprefix("/compatible-mode")  # DashScope's live routes
        key = _request_key(url, body)
        if key in self._billed_bodies and key not in self._live:
            self.counters.lines_billed_twice += 1
        self._live.add(key)

    def snapshot(self) -> JSONObject:
        self.advance()
        return self.counters.view()

    def reset(self) -> None:
        """Zero the counters; files, batches and what was billed stay, as a provider's do."""
        self.counters = _Counters()


# --- HTTP helpers ------------------------------------------------------------------------


def _json(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def _drop(request: web.Request) -> web.Response:
    """Close the connection with no (or no whole) answer: the work is done, the answer lost."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()  # aiohttp quietly fails to write it to the closed transport


async def _json_body(request: web.Request) -> JSONObject:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise _Refused(400, "We could not parse the JSON body of your request.") from exc
    if not isinstance(body, dict):
        raise _Refused(400, "The request body must be a JSON object.")
    return body


async def _read_upload(request: web.Request, limit: int) -> tuple[str | None, str, bytes]:
    """purpose, filename and bytes of a multipart upload, refused past `limit` bytes."""
    if not request.content_type.startswith("multipart/"):
        raise _Refused(400, "Expected a multipart/form-data body with 'purpose' and 'file'.")
    purpose: str | None = None
    filename, data = "", None
    async for part in await request.multipart():
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "purpose":
            purpose = await part.text()
        elif part.name == "file":
            filename, data = part.filename or "upload.jsonl", await _read_part(part, limit)
    if data is None:
        raise _Refused(400, "Missing required parameter: 'file'.", "file")
    return purpose, filename, data


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk(1 << 16):
        size += len(chunk)
        if size > limit:
            raise _Refused(
                400, f"The file is larger than the {limit} bytes allowed.", "file", "file_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _shuffle(lines: list[_Line], rng: random.Random) -> None:
    """Shuffle in place, never leaving two or more lines in their input order."""
    before = list(lines)
    rng.shuffle(lines)
    if len(lines) > 1 and lines == before:
        lines.append(lines.pop(0))
