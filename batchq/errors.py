"""The exceptions batchq raises, and which of them stop a job.

::

    BatchqError
    ├── ConfigError(BatchqError, ValueError)   bad option, setting or job folder   -> exit 2
    ├── InputError                             input file unusable as a whole      -> exit 2
    ├── JournalError                           checkpoint unreadable or for another input -> exit 2
    ├── JobLocked                              another process runs this job       -> exit 2
    ├── LimitsStoreError                       --limits-store unreachable at start -> exit 2
    ├── FatalEndpointError                     bad key, no quota, endpoint gone    -> exit 3
    ├── StorageError                           full disk, I/O error, permission    -> exit 3
    ├── BudgetReached                          the next request could cross --max-cost -> exit 4
    └── RequestError                           one request failed; becomes an error line
        ├── TransportError                     connect/read failure (retryable)
        │   ├── EndpointUnreachable            could not connect at all
        │   └── RequestTimeout(TransportError, TimeoutError)
        ├── InvalidResponse                    a 2xx that is not a JSON object (retryable)
        ├── UnusableAnswer                     not sent again this run; --retry-failed may
        │   ├── Redirected                     301/302/303, or a redirect to another host
        │   └── ResponseTooLarge               more than --max-response-bytes
        └── HTTPStatusError                    .status, .body, .request_id, .headers
            ├── RateLimited                    429, retryable, honours Retry-After
            ├── ServerError                    5xx, retryable
            └── RequestRejected                other 4xx, not retryable

A ``RequestError`` that is left after retries is data: the worker writes an
error line and goes on. Everything else is fatal and propagates, tearing the
pipeline down; what was written so far stays durable and the job resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import orjson


class BatchqError(Exception):
    """Something batchq tells the user in one line."""

    exit_code = 2


class ConfigError(BatchqError, ValueError):
    """An option, a setting in job.toml, or a job folder is not usable."""


class InputError(BatchqError):
    """The input file cannot be used at all (missing, unreadable, not JSONL)."""


class JournalError(BatchqError):
    """The job's checkpoint cannot be trusted, or belongs to a different input."""


class JobLocked(BatchqError):
    """Another batchq process is running this job right now."""


class LimitsStoreError(BatchqError):
    """The shared limits store (--limits-store) cannot be reached when the job starts."""


class FatalEndpointError(BatchqError):
    """The endpoint refuses every request (bad key, no quota, unreachable); fix it and rerun."""

    exit_code = 3


class StorageError(BatchqError):
    """The machine refused a write (full disk, I/O error, permission); fix it and rerun."""

    exit_code = 3

    def __init__(self, message: str, *, path: Path, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno

    @classmethod
    def from_os(cls, op: str, path: Path, exc: OSError) -> StorageError:
        cause = exc.strerror or str(exc)
        return cls(
            f"cannot {_VERBS.get(op, op)} {path}: {cause}; "
            "nothing done was lost: fix that, then run the same command to continue",
            path=path,
            errno=exc.errno,
        )


class BudgetReached(BatchqError):
    """The job stopped at its budget (--max-cost): nothing is lost, and a higher budget
    continues it. ``spent`` is the job's, every run's; ``pending`` the lines not yet done."""

    exit_code = 4

    def __init__(self, message: str, *, spent: float, limit: float, pending: int | None) -> None:
        super().__init__(message)
        self.spent = spent
        self.limit = limit
        self.pending = pending


_VERBS = {"fsync": "write", "fsync_dir": "write to folder", "mkdir": "create folder"}


class RequestError(Exception):
    """One request failed; after retries it becomes a line in errors.jsonl."""

    code = "request_failed"
    retryable = True


class TransportError(RequestError):
    """The connection failed or dropped before a full answer arrived."""

    code = "connection_error"


class EndpointUnreachable(TransportError):
    """No connection to the endpoint could be made at all."""

    code = "endpoint_unreachable"


class RequestTimeout(TransportError, TimeoutError):
    """No full answer arrived within the request timeout."""

    code = "timeout"


class InvalidResponse(RequestError):
    """A 2xx whose body is not a JSON object: a login page, a proxy's text, a cut-off answer."""

    code = "invalid_response"


class UnusableAnswer(RequestError):
    """An answer that the job's settings rule out; sending the request again now would end
    the same way, but after a change of setting (--base-url, --max-response-bytes)
    ``--retry-failed`` sends it again."""

    def __init__(self, message: str, *, status: int, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


class Redirected(UnusableAnswer):
    """A redirect batchq does not follow: one that would turn the POST into a GET, or send
    the API key to another host."""

    code = "redirected"


class ResponseTooLarge(UnusableAnswer):
    """An answer larger than --max-response-bytes (counted after decompression)."""

    code = "response_too_large"


class HTTPStatusError(RequestError):
    """The endpoint answered with a status other than 2xx."""

    def __init__(
        self,
        status: int,
        body: Any,
        *,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.request_id = request_id
        self.headers = headers or {}
        super().__init__(f"HTTP {status}: {error_message(body)}")

    @property
    def error_code(self) -> str | None:
        """The ``error.code`` (or ``error.type``) of an OpenAI-style error body."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            return str(code) if code else None
        return None

    @property
    def code(self) -> str:  # type: ignore[override]
        return self.error_code or f"http_{self.status}"


class RateLimited(HTTPStatusError):
    """429: the endpoint wants us to slow down."""


class ServerError(HTTPStatusError):
    """5xx: the endpoint failed; trying again usually works."""


class RequestRejected(HTTPStatusError):
    """4xx other than 429: the request itself is wrong; sending it again won't help."""

    retryable = False


def error_message(body: Any) -> str:
    """The human part of an error body: OpenAI's ``error.message``, else a short excerpt."""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, dict) and error.get("message"):
            body = error["message"]
        elif isinstance(error, str):
            return error
    if isinstance(body, str):
        return body[:300]
    try:  # JSON as the endpoint sent it, not a Python repr of what it was parsed into
        return orjson.dumps(body, default=str)[:300].decode("utf-8", "replace")
    except orjson.JSONEncodeError:
        return "an error body nested too deeply to show"


class Notify(Protocol):
    """How the engine tells its user something that is not an error, e.g. lines it cuts.

    ``level`` is a ``logging`` level: WARNING for what went wrong or changes what the
    user gets, INFO (the default) for the course of the run. The command line prints
    both; the Python API logs them to the ``batchq`` logger.
    """

    def __call__(self, message: str, level: int = logging.INFO) -> None: ...
