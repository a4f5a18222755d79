"""The ledger of a job's provider batches: what was planned, uploaded, created, collected.

The providers' Batch APIs take no idempotency key, so every step that costs
money or cannot be taken back is written down, and fsynced, *before* it is
taken, and its result after. One JSON line a step, in ``batches.jsonl``::

    {"job": "<uuid>"}                                   first line: names the job's batches
    {"chunk": 3, "step": "plan", "lines": [[1, 5000]], "count": 5000, "attempt": 1,
     "url": "/v1/chat/completions", "model": "qwen-max", "bytes": 1234567}
    {"chunk": 3, "step": "upload", "file_id": "file-..."}
    {"chunk": 3, "step": "create"}                      from here the batch may exist
    {"chunk": 3, "step": "created", "batch_id": "batch_...", "at": 1796190000.0}
    {"chunk": 3, "step": "status", "status": "in_progress", "counts": {...}}
    {"chunk": 3, "step": "collected", "status": "completed", "retry": [[17, 17]]}

A chunk found at ``create`` without ``created`` may or may not be a batch at
the provider: the executor looks for it (by the metadata that names the job
and the chunk) before it creates another, so a lost answer or a crash never
pays for the same lines twice.

A chunk's lines are *held* from ``plan`` until ``collected``: no run sends
them any other way meanwhile. ``collected`` is written only after the
journal has committed every line the batch answered, so a crash between the
two collects the batch again, finds those lines done, and writes none twice.
``retry`` lists the lines the batch left to do again (expired, cancelled,
5xx, absent); they are pending once more, at the next ``attempt`` (at the
same one with ``"free": true``: the account's enqueued tokens were full).

A torn last line is the record of a step that never finished: it is cut off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchq.errors import JournalError
from batchq.job import durable
from batchq.job.journal import DoneSet

LEDGER = "batches.jsonl"
CHUNKS = "batches"  # the folder of the chunks' files, until they are collected
DOWNLOADS = (".output.jsonl", ".error.jsonl")  # a chunk's files from the provider, as collected

Ranges = list[list[int]]  # [[first, last], ...], inclusive, ascending


def to_ranges(lines: Iterable[int]) -> Ranges:
    """Ascending line numbers as runs: a 50,000-line chunk is usually one pair."""
    ranges: Ranges = []
    for n in lines:
        if ranges and ranges[-1][1] + 1 == n:
            ranges[-1][1] = n
        else:
            ranges.append([n, n])
    return ranges


def in_ranges(ranges: Ranges) -> Iterator[int]:
    for first, last in ranges:
        yield from range(first, last + 1)


@dataclass(slots=True)
class Chunk:
    """One batch file's worth of lines, and how far it got."""

    number: int
    lines: Ranges
    count: int
    attempt: int
    url: str
    model: str | None
    bytes: int
    planned_at: float = 0.0
    base: str | None = None  # the endpoint it was sent to, without secrets
    created_at: float | None = None  # when the provider was seen to have the batch
    file_id: str | None = None
    creating: bool = False  # the create call may have been made
    batch_id: str | None = None
    status: str | None = None  # the provider's, when last seen
    counts: dict[str, int] = field(default_factory=dict)
    collected: bool = False
    retry: Ranges = field(default_factory=list)
    free: bool = False  # its lines go again without counting a try (the account was full)

    @property
    def name(self) -> str:
        return f"chunk-{self.number:05d}"

    def apply(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step == "upload":
            self.file_id = str(record["file_id"])
        elif step == "create":
            self.creating = True
        elif step == "created":
            self.batch_id = str(record["batch_id"])
            self.created_at = record.get("at")
        elif step == "status":
            self.status = str(record["status"])
            self.counts = dict(record.get("counts") or {})
        elif step == "collected":
            self.collected = True
            self.status = str(record.get("status") or self.status)
            self.retry = record.get("retry") or []
            self.free = bool(record.get("free"))


class Ledger:
    """The open ledger of one job (or shard) folder; only the run holding its lock writes."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LEDGER
        self.folder = run_dir / CHUNKS
        records, valid = _read(self.path)
        self._file = durable.open_file(self.path)
        try:
            if os.fstat(self._file.fd).st_size > valid:
                durable.truncate(self._file, valid)  # a step that never finished
            if not records:
                import uuid  # here: a live run reads ledgers, and never pays for this import

                self.job_id = uuid.uuid4().hex
                self._write({"job": self.job_id})
                durable.fsync_dir(run_dir)
            else:
                self.job_id = str(records[0]["job"])
        except BaseException:
            durable.close(self._file)
            raise
        self.chunks = _chunks(records[1:], self.path)

    def next_number(self) -> int:
        return max(self.chunks, default=0) + 1

    def plan(self, chunk: Chunk) -> None:
        chunk.planned_at = round(time.time(), 3)
        record = {
            "chunk": chunk.number,
            "step": "plan",
            "lines": chunk.lines,
            "count": chunk.count,
            "attempt": chunk.attempt,
            "url": chunk.url,
            "model": chunk.model,
            "bytes": chunk.bytes,
            "base": chunk.base,
            "at": chunk.planned_at,
        }
        self._write(record)
        self.chunks[chunk.number] = chunk

    def step(self, chunk: Chunk, step: str, **fields: Any) -> None:
        """Record that ``chunk`` reached ``step`` (durable when this returns)."""
        record = {"chunk": chunk.number, "step": step, **fields, "at": round(time.time(), 3)}
        self._write(record)
        chunk.apply(record)

    def open_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks.values() if not c.collected]

    def held(self) -> DoneSet:
        """The lines of every chunk not yet collected: no other run may send them."""
        return _lines_of(self.open_chunks())

    def attempts(self) -> dict[int, int]:
        """Batches each line to retry has been through already."""
        tried: dict[int, int] = {}
        for chunk in self.chunks.values():
            for n in in_ranges(chunk.retry):
                tried[n] = max(tried.get(n, 0), chunk.attempt - chunk.free)
        return tried  # a line since done is never planned again: its entry does no harm

    def close(self) -> None:
        durable.close(self._file)

    def _write(self, record: dict[str, Any]) -> None:
        durable.write(self._file, orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        durable.fsync(self._file)


def remove_downloads(run_dir: Path) -> None:
    """Downloads a kill left behind: they hold the answers as the provider sent them, an
    echoed key included. A batch not yet collected is downloaded again."""
    for suffix in DOWNLOADS:
        for path in (run_dir / CHUNKS).glob(f"chunk-*{suffix}"):
            durable.unlink(path)


def held_lines(run_dir: Path) -> tuple[DoneSet, int]:
    """The lines of a folder's open batches, and how many: a live run leaves them alone."""
    held = [chunk for chunk in read_ledger(run_dir) if not chunk.collected]
    return _lines_of(held), sum(chunk.count for chunk in held)


def _lines_of(chunks: Iterable[Chunk]) -> DoneSet:
    lines = DoneSet()
    for chunk in chunks:
        lines.add_all(in_ranges(chunk.lines))
    return lines


def read_ledger(run_dir: Path) -> list[Chunk]:
    """The chunks of a job folder, for ``status``: read only, no lock needed."""
    records, _ = _read(run_dir / LEDGER)
    return list(_chunks(records[1:], run_dir / LEDGER).values())


def _read(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Every complete record, and the length of the bytes they span."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from exc
    records, valid = [], 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # torn: the step it records never finished
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise JournalError(
                f"{path} holds a line batchq did not write ({line[:80]!r}); put the file back "
                "as batchq wrote it: it is the only record of batches the provider bills"
            ) from None
        if not isinstance(record, dict):
            raise JournalError(f"{path} holds a line batchq did not write; put it back")
        records.append(record)
        valid += len(line)
    if records and not isinstance(records[0].get("job"), str):
        raise JournalError(f"{path} does not start with the job's id; put it back as it was")
    return records, valid


def _chunks(records: list[dict[str, Any]], path: Path) -> dict[int, Chunk]:
    chunks: dict[int, Chunk] = {}
    try:
        for record in records:
            number = int(record["chunk"])
            if record["step"] == "plan":
                chunks[number] = Chunk(
                    number=number,
                    lines=record["lines"],
                    count=int(record["count"]),
                    attempt=int(record["attempt"]),
                    url=str(record["url"]),
                    model=record.get("model"),
                    bytes=int(record["bytes"]),
                    planned_at=float(record.get("at", 0.0)),
                    base=record.get("base"),
                )
            else:
                chunks[number].apply(record)
            if not all(_is_ranges(c) for c in (chunks[number].lines, chunks[number].retry)):
                raise ValueError("not line ranges")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise JournalError(f"{path} was changed outside batchq; put it back as it was") from None
    return chunks


def _is_ranges(value: object) -> bool:
    """Whether ``value`` is a list of ``[first, last]`` line numbers, as the ledger writes."""
    return isinstance(value, list) and all(
        isinstance(r, list) and len(r) == 2 and all(type(n) is int for n in r) and 0 < r[0] <= r[1]
        for r in value
    )
