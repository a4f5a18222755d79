"""The checkpoint: which input lines are done, and how a job resumes.

The outputs, ``results.jsonl`` and ``errors.jsonl``, are only ever appended
to. Beside them ``journal.bin`` holds a sequence of commit records, and one
rule decides what is durable:

    **A line is done once a complete journal record names it.**

Each record also states how long both output files were when it was
written, and both files were fsynced before it. On open, each output file
is cut back to the length the last complete record states: a torn last
line, or lines appended after the last commit, are removed, and their
requests are sent again. Every input line therefore ends up in exactly one
output line, whenever the process dies.

Commits happen in batches (the runner commits every few hundred
milliseconds), and their fsyncs run in a worker thread: fsync never sits on
the per-request path, nor blocks the event loop.

A record, little-endian::

    results_len u64 | errors_len u64 | ok i64 | failed i64 |
    prompt_tokens i64 | completion_tokens i64 | n u32 | n × line u32 | crc32 u32

``ok``, ``failed`` and the token counts are increments, so a job's totals
are sums over its records and nobody parses a response body to get them.
The done-set is a bitmap over line numbers: a million-line job costs 125 kB.

``--retry-failed`` rewrites ``errors.jsonl`` without its retryable lines and
replaces the journal by one record that no longer names them. The two files
change in one atomic step: both new versions are written beside the old
ones, and renaming the new journal into place is the commit point; a crash
after it is rolled forward, one before it rolled back (``recover``).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import zlib
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

from batchq.errors import JournalError, StorageError
from batchq.job import durable as durable_io
from batchq.records import Outcome

JOURNAL_NAME = "journal.bin"
_HEADER = struct.Struct("<QQqqqqI")
_CRC = struct.Struct("<I")
_LINE = "I"  # array typecode: 4-byte unsigned line numbers


class DoneSet:
    """A set of line numbers, one bit each."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = bytearray()

    def add_all(self, line_numbers: Iterable[int]) -> None:
        bits = self._bits
        for n in line_numbers:
            index = n >> 3
            if index >= len(bits):
                bits.extend(bytes(index + 1 - len(bits) + len(bits) // 2))
            bits[index] |= 1 << (n & 7)

    def discard_all(self, line_numbers: Iterable[int]) -> None:
        bits = self._bits
        for n in line_numbers:
            if n >> 3 < len(bits):
                bits[n >> 3] &= ~(1 << (n & 7)) & 0xFF

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int) or n < 0:
            return False
        index = n >> 3
        return index < len(self._bits) and bool(self._bits[index] >> (n & 7) & 1)

    def __len__(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def run_from(self, start: int) -> int:
        """How many numbers in a row, from ``start`` on, are in the set."""
        ones = int.from_bytes(self._bits, "little") >> start
        return (ones ^ (ones + 1)).bit_length() - 1  # the trailing 1-bits, counted

    def __iter__(self) -> Iterator[int]:
        for index, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte >> bit & 1:
                        yield index * 8 + bit


@dataclass(slots=True)
class Totals:
    """What the committed records add up to."""

    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    results_len: int = 0
    errors_len: int = 0


def read_journal(path: Path) -> tuple[DoneSet, Totals, int]:
    """The done-set and totals of every complete record, and the byte length they span.

    Reading stops at the first incomplete or corrupt record: that is a commit
    that never finished, and counts as not made.
    """
    done, totals = DoneSet(), Totals()
    length = 0
    for end, lines in _records(path, totals):
        done.add_all(lines)
        length = end
    return done, totals, length


def read_totals(path: Path) -> Totals:
    """The totals of every complete record, without the done-set (whose bits cost a Python
    step a line): for a reader that looks at a running job every few seconds."""
    totals = Totals()
    for _ in _records(path, totals, lines=False):
        pass
    return totals


def _records(path: Path, totals: Totals, *, lines: bool = True) -> Iterator[tuple[int, array[int]]]:
    """Each complete record of the journal at ``path``, added to ``totals``: where it ends,
    and the line numbers it names (left empty unless ``lines``)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from exc
    pos = 0
    while pos + _HEADER.size <= len(data):
        results_len, errors_len, ok, failed, p_tok, c_tok, n = _HEADER.unpack_from(data, pos)
        end = pos + _HEADER.size + 4 * n
        if end + _CRC.size > len(data):
            break
        (crc,) = _CRC.unpack_from(data, end)
        if crc != zlib.crc32(memoryview(data)[pos:end]):
            break
        named = array(_LINE)
        if lines:
            named.frombytes(data[pos + _HEADER.size : end])
        totals.ok += ok
        totals.failed += failed
        totals.prompt_tokens += p_tok
        totals.completion_tokens += c_tok
        totals.results_len, totals.errors_len = results_len, errors_len
        pos = end + _CRC.size
        yield pos, named


def _record(totals: Totals, lines: array[int], delta: Totals) -> bytes:
    header = _HEADER.pack(
        totals.results_len,
        totals.errors_len,
        delta.ok,
        delta.failed,
        delta.prompt_tokens,
        delta.completion_tokens,
        len(lines),
    )
    body = header + lines.tobytes()
    return body + _CRC.pack(zlib.crc32(body))


class Sidecar(Protocol):
    """A small file kept in step with the journal (job/spend.py): ``snapshot`` is taken
    when a commit takes its lines, ``save``d in the commit's thread before its record."""

    def snapshot(self) -> bytes: ...
    def save(self, snapshot: bytes) -> None: ...


class Journal:
    """Owns the two output files and the journal of one job while it runs.

    Only the writer task calls ``append``; ``commit`` (or, during a run,
    ``commit_in_thread``) makes everything appended so far durable.

    The first failed write or fsync (a full disk, an I/O error) breaks the
    journal for the rest of the run: nothing more is appended or committed,
    so no record can vouch for bytes that did not reach the disk. What was
    committed stays done; the rest is cut off and sent again on resume.
    """

    def __init__(self, job_dir: Path, results: Path, errors: Path, *, durable: bool = True) -> None:
        self.path = job_dir / JOURNAL_NAME
        self.durable = durable
        self.failed: StorageError | None = None
        recover(self.path, errors)
        _refuse_lost_journal(self.path, results, errors)
        self.done, self.totals, valid_len = read_journal(self.path)
        self.notes: list[str] = []  # what opening cut away, for the user
        paths = (results, errors, self.path)
        new = not all(path.exists() for path in paths)
        files: list[durable_io.File] = []
        try:
            for path, length in zip(
                paths, (self.totals.results_len, self.totals.errors_len, valid_len), strict=True
            ):
                files.append(_open_at(path, length, self.notes))
            if new:
                # The files' names are durable before any line is written to them: a crash
                # must never leave outputs with lines beside no journal at all.
                for folder in dict.fromkeys(path.parent for path in paths):
                    durable_io.fsync_dir(folder)
        except BaseException:
            for f in files:
                durable_io.close(f)
            raise
        self._results, self._errors, self._journal = files
        self._pending = array(_LINE)
        self._delta = Totals()
        self._lock = threading.Lock()  # one commit at a time, records in order
        self.sidecar: Sidecar | None = None

    def append(self, outcomes: Sequence[Outcome]) -> None:
        """Write the outcomes' lines (one write per file); durable only after ``commit``."""
        if self.failed is not None:
            raise self.failed
        ok = b"".join(o.line for o in outcomes if o.ok)
        failed = b"".join(o.line for o in outcomes if not o.ok)
        try:
            if ok:
                durable_io.write(self._results, ok)
            if failed:
                durable_io.write(self._errors, failed)
        except StorageError as exc:
            self.failed = exc  # lengths stay as they were: no record covers these bytes
            raise
        delta, totals = self._delta, self.totals
        totals.results_len += len(ok)
        totals.errors_len += len(failed)
        for o in outcomes:
            self._pending.append(o.line_no)
            if o.ok:
                delta.ok += 1
            else:
                delta.failed += 1
            delta.prompt_tokens += o.prompt_tokens
            delta.completion_tokens += o.completion_tokens

    def commit(self) -> None:
        """Make every appended line durable: fsync the outputs, then write and fsync a record."""
        self._lock.acquire()
        self._make_durable(self._take())

    async def commit_in_thread(self) -> None:
        """``commit``, with the fsyncs in a worker thread so the event loop keeps sending.

        The lock is taken here and released by the thread when the record is
        on disk, so commits stay in order even if this coroutine is cancelled
        meanwhile; ``close`` waits for it.
        """
        if not self._pending:
            return
        if not self.durable:
            self.commit()
            return
        self._lock.acquire()  # free: the only other taker is close(), after the run
        taken = self._take()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._make_durable, taken)
        # A failure is also kept in self.failed, which close() raises: seen even if this
        # wait was cancelled, and not logged again as "exception never retrieved".
        future.add_done_callback(_retrieve)
        # shield: a cancelled wait must not cancel the job before it ran and released the lock
        await asyncio.shield(future)

    def _take(self) -> _Commit | None:
        """What was appended since the last record; it counts as done once that is on disk."""
        if not self._pending or self.failed is not None:
            return None
        taken = _Commit(
            _record(self.totals, self._pending, self._delta),
            self._pending,
            self._delta,
            None if self.sidecar is None else self.sidecar.snapshot(),
        )
        self._pending = array(_LINE)
        self._delta = Totals()
        return taken

    def _make_durable(self, taken: _Commit | None) -> None:
        """Called holding the lock, which it releases."""
        try:
            if self.failed is not None:
                raise self.failed
            if taken is None:
                return
            for f in (self._results, self._errors):
                _still_there(f)
            if self.durable:
                durable_io.fsync(self._results)
                durable_io.fsync(self._errors)
            if taken.sidecar is not None and self.sidecar is not None:
                self.sidecar.save(taken.sidecar)  # what the lines cost is on disk before them
            # The record is written only after the lines it vouches for are on disk.
            durable_io.write(self._journal, taken.record)
            if self.durable:
                durable_io.fsync(self._journal)
            self.done.add_all(taken.lines)
            t, d = self.totals, taken.delta
            t.ok, t.failed = t.ok + d.ok, t.failed + d.failed
            t.prompt_tokens += d.prompt_tokens
            t.completion_tokens += d.completion_tokens
        except StorageError as exc:
            self.failed = exc  # not done: a record may or may not be on disk, none follows
            raise
        finally:
            self._lock.release()

    def close(self) -> None:
        """Commit what is left and close the files; raises the run's storage failure, if any."""
        try:
            self.commit()
            if self.sidecar is not None and self.failed is None:  # answers with no line too
                self.sidecar.save(self.sidecar.snapshot())
        finally:
            for f in (self._results, self._errors, self._journal):
                durable_io.close(f)


def close_opened(opened: tuple[object, Journal]) -> None:
    """Close the journal an executor's ``_open`` returned: its run was cancelled meanwhile."""
    opened[1].close()


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True, slots=True)
class _Commit:
    """A record to write, and what it makes done once it is on disk."""

    record: bytes
    lines: array[int]
    delta: Totals
    sidecar: bytes | None = None


def _still_there(f: durable_io.File) -> None:
    """Refuse to commit lines to a file that was deleted or replaced while the job ran."""
    try:
        same = os.path.samestat(os.stat(f.path), os.fstat(f.fd))
    except FileNotFoundError:
        same = False
    if not same:
        raise StorageError(
            f"{f.path} was deleted or replaced while the job ran, and the lines it held with "
            "it; put it back and run the same command, or move the job folder away to start "
            "afresh",
            path=f.path,
        )


def _refuse_lost_journal(journal: Path, results: Path, errors: Path) -> None:
    """Outputs with no journal at all were not cut short by a crash: the journal was lost.

    (A run creates the journal, and makes its name durable, before it writes
    its first line, so a crash leaves an empty journal, never none.) Cutting
    the outputs to nothing would throw results away, so refuse instead.
    """
    if journal.exists():
        return
    for path in (results, errors):
        if path.exists() and path.stat().st_size:
            raise JournalError(
                f"{path} has results but the checkpoint {journal} is missing; restore it, "
                f"or move {path} away to start the job afresh"
            )


def _open_at(path: Path, length: int, notes: list[str]) -> durable_io.File:
    """Open ``path`` for appending, cut back to ``length`` bytes: what was committed.

    What is cut is said in ``notes``: a crash leaves a fraction of a second's lines
    behind the last commit, damage to the journal may leave many more.
    """
    f = durable_io.open_file(path)
    size = os.fstat(f.fd).st_size
    if size < length:
        durable_io.close(f)
        raise JournalError(
            f"{path} is shorter ({size} bytes) than the checkpoint says ({length}): it was "
            f"cut or replaced outside batchq; put the complete file back, or move the job "
            f"folder away to start afresh (every request is then sent again)"
        )
    if size > length:  # a torn or uncommitted tail, or what damage to the journal disowns
        try:
            lines = _count_lines(f.fd, length, size)
            durable_io.truncate(f, length)
        except BaseException:
            durable_io.close(f)
            raise
        what = "" if path.name == JOURNAL_NAME else f" ({lines:,} lines, sent again now)"
        notes.append(
            f"cut {size - length:,} bytes{what} from {path}: written after the last commit"
        )
    return f


def _count_lines(fd: int, start: int, end: int) -> int:
    count = 0
    while start < end:
        block = os.pread(fd, min(1 << 20, end - start), start)
        if not block:
            break
        count += block.count(b"\n")
        start += len(block)
    return count


def recover(journal: Path, errors: Path) -> None:
    """Finish or undo a ``--retry-failed`` rewrite that a crash interrupted.

    While ``journal.bin.new`` exists the rewrite is undone, so it is removed
    last, after ``errors.jsonl.new``: a crash in between undoes it again.
    """
    journal_new = journal.with_name(journal.name + ".new")
    errors_new = errors.with_name(errors.name + ".new")
    if journal_new.exists():  # the commit point was not reached: roll back
        durable_io.unlink(errors_new)
        durable_io.fsync_dir(errors.parent)
        durable_io.unlink(journal_new)
        durable_io.fsync_dir(journal.parent)
    elif errors_new.exists():  # the new journal is in place: roll forward
        durable_io.replace(errors_new, errors)
        durable_io.fsync_dir(errors.parent)


def retry_failed(job_dir: Path, results: Path, errors: Path) -> int:
    """Move the retryable failures of errors.jsonl back to pending; return how many.

    Runs before a job opens its journal, under the job's lock.
    """
    path = job_dir / JOURNAL_NAME
    recover(path, errors)
    done, totals, _ = read_journal(path)
    committed = _read_committed(errors, totals.errors_len)
    kept, retried = [], array(_LINE)
    for line in committed.splitlines(keepends=True):
        meta = _meta(errors, line)
        if meta.get("retryable"):
            retried.append(int(meta["line"]))
        else:
            kept.append(line)
    if not retried:
        return 0
    done.discard_all(retried)
    new_errors = b"".join(kept)
    totals.errors_len, totals.failed = len(new_errors), len(kept)
    snapshot = Totals(ok=totals.ok, failed=len(kept), **_tokens(totals))
    journal_new = path.with_name(path.name + ".new")
    # The new journal is written, and its name made durable, first: while it exists
    # recover() rolls back, so a crash while errors.jsonl.new is half-written changes
    # nothing. errors.jsonl.new is durable before the rename that commits both.
    durable_io.write_synced(journal_new, _record(totals, array(_LINE, done), snapshot))
    durable_io.fsync_dir(job_dir)
    durable_io.write_synced(errors.with_name(errors.name + ".new"), new_errors)
    durable_io.fsync_dir(errors.parent)
    durable_io.replace(journal_new, path)  # the commit point
    durable_io.fsync_dir(job_dir)
    recover(path, errors)
    return len(retried)


def _read_committed(errors: Path, length: int) -> bytes:
    try:
        with errors.open("rb") as f:
            committed = f.read(length)
    except FileNotFoundError:
        committed = b""
    except OSError as exc:
        raise StorageError.from_os("read", errors, exc) from exc
    if len(committed) < length:
        raise JournalError(
            f"{errors} is shorter ({len(committed)} bytes) than the checkpoint says ({length}): "
            "it was cut or replaced outside batchq; put the complete file back first"
        )
    return committed


def _meta(errors: Path, line: bytes) -> dict[str, Any]:
    """The ``batchq`` part of a committed error line."""
    try:
        meta = orjson.loads(line).get("batchq") or {}
        int(meta.get("line", 0))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        raise JournalError(
            f"{errors} holds a line that batchq did not write ({line[:80]!r}); "
            "put the file back as batchq wrote it"
        ) from None
    return meta


def _tokens(totals: Totals) -> dict[str, int]:
    return {"prompt_tokens": totals.prompt_tokens, "completion_tokens": totals.completion_tokens}
