"""What every run of a job does around its executor: lock, open, and close the job.

Both executors run inside ``open_run``: it takes the job's (or shard's)
lock, pins the input and opens the journal in a worker thread, and on the
way out commits and closes it, holding the lock until no thread of the run
works on the job any more, however often it is cancelled.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from batchq.errors import Notify
from batchq.job.batches import remove_downloads
from batchq.job.folder import (
    Job,
    add_elapsed,
    job_lock,
    prepare,
    read_state,
    save_settings,
    to_thread_to_the_end,
    write_state,
)
from batchq.job.journal import Journal, close_opened, retry_failed
from batchq.job.shard import Span
from batchq.stats import Stats

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class OpenRun:
    """An open job: the part of the input this run takes, its journal and its counters."""

    span: Span
    journal: Journal
    stats: Stats


class RunOptions(Protocol):
    """What both executors' options say about opening a job."""

    @property
    def retry_failed(self) -> bool: ...  # move the retryable failures back to pending first
    @property
    def durable(self) -> bool: ...  # fsync the checkpoint
    @property
    def on_notice(self) -> Notify: ...
    @property
    def handle_signals(self) -> bool: ...
    @property
    def on_open(self) -> Callable[[], Awaitable[None]] | None: ...  # open, nothing sent yet
    @property
    def on_stats(self) -> Callable[[Stats], Awaitable[None]] | None: ...  # the run's counters


@contextlib.asynccontextmanager
async def open_run(job: Job, options: RunOptions) -> AsyncIterator[OpenRun]:
    """The job opened under its lock; committed and closed when the block ends.

    ``handle_signals``: from the moment the journal is open, SIGINT and
    SIGTERM are noted (``stats.interrupted``, exit 130), never raised, so the
    last commit is not cut short; an executor puts its own handlers on top
    while it works. Only for the command line: a library leaves signals to
    its application.
    """
    on_notice = options.on_notice
    prepared: Span | None = None
    if job.shard is not None:
        # A shard's folder exists once the count is settled, so its lock comes second.
        prepared = await to_thread_to_the_end(_prepare, job)
    with job_lock(job.run_dir):
        # Hashing the input and the fsyncs of opening and closing run off the event
        # loop's thread, so that a loop the engine shares is never stalled by them.
        span, journal = await to_thread_to_the_end(
            _open, job, options.retry_failed, options.durable, on_notice, prepared,
            undo=close_opened,
        )  # fmt: skip
        for note in journal.notes:  # lines cut away, sent again
            on_notice(note, logging.WARNING)
        stats = Stats(
            ok_before=journal.totals.ok, failed_before=journal.totals.failed, total=span.requests
        )
        with _signals_noted(stats, options.handle_signals):
            try:
                if stats.done:
                    on_notice(f"resuming: {stats.done:,} of {stats.total:,} done")
                if options.on_stats is not None:  # --metrics-port: it serves them from now on
                    await options.on_stats(stats)
                if options.on_open is not None:
                    await options.on_open()
                yield OpenRun(span, journal, stats)
            finally:
                await to_thread_to_the_end(_close, job, journal, stats)


def _prepare(job: Job) -> Span:
    return prepare(job)[1]


def _open(
    job: Job, retry: bool, durable: bool, on_notice: Notify, span: Span | None
) -> tuple[Span, Journal]:
    if span is None:
        span = _prepare(job)
    else:  # for `batchq status`: the shard's own part of the input
        figures = {"start": span.start, "end": span.end, "first_line": span.first_line}
        state = read_state(job.run_dir)
        if {k: state.get(k) for k in figures} != figures or state.get("requests") != span.requests:
            write_state(job.run_dir, {**state, **figures, "requests": span.requests})
    save_settings(job)  # only now, holding the run's lock: a refused run changes nothing
    remove_downloads(job.run_dir)
    if retry:
        moved = retry_failed(job.run_dir, job.results, job.errors)
        on_notice(f"--retry-failed: {moved:,} retryable failures back to pending")
    return span, Journal(job.run_dir, job.results, job.errors, durable=durable)


def _close(job: Job, journal: Journal, stats: Stats) -> None:
    try:
        journal.close()
    finally:
        add_elapsed(job.run_dir, stats.elapsed)


@contextlib.contextmanager
def _signals_noted(stats: Stats, enabled: bool) -> Iterator[None]:
    def note(signum: int, frame: object) -> None:
        stats.interrupted = True

    previous = {sig: signal.signal(sig, note) for sig in SIGNALS if enabled}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
