"""`batchq.job.journal`: the done-set, commit and reopen, torn and uncommitted tails, a journal
cut at every byte, corruption, and `--retry-failed` with the crash states it can leave.

Crashes are real where it matters: a forked child appends and dies with ``os._exit``,
never closing or committing. Other crash states are built by hand, byte for byte."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchq.errors import JournalError
from batchq.job.journal import JOURNAL_NAME, DoneSet, Journal, Totals, read_journal, retry_failed
from batchq.records import Outcome, Request, error_line, result_line

CHAT = "/v1/chat/completions"


# --- realistic outcomes --------------------------------------------------------------


def ok(n: int) -> Outcome:
    request = Request(n, f"req-{n}", CHAT, b'{"messages": []}', 10)
    body = {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"answer {n}"}}],
        "usage": {"prompt_tokens": n, "completion_tokens": 2 * n, "total_tokens": 3 * n},
    }
    line = result_line(request, 200, f"req_{n}", orjson.dumps(body), body, attempts=1)
    return Outcome(n, True, line, prompt_tokens=n, completion_tokens=2 * n)


def failed(n: int, *, retryable: bool) -> Outcome:
    if retryable:
        status, code, message, attempts = 503, "server_error", "HTTP 503: overloaded", 8
    else:
        status, code, message, attempts = 400, "invalid_request_error", "HTTP 400: bad", 1
    body = {"error": {"message": message, "type": code, "code": None}}
    line = error_line(
        n,
        f"req-{n}",
        code,
        message,
        status=status,
        request_id=f"req_{n}",
        body=body,
        attempts=attempts,
        retryable=retryable,
    )
    return Outcome(n, False, line)


def bad_input(n: int) -> Outcome:
    return Outcome(n, False, error_line(n, f"line-{n}", "invalid_json", "not valid JSON"))


# --- a job folder and what it should hold --------------------------------------------


@dataclass(frozen=True)
class Job:
    dir: Path

    @property
    def results(self) -> Path:
        return self.dir / "results.jsonl"

    @property
    def errors(self) -> Path:
        return self.dir / "errors.jsonl"

    @property
    def journal(self) -> Path:
        return self.dir / JOURNAL_NAME

    def open(self) -> Journal:
        return Journal(self.dir, self.results, self.errors, durable=False)

    def retry_failed(self) -> int:
        return retry_failed(self.dir, self.results, self.errors)

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.dir.iterdir() if p.name.endswith(".new"))


@pytest.fixture
def job(tmp_path: Path) -> Job:
    return Job(tmp_path)


@dataclass(frozen=True)
class State:
    """What a reopened journal must show: done-set, totals and both output files."""

    done: frozenset[int]
    results: bytes
    errors: bytes
    ok: int
    failed: int
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, outcomes: Iterable[Outcome]) -> State:
        outs = list(outcomes)
        return cls(
            done=frozenset(o.line_no for o in outs),
            results=b"".join(o.line for o in outs if o.ok),
            errors=b"".join(o.line for o in outs if not o.ok),
            ok=sum(o.ok for o in outs),
            failed=sum(not o.ok for o in outs),
            prompt_tokens=sum(o.prompt_tokens for o in outs),
            completion_tokens=sum(o.completion_tokens for o in outs),
        )


EMPTY = State.of([])


def check(job: Job, journal: Journal, expected: State) -> None:
    """The open ``journal`` and the files on disk show exactly ``expected``."""
    assert frozenset(journal.done) == expected.done
    assert journal.totals == Totals(
        ok=expected.ok,
        failed=expected.failed,
        prompt_tokens=expected.prompt_tokens,
        completion_tokens=expected.completion_tokens,
        results_len=len(expected.results),
        errors_len=len(expected.errors),
    )
    assert job.results.read_bytes() == expected.results
    assert job.errors.read_bytes() == expected.errors


def reopen_and_check(job: Job, expected: State) -> None:
    journal = job.open()
    try:
        check(job, journal, expected)
    finally:
        journal.close()


def commit_batches(job: Job, batches: Sequence[Sequence[Outcome]]) -> list[tuple[int, State]]:
    """Append and commit each batch; after each commit, the journal's length and the state."""
    journal = job.open()
    snapshots: list[tuple[int, State]] = []
    so_far: list[Outcome] = []
    try:
        for batch in batches:
            journal.append(batch)
            journal.commit()
            so_far.extend(batch)
            snapshots.append((job.journal.stat().st_size, State.of(so_far)))
    finally:
        journal.close()
    return snapshots


def in_a_process_that_dies(work: Callable[[], None]) -> None:
    """Run ``work`` in a forked child that then dies at once: no close, no commit, no cleanup."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed before it 'crashed'"


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

BATCHES: list[list[Outcome]] = [
    [ok(1), failed(2, retryable=True), ok(3)],
    [bad_input(4), ok(5)],
    [failed(6, retryable=False)],
    [ok(7), ok(8), failed(9, retryable=True)],
]
EVERYTHING = State.of(o for batch in BATCHES for o in batch)


# --- DoneSet -------------------------------------------------------------------------

line_numbers = st.integers(0, 5000) | st.integers(0, 2**20)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.lists(line_numbers, max_size=30)), max_size=20),
    probes=st.lists(st.integers(0, 2**21), max_size=30),
)
def test_done_set_behaves_like_a_set(ops: list[tuple[bool, list[int]]], probes: list[int]) -> None:
    done, oracle = DoneSet(), set[int]()
    for add, numbers in ops:
        if add:
            done.add_all(numbers)
            oracle.update(numbers)
        else:
            done.discard_all(numbers)
            oracle.difference_update(numbers)
    assert list(done) == sorted(oracle)
    assert len(done) == len(oracle)
    for n in [*probes, *oracle]:
        assert (n in done) == (n in oracle)
        run = 0
        while n + run in oracle:
            run += 1
        assert done.run_from(n) == run


def test_done_set_takes_any_iterable_and_ignores_non_integers() -> None:
    done = DoneSet()
    done.add_all(n for n in range(0, 100, 7))
    done.discard_all(iter([7, 14, 10_000]))
    assert list(done) == [0, *range(21, 100, 7)]
    assert "21" not in done
    assert None not in done


def test_negative_numbers_are_never_in_the_done_set() -> None:
    done = DoneSet()
    done.add_all([7])
    assert -1 not in done


# --- commit, close, reopen -----------------------------------------------------------


def test_reopen_shows_exactly_what_was_committed(job: Job) -> None:
    commit_batches(job, BATCHES)
    reopen_and_check(job, EVERYTHING)


def test_reopening_without_new_work_changes_nothing(job: Job) -> None:
    commit_batches(job, BATCHES)
    before = {p.name: p.read_bytes() for p in job.dir.iterdir()}
    job.open().close()
    job.open().close()
    assert {p.name: p.read_bytes() for p in job.dir.iterdir()} == before


def test_a_fresh_job_starts_empty(job: Job) -> None:
    reopen_and_check(job, EMPTY)
    assert job.journal.read_bytes() == b""


def test_close_commits_what_was_appended(job: Job) -> None:
    journal = job.open()
    journal.append(BATCHES[0])
    journal.append(BATCHES[1])
    journal.close()
    reopen_and_check(job, State.of([*BATCHES[0], *BATCHES[1]]))


def test_totals_count_only_after_commit(job: Job) -> None:
    journal = job.open()
    journal.append(BATCHES[0])
    assert (journal.totals.ok, journal.totals.failed) == (0, 0)
    assert 2 not in journal.done
    journal.commit()
    assert (journal.totals.ok, journal.totals.failed) == (2, 1)
    assert set(journal.done) == {1, 2, 3}
    journal.close()


def test_outputs_may_live_outside_the_job_folder(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    results, errors = tmp_path / "out" / "r.jsonl", tmp_path / "e.jsonl"
    results.parent.mkdir()
    journal = Journal(tmp_path / "job", results, errors, durable=False)
    journal.append(BATCHES[0])
    journal.close()
    assert results.read_bytes() == State.of(BATCHES[0]).results
    assert errors.read_bytes() == State.of(BATCHES[0]).errors
    assert (tmp_path / "job" / JOURNAL_NAME).stat().st_size > 0


def test_durable_commit_works_too(job: Job) -> None:
    journal = Journal(job.dir, job.results, job.errors, durable=True)
    journal.append(BATCHES[0])
    journal.close()
    reopen_and_check(job, State.of(BATCHES[0]))


# --- crashes and tails ---------------------------------------------------------------


@needs_fork
def test_appended_but_uncommitted_lines_are_cut_on_reopen(job: Job) -> None:
    def work() -> None:
        journal = job.open()
        journal.append(BATCHES[0])
        journal.commit()
        journal.append(BATCHES[1])  # written, never committed: the process dies here

    in_a_process_that_dies(work)
    committed = State.of(BATCHES[0])
    assert len(job.results.read_bytes()) > len(committed.results)  # the tail is on disk
    assert len(job.errors.read_bytes()) > len(committed.errors)
    reopen_and_check(job, committed)

    journal = job.open()  # the resumed run sends the cut requests again: each lands once
    journal.append(BATCHES[1])
    journal.close()
    reopen_and_check(job, State.of([*BATCHES[0], *BATCHES[1]]))


@needs_fork
def test_a_crash_between_appends_loses_only_uncommitted_work(job: Job) -> None:
    def work() -> None:
        journal = job.open()
        for batch in BATCHES[:3]:
            journal.append(batch)
            journal.commit()
        journal.append(BATCHES[3])

    in_a_process_that_dies(work)
    reopen_and_check(job, State.of(o for batch in BATCHES[:3] for o in batch))


@pytest.mark.parametrize("torn", ["results", "errors", "both"])
def test_a_torn_tail_is_truncated(job: Job, torn: str) -> None:
    commit_batches(job, BATCHES)
    if torn in ("results", "both"):
        with job.results.open("ab") as f:
            f.write(ok(10).line[:40])
    if torn in ("errors", "both"):
        with job.errors.open("ab") as f:
            f.write(failed(11, retryable=True).line[:-1])  # all but its newline
    reopen_and_check(job, EVERYTHING)


def test_a_journal_cut_at_every_byte_reopens_at_the_last_complete_record(job: Job) -> None:
    snapshots = commit_batches(job, BATCHES)
    journal_bytes = job.journal.read_bytes()
    full_results, full_errors = job.results.read_bytes(), job.errors.read_bytes()
    assert snapshots[-1][0] == len(journal_bytes)
    for cut in range(len(journal_bytes) + 1):
        job.results.write_bytes(full_results)
        job.errors.write_bytes(full_errors)
        job.journal.write_bytes(journal_bytes[:cut])
        expected = EMPTY
        for end, state in snapshots:
            if end <= cut:
                expected = state
        journal = job.open()
        try:
            check(job, journal, expected)
            # The torn record is cut from the journal too: the next commit must be readable.
            journal.append([ok(100)])
        finally:
            journal.close()
        done, _, valid = read_journal(job.journal)
        assert set(done) == {*expected.done, 100}, f"cut at {cut}"
        assert valid == job.journal.stat().st_size, f"cut at {cut}"


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.lists(st.sampled_from("ofbx"), min_size=1, max_size=4), max_size=5),
    cut_at=st.floats(0, 1),
)
def test_any_job_cut_anywhere_resumes_exactly_once(kinds: list[list[str]], cut_at: float) -> None:
    make = {
        "o": ok,
        "f": lambda n: failed(n, retryable=True),
        "x": lambda n: failed(n, retryable=False),
        "b": bad_input,
    }
    batches, n = [], 0
    for batch in kinds:
        batches.append([make[k](n := n + 1) for k in batch])
    with tempfile.TemporaryDirectory() as tmp:
        job = Job(Path(tmp))
        snapshots = commit_batches(job, batches)
        data = job.journal.read_bytes()
        cut = int(cut_at * len(data))
        job.journal.write_bytes(data[:cut])
        expected = EMPTY
        for end, state in snapshots:
            if end <= cut:
                expected = state
        journal = job.open()
        check(job, journal, expected)
        # Resume: send whatever is not done; afterwards every line is in exactly one file.
        journal.append([o for batch in batches for o in batch if o.line_no not in journal.done])
        journal.close()
        reopen_and_check(job, State.of(sorted_by_file(batches, expected)))


def sorted_by_file(batches: list[list[Outcome]], first: State) -> list[Outcome]:
    """The committed outcomes in commit order, then the resent ones in input order."""
    everything = [o for batch in batches for o in batch]
    kept = [o for o in everything if o.line_no in first.done]
    return kept + [o for o in everything if o.line_no not in first.done]


def test_a_corrupt_byte_in_the_last_record_ignores_that_record(job: Job) -> None:
    snapshots = commit_batches(job, BATCHES)
    data = job.journal.read_bytes()
    full_results, full_errors = job.results.read_bytes(), job.errors.read_bytes()
    start, previous = snapshots[-2][0], snapshots[-2][1]
    for offset in range(start, len(data)):
        corrupt = bytearray(data)
        corrupt[offset] ^= 0x5A
        job.journal.write_bytes(bytes(corrupt))
        job.results.write_bytes(full_results)
        job.errors.write_bytes(full_errors)
        journal = job.open()
        try:
            check(job, journal, previous)
        finally:
            journal.close()
        assert job.journal.read_bytes() == data[:start], f"byte {offset}"


@pytest.mark.parametrize("which", ["results", "errors"])
def test_an_output_shorter_than_the_journal_says_is_refused(job: Job, which: str) -> None:
    commit_batches(job, BATCHES)
    path = job.results if which == "results" else job.errors
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(JournalError, match=re.escape(f"{path.name} is shorter")):
        job.open()


def test_a_deleted_output_is_refused(job: Job) -> None:
    commit_batches(job, BATCHES)
    job.results.unlink()
    with pytest.raises(JournalError, match=re.escape("results.jsonl is shorter")):
        job.open()


def test_outputs_without_any_journal_are_refused_not_emptied(job: Job) -> None:
    commit_batches(job, BATCHES)
    results = job.results.read_bytes()
    job.journal.unlink()
    with pytest.raises(JournalError, match=r"checkpoint .* is missing"):
        job.open()
    assert job.results.read_bytes() == results


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_refused_journal_leaks_no_file_descriptors(job: Job) -> None:
    commit_batches(job, BATCHES)
    job.errors.write_bytes(job.errors.read_bytes()[:-1])
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(JournalError):
        job.open()
    assert len(os.listdir("/proc/self/fd")) == before


# --- --retry-failed ------------------------------------------------------------------

RETRYABLE = {2, 9}


def after_retry_failed() -> State:
    """What the job holds once the retryable failures are pending again."""
    kept = [o for batch in BATCHES for o in batch if o.line_no not in RETRYABLE]
    return State.of(kept)


def test_retry_failed_moves_only_retryable_lines_back(job: Job) -> None:
    commit_batches(job, BATCHES)
    results_before = job.results.read_bytes()
    assert job.retry_failed() == len(RETRYABLE)
    assert job.leftovers() == []
    expected = after_retry_failed()
    assert expected.done == EVERYTHING.done - RETRYABLE
    reopen_and_check(job, expected)
    assert job.results.read_bytes() == results_before
    kept = [orjson.loads(line) for line in job.errors.read_bytes().splitlines()]
    assert [line["batchq"]["line"] for line in kept] == [4, 6]
    assert not any(line["batchq"]["retryable"] for line in kept)


def test_retried_lines_land_once_when_they_run_again(job: Job) -> None:
    commit_batches(job, BATCHES)
    job.retry_failed()
    journal = job.open()
    journal.append([ok(2), failed(9, retryable=True)])
    journal.close()
    final = [*after_retry_failed_outcomes(), ok(2), failed(9, retryable=True)]
    reopen_and_check(job, State.of(final))
    assert job.retry_failed() == 1  # line 9 failed again, retryably
    reopen_and_check(job, State.of(o for o in final if o.line_no != 9))


def after_retry_failed_outcomes() -> list[Outcome]:
    return [o for batch in BATCHES for o in batch if o.line_no not in RETRYABLE]


def test_retry_failed_with_nothing_retryable_changes_nothing(job: Job) -> None:
    commit_batches(job, [[ok(1), failed(2, retryable=False), bad_input(3)]])
    before = {p.name: p.read_bytes() for p in job.dir.iterdir()}
    assert job.retry_failed() == 0
    assert {p.name: p.read_bytes() for p in job.dir.iterdir()} == before


def test_retry_failed_on_a_job_that_never_ran(job: Job) -> None:
    assert job.retry_failed() == 0
    reopen_and_check(job, EMPTY)


def test_retry_failed_ignores_uncommitted_tails(job: Job) -> None:
    commit_batches(job, BATCHES)
    with job.errors.open("ab") as f:
        f.write(failed(20, retryable=True).line)  # written, never committed
    with job.results.open("ab") as f:
        f.write(ok(21).line)
    assert job.retry_failed() == len(RETRYABLE)
    reopen_and_check(job, after_retry_failed())


# --- recovering an interrupted --retry-failed ----------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """The files of a job before and after a complete --retry-failed."""

    old_journal: bytes
    old_errors: bytes
    new_journal: bytes
    new_errors: bytes


@pytest.fixture
def rewrite(job: Job, tmp_path_factory: pytest.TempPathFactory) -> Rewrite:
    commit_batches(job, BATCHES)
    other = Job(tmp_path_factory.mktemp("copy"))
    for name in ("results.jsonl", "errors.jsonl", JOURNAL_NAME):
        shutil.copy(job.dir / name, other.dir / name)
    assert other.retry_failed() == len(RETRYABLE)
    return Rewrite(
        job.journal.read_bytes(),
        job.errors.read_bytes(),
        other.journal.read_bytes(),
        other.errors.read_bytes(),
    )


def new_file(path: Path, data: bytes) -> None:
    path.with_name(path.name + ".new").write_bytes(data)


@pytest.mark.parametrize(
    "state",
    [
        "journal.new and errors.new complete",
        "journal.new half written",
        "journal.new empty",
    ],
)
def test_crash_before_the_commit_point_rolls_back(job: Job, rewrite: Rewrite, state: str) -> None:
    new_file(job.errors, rewrite.new_errors)
    journal_new = {
        "journal.new and errors.new complete": rewrite.new_journal,
        "journal.new half written": rewrite.new_journal[: len(rewrite.new_journal) // 2],
        "journal.new empty": b"",
    }[state]
    new_file(job.journal, journal_new)
    reopen_and_check(job, EVERYTHING)
    assert job.leftovers() == []
    assert job.retry_failed() == len(RETRYABLE)  # and the user can simply run it again
    reopen_and_check(job, after_retry_failed())


def test_journal_new_alone_rolls_back(job: Job, rewrite: Rewrite) -> None:
    new_file(job.journal, rewrite.new_journal)
    reopen_and_check(job, EVERYTHING)
    assert job.leftovers() == []


def test_crash_after_the_commit_point_rolls_forward(job: Job, rewrite: Rewrite) -> None:
    job.journal.write_bytes(rewrite.new_journal)  # renamed into place: the commit point
    new_file(job.errors, rewrite.new_errors)  # errors.jsonl itself is still the old one
    assert job.errors.read_bytes() == rewrite.old_errors
    reopen_and_check(job, after_retry_failed())
    assert job.errors.read_bytes() == rewrite.new_errors
    assert job.leftovers() == []


def test_retry_failed_itself_finishes_a_rewrite_left_half_done(job: Job, rewrite: Rewrite) -> None:
    job.journal.write_bytes(rewrite.new_journal)
    new_file(job.errors, rewrite.new_errors)
    assert job.retry_failed() == 0  # rolled forward first: nothing retryable is left
    reopen_and_check(job, after_retry_failed())


@pytest.mark.parametrize("errors_new", ["none", "half", "complete"])
def test_a_crash_before_the_new_journal_is_renamed_rolls_back(
    job: Job, rewrite: Rewrite, errors_new: str
) -> None:
    # retry_failed writes journal.bin.new first, then errors.jsonl.new, then renames the
    # journal: any crash before the rename leaves journal.bin.new, and means "not done".
    new_file(job.journal, rewrite.new_journal[: len(rewrite.new_journal) // 2])
    if errors_new != "none":
        data = rewrite.new_errors if errors_new == "complete" else rewrite.new_errors[:50]
        new_file(job.errors, data)
    reopen_and_check(job, EVERYTHING)
    assert job.leftovers() == []


# --- commits off the event loop --------------------------------------------------------


async def test_a_commit_in_a_thread_is_durable_and_in_order(tmp_path: Path) -> None:
    results, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    journal = Journal(tmp_path, results, errors)
    journal.append([ok(1), failed(2, retryable=True)])
    await journal.commit_in_thread()
    journal.append([ok(3)])
    # A commit whose waiter is cancelled still lands, and close() waits for it first.
    commit = asyncio.ensure_future(journal.commit_in_thread())
    await asyncio.sleep(0)
    commit.cancel()
    journal.append([ok(4)])
    journal.close()
    done, totals, _ = read_journal(tmp_path / JOURNAL_NAME)
    assert sorted(done) == [1, 2, 3, 4]
    assert (totals.ok, totals.failed) == (3, 1)
    assert totals.results_len == results.stat().st_size
    reopened = Journal(tmp_path, results, errors)
    assert sorted(reopened.done) == [1, 2, 3, 4]
    reopened.close()
