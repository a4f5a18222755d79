"""The batch executor: a job's pending lines through the provider's Batch API, exactly once.

One round, repeated until no line is pending and no batch is open::

    plan ──▶ upload ──▶ create ──▶ poll … ──▶ download ──▶ commit ──▶ collected
    (job/batches.py records each step, fsynced, before the next is taken)

A run first takes every open chunk of the ledger as far as it got (a file
planned but not uploaded is uploaded; a create that may have happened is
looked for before it is made again), then plans the lines that are neither
done nor held by an open batch. Lines a batch leaves undone (5xx, expired,
cancelled) are planned again in a later round, up to ``max_attempts``.

Stopping (Ctrl-C, or ``detach``) stops *waiting*: the batches go on at the
provider and are billed, and the next run collects them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchq.answers import Answers, load_answers
from batchq.batch.collect import (
    Damaged,
    check,
    collect,
    read_ids,
    rejected_lines,
    validation_errors,
)
from batchq.batch.plan import Dialect, check_window, dialect_of, plan
from batchq.batch.provider import Provider, ProviderError, Uncertain
from batchq.config import strip_secrets, url_secrets
from batchq.errors import ConfigError, Notify, StorageError
from batchq.job import durable
from batchq.job.batches import DOWNLOADS, Chunk, Ledger, in_ranges, to_ranges
from batchq.job.folder import Job
from batchq.job.history import History
from batchq.job.journal import DoneSet
from batchq.job.run import SIGNALS, OpenRun, open_run
from batchq.reader import RequestTemplate, feed
from batchq.records import Outcome, Request, hidden, scrubbers
from batchq.stats import Stats

#: The provider's states after which a batch changes no more.
FINAL = frozenset({"completed", "failed", "expired", "cancelled", "gone"})  # gone: a 404
FILES_LATE = 5  # looks at a final batch that names no file yet before the job stops
CREATE_TRIES = 5
DOWNLOAD_TRIES = 3
APPEND_BYTES = 1 << 20  # output lines a collect hands to the journal at a time
FREE_TRIES = 6  # batches in a row refused for a full account before that counts as a try
SHOW_EVERY = 60.0  # seconds between progress lines while no batch changes state
#: How far back (seconds) to look for a batch whose create answer was lost.
FIND_SLACK = 3600.0

#: Test hook, None in normal runs: called with the name of each step as it is reached
#: (the crash tests SIGKILL the process there).
at_step: Callable[[str], None] | None = None


def _reached(step: str) -> None:
    if at_step is not None:
        at_step(step)


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchOptions:
    """How to run a job through the Batch API, beyond its settings."""

    api_key: str | None = None
    retry_failed: bool = False
    durable: bool = True
    detach: bool = False  # return once every batch is created
    cancel: bool = False  # cancel the open batches, collect what they finished
    # --via auto: lines no batch takes, and lines a batch left undone, stay pending for the
    # live engine; a batch that cannot finish by ``deadline`` (time.time()) is cancelled.
    live_after: bool = False
    deadline: float | None = None
    live_rate: float | None = None  # lines a second the live engine is paced to, if known
    on_notice: Notify = field(default=lambda message, level=logging.INFO: None)
    handle_signals: bool = False  # SIGINT/SIGTERM stop waiting: for the command line
    on_outcomes: Callable[[list[bytes]], Awaitable[None]] | None = None  # lines committed
    on_open: Callable[[], Awaitable[None]] | None = None  # the job is open, nothing sent yet
    on_stats: Callable[[Stats], Awaitable[None]] | None = None  # its counters, once open


async def run_batches(job: Job, options: BatchOptions) -> Stats:
    """Run ``job`` through the provider's batches until every line is done, or detached.

    Raises ConfigError (exit 2) for lines no batch can take, before anything
    is uploaded; FatalEndpointError (exit 3) when the provider refuses.
    """
    dialect = dialect_of(job.settings)
    check_window(job.settings.completion_window, dialect)
    answers = load_answers(job.settings, job.dir)  # a bad schema is refused before anything
    async with open_run(job, options) as opened:
        s = job.settings
        provider = Provider(
            s.base_url,
            options.api_key,
            timeout=s.timeout,
            connect_timeout=s.connect_timeout,
            backoff=min(1.0, s.batch_poll),
        )
        ledger = Ledger(job.run_dir)
        try:
            async with provider:
                run = BatchRun(job, opened, ledger, provider, options, dialect, answers)
                with run.signals():
                    try:
                        await run.run()
                    finally:  # the last point of `batchq view`'s charts
                        run.history.record(run.stats, time.monotonic(), pace=None)
                        run.history.close()
        finally:
            ledger.close()
    return opened.stats


class BatchRun:
    """One run of the batch executor over one job folder."""

    def __init__(
        self,
        job: Job,
        opened: OpenRun,
        ledger: Ledger,
        provider: Provider,
        options: BatchOptions,
        dialect: Dialect,
        answers: Answers | None = None,
    ) -> None:
        self.job = job
        self.answers = answers  # the check of every answer (--json-schema, --json-mode)
        self.span, self.journal, self.stats = opened.span, opened.journal, opened.stats
        self.ledger, self.provider, self.options, self.dialect = ledger, provider, options, dialect
        self.notice = options.on_notice
        self.base = strip_secrets(job.settings.base_url, mask="***")[0].rstrip("/")
        self.scrubbers = scrubbers(options.api_key, *url_secrets(job.settings))
        self.stopping = asyncio.Event()
        self._shown, self._shown_at = "", 0.0
        self._replan = not options.cancel  # the input is scanned again only when lines came back
        self._cancelled: set[int] = set()  # chunks this run asked the provider to cancel
        self._full = 0  # batches in a row refused for the account's enqueued tokens
        self._late: dict[int, int] = {}  # looks at final batches that named no file yet
        self._resubmit_at = 0.0  # time.monotonic() before which nothing is planned again
        self._reserve = 0.0 if options.deadline is None else 0.1 * (options.deadline - time.time())
        self.history = History(job.run_dir, prices=(job.settings.price_in, job.settings.price_out))

    async def run(self) -> None:
        elsewhere = {c.base for c in self.ledger.open_chunks() if c.base not in (None, self.base)}
        if elsewhere:
            raise ConfigError(
                f"this job's open batches were sent to {', '.join(map(str, elsewhere))}, not "
                f"{self.base}: run it with that --base-url (and its key) to collect them"
            )
        if self.stats.interrupted:  # signalled while the job was opening: nothing is sent
            self.stopping.set()
        elif self.options.cancel:
            await self.cancel_open()
        elif self.options.detach:
            await self.collect_finished()  # a detached run collects what is done, then submits
        while not self.stopping.is_set():
            for chunk in self.ledger.open_chunks():
                await self.submit(chunk)
            if self._replan and self._may_replan():
                self._replan = False
                await self.plan_and_submit()
            if self.options.detach:
                break
            if not self.ledger.open_chunks():
                if not self._replan:
                    break
                await self._sleep(self._resubmit_at - time.monotonic())  # the account is full
                continue
            await self.wait_and_collect()
        self.stats.batches_open = len(self.ledger.open_chunks())
        if self.stopping.is_set() or self.options.detach:
            self.stats.interrupted = self.stopping.is_set()
            self._say_left_running()

    def _may_replan(self) -> bool:
        """After a batch was refused for the account's enqueued tokens, lines go again only
        once the job's other batches are done (theirs are the tokens that drain) and a
        back-off has passed (from --batch-poll, doubling, at most 30 minutes)."""
        if not self._full:
            return True
        return not self.ledger.open_chunks() and time.monotonic() >= self._resubmit_at

    async def _sleep(self, seconds: float) -> None:
        """Wait, but not past a Ctrl-C."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), max(0.0, seconds))

    async def plan_and_submit(self) -> None:
        """Plan the lines neither done nor held by an open batch, then submit them."""
        done, held, tried = self.journal.done, self.ledger.held(), self.ledger.attempts()
        if self.options.live_after:  # what a batch left undone goes live, not in another batch

            def skip(n: int) -> bool:
                return n in done or n in held or n in tried
        else:

            def skip(n: int) -> bool:
                return n in done or n in held

        planned = await plan(
            self.job.settings,
            self.job.input,
            self.span,
            skip,
            tried,
            self.ledger.folder,
            self.ledger.next_number(),
            self.dialect,
            self.answers,
        )
        if planned.refused_count and self.options.live_after:
            self.notice(
                f"{planned.refused_count:,} lines cannot go by batch and go live: "
                + "; ".join(planned.refused)
            )
        elif planned.refused_count:
            for chunk in planned.chunks:
                _remove_files(self.ledger.folder, chunk)
            raise ConfigError(
                f"{planned.refused_count:,} lines cannot go through {self.dialect.name}'s Batch "
                f"API, so nothing was uploaded: {'; '.join(planned.refused)}"
            )
        await self._commit(planned.rejected)
        for chunk in planned.chunks:
            chunk.base = self.base
            self.ledger.plan(chunk)
        _reached("planned")
        if planned.chunks:
            lines = sum(c.count for c in planned.chunks)
            self.notice(f"planned {len(planned.chunks)} batches of {lines:,} lines in all")
        for chunk in planned.chunks:
            if self.stopping.is_set():
                return
            await self.submit(chunk)

    async def submit(self, chunk: Chunk) -> None:
        """Take ``chunk`` from wherever it got to up to a created batch."""
        if chunk.batch_id is not None:
            return
        if chunk.file_id is None:
            path = self.ledger.folder / f"{chunk.name}.jsonl"
            if not path.exists():  # batches/ deleted before the upload: plan its lines again
                self.ledger.step(
                    chunk, "collected", status="not created", retry=chunk.lines, free=True
                )
                _remove_files(self.ledger.folder, chunk)
                self._replan = True
                return
            uploaded = await self.provider.upload(path, f"{self.job.dir.name}-{chunk.name}.jsonl")
            _reached("uploaded")
            self.ledger.step(chunk, "upload", file_id=str(uploaded["id"]))
        if chunk.creating and await self.find(chunk):
            return
        if not chunk.creating:
            self.ledger.step(chunk, "create")  # from here on, the batch may exist
            _reached("creating")
        for attempt in range(1, CREATE_TRIES + 1):
            try:
                batch = await self.provider.create(
                    str(chunk.file_id), chunk.url, self.job.settings.completion_window,
                    self._metadata(chunk),
                )  # fmt: skip
            except Uncertain as exc:
                # Never create blindly again: the lost answer may have made the batch.
                self.notice(f"{chunk.name}: no answer to its create ({exc}); looking for it")
                await asyncio.sleep(min(30.0, self.job.settings.batch_poll * 2**attempt))
                if await self.find(chunk):
                    return
                continue
            _reached("created")
            self.ledger.step(chunk, "created", batch_id=str(batch["id"]))
            self.stats.batches_created += 1
            return
        raise ProviderError(
            f"cannot create a batch for {chunk.name}: no answer {CREATE_TRIES} times"
        )

    async def find(self, chunk: Chunk) -> bool:
        """Look for the batch of a create whose answer was lost; record it if found."""
        wanted = self._metadata(chunk)
        async for batch in self.provider.batches():
            metadata = batch.get("metadata")
            if (
                isinstance(metadata, dict)
                and all(metadata.get(k) == v for k, v in wanted.items())
                and isinstance(batch.get("id"), str)
            ):
                self.ledger.step(chunk, "created", batch_id=str(batch["id"]))
                return True
            created = batch.get("created_at")
            if isinstance(created, int | float) and created < chunk.planned_at - FIND_SLACK:
                break  # newest first: nothing older can be ours
        return False

    def _metadata(self, chunk: Chunk) -> dict[str, str]:
        return {
            "batchq_job": self.ledger.job_id,
            "batchq_chunk": str(chunk.number),
            "batchq_lines": f"{chunk.lines[0][0]}-{chunk.lines[-1][1]}" if chunk.lines else "",
        }

    async def wait_and_collect(self) -> None:
        """Poll the open batches until one or more has finished; collect those."""
        while not self.stopping.is_set() and not await self.collect_finished():
            self._record()
            await self._sleep(self.job.settings.batch_poll)

    async def collect_finished(self) -> bool:
        """Look at every open batch once and collect those that finished; whether any had."""
        finished = []
        for chunk in self.ledger.open_chunks():
            if chunk.batch_id is None:
                continue  # not created yet: submit() takes it on
            batch = await self._retrieve(chunk)
            self._seen(chunk, batch)
            if _status(batch) in FINAL and self._files_ready(chunk, batch):
                finished.append((chunk, batch))
            elif self._too_late(chunk):
                await self._cancel(chunk, "it cannot finish before the deadline")
        self._show()
        for chunk, batch in finished:
            await self.collect(chunk, batch)
        self.stats.batches_open = len(self.ledger.open_chunks())  # for --metrics-port, as it goes
        return bool(finished)

    async def _retrieve(self, chunk: Chunk) -> dict[str, Any]:
        """The batch as the provider has it now; a batch it no longer knows (404: deleted,
        or another account's) is "gone", and its lines not answered go again."""
        try:
            return await self.provider.retrieve(str(chunk.batch_id))
        except ProviderError as exc:
            if exc.status != 404:
                raise
        self.notice(
            f"batch {chunk.batch_id} ({chunk.name}) is unknown to the provider (HTTP 404); "
            "its lines go again",
            logging.WARNING,
        )
        return {"status": "gone"}

    def _files_ready(self, chunk: Chunk, batch: dict[str, Any]) -> bool:
        """Whether a final batch's files are there to collect: a batch that says it answered
        lines but names no file yet is looked at again, not taken for unanswered (which
        would pay for its lines again); after ``FILES_LATE`` looks, the job stops."""
        answered = chunk.counts.get("completed", 0) + chunk.counts.get("failed", 0)
        if answered == 0 or batch.get("output_file_id") or batch.get("error_file_id"):
            return True
        self._late[chunk.number] = late = self._late.get(chunk.number, 0) + 1
        if late >= FILES_LATE:
            raise ProviderError(
                f"batch {chunk.batch_id} is {_status(batch)} with {answered:,} lines answered "
                "but names no output or error file; run the same command later to collect it"
            )
        return False

    def _too_late(self, chunk: Chunk) -> bool:
        """Whether ``chunk``'s batch must stop now: the deadline less the time its unfinished
        lines would take live (at least a tenth of the time the run was given) has come.

        Not earlier, even when its pace shows it cannot finish: every line it finishes
        until then is one line fewer at the live price.
        """
        if self.options.deadline is None or chunk.number in self._cancelled:
            return False
        total, completed = chunk.counts.get("total", chunk.count), chunk.counts.get("completed", 0)
        left = max(0, total - completed)
        live = left / self.options.live_rate if self.options.live_rate else 0.0
        return time.time() >= self.options.deadline - max(self._reserve, live)

    async def _cancel(self, chunk: Chunk, why: str) -> None:
        """Ask the provider to stop ``chunk``'s batch; what it finished is still collected."""
        self._cancelled.add(chunk.number)
        self.notice(f"cancelling batch {chunk.batch_id} ({chunk.count:,} lines): {why}")
        try:
            batch = await self.provider.cancel(str(chunk.batch_id))
        except ProviderError as exc:
            # 409 (or a gateway's 400/422): it finished, or is cancelling, already
            if exc.status is None or not 400 <= exc.status < 500:
                raise
            batch = await self._retrieve(chunk)
        self._seen(chunk, batch)

    def _seen(self, chunk: Chunk, batch: dict[str, Any]) -> None:
        status = _status(batch)
        counts = batch.get("request_counts")
        counts = (
            {k: v for k, v in counts.items() if isinstance(v, int)}
            if isinstance(counts, dict)
            else {}
        )
        if status != chunk.status:
            self.ledger.step(chunk, "status", status=status, counts=counts)
        chunk.counts = counts

    async def collect(self, chunk: Chunk, batch: dict[str, Any]) -> None:
        """Commit a finished batch's lines; mark it collected once they are durable."""
        status = _status(batch)
        ids = await self._ids(chunk)
        files: list[Path] = []
        # The downloads hold the answers as the provider sent them, an echoed key included:
        # they go as soon as the collect ends, however it ends.
        gone: list[str] = []
        try:
            for key in ("output_file_id", "error_file_id"):
                file_id = batch.get(key)
                if isinstance(file_id, str) and file_id:  # null, or "" from DashScope: none
                    path = await self._download(chunk, file_id, key.split("_")[0], ids)
                    files += [path] if path is not None else []
                    gone += [file_id] if path is None else []
            await self._commit_collected(chunk, batch, status, ids, files, gone)
        finally:
            for path in files:
                with contextlib.suppress(StorageError):
                    durable.unlink(path)

    async def _commit_collected(
        self,
        chunk: Chunk,
        batch: dict[str, Any],
        status: str,
        ids: dict[str, tuple[int, str]],
        files: list[Path],
        gone: list[str],
    ) -> None:
        _reached("downloaded")
        # Handed to the journal a slice at a time, so memory holds one slice of a batch's
        # answers, not all of them (but for the lines on_outcomes is given after the commit);
        # none is durable, nor the batch collected, before the commit.
        outcomes: list[Outcome] = []
        appended: list[bytes] = []
        held = 0

        def emit(outcome: Outcome) -> None:
            nonlocal held
            outcomes.append(outcome)
            held += len(outcome.line)
            if held >= APPEND_BYTES:
                self._append(outcomes)
                if self.options.on_outcomes is not None:
                    appended.extend(o.line for o in outcomes)
                outcomes.clear()
                held = 0

        rejected = rejected_lines(chunk, batch) if status == "failed" else {}
        # Refused for the account's enqueued tokens: its lines go again later, and (the first
        # few times in a row) without counting a try.
        full = (
            status == "failed"
            and self._full < FREE_TRIES
            and any(
                code == "token_limit_exceeded" for _, code, _ in validation_errors(chunk, batch)
            )
        )
        collected = collect(
            files, chunk, ids, self.journal.done,
            max_attempts=self.job.settings.max_attempts, emit=emit, rejected=rejected, free=full,
            answers=self.answers, gone=gone,
        )  # fmt: skip
        if status == "failed":
            self._say_failed(chunk, batch, len(rejected))
        await self._commit(outcomes, appended)
        _reached("committed")
        # Only now, with its lines durable, is the batch collected: a crash before this
        # line collects it again, and finds those lines done.
        retry = to_ranges(collected.retry)
        self.ledger.step(chunk, "collected", status=status, retry=retry, free=full)
        if collected.retry and not (self.options.cancel or self.options.live_after):
            self._replan = True  # lines to send again in a batch of their own
        if full:
            self._full += 1
            delay = min(1800.0, self.job.settings.batch_poll * 2**self._full)
            self._resubmit_at = time.monotonic() + delay
        elif status == "completed":
            self._full = 0
        _remove_files(self.ledger.folder, chunk)
        if collected.unknown or collected.twice:
            self.notice(
                f"{chunk.name}: the batch's files held {collected.unknown} lines it was not sent "
                f"and {collected.twice} twice; they were left out",
                logging.WARNING,
            )

    async def _ids(self, chunk: Chunk) -> dict[str, tuple[int, str]]:
        """The chunk's upload ids, from the file beside it or, where that was lost (the
        batches/ folder deleted) or damaged, read again from its input lines (a short one
        would leave answers unmatched)."""
        path = self.ledger.folder / f"{chunk.name}.ids"
        if path.exists():
            with contextlib.suppress(Damaged):
                kept = read_ids(path)
                if len(kept) == chunk.count:
                    return kept
        lines = DoneSet()
        lines.add_all(in_ranges(chunk.lines))
        ids: dict[str, tuple[int, str]] = {}

        async def found(request: Request) -> None:
            ids[f"batchq-{request.line_no}"] = (request.line_no, request.custom_id)

        async def bad(outcome: Outcome) -> None:  # it was a request when it was planned
            pass

        await feed(
            self.job.input, self.span.end, lambda n: n not in lines,
            RequestTemplate.from_settings(self.job.settings), found, bad,
            start=self.span.start, first_line=self.span.first_line,
        )  # fmt: skip
        return ids

    async def _download(
        self, chunk: Chunk, file_id: str, kind: str, ids: dict[str, tuple[int, str]]
    ) -> Path | None:
        """A file of the batch, downloaded whole and checked; removed if it never is.

        None: the provider no longer has it (404). A file damaged in every download is
        collected for its readable lines: fetching it forever would hold the job's lines,
        and its good answers, for good.
        """
        target = self.ledger.folder / f"{chunk.name}.{kind}.jsonl"
        about = f"the {kind} file {file_id} of batch {chunk.batch_id}"
        try:
            size = await self._size(file_id)
            for attempt in range(1, DOWNLOAD_TRIES + 1):
                await self.provider.download(file_id, target, size)
                try:
                    check(target, ids)
                    return target
                except Damaged as exc:
                    if attempt == DOWNLOAD_TRIES:
                        self.notice(
                            f"{about} is damaged ({exc}) in {DOWNLOAD_TRIES} downloads in a "
                            "row: its readable lines are collected",
                            logging.WARNING,
                        )
            return target
        except ProviderError as exc:
            with contextlib.suppress(StorageError):
                durable.unlink(target)
            if exc.status != 404:
                raise
            self.notice(f"{about} is gone (HTTP 404)", logging.WARNING)
            return None
        except BaseException:
            with contextlib.suppress(StorageError):
                durable.unlink(target)
            raise

    async def _size(self, file_id: str) -> int | None:
        """The bytes of a file as the provider states them; None if it does not (a gateway
        that serves the content but not this)."""
        try:
            info = await self.provider.file(file_id)
        except ProviderError as exc:
            if exc.status != 404:
                raise
            return None
        return info.get("bytes") if isinstance(info.get("bytes"), int) else None

    async def cancel_open(self) -> None:
        """Cancel every open batch; chunks never created are released without a call."""
        for chunk in self.ledger.open_chunks():
            if chunk.batch_id is None and chunk.creating:
                await self.find(chunk)
            if chunk.batch_id is None:
                self.ledger.step(chunk, "collected", status="not created", retry=chunk.lines)
                _remove_files(self.ledger.folder, chunk)
                continue
            if chunk.status not in FINAL:
                await self._cancel(chunk, "as asked")
        if self.ledger.open_chunks():
            self.notice("collecting what the cancelled batches finished")

    async def _commit(self, outcomes: list[Outcome], appended: Sequence[bytes] = ()) -> None:
        """Append ``outcomes`` and make them durable, with the lines ``appended`` before them;
        then hand all of them to ``on_outcomes``."""
        self._append(outcomes)
        await self.journal.commit_in_thread()
        self._record()
        lines = [*appended, *(o.line for o in outcomes)]
        if lines and self.options.on_outcomes is not None:
            await self.options.on_outcomes(lines)

    def _record(self) -> None:
        """A point of the job's history (job/history.py), when one is due."""
        if self.history.due(now := time.monotonic()):
            self.history.record(self.stats, now, pace=None)

    def _append(self, outcomes: list[Outcome]) -> None:
        if not outcomes:
            return
        for scrubber in self.scrubbers:
            for o in outcomes:
                o.line = scrubber.scrub(o.line)
        self.journal.append(outcomes)
        for o in outcomes:
            if o.ok:
                self.stats.ok += 1
            else:
                self.stats.failed += 1
            self.stats.prompt_tokens += o.prompt_tokens
            self.stats.completion_tokens += o.completion_tokens
            self.stats.batch_prompt_tokens += o.prompt_tokens
            self.stats.batch_completion_tokens += o.completion_tokens

    def _show(self) -> None:
        """A line when the batches' states change, and at most a minute apart while they
        work: batches by state, the provider's count of their lines done, the job's."""
        states: dict[str, int] = {}
        held = answered = 0
        for chunk in self.ledger.open_chunks():
            states[chunk.status or "submitted"] = states.get(chunk.status or "submitted", 0) + 1
            held += chunk.count
            answered += chunk.counts.get("completed", 0) + chunk.counts.get("failed", 0)
        text = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        now = time.monotonic()
        if text == self._shown and now - self._shown_at < SHOW_EVERY:
            return
        self._shown, self._shown_at = text, now
        self.notice(
            f"batches: {text} · {answered:,} of their {held:,} lines answered"
            f" · job: {self.stats.done:,} of {self.stats.total or 0:,} done"
        )

    def _say_failed(self, chunk: Chunk, batch: dict[str, Any], rejected: int) -> None:
        reasons = [
            f"{code}: {message}" + (f" (input line {line_no})" if line_no else "")
            for line_no, code, message in validation_errors(chunk, batch)[:3]
        ]
        text = "; ".join(reasons) or "no reason given"
        text = hidden(text, self.scrubbers)
        fate = (
            f"{rejected:,} lines it named go to errors, the rest again"
            if rejected
            else ("its lines go again")
        )
        self.notice(
            f"batch {chunk.batch_id} ({chunk.name}) failed: {text}; {fate}", logging.WARNING
        )

    def _say_left_running(self) -> None:
        running = [c for c in self.ledger.open_chunks() if c.batch_id is not None]
        if running:
            self.notice(
                f"{len(running)} batches go on running at the provider (and are billed); "
                "run the same command to collect them, or `batchq cancel JOB` to stop them",
                logging.WARNING,
            )

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM stop the waiting (the batches go on); a second one stops at once,
        in the middle of a provider call (which may retry for minutes)."""
        if not self.options.handle_signals:
            yield
            return
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        cancelled = False

        def stop() -> None:
            nonlocal cancelled
            if not self.stopping.is_set():
                self.stopping.set()
                self.notice(
                    "stopping: the batches go on at the provider (Ctrl-C again to stop at once)"
                )
            elif not cancelled:
                cancelled = True
                main.cancel()

        previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in SIGNALS}
        for sig in SIGNALS:
            loop.add_signal_handler(sig, stop)
        try:
            yield
        except asyncio.CancelledError:
            if not cancelled or main.uncancel():  # a cancel that is not the signal's
                raise
            self.stats.interrupted = True
            self.stats.batches_open = len(self.ledger.open_chunks())
            self._say_left_running()
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)


def _status(batch: dict[str, Any]) -> str:
    status = batch.get("status")
    return status if isinstance(status, str) else "unknown"


def _remove_files(folder: Path, chunk: Chunk) -> None:
    for suffix in (".jsonl", ".ids", *DOWNLOADS):
        durable.unlink(folder / f"{chunk.name}{suffix}")
