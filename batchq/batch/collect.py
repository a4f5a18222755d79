"""A finished batch's output and error files, turned into the job's output lines.

A download is checked whole before any line of it is written: every line
parses and names a ``custom_id``. A file that fails the check is fetched
again; half of one is never committed. A file damaged the same way in every
download is collected for the lines that can be read. Neither provider
writes its lines in input order.

Each line the batch answered becomes a result line, or an error line where
the request failed for good (a 4xx). A line that failed for a reason that
may pass (5xx, 429, the batch expired or was cancelled before it) or that
is in neither file goes back to pending, to be sent again, until
``max_attempts`` batches have tried it; but not when the files held lines
batchq cannot match to its requests (a gateway that renames ``custom_id``,
a damaged line), or a file is gone: the line may have been answered, and paid
for, there, so it fails, retryable, instead of going in another batch unasked.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchq.answers import Answers
from batchq.errors import StorageError
from batchq.job.batches import Chunk, in_ranges
from batchq.records import Outcome, Request, error_line, result_line, usage_tokens

#: Error codes of lines a batch did not get to: they are sent again.
UNFINISHED = frozenset({"batch_expired", "batch_cancelled", "request_timeout"})


class Damaged(Exception):
    """A downloaded file that is not what the batch wrote: fetched again."""


@dataclass(slots=True)
class Collected:
    """What one batch's files came to, beyond the outcomes handed on."""

    retry: list[int] = field(default_factory=list)
    failed_for_good: int = 0
    unknown: int = 0  # lines with a custom_id this batch was not sent, or unreadable
    twice: int = 0  # a custom_id seen again


def read_ids(path: Path) -> dict[str, tuple[int, str]]:
    """batchq's upload ids of a chunk, mapped to (input line, the user's custom_id)."""
    ids = {}
    try:
        with path.open("rb") as f:
            for raw in f:
                line_no, custom_id = orjson.loads(raw)
                ids[f"batchq-{line_no}"] = (int(line_no), str(custom_id))
    except OSError as exc:
        raise StorageError.from_os("read", path, exc) from None
    except (ValueError, TypeError):  # not the [line, id] rows plan() writes
        raise Damaged(f"{path.name} is not a list of the chunk's ids") from None
    return ids


def check(path: Path, ids: Container[str]) -> None:
    """Raise ``Damaged`` unless every line of ``path`` is an output line of this batch."""
    for line_no, obj in _lines(path):
        if _custom_id(obj) is None:
            raise Damaged(f"line {line_no} of the download is not a batch output line")


def collect(
    files: list[Path],
    chunk: Chunk,
    ids: dict[str, tuple[int, str]],
    done: Container[int],
    *,
    max_attempts: int,
    emit: Callable[[Outcome], None],
    rejected: dict[int, tuple[str, str]] | None = None,
    free: bool = False,
    answers: Answers | None = None,
    gone: Sequence[str] = (),
) -> Collected:
    """Hand every answered line of ``chunk`` to ``emit``; say what is left to do.

    ``rejected``: lines a batch that failed validation named as bad (input line:
    code, message); they fail for good, the batch's other lines go again.
    ``free``: this batch does not count as a try of its lines (the account was full).
    ``answers``: the job's check of every answer (--json-schema); an answer that does
    not fit is an ``invalid_output`` failure, retryable: no batch is made to ask again.
    ``gone``: the batch's files the provider no longer has, whose answers are lost.
    """
    result = Collected()
    seen: set[int] = set()
    ids_by_line = dict(ids.values())
    last_try = chunk.attempt >= max_attempts and not free
    for path in files:
        for _, obj in _lines(path, strict=False):
            found = ids.get(_custom_id(obj) or "")
            if found is None:
                result.unknown += 1
                continue
            line_no, custom_id = found
            if line_no in seen:
                result.twice += 1
                continue
            seen.add(line_no)
            if line_no in done:  # committed before a crash, the batch not yet marked collected
                continue
            outcome, retryable = _outcome(obj, line_no, custom_id, chunk)
            if answers is not None and outcome.ok and answers.checks(chunk.url):
                verdict = answers.check_line(outcome.line)
                if not verdict.fits:
                    outcome = answers.invalid_outcome(outcome, verdict, 1)
            if retryable and not last_try:
                result.retry.append(line_no)
            else:
                result.failed_for_good += not outcome.ok
                emit(outcome)
    for line_no in in_ranges(chunk.lines):
        if line_no in seen or line_no in done:
            continue
        if rejected and line_no in rejected:
            code, message = rejected[line_no]
            line = error_line(
                line_no, ids_by_line.get(line_no), code, f"the provider refused it: {message}",
                attempts=chunk.attempt, batch=chunk.batch_id,
            )  # fmt: skip
            result.failed_for_good += 1
            emit(Outcome(line_no, False, line))
        elif last_try:
            message = f"not answered by batch {chunk.batch_id} ({chunk.status}), the last try"
            line = error_line(
                line_no, ids_by_line.get(line_no), "batch_unanswered", message,
                attempts=chunk.attempt, retryable=True, batch=chunk.batch_id,
            )  # fmt: skip
            emit(Outcome(line_no, False, line))
        elif result.unknown or gone:
            where = (
                f"which hold answers that match none of its requests ({result.unknown:,})"
                if result.unknown
                else f"of which the provider no longer has {', '.join(gone)}"
            )
            message = (
                f"not found in the files of batch {chunk.batch_id}, {where}; this line's "
                "answer may have been there, paid for, so it was not sent again: "
                "--retry-failed sends it"
            )
            code = "batch_unmatched" if result.unknown else "batch_output_gone"
            line = error_line(
                line_no, ids_by_line.get(line_no), code, message,
                attempts=chunk.attempt, retryable=True, batch=chunk.batch_id,
            )  # fmt: skip
            emit(Outcome(line_no, False, line))
        else:
            result.retry.append(line_no)
    result.retry.sort()
    return result


def validation_errors(chunk: Chunk, batch: dict[str, Any]) -> list[tuple[int | None, str, str]]:
    """A failed batch's ``errors.data``: (input line or None, code, message) each.

    The provider numbers the lines of the file batchq uploaded, from 1; the
    chunk's lines were written in ascending order, so the n-th is its n-th line.
    """
    errors = batch.get("errors")
    data = errors.get("data") if isinstance(errors, dict) else None
    lines = list(in_ranges(chunk.lines))
    found = []
    for error in data if isinstance(data, list) else []:
        if isinstance(error, dict):
            where = error.get("line")
            line_no = (
                lines[where - 1] if isinstance(where, int) and 1 <= where <= len(lines) else None
            )
            found.append((line_no, str(error.get("code")), str(error.get("message"))))
    return found


def rejected_lines(chunk: Chunk, batch: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """The input lines a failed batch named as bad, with why."""
    return {
        line_no: (code, message)
        for line_no, code, message in validation_errors(chunk, batch)
        if line_no is not None
    }


def _outcome(
    obj: dict[str, Any], line_no: int, custom_id: str, chunk: Chunk
) -> tuple[Outcome, bool]:
    """The outcome of one line of a batch's files, and whether it may pass if sent again."""
    response = obj.get("response") if isinstance(obj.get("response"), dict) else None
    error = obj.get("error") if isinstance(obj.get("error"), dict) else None
    status = response.get("status_code") if response is not None else None
    body = response.get("body") if response is not None else None
    request_id = response.get("request_id") if response is not None else None
    raw = _encoded(body)
    if error is None and isinstance(status, int) and 200 <= status < 300 and raw is not None:
        assert isinstance(body, dict)  # _encoded takes objects only
        request = Request(line_no, custom_id, chunk.url, b"", 0)
        line = result_line(
            request, status, _text(request_id), raw, body, attempts=chunk.attempt,
            batch=chunk.batch_id,
        )  # fmt: skip
        return Outcome(line_no, True, line, *usage_tokens(body)), False
    code, message = _error(error, body, status)
    if not isinstance(status, int) or isinstance(status, bool):
        status = None  # a provider's "200" or 200.0 is no status batchq can trust
    retryable = code in UNFINISHED or status is None or status == 429 or status >= 500
    if isinstance(status, int) and 200 <= status < 300:  # a 2xx without a usable JSON object
        code, message, retryable = "invalid_response", f"HTTP {status} is not a JSON object", True
        if isinstance(body, dict):
            message = f"HTTP {status}: an answer nested too deeply to be written and read back"
            body = None
    line = error_line(
        line_no, custom_id, code, message, status=status if isinstance(status, int) else None,
        request_id=_text(request_id), body=body, attempts=chunk.attempt, retryable=retryable,
        batch=chunk.batch_id,
    )  # fmt: skip
    return Outcome(line_no, False, line), retryable


def _error(error: dict[str, Any] | None, body: Any, status: Any) -> tuple[str, str]:
    """The code and message of a failed line, from its ``error`` or its answer's body."""
    inner = body.get("error") if isinstance(body, dict) else None
    for source in (error, inner):
        if isinstance(source, dict) and (source.get("code") or source.get("message")):
            code = source.get("code") or source.get("type") or f"http_{status}"
            return str(code), str(source.get("message") or code)
    return f"http_{status}", f"HTTP {status} in the batch"


def _encoded(body: Any) -> bytes | None:
    """A 2xx answer's body as JSON to splice into its result line; None if it is not an
    object, or is nested deeper than orjson writes (the line could not be read back)."""
    if not isinstance(body, dict):
        return None
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError:
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _custom_id(obj: Any) -> str | None:
    """The ``custom_id`` of a batch output line; None if ``obj`` is not one."""
    custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def _lines(path: Path, *, strict: bool = True) -> Iterator[tuple[int, Any]]:
    """Each line of ``path``, parsed; one that is not JSON raises ``Damaged``, or with
    ``strict=False`` comes as None."""
    try:
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    yield line_no, orjson.loads(raw)
                except orjson.JSONDecodeError:
                    if strict:
                        raise Damaged(f"line {line_no} of {path.name} is not JSON") from None
                    yield line_no, None
    except OSError as exc:
        raise StorageError.from_os("read", path, exc) from None
