"""Faults at every call, after SQLite's I/O-error tests.

Every change batchq makes to a job's durable files goes through
``batchq.job.durable``. These tests count the calls of a clean run, then run the
same job again failing the 1st call, then the 2nd, ..., in process
(``batchq.job.durable.inject``) against the built-in endpoint on a real socket,
once with one of ENOSPC, EIO, EROFS and EMFILE, once as a disk that fills up
there (ENOSPC for every later call that may need space). Each faulted run
must stop with one line naming the path and the cause, and exit 3 (or
finish, if the failed call was one the run can do without); the same
command, with the fault gone, must then finish the job exactly once.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import MockFactory, RunningMock
from support import assert_exactly_once, chat, write_jsonl

import batchq as bq
from batchq.cli import cli
from batchq.job import durable
from batchq.live import runner

pytestmark = pytest.mark.slow

#: One retryable failure (503 with --max-attempts 1), seven requests that succeed (two of
#: them slowly, so that the checkpoint is committed while others are written), one the
#: endpoint rejects (late: the retryable failure is not the last line of errors.jsonl),
#: one line that is not JSON, one blank line.
LINES = [
    chat("[[mock:fail=1]] flaky", "req-503"),
    *(chat(f"question {i}", f"req-{i}") for i in range(5)),
    *(chat(f"[[mock:sleep=0.03]] question {i}", f"req-{i}") for i in range(5, 7)),
    chat("[[mock:sleep=0.04]] [[mock:status=400]] rejected", "req-400"),
]
CUSTOM_IDS = ["req-503", *(f"req-{i}" for i in range(7)), "req-400", "line-10"]


#: Full disk, I/O error, read-only folder, too many open files: in turn.
CODES = (errno.ENOSPC, errno.EIO, errno.EROFS, errno.EMFILE)


def make_input(folder: Path) -> Path:
    path = write_jsonl(folder / "input.jsonl", LINES)
    with path.open("ab") as f:
        f.write(b"{not json\n\n")
    return path


class Faults:
    """``durable.inject`` that counts the calls and fails the ``fail_at``-th, once; or, if
    ``full``, every call from it on that needs space, as a disk that has filled up."""

    def __init__(self, fail_at: int = 0, code: int = errno.ENOSPC, *, full: bool = False) -> None:
        self.fail_at, self.code, self.full = fail_at, code, full
        self.calls: list[tuple[str, Path]] = []
        self.failed: tuple[str, Path] | None = None

    def __call__(self, op: str, path: Path) -> None:
        self.calls.append((op, path))
        n = len(self.calls)
        if n == self.fail_at or (self.full and n > self.fail_at and op in SPACE):
            self.failed = self.failed or (op, path)
            raise OSError(self.code, os.strerror(self.code), str(path))


#: The calls that a full disk fails: those that may need a new block.
SPACE = ("open", "write", "fsync", "mkdir", "fsync_dir")


@pytest.fixture
def injecting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Faults | None], None]]:
    """Set ``durable.inject``; commits every 5 ms, so that a small job makes several."""
    monkeypatch.setattr(runner, "COMMIT_INTERVAL", 0.005)

    def use(faults: Faults | None) -> None:
        monkeypatch.setattr(durable, "inject", faults)

    yield use


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["run", *map(str, args)], catch_exceptions=True)


@dataclass
class Ran:
    """What a run of the Python API ended with, as the command line would show it."""

    exit_code: int
    output: str = ""
    exception: BaseException | None = None


def api_run(job: Path, **options: object) -> Ran:
    """``batchq.run`` of LINES (less the bad line, which a list cannot hold) into ``job``."""
    try:
        results = bq.run(LINES, job=job, progress=False, max_attempts=1, **options)
    except bq.StorageError as exc:  # anything else is raised, and fails the test
        return Ran(exc.exit_code, f"batchq: error: {exc}\n")
    return Ran(0 if all(r.ok for r in results) else 1)


def assert_stopped_cleanly(result: Result | Ran, faults: Faults) -> None:
    """Exit 3 and one line naming the path and the cause; or a finished run, if it could."""
    assert faults.failed is not None
    op, path = faults.failed
    assert isinstance(result.exception, SystemExit | None), result.exception
    assert "Traceback" not in result.output
    if result.exit_code in (0, 1):  # the failed call was one a run can do without
        return
    assert result.exit_code == 3, (op, path, result.output)
    errors = [line for line in result.output.splitlines() if line.startswith("batchq: error")]
    assert len(errors) == 1, result.output
    # A full disk fails the writer and the committing thread alike: either may tell.
    named = str(path.parent if faults.full else path)
    assert named in errors[0] and os.strerror(faults.code) in errors[0], errors[0]


def sweep(
    server: RunningMock,
    tmp_path: Path,
    injecting: Callable[[Faults | None], None],
    prepare: Callable[[Path], None],
    *args: str,
) -> int:
    """Run the job made by ``prepare`` failing each call in turn; return how many calls."""
    input_path = make_input(tmp_path)
    common = [input_path, "--base-url", server.url, "--model", "m", "-q", *args]
    common += ["--max-attempts", "1", "--concurrency", "4"]
    calls = sweep_runs(
        tmp_path, injecting, prepare, lambda job: run(*common, "--job", job), CUSTOM_IDS
    )
    return len(calls)


def sweep_runs(
    tmp_path: Path,
    injecting: Callable[[Faults | None], None],
    prepare: Callable[[Path], None],
    run_job: Callable[[Path], Result | Ran],
    custom_ids: list[str],
) -> list[tuple[str, Path]]:
    """``sweep`` for any way of running the job, ``run_job(folder)``; the clean run's calls."""
    clean = Faults()
    job = tmp_path / "clean"
    prepare(job)
    injecting(clean)
    assert run_job(job).exit_code == 1
    assert_exactly_once(job, custom_ids)
    calls = len(clean.calls)
    assert calls > 20
    stopped = 0
    # A few more than counted: a run whose commits fall differently may make more calls.
    for n in range(1, calls + 5):
        for code, full in ((CODES[n % len(CODES)], False), (errno.ENOSPC, True)):
            job = tmp_path / f"job-{n}-{code}-{full}"
            prepare(job)
            faults = Faults(n, code, full=full)
            injecting(faults)
            result = run_job(job)
            if faults.failed is None:
                continue  # this run made fewer calls
            assert_stopped_cleanly(result, faults)
            stopped += result.exit_code == 3
            injecting(None)
            again = run_job(job)
            assert again.exit_code == 1, again.output
            assert_exactly_once(job, custom_ids)
    assert stopped > calls  # most calls matter: their failure stops the run
    return clean.calls


def test_a_fault_at_any_call_of_a_new_job_stops_cleanly_and_resumes_exactly_once(
    mock_server: MockFactory, tmp_path: Path, injecting: Callable[[Faults | None], None]
) -> None:
    server = mock_server()
    calls = sweep(server, tmp_path, injecting, lambda job: None)
    print(f"{calls} calls of a new job, each failed in turn")


@pytest.mark.parametrize("before", ["a finished job", "a job stopped halfway"])
def test_a_fault_at_any_call_of_a_resume_stops_cleanly_and_resumes_exactly_once(
    mock_server: MockFactory,
    tmp_path: Path,
    injecting: Callable[[Faults | None], None],
    before: str,
) -> None:
    """--retry-failed of a finished job; or the resume of one stopped with lines on disk that
    no commit names, which it cuts away."""
    server = mock_server()
    input_path = make_input(tmp_path)
    earlier = tmp_path / "earlier"
    command = [input_path, "--base-url", server.url, "--model", "m", "-q", "--max-attempts", "1"]
    if before == "a job stopped halfway":
        injecting(Faults(20, errno.EIO))  # around the first commit
        assert run(*command, "--job", earlier).exit_code == 3
        injecting(None)
        args: tuple[str, ...] = ()
    else:
        assert run(*command, "--job", earlier).exit_code == 1
        args = ("--retry-failed",)

    def copy_earlier(job: Path) -> None:
        shutil.copytree(earlier, job)

    calls = sweep(server, tmp_path, injecting, copy_earlier, *args)
    print(f"{calls} calls of a resume of {before}, each failed in turn")


def test_a_fault_at_any_call_of_the_python_api_stops_cleanly_and_resumes_exactly_once(
    mock_server: MockFactory, tmp_path: Path, injecting: Callable[[Faults | None], None]
) -> None:
    """The API's own writes too: the job folder and the requests it writes as input.jsonl."""
    server = mock_server()

    def api(job: Path) -> Ran:
        return api_run(job, base_url=server.url, model="m", concurrency=4)

    calls = sweep_runs(tmp_path, injecting, lambda job: None, api, CUSTOM_IDS[:-1])
    job = tmp_path / "clean"
    assert ("mkdir", job) in calls and ("fsync_dir", job.parent) in calls
    assert [op for op, path in calls if path.name.startswith(".input.jsonl.")][:4] == [
        "open", "write", "fsync", "rename",
    ]  # fmt: skip
    print(f"{len(calls)} calls of a new job run from Python, each failed in turn")
