"""The results browser of ``batchq view``: each input line beside its answer, a page at a time.

Memory stays bounded however long the job: the outputs are reached through
the offset index (``OutputIndex``, 8 bytes a line) and the input through a
sparse one (one offset every ``STRIDE`` lines). A filtered page reads lines
from where the last page stopped until it is full, or until it has looked at
``SCAN_LIMIT`` lines: the page then says where it stopped, and the next
request goes on from there, so no request reads millions of lines.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

from batchq.job.journal import JOURNAL_NAME
from batchq.job.results import OutputIndex, Result
from batchq.show.picture import CODE_CHARS, JobFolder

STRIDE = 1024  # input lines between two remembered offsets
SCAN_LIMIT = 200_000  # lines one request may look at
SHOWN = 1_000  # characters of a prompt or an answer in a row
REINDEX_AFTER = 5.0  # seconds: how stale a running job's index may be, at least
REINDEX_SHARE = 0.1  # of a core, at most, that indexing a running job again may take


class InputLines:
    """Lines of the input file by number (1-based, as ``Request.line_no``), through a sparse
    index that grows as the file does (a job's input may be appended to)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] | None = None
        self._starts = array("q", [0])  # where lines 1, 1 + STRIDE, 1 + 2 * STRIDE, ... start
        self._lines = 0  # complete lines scanned
        self._scanned = 0  # bytes
        self._next = (1, 0)  # the line after the last one read, and where it starts

    def line(self, n: int) -> bytes | None:
        if n < 1 or (n > self._lines and n > self.count()):
            return None
        f = self._file()
        assert f is not None  # count() opened it
        line, offset = self._next
        if not (line <= n and n - line < STRIDE):  # a page reads on from the line before
            line, offset = (n - 1) // STRIDE * STRIDE + 1, self._starts[(n - 1) // STRIDE]
        f.seek(offset)
        for _ in range(n - line):
            f.readline()
        raw = f.readline()
        if raw.endswith(b"\n"):  # not after an unfinished last line: it may yet grow
            self._next = (n + 1, f.tell())
        return raw.rstrip(b"\r\n")

    def count(self) -> int:
        """The lines written so far: an unfinished last line counts too."""
        f = self._file()
        if f is None:
            return 0
        self._scan(f)
        return self._lines + (os.fstat(f.fileno()).st_size > self._scanned)

    def _file(self) -> IO[bytes] | None:
        if self._f is None:
            try:
                self._f = self.path.open("rb")
            except OSError:
                return None
        return self._f

    def _scan(self, f: IO[bytes]) -> None:
        start = self._scanned  # of the chunk: a line may be longer than one (an image)
        f.seek(start)
        while chunk := f.read(1 << 20):
            at = 0
            while (found := chunk.find(b"\n", at)) >= 0:
                at = found + 1
                self._lines += 1
                if self._lines % STRIDE == 0:
                    self._starts.append(start + at)
            if at:  # an unfinished last line waits for its end
                self._scanned = start + at
            start += len(chunk)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Browser:
    """Pages of a job's lines; safe to call from several threads (one at a time)."""

    def __init__(self, folder: JobFolder) -> None:
        self.folder = folder
        self.inputs = InputLines(folder.input)
        self._index: OutputIndex | None = None
        self._indexed: tuple[float, tuple[int, ...]] = (0.0, ())
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._index is not None:
                self._index.close()
            self.inputs.close()

    def page(
        self,
        start: int = 1,
        *,
        status: str = "all",
        code: str = "",
        text: str = "",
        limit: int = 50,
    ) -> dict[str, Any]:
        """Up to ``limit`` rows from line ``start`` on that match the filters; ``next`` is
        the line to go on from (None: the end), ``scanned_to`` the last line looked at."""
        needle = _matcher(text)
        with self._lock:
            index = self._fresh_index()
            last = max(index.last, self._total())
            rows: list[dict[str, Any]] = []
            line = max(1, start)
            stop = line + SCAN_LIMIT
            while line <= last and len(rows) < limit and line < stop:
                if (row := self._match(index, line, status, code, needle)) is not None:
                    rows.append(row)
                line += 1
            return {
                "rows": rows,
                "next": line if line <= last else None,
                "scanned_to": line - 1,
                "last": last,
            }

    def raw(self, line: int) -> dict[str, Any]:
        """Line ``line``'s input and output, parsed where they parse."""
        with self._lock:
            index = self._fresh_index()
            return {
                "line": line,
                "input": _parsed(self.inputs.line(line)),
                "output": _parsed(index.output(line)),
            }

    def _match(
        self,
        index: OutputIndex,
        line: int,
        status: str,
        code: str,
        needle: Callable[[bytes | None], bool] | None,
    ) -> dict[str, Any] | None:
        ok = index.ok(line)
        if status == "ok" and ok is not True:
            return None
        if status == "failed" and ok is not False:
            return None
        if status == "pending" and ok is not None:
            return None
        if code and ok is not False:
            return None
        output = index.output(line)
        if code and (output is None or _error_code(output) != code):
            return None
        source = self.inputs.line(line)
        if source is not None and not source.strip():
            return None  # a blank line is no request
        if needle is not None and not needle(output) and not needle(source):
            return None
        return _row(line, source, output)

    def _fresh_index(self) -> OutputIndex:
        """The offset index, built again once the journals have grown and it is seconds old."""
        sizes = tuple(_size(part[0] / JOURNAL_NAME) for part in self.folder.parts)
        ready, known = self._indexed
        if self._index is None or (sizes != known and time.monotonic() >= ready):
            started = time.monotonic()
            first, *more = self.folder.parts
            index = OutputIndex(*first, more=more)
            if self._index is not None:
                self._index.close()
            self._index = index
            # ten million lines take a minute to index: not again for ten, while the job runs
            took = time.monotonic() - started
            self._indexed = (started + max(REINDEX_AFTER, took / REINDEX_SHARE), sizes)
        return self._index

    def _total(self) -> int:
        return self.inputs.count()


def _matcher(text: str) -> Callable[[bytes | None], bool] | None:
    """Whether a JSON line holds ``text``, in any case; None: no search."""
    if not text:
        return None
    folded = text.casefold()
    raw = folded.encode()  # as JSON writes it, it may be found in the bytes, fast
    if folded.isascii() and folded.isprintable() and not {'"', "\\"} & set(folded):
        return lambda data: data is not None and raw in data.lower()
    # "é" may be written "\u00e9", a quote "\"", a tab "\t": the text decoded tells (and
    # the bytes still find a quoted "custom_id", as typed from the file)
    return lambda data: (
        data is not None and (raw in data.lower() or folded in _text_of(data).casefold())
    )


def _text_of(data: bytes) -> str:
    """Every string of a JSON line (its keys too), as the page shows them."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode(errors="replace")
    strings: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings.append(item)
        elif isinstance(item, dict):
            strings.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return "\n".join(strings)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _row(line: int, source: bytes | None, output: bytes | None) -> dict[str, Any]:
    row: dict[str, Any] = {"line": line, "prompt": _prompt(source), "status": "pending"}
    if output is None:
        return row
    try:
        result = Result.from_output(orjson.loads(output))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        row.update(status="failed", answer="(unreadable output line)")
        return row
    row["custom_id"] = result.custom_id
    row["attempts"] = result.attempts
    if result.error is not None:
        row.update(status="failed", code=result.error.code, answer=result.error.message[:SHOWN])
        return row
    row["status"] = "ok"
    row["tokens"] = [result.prompt_tokens, result.completion_tokens]
    text = result.text
    if text is not None:
        row["answer"] = text[:SHOWN]
        if isinstance(result.parsed, dict):  # a structured answer: its fields
            row["fields"] = {k: _short(v) for k, v in list(result.parsed.items())[:8]}
    elif (vector := result.embedding) is not None:
        row["answer"] = f"embedding: {len(vector):,} dimensions"
    else:
        row["answer"] = "(no text in the answer)"
    return row


def _prompt(source: bytes | None) -> str:
    """What a request asks, for a person: its last user message, prompt or input."""
    if source is None:
        return ""
    try:
        obj = orjson.loads(source)
    except orjson.JSONDecodeError:
        return source[:SHOWN].decode("utf-8", "replace")
    body = obj.get("body") if isinstance(obj, dict) and isinstance(obj.get("body"), dict) else obj
    if not isinstance(body, dict):
        return str(obj)[:SHOWN]
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        return _content((users or messages)[-1])[:SHOWN]
    for key in ("prompt", "input"):
        value = body.get(key)
        if isinstance(value, str):
            return value[:SHOWN]
        if isinstance(value, list) and value:
            return (value[0] if isinstance(value[0], str) else str(value))[:SHOWN]
    return source[:SHOWN].decode("utf-8", "replace")


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: text, images, ...
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return str(content)


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    return text if len(text) <= 80 else text[:79] + "…"


def _error_code(output: bytes) -> str | None:
    try:
        error = orjson.loads(output).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    # cut as the failures table shows it, which is what the page's code filter sends
    return str(error.get("code"))[:CODE_CHARS] if isinstance(error, dict) else None


def _parsed(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")
