"""A job's outputs in input order: ``batchq.Result``, ``batchq export``, and the Python API's lists.

``results.jsonl`` and ``errors.jsonl`` are written in completion order. To
give every input line back in the order of the input, ``OutputIndex`` scans
both files once and keeps, per input line, where its output line starts (8
bytes a line: 80 MB for ten million, and never the records themselves);
reading in order is then one seek per line. Only what the journal has
committed is read: a line written after the last commit is not done yet.
"""

from __future__ import annotations

import csv
import io
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from batchq.errors import JournalError
from batchq.job.journal import JOURNAL_NAME, DoneSet, read_journal
from batchq.records import answer_text

JSONObject = dict[str, Any]

#: Fields ``batchq export --format csv`` can write, and its default choice.
CSV_FIELDS = (
    "line",
    "custom_id",
    "ok",
    "status_code",
    "text",
    "prompt_tokens",
    "completion_tokens",
    "attempts",
    "error",
    "error_code",
)
DEFAULT_CSV_FIELDS = ("custom_id", "text", "prompt_tokens", "completion_tokens", "error")
#: The cell of a parsed value too deeply nested to write as JSON (the answer's text has it).
NESTED_TOO_DEEPLY = "(nested too deeply to write)"

_MARK = b'"batchq":{"line":'  # what every output line ends with, before its line number
_FILE_SHIFT = 48  # an output file of up to 256 TiB; 32,768 files, two a shard
_OFFSET_MASK = (1 << _FILE_SHIFT) - 1

#: A folder holding a journal, and the results and errors files it commits.
Part = tuple[Path, Path, Path]


@dataclass(frozen=True, slots=True)
class Error:
    """Why a request failed: batchq's or the endpoint's code, and a sentence."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one request (one input line), as the job's output line says it.

    ``body`` is the endpoint's JSON answer (None where it gave none); ``text``
    the generated text of a chat, completions or responses answer, and
    ``embedding`` the vector of an embeddings answer. ``parsed`` is a
    succeeded answer's text read as JSON (None if it is not JSON): with
    ``--json-schema`` an object that fits the schema; in the Python API with
    ``response_model=``, an instance of that model.
    """

    line: int
    custom_id: str | None
    ok: bool
    status_code: int | None
    body: JSONObject | None
    error: Error | None
    attempts: int
    parsed: Any = None

    @classmethod
    def from_output(cls, output: JSONObject) -> Result:
        """A Result from a parsed results.jsonl or errors.jsonl line."""
        response = output.get("response") or {}
        error = output.get("error")
        extra = output.get("batchq") or {}
        body = response.get("body")
        return cls(
            line=int(extra.get("line", 0)),
            custom_id=output.get("custom_id"),
            ok=error is None,
            status_code=response.get("status_code"),
            body=body if isinstance(body, dict) else None,
            error=None if error is None else Error(str(error["code"]), str(error["message"])),
            attempts=int(extra.get("attempts", 0)),
            parsed=_json_answer(body) if error is None and isinstance(body, dict) else None,
        )

    @property
    def usage(self) -> JSONObject | None:
        usage = self.body.get("usage") if self.body else None
        return usage if isinstance(usage, dict) else None

    @property
    def prompt_tokens(self) -> int | None:
        return _count(self.usage, "prompt_tokens", "input_tokens")

    @property
    def completion_tokens(self) -> int | None:
        return _count(self.usage, "completion_tokens", "output_tokens")

    @property
    def text(self) -> str | None:
        """The generated text: chat, completions and responses answers; else None."""
        return answer_text(self.body or {})

    @property
    def embedding(self) -> list[float] | None:
        data = (self.body or {}).get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict):
            vector = data[0].get("embedding")
            return vector if isinstance(vector, list) else None
        return None


def _json_answer(body: JSONObject) -> Any:
    """An answer's text read as JSON; None if it is not JSON (most answers of a job with no
    schema, which a look at the first character tells without parsing)."""
    text = answer_text(body)
    if text is None or text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return None


def _path(value: Any, keys: Sequence[str]) -> Any:
    """The value at ``keys`` inside a parsed answer; None where there is none."""
    for key in keys:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _cell(value: Any) -> object:
    """A parsed value as a CSV cell: text as it is, anything else as JSON, nothing empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # orjson reads 1024 levels but writes only 255
        return NESTED_TOO_DEEPLY


def _count(usage: JSONObject | None, *keys: str) -> int | None:
    for key in keys:
        value = (usage or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class OutputIndex:
    """Where each input line's output line is: in which file, at which byte.

    A sharded job's index covers every shard: ``parts`` names each
    process's folder (holding its journal) with its two output files.

    The files are read through the handles they were indexed through, kept
    open until ``close`` (or the end of a ``with`` block): a run that
    replaces a file meanwhile (``--retry-failed`` rewrites errors.jsonl)
    must not make the offsets point into another file's lines.
    """

    def __init__(
        self, job_dir: Path, results: Path, errors: Path, *, more: Sequence[Part] = ()
    ) -> None:
        self.files: list[Path] = []
        self._handles: list[IO[bytes]] = []
        # (offset + 1) | file << _FILE_SHIFT, the file an index into self.files; 0: not done
        self._where = array("q")
        try:
            for run_dir, *outputs in ((job_dir, results, errors), *more):
                done, totals, _ = read_journal(run_dir / JOURNAL_NAME)
                lengths = (totals.results_len, totals.errors_len)
                for path, length in zip(outputs, lengths, strict=True):
                    self.files.append(path)
                    self._handles.append(f := _open(path))
                    self._scan(f, length, len(self.files) - 1, done)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for f in self._handles:
            f.close()

    def __enter__(self) -> OutputIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _scan(self, f: IO[bytes], length: int, which: int, done: DoneSet) -> None:
        offset = 0
        for raw in f:
            if offset + len(raw) > length:
                break  # past the last commit
            mark = raw.rfind(_MARK)
            if mark >= 0:
                digits = raw[mark + len(_MARK) :].split(b",", 1)[0].split(b"}", 1)[0]
                line = int(digits) if digits.isdigit() else 0
                # Every committed line names a line its journal has done: anything else is
                # damage, and a number such as 10**12 would grow the index past any memory.
                if line not in done or line == 0:
                    raise self._damaged(which, offset)
                if line >= len(self._where):
                    self._where.extend([0] * (line + 1 - len(self._where)))
                self._where[line] = (offset + 1) | which << _FILE_SHIFT
            offset += len(raw)

    def lines(self, upto: int | None = None) -> Iterator[tuple[int, bytes | None]]:
        """(line number, its output line or None if not done), lines 1 to ``upto``."""
        last = len(self._where) - 1 if upto is None else upto
        for line in range(1, last + 1):
            yield line, self.output(line)

    @property
    def last(self) -> int:
        """The highest line number that has an output line (0: none)."""
        return max(0, len(self._where) - 1)

    def ok(self, line: int) -> bool | None:
        """Whether ``line`` succeeded (True), failed (False), or is not done (None), without
        reading its output line: results and errors files alternate in ``files``."""
        where = self._where[line] if 0 < line < len(self._where) else 0
        return None if not where else (where >> _FILE_SHIFT) % 2 == 0

    def output(self, line: int) -> bytes | None:
        """The output line of input line ``line``, or None if it is not done."""
        where = self._where[line] if 0 < line < len(self._where) else 0
        if not where:
            return None
        f = self._handles[where >> _FILE_SHIFT]
        f.seek((where & _OFFSET_MASK) - 1)
        return f.readline()

    def results(self) -> Iterator[Result]:
        """Every done line's Result, in input order."""
        for line, raw in self.lines():
            if raw is not None:
                try:
                    result = Result.from_output(orjson.loads(raw))
                except (ValueError, TypeError, KeyError, AttributeError):  # JSONDecodeError too
                    where = self._where[line]
                    raise self._damaged(where >> _FILE_SHIFT, (where & _OFFSET_MASK) - 1) from None
                yield result

    def _damaged(self, which: int, offset: int) -> JournalError:
        return JournalError(
            f"{self.files[which]} holds a line at byte {offset} that batchq did not write; "
            "put the file back as batchq wrote it"
        )


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except FileNotFoundError:
        return io.BytesIO()


def write_jsonl(index: OutputIndex, out: IO[bytes]) -> int:
    """Every done line's output line, in input order; how many were written."""
    written = 0
    for _, raw in index.lines():
        if raw is not None:
            out.write(raw)
            written += 1
    return written


def write_csv(index: OutputIndex, out: IO[str], fields: Sequence[str]) -> int:
    """One CSV row per done line, in input order, with ``fields``; how many were written."""
    writer = csv.writer(out)
    writer.writerow(fields)
    written = 0
    for result in index.results():
        writer.writerow([_field(result, name) for name in fields])
        written += 1
    return written


def known_field(name: str) -> bool:
    """Whether ``--fields`` can name ``name``: a CSV field, ``parsed``, or a path into the
    parsed answer such as ``parsed.label`` or ``parsed.items.0.name``."""
    return name in CSV_FIELDS or name == "parsed" or (name.startswith("parsed.") and name[7:] != "")


def _field(result: Result, name: str) -> object:
    if name == "parsed" or name.startswith("parsed."):
        return _cell(_path(result.parsed, name.split(".")[1:]))
    if name == "error":
        return "" if result.error is None else result.error.message
    if name == "error_code":
        return "" if result.error is None else result.error.code
    value = getattr(result, name)
    return "" if value is None else value
