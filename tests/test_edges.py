"""The edges where the machine or the user meets a job: one line and the right exit status.

Each test runs ``batchq`` as a user does, in a subprocess against the built-in
endpoint. Signals and a disk filling up at the edges of a run come from the run itself,
through ``batchq.job.durable.inject``, at the moment the test names: no timing
involved.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import MockFactory, RunningMock
from support import (
    assert_exactly_once,
    batchq,
    batchq_cmd,
    chat,
    clean_env,
    read_jsonl,
    write_jsonl,
)

import batchq as batchq_api
from batchq.errors import JournalError, StorageError
from batchq.job.folder import job_lock, running_pid
from batchq.job.journal import Journal, read_journal
from batchq.records import Outcome

pytestmark = pytest.mark.slow

IDS = [f"e-{i}" for i in range(6)]


def new_job(tmp_path: Path, server: RunningMock, *args: str) -> tuple[list[str | Path], Path]:
    """A finished job; the command that runs it."""
    write_jsonl(tmp_path / "in.jsonl", [chat(cid, custom_id=cid) for cid in IDS])
    job = tmp_path / "job"
    command: list[str | Path] = ["run", "in.jsonl", "--job", job, "--base-url", server.url, "-q"]
    done = batchq(*command, "--model", "m", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return command, job


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line a stopped run prints, after checking its exit status."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("batchq: error")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_refused_run_leaves_job_toml_alone(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    command, job = new_job(tmp_path, server)
    before = (job / "job.toml").read_bytes()
    with job_lock(job):  # another run holds the job
        refused = batchq(*command, "--model", "BBB", "--force", cwd=tmp_path)
    assert "already being run" in one_error_line(refused, 2)
    assert (job / "job.toml").read_bytes() == before


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("job/results.jsonl", "would overwrite the results file of job"),
        ("job/errors.jsonl", "would overwrite the errors file of job"),
        ("in.jsonl", "would overwrite the input of job"),
        ("job/journal.bin", "the job's own journal.bin"),
        ("job/job.toml", "the job's own job.toml"),
        ("job/../job/state.json", "the job's own state.json"),
        ("job/batches.jsonl", "the job's own batches.jsonl"),  # --via batch's ledger
        ("link-to-results.jsonl", "the results file"),  # a symlink
        ("linked-job/results.jsonl", "the results file"),  # through a symlinked folder
        ("hard-link-to-input.jsonl", "the input"),
    ],
)
def test_export_refuses_to_overwrite_the_jobs_own_files(
    tmp_path: Path, mock_server: MockFactory, target: str, says: str
) -> None:
    server = mock_server()
    _, job = new_job(tmp_path, server)
    (tmp_path / "link-to-results.jsonl").symlink_to(job / "results.jsonl")
    (tmp_path / "linked-job").symlink_to(job)
    os.link(tmp_path / "in.jsonl", tmp_path / "hard-link-to-input.jsonl")
    before = {p: p.read_bytes() for p in [tmp_path / "in.jsonl", *job.iterdir()] if p.is_file()}
    for fmt in ("jsonl", "csv"):
        refused = batchq("export", "job", "-o", target, "--format", fmt, cwd=tmp_path)
        assert says in one_error_line(refused, 2)
    assert {p: p.read_bytes() for p in before} == before
    beside = batchq("export", "job", "-o", "job/export.jsonl", cwd=tmp_path)
    assert beside.returncode == 0, beside.stderr  # a new file in the job's folder is fine
    assert len(read_jsonl(job / "export.jsonl")) == len(IDS)


def test_an_export_that_cannot_be_written_is_one_line_exit_3_and_keeps_the_last(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    new_job(tmp_path, server)
    full = batchq("export", "job", "-o", "/dev/full", cwd=tmp_path)
    assert "cannot write /dev/full: No space left on device" in one_error_line(full, 3)
    last = tmp_path / "last.jsonl"
    last.write_text("the last export\n")

    def small_files() -> None:  # a disk that fills after 100 bytes, even for root
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    cut = subprocess.run(
        batchq_cmd("export", "job", "-o", last), cwd=tmp_path, env=clean_env(),
        capture_output=True, text=True, timeout=60, preexec_fn=small_files,
    )  # fmt: skip
    assert "cannot write" in one_error_line(cut, 3)
    assert last.read_text() == "the last export\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("last")) == [last.name]


def test_an_export_or_a_report_through_a_symlink_replaces_its_target(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    """Written whole, then renamed into place: the target is what is replaced, not the
    link the user keeps (a "latest" link to a shared folder)."""
    server = mock_server()
    new_job(tmp_path, server)
    (tmp_path / "shared").mkdir()
    for command, name in (("export", "latest.jsonl"), ("report", "latest.html")):
        (tmp_path / "shared" / name).write_text("old\n")
        (tmp_path / "shared" / name).chmod(0o600)  # kept private
        (tmp_path / name).symlink_to(tmp_path / "shared" / name)
        done = batchq(command, "job", "-o", name, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / name).is_symlink()
        assert (tmp_path / "shared" / name).read_text() != "old\n"
        assert (tmp_path / "shared" / name).stat().st_mode & 0o777 == 0o600
        (tmp_path / "loop").unlink(missing_ok=True)
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        looped = batchq(command, "job", "-o", "loop", cwd=tmp_path)
        assert "loop" in one_error_line(looped, 3)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [
        "latest.html",
        "latest.jsonl",
    ]


def test_a_printed_command_names_a_folder_whose_name_is_not_utf8_exactly(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    """Printed as text, b"j\\xff" came out as 'j\\udcff': pasted, a new job, paid again."""
    server = mock_server()
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\nnot json\n')
    job = os.fsdecode(b"j\xff")
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", "--job", job,
                  cwd=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr
    command = done.stderr.rpartition("to retry the retryable failures: ")[2].strip()
    words = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + command.removeprefix("batchq ")],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    assert words[words.index(b"--job") + 1] == b"j\xff"


def test_status_never_makes_a_starting_run_fail(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    command, job = new_job(tmp_path, server)
    stop = threading.Event()

    def poll_status() -> None:
        while not stop.is_set():
            running_pid(job)  # what `batchq status` does: a shared lock, for an instant

    poller = threading.Thread(target=poll_status)
    poller.start()
    try:
        codes = [batchq(*command, cwd=tmp_path).returncode for _ in range(3)]
    finally:
        stop.set()
        poller.join()
    assert codes == [0, 0, 0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--output", "same.jsonl", "--errors", "same.jsonl"], "would overwrite the results"),
        (["--output", "job/job.toml"], "the job's own job.toml"),  # from the cwd, as given
        (["--errors", "job/journal.bin"], "the job's own journal.bin"),
        (["--output", "in.jsonl"], "the input"),
        (["--output", "missing/results.jsonl"], "does not exist"),
    ],
)
def test_outputs_that_clash_are_refused_up_front(
    tmp_path: Path, mock_server: MockFactory, args: list[str], says: str
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("x")])
    result = batchq(
        "run", "in.jsonl", "--job", "job", "--base-url", server.url, *args, cwd=tmp_path
    )
    assert says in one_error_line(result, 2)
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("file", "text", "says"),
    [
        ("job.toml", 'input = 5\nmodel = "m"\n', "input in job.toml must be a string"),
        ("state.json", '{"input_size": "abc"}', "state.json was changed outside batchq"),
    ],
)
def test_damaged_settings_are_one_line(
    tmp_path: Path, mock_server: MockFactory, file: str, text: str, says: str
) -> None:
    server = mock_server()
    _, job = new_job(tmp_path, server)
    (job / file).write_text(text)
    assert says in one_error_line(batchq("run", job, cwd=tmp_path), 2)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:abc/v1",
        "http://127.0.0.1:99999/v1",
        "http://[::1/v1",
        "http://[::1]:abc/v1",
        "http://alice:Zq9/PWSECRET55@127.0.0.1:8000/v1",  # a '/' in the password: no port
        "http://..../v1",  # no name a lookup can take
        "http://" + "a" * 64 + ".example/v1",  # a label over 63 characters
    ],
)
def test_a_base_url_with_a_bad_host_or_port_is_one_line(tmp_path: Path, url: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("x")])
    pool = tmp_path / "pool.toml"
    pool.write_text(f'[[deployments]]\nname = "a"\nbase_url = "{url}"\n')
    for given in (["--base-url", url], ["--deployments", str(pool)]):
        done = batchq("run", "in.jsonl", "--job", "job", "--model", "m", *given, cwd=tmp_path)
        said = one_error_line(done, 2)
        assert "has no valid host and port" in said and "PWSECRET55" not in done.stderr
        assert not (tmp_path / "job" / "job.toml").exists()


@pytest.mark.parametrize(
    ("tail", "says"),
    [
        (b'system = "caf\xe9"\n', "it is not UTF-8 text"),  # saved as Latin-1
        (b"x = " + b"[" * 2000 + b"]" * 2000 + b"\n", "it is nested too deeply"),
    ],
    ids=["latin-1", "deep"],
)
def test_a_toml_file_that_is_not_utf8_or_too_deep_is_one_line(
    tmp_path: Path, mock_server: MockFactory, tail: bytes, says: str
) -> None:
    server = mock_server()
    _, job = new_job(tmp_path, server)
    pool = tmp_path / "pool.toml"
    pool.write_bytes(f'[[deployments]]\nname = "a"\nbase_url = "{server.url}"\n'.encode() + tail)
    given = ("in.jsonl", "--job", "other", "--model", "m", "--deployments", pool)
    assert f"pool.toml is not valid TOML: {says}" in one_error_line(
        batchq("run", *given, cwd=tmp_path), 2
    )
    with (job / "job.toml").open("ab") as f:
        f.write(tail)
    for command in (["run", job], ["status", job]):
        said = one_error_line(batchq(*command, cwd=tmp_path), 2)
        assert f"job.toml is not valid TOML: {says}" in said


def test_retry_failed_with_a_cut_errors_file_is_one_line(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("[[mock:status=400]] no"), chat("yes")])
    job = tmp_path / "job"
    assert batchq(
        "run", "in.jsonl", "--job", job, "--base-url", server.url, cwd=tmp_path
    ).returncode
    errors = job / "errors.jsonl"
    errors.write_bytes(errors.read_bytes()[:10])
    result = batchq("run", job, "--retry-failed", cwd=tmp_path)
    assert "errors.jsonl is shorter" in one_error_line(result, 2)


def test_an_input_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    fifo = tmp_path / "requests.jsonl"
    os.mkfifo(fifo)
    result = batchq("run", fifo, "--base-url", server.url, cwd=tmp_path, timeout=30)
    assert "not a regular file" in one_error_line(result, 2)
    piped = subprocess.run(
        batchq_cmd("run", "/dev/stdin", "--job", "job", "--base-url", server.url),
        input='{"prompt": "hi"}\n',
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "not a regular file" in one_error_line(piped, 2)
    assert not (tmp_path / "job").exists()


# --- signals at the edges of a run --------------------------------------------------------

#: batchq's own command line; at the Nth call ``op`` on file ``name`` it sends itself a signal
#: ("SIGTERM", "SIGINT") or its disk fills up ("full": ENOSPC for every later call that needs
#: space).
HOOKED = """
import errno, os, signal, sys
from batchq.job import durable
from batchq.cli import main

action, op, name, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
calls, full = 0, False

def inject(called, path):
    global calls, full
    if called == op and path.name == name:
        calls += 1
        if calls == nth and action in ("SIGTERM", "SIGINT"):
            os.kill(os.getpid(), getattr(signal, action))
        full = full or (calls == nth and action == "full")
    if full and called in ("open", "write", "fsync", "mkdir", "fsync_dir"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

durable.inject = inject
sys.argv = ["batchq", *sys.argv[5:]]
main()
"""


def hooked(
    cwd: Path, action: str, op: str, name: str, nth: int, command: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", HOOKED, action, op, name, str(nth), *command],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "nth"), [("results.jsonl", 1), ("results.jsonl", 2), ("journal.bin", 1)]
)
def test_a_disk_that_fills_up_mid_run_is_one_line_and_the_resume_exactly_once(
    tmp_path: Path, mock_server: MockFactory, name: str, nth: int
) -> None:
    # The reproduction, without the tmpfs: 16 in flight, half of them 503s.
    server = mock_server(rate_503=0.5, latency=0.002, seed=nth)
    ids = [f"f-{i}" for i in range(300)]
    write_jsonl(tmp_path / "in.jsonl", [chat(cid, custom_id=cid) for cid in ids])
    command = ["run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "m", "-q"]
    command += ["--max-attempts", "1", "--concurrency", "16"]
    full = hooked(tmp_path, "full", "write", name, nth, command)
    line = one_error_line(full, 3)
    assert "No space left on device" in line
    assert full.stderr.splitlines() == ["batchq: new job in job", line]  # nothing else
    resumed = batchq(*command, cwd=tmp_path)
    assert resumed.returncode == 1, resumed.stderr  # the 503s are failures, retryable
    assert_exactly_once(tmp_path / "job", ids)


@pytest.mark.parametrize(
    ("moment", "op", "name", "nth", "sig"),
    [
        ("creating the job folder", "mkdir", "job", 1, "SIGTERM"),
        ("creating the job folder", "mkdir", "job", 1, "SIGINT"),
        ("taking the job's lock", "open", "lock", 1, "SIGTERM"),
        ("the last commit", "fsync", "journal.bin", 1, "SIGTERM"),
        ("saving the elapsed time, after the last commit", "open", "state.json.new", 2, "SIGTERM"),
    ],
)
def test_a_signal_at_any_moment_is_130_and_resumable(
    tmp_path: Path, mock_server: MockFactory, moment: str, op: str, name: str, nth: int, sig: str
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat(cid, custom_id=cid) for cid in IDS])
    command = ["run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "m", "-q"]
    stopped = hooked(tmp_path, sig, op, name, nth, command)
    assert stopped.returncode == 130, (moment, stopped.stderr)
    assert "Traceback" not in stopped.stderr and "Aborted" not in stopped.stderr
    assert "interrupted" in stopped.stderr
    resumed = batchq(*command, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(tmp_path / "job", IDS)


# --- input edges ------------------------------------------------------------------------------


def test_a_bom_only_first_line_is_a_blank_line_for_run_validate_and_status(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    body = b"".join(f'{{"prompt": "{cid}", "custom_id": "{cid}"}}\n'.encode() for cid in IDS)
    (tmp_path / "in.jsonl").write_bytes(b"\xef\xbb\xbf\n" + body)
    assert batchq("validate", "in.jsonl", cwd=tmp_path).returncode == 0
    command = ["run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "m"]
    run = batchq(*command, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"{len(IDS)} succeeded" in run.stderr
    status = batchq("status", "job", "--json", cwd=tmp_path)
    assert '"total": 6' in status.stdout
    assert_exactly_once(tmp_path / "job", IDS)


def test_lines_appended_to_a_file_without_a_final_newline_are_new_requests(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    (tmp_path / "in.jsonl").write_bytes(b'{"prompt": "a", "custom_id": "a"}')
    command = ["run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "m", "-q"]
    assert batchq(*command, cwd=tmp_path).returncode == 0
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(b'\n{"prompt": "b", "custom_id": "b"}\n')
    again = batchq(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(tmp_path / "job", ["a", "b"])
    assert server.stats()["requests"] == 2


# --- damage is said ---------------------------------------------------------------------------


def test_a_damaged_journal_says_what_is_sent_again(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    command, job = new_job(tmp_path, server)
    journal = job / "journal.bin"
    data = bytearray(journal.read_bytes())
    data[3] ^= 0xFF  # a flipped bit in the first record: nothing after it can be trusted
    journal.write_bytes(bytes(data))
    server.reset()
    resumed = batchq(*command, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(IDS)} lines, sent again now)" in resumed.stderr
    assert server.stats()["requests"] == len(IDS)
    assert_exactly_once(job, IDS)
    assert len(read_jsonl(job / "results.jsonl")) == len(IDS)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw.replace(b'"batchq":{"line":1', b'"batchq":{"line":x'),
        lambda raw: raw.replace(b'"batchq":{"line":1', b'"batchq":{"line":-1'),
        lambda raw: raw.replace(b'"batchq":{"line":1,', b'"batchq":{"line":999999999999,'),
        lambda raw: b"XXXXX" + raw[5:],  # no longer JSON
        lambda raw: raw.replace(b'"response":{', b'"response":[{', 1),  # JSON of another shape
    ],
    ids=["not-a-number", "negative", "huge", "not-json", "not-an-object"],
)
def test_a_damaged_results_line_is_one_line_for_export_and_the_api(
    tmp_path: Path, mock_server: MockFactory, damage: Callable[[bytes], bytes]
) -> None:
    server = mock_server()
    _, job = new_job(tmp_path, server)
    results = job / "results.jsonl"
    first, rest = results.read_bytes().split(b"\n", 1)
    assert first != damage(first)
    results.write_bytes(damage(first) + b"\n" + rest)
    said = one_error_line(
        batchq("export", "job", "--format", "csv", "-o", "x.csv", cwd=tmp_path), 2
    )
    assert "results.jsonl holds a line at byte 0 that batchq did not write" in said
    with pytest.raises(JournalError, match=r"results\.jsonl holds a line at byte 0"):
        list(batchq_api.open_job(job).results())


def test_a_commit_refuses_outputs_deleted_while_the_job_runs(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    journal = Journal(tmp_path, results, tmp_path / "errors.jsonl")
    journal.append([Outcome(1, True, b'{"custom_id": "a"}\n')])
    journal.commit()
    results.unlink()  # a user tidying up while the job runs
    journal.append([Outcome(2, True, b'{"custom_id": "b"}\n')])
    with pytest.raises(StorageError, match=r"results\.jsonl was deleted or replaced"):
        journal.close()
    assert sorted(read_journal(tmp_path / "journal.bin")[0]) == [1]  # no record vouches for b
