"""batchq from Python: the same engine as the command line, checked as a script would use it."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MockFactory, RedisServer
from support import (
    assert_exactly_once,
    batchq,
    chat,
    clean_env,
    read_jsonl,
    start,
    wait_for,
    write_jsonl,
)

import batchq as bq
from batchq.api import STREAM_BUFFER
from batchq.cli import GC_YOUNG
from batchq.job import durable
from batchq.job.folder import running_pid
from batchq.live.transport import Response

KEY = "sk-test-0123456789abcdefghij"


def options(url: str, **more: Any) -> dict[str, Any]:
    return {"base_url": url, "model": "m", "progress": False, **more}


@pytest.mark.parametrize(("hedge", "copies"), [({}, 2), ({"hedge": False}, 1)])
def test_the_tail_hedge_is_on_by_default_and_hedge_false_turns_it_off(
    mock_server: MockFactory, hedge: dict[str, bool], copies: int
) -> None:
    server = mock_server(latency=0.01)
    late = "late [[mock:sleep=3:1]]"  # only its first copy is slow
    results = bq.run([*(f"q{i}" for i in range(59)), late], **options(server.url, **hedge))
    assert all(r.ok for r in results) and len(results) == 60
    assert server.stats()["prompts"][late] == copies


def test_run_returns_one_result_per_request_in_input_order(mock_server: MockFactory) -> None:
    server = mock_server(latency_jitter=0.02, seed=3)  # answers come back out of order
    requests: list[Any] = [f"question {i}" for i in range(40)]
    requests[5] = {"custom_id": "mine", "body": {"messages": [{"role": "user", "content": "x"}]}}
    requests[7] = chat("[[mock:status=400]]")
    results = bq.run(requests, **options(server.url))
    assert [r.line for r in results] == list(range(1, 41))
    assert results[0].custom_id == "line-1" and results[0].text == "Echo: question 0"
    assert results[5].custom_id == "mine" and results[5].ok
    bad = results[7]
    assert not bad.ok and bad.status_code == 400 and bad.error is not None
    assert bad.text is None
    assert results[1].usage is not None and results[1].prompt_tokens == 3
    assert server.stats()["requests"] == 40


async def test_run_works_inside_a_running_event_loop_as_in_a_notebook(
    mock_server: MockFactory,
) -> None:
    server = mock_server()
    results = bq.run(["a", "b"], **options(server.url))  # a loop runs in this thread
    assert [r.text for r in results] == ["Echo: a", "Echo: b"]


def test_run_works_from_a_thread(mock_server: MockFactory) -> None:
    server = mock_server()
    got: list[bq.Result] = []
    thread = threading.Thread(target=lambda: got.extend(bq.run(["a"], **options(server.url))))
    thread.start()
    thread.join()
    assert [r.text for r in got] == ["Echo: a"]


async def test_arun_and_stream(mock_server: MockFactory) -> None:
    server = mock_server()
    results = await bq.arun(["a", "b", "c"], **options(server.url))
    assert [r.text for r in results] == ["Echo: a", "Echo: b", "Echo: c"]
    seen = []
    async with bq.stream([f"s{i}" for i in range(20)], **options(server.url)) as stream:
        async for result in stream:
            seen.append(result.custom_id)
    assert sorted(seen) == sorted(f"line-{i}" for i in range(1, 21))


async def test_leaving_a_stream_early_stops_the_run(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(latency=0.05)
    job = tmp_path / "job"
    requests = [f"s{i}" for i in range(500)]
    async with bq.stream(requests, job=job, concurrency=4, **options(server.url)) as stream:
        async for _ in stream:
            break
    sent = server.stats()["requests"]
    assert sent < 500
    results = await bq.arun(requests, job=job, **options(server.url))  # the rest, only
    assert len(results) == 500
    assert server.stats()["requests"] - sent <= 500 - 1


def lines_written(job: Path) -> int:
    path = job / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def wait_until_the_buffer_is_full(job: Path, taken: int) -> None:
    """Until the stream holds STREAM_BUFFER results its reader has not taken.

    The writer appends a batch, then hands it to the stream without yielding to
    the loop unless the stream is full: so whenever this reader runs, every line
    written was handed over, or the stream is full. Lines written beyond what
    was taken and what the stream can hold mean it is full.
    """
    await asyncio.to_thread(wait_for, lambda: lines_written(job) >= taken + STREAM_BUFFER)


class Leave(Exception):
    pass


@pytest.mark.parametrize("leave", ["break", "raise"])
async def test_leaving_a_stream_whose_reader_fell_behind_returns_at_once(
    mock_server: MockFactory, tmp_path: Path, leave: str
) -> None:
    server = mock_server(record=False)
    job = tmp_path / "job"
    requests = [f"s{i}" for i in range(STREAM_BUFFER + 500)]
    raised = pytest.raises(Leave) if leave == "raise" else contextlib.nullcontext()
    with raised:  # the body's own exception is what the caller sees
        async with asyncio.timeout(30) as deadline:  # only if leaving hangs
            async with bq.stream(requests, job=job, **options(server.url)) as stream:
                async for _ in stream:
                    await wait_until_the_buffer_is_full(job, taken=1)
                    if leave == "raise":
                        raise Leave
                    break
    assert not deadline.expired()


async def test_a_cancellation_aimed_at_a_stream_s_caller_is_raised(
    mock_server: MockFactory,
) -> None:
    server = mock_server(latency=0.05)
    requests = [f"s{i}" for i in range(200)]

    async def consume() -> str:
        async with bq.stream(requests, concurrency=2, **options(server.url)) as stream:
            async for _ in stream:
                current = asyncio.current_task()
                assert current is not None
                current.cancel()  # it arrives as the block is left, while the run stops
                break
        return "the cancellation was swallowed"

    with pytest.raises(asyncio.CancelledError):
        await asyncio.ensure_future(consume())


@pytest.mark.parametrize("behind", [False, True], ids=["at-once", "reader-behind"])
async def test_a_stream_left_early_and_the_resumed_stream_yield_every_line(
    mock_server: MockFactory, tmp_path: Path, behind: bool
) -> None:
    server = mock_server(record=False)
    job = tmp_path / "job"
    requests = [f"s{i}" for i in range(STREAM_BUFFER + 476)]
    first: list[int] = []
    async with bq.stream(requests, job=job, **options(server.url)) as stream:
        async for result in stream:
            first.append(result.line)
            if behind:
                await wait_until_the_buffer_is_full(job, taken=1)
            break
    done_before = [r.line for r in bq.open_job(job).results()]
    assert 0 < len(done_before) < len(requests)
    async with bq.stream(requests, job=job, **options(server.url)) as stream:
        second = [result.line async for result in stream]
    # The resumed stream yields every line of the job once: those done before it, in
    # input order, then the rest as they complete.
    assert second[: len(done_before)] == done_before
    assert sorted(second) == list(range(1, len(requests) + 1))


@pytest.mark.parametrize("via", ["live", "batch"])
async def test_a_cancelled_run_holds_the_job_until_its_thread_is_done(
    mock_server: MockFactory, tmp_path: Path, via: str
) -> None:
    server = mock_server()
    job = tmp_path / "job"
    more = {"via": via, "batch_poll": 0.02} if via == "batch" else {}
    await bq.arun(["a", "b"], job=job, **options(server.url, **more))
    setup = os.open(job / "setup.lock", os.O_RDWR)
    contender = None
    try:
        fcntl.flock(setup, fcntl.LOCK_EX)  # opening the job waits for it, in a thread
        run = asyncio.ensure_future(bq.arun(["a", "b"], job=job, **options(server.url, **more)))
        await asyncio.to_thread(wait_for, lambda: running_pid(job) == os.getpid())
        run.cancel()  # a notebook's interrupt, a stream left early
        await asyncio.sleep(0)  # let it arrive, then a second one
        run.cancel()
        contender = start("run", job, cwd=tmp_path)
        await asyncio.to_thread(
            wait_for, lambda: contender.poll() is not None or running_pid(job) == contender.pid
        )
        assert contender.poll() == 2, "a second run took the job while a thread worked on it"
        assert "already being run by process" in contender.communicate()[1]
    finally:
        os.close(setup)  # the thread goes on
        if contender is not None and contender.poll() is None:
            contender.kill()
            contender.wait()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert running_pid(job) is None


def test_the_command_line_tunes_its_own_gc_and_run_leaves_the_callers_alone(
    mock_server: MockFactory,
) -> None:
    # The console script owns its process: the GC's youngest generation is collected ten
    # times less often there (workers waiting for a place in the pool made it run ~10x as
    # often: a tenth of a 1 ms endpoint's throughput). A caller's process is not ours to tune.
    script = (
        "import atexit, gc, sys; atexit.register(lambda: print(gc.get_threshold()[0])); "
        "sys.argv = ['batchq', '--version']; from batchq.cli import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=clean_env()
    )
    assert done.returncode == 0 and done.stdout.split()[-1] == str(GC_YOUNG) != "700"
    before = gc.get_threshold()
    assert bq.run(["q"], **options(mock_server().url))[0].ok
    assert gc.get_threshold() == before


def test_failures_raise_batchq_errors_not_system_exit(mock_server: MockFactory) -> None:
    server = mock_server(api_key=KEY)
    with pytest.raises(bq.FatalEndpointError, match="401"):
        bq.run(["a"], **options(server.url))  # no key
    with pytest.raises(bq.ConfigError, match="rpm"):
        bq.run(["a"], rpm=-1, **options(server.url))
    with pytest.raises(bq.ConfigError, match="unknown option"):
        bq.run(["a"], modle="m", **options(server.url))
    assert bq.run(["a"], api_key=KEY, **options(server.url))[0].ok


def test_the_key_given_as_api_key_is_written_nowhere(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(api_key=KEY)
    job = tmp_path / "job"
    results = bq.run(["a", "[[mock:status=400]]"], job=job, api_key=KEY, **options(server.url))
    assert results[0].ok
    for path in job.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_a_transport_can_be_handed_to_the_engine(tmp_path: Path) -> None:
    class Echo:
        def __init__(self) -> None:
            self.paths: list[str] = []

        async def send(self, path: str, body: bytes) -> Response:
            self.paths.append(path)
            reply = {"choices": [{"message": {"content": orjson.loads(body)["model"]}}]}
            return Response(200, {}, orjson.dumps(reply), None)

    transport = Echo()
    results = bq.run(["a", "b"], model="echo-me", transport=transport, progress=False)
    assert [r.text for r in results] == ["echo-me", "echo-me"]
    assert transport.paths == ["/v1/chat/completions"] * 2


SCRIPT = """
import sys, batchq
results = batchq.run([f"q{i}" for i in range(300)], job=sys.argv[1], base_url=sys.argv[2],
                     model="m", concurrency=4, progress=False)
in_order = [r.line for r in results] == list(range(1, 301))
print(len(results), len({r.custom_id for r in results}), in_order)
"""


def test_a_killed_script_reruns_to_every_result_exactly_once_in_order(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(latency=0.01)
    job = tmp_path / "job"
    args = [sys.executable, "-c", SCRIPT, str(job), server.url]
    proc = subprocess.Popen(args, env=clean_env(), stdout=subprocess.PIPE, text=True)
    results = job / "results.jsonl"
    wait_for(lambda: results.exists() and results.stat().st_size > 2000)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(args, env=clean_env(), capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["300", "300", "True"]
    ids = [line["custom_id"] for line in read_jsonl(results)]
    assert sorted(ids) == sorted(f"line-{i}" for i in range(1, 301))  # once each
    assert server.stats()["requests"] < 300 + 300  # the rerun sent only what was missing


def test_the_command_line_and_the_api_write_the_same_files(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server()
    requests = [chat(f"q{i}") for i in range(30)] + [chat("[[mock:status=400]]")]
    bq.run(requests, job=tmp_path / "api", concurrency=1, **options(server.url))
    write_jsonl(tmp_path / "api" / "copy.jsonl", requests)
    cli = batchq(
        "run", tmp_path / "api" / "input.jsonl", "--job", tmp_path / "cli", "--base-url",
        server.url, "--model", "m", "--concurrency", "1", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert cli.returncode == 1, cli.stderr

    def lines(job: str, name: str) -> list[Any]:
        rows = read_jsonl(tmp_path / job / name)
        for row in rows:  # ids and times are the server's, not ours
            if row["response"]:
                row["response"].pop("request_id")
                if isinstance(row["response"]["body"], dict):
                    row["response"]["body"].pop("id", None)
                    row["response"]["body"].pop("created", None)
        return sorted(rows, key=lambda r: r["batchq"]["line"])

    for name in ("results.jsonl", "errors.jsonl"):
        assert lines("api", name) == lines("cli", name)


def test_export_gives_every_line_once_in_input_order(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(latency_jitter=0.01, seed=5)
    requests = [chat(f"q{i}", custom_id=f"c{i}") for i in range(50)]
    requests[3] = chat("[[mock:status=400]]", custom_id="c3")
    write_jsonl(tmp_path / "in.jsonl", requests)
    run = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", cwd=tmp_path)
    assert run.returncode == 1
    out = batchq("export", "jobs/in", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(50)]
    assert rows[3]["error"]["code"]
    csv = batchq(
        "export",
        "jobs/in",
        "-o",
        "out.csv",
        "--fields",
        "line,custom_id,text,error_code",
        cwd=tmp_path,
    )
    assert csv.returncode == 0, csv.stderr
    text = (tmp_path / "out.csv").read_text().splitlines()
    assert text[0] == "line,custom_id,text,error_code"
    assert text[1] == "1,c0,Echo: q0,"
    assert text[4].startswith("4,c3,,")
    assert [r.custom_id for r in bq.open_job(tmp_path / "jobs" / "in").results()] == [
        f"c{i}" for i in range(50)
    ]


def test_an_export_reads_the_files_it_indexed_while_retry_failed_replaces_them(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server()
    requests = [chat(f"q{i}", custom_id=f"c{i}") for i in range(6)]
    requests[1] = chat("[[mock:fail=1]] once", custom_id="c1")  # retryable, then fine
    requests[4] = chat("[[mock:status=400]] never", custom_id="c4")
    write_jsonl(tmp_path / "in.jsonl", requests)
    command = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    assert batchq(*command, "--max-attempts", "1", cwd=tmp_path).returncode == 1
    job = bq.open_job(tmp_path / "jobs" / "in")
    with job.index() as first:
        before = list(first.lines())
    assert sum(raw is not None and b'"error":null' not in raw for _, raw in before) == 2

    index = job.index()  # an export has indexed the files, and not read them yet
    retried = batchq(*command, "--retry-failed", cwd=tmp_path)
    assert retried.returncode == 1, retried.stderr
    errors = read_jsonl(tmp_path / "jobs" / "in" / "errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["c4"]  # errors.jsonl was replaced
    assert list(index.lines()) == before  # the lines as they were indexed, every one whole
    index.close()


async def test_shards_started_at_once_each_return_their_part_and_the_job_holds_all(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(latency_jitter=0.01, seed=9)
    job = tmp_path / "job"
    requests = [f"q{i}" for i in range(60)]
    parts = await asyncio.gather(  # both write the job's input, and pin it, at once
        *(
            bq.arun(requests, job=job, shard=shard, **options(server.url))
            for shard in ("0/3", (1, 3), "2/3")
        )
    )
    lines = [[r.line for r in part] for part in parts]
    assert all(lines) and [n for part in lines for n in part] == list(range(1, 61))
    assert [r.text for r in bq.open_job(job).results()] == [f"Echo: q{i}" for i in range(60)]
    assert server.stats()["requests"] == 60
    again = bq.run(requests, job=job, shard="1/3", **options(server.url))
    assert [r.line for r in again] == lines[1] and server.stats()["requests"] == 60
    with pytest.raises(bq.ConfigError, match="started as 3 shards, not 2"):
        bq.run(requests, job=job, shard=(0, 2), **options(server.url))
    with pytest.raises(bq.ConfigError, match=r'takes "I/N", \(I, N\) or "auto"'):
        bq.run(requests, job=job, shard=[0, 3], **options(server.url))
    with pytest.raises(bq.ConfigError, match="shard= needs job="):
        bq.run(requests, shard="0/3", **options(server.url))


# --- Notices: the engine's, logged to the "batchq" logger ----------------------------------


def test_notices_are_logged_to_the_batchq_logger_at_their_level(
    mock_server: MockFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = mock_server()
    job = tmp_path / "job"
    requests = ["a", "[[mock:fail=1]] flaky", "c"]
    caplog.set_level(logging.INFO, logger="batchq")

    def notices() -> list[tuple[int, str]]:
        got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "batchq"]
        caplog.clear()
        return got

    first = bq.run(requests, job=job, max_attempts=1, **options(server.url))
    assert [r.ok for r in first] == [True, False, True]
    assert notices() == [(logging.INFO, f"new job in {job}")]
    with (job / "results.jsonl").open("ab") as f:  # written after the last commit, as by a crash
        f.write(b'{"custom_id": "torn"}\n')
    bq.run(requests, job=job, max_attempts=1, **options(server.url))
    cut = notices()
    assert [level for level, _ in cut] == [logging.WARNING, logging.INFO], cut
    assert "(1 lines, sent again now)" in cut[0][1] and cut[1][1] == "resuming: 3 of 3 done"
    again = bq.run(requests, job=job, retry_failed=True, **options(server.url))
    assert [r.ok for r in again] == [True, True, True]
    assert (logging.INFO, "--retry-failed: 1 retryable failures back to pending") in notices()


WARN_SCRIPT = """
import sys, batchq
job, url, store = sys.argv[1:]
results = batchq.run([f"q{i}" for i in range(400)], job=job, base_url=url, model="m",
                     rpm=6000, concurrency=3000, limits_store=store, progress=False)
print(len(results))
"""


def test_warnings_reach_stderr_with_no_logging_set_up_and_the_course_of_the_run_does_not(
    mock_server: MockFactory, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Python's last-resort handler shows WARNING and above: a script or a notebook that
    set up no logging still hears of a lost store, the open-file cap and lines cut."""
    server = mock_server(rpm=6000)
    job = tmp_path / "job"

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    def script() -> subprocess.Popen[str]:
        args = [sys.executable, "-c", WARN_SCRIPT, str(job), server.url, redis_server.url]
        return subprocess.Popen(
            args, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=few_files,
        )  # fmt: skip

    first = script()
    wait_for(lambda: server.stats()["requests"] >= 100)
    redis_server.kill()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0 and out.split() == ["400"], err
    assert err.count("lost the limits store") == 1, err
    assert "ulimit -n" in err and "at most 192" in err
    assert "new job in" not in err  # INFO: only for who asks for it
    with (job / "results.jsonl").open("ab") as f:
        f.write(b'{"custom_id": "torn"}\n')
    redis_server.start()  # the job.toml names the store
    second = script()
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0 and out.split() == ["400"], err
    assert "(1 lines, sent again now)" in err and "resuming" not in err
    assert "Traceback" not in err
    assert_exactly_once(job, [f"line-{i}" for i in range(1, 401)])


# --- Options and the job folder ------------------------------------------------------------


def test_none_means_not_given_for_every_option(mock_server: MockFactory, tmp_path: Path) -> None:
    server = mock_server()
    job = tmp_path / "job"
    nones = dict.fromkeys(("max_tokens", "temperature", "rpm", "system", "params", "concurrency"))
    results = bq.run(["a"], job=job, **nones, **options(server.url))
    assert results[0].ok
    toml = (job / "job.toml").read_text()
    assert "max_tokens" not in toml and "temperature" not in toml
    body = orjson.loads((job / "input.jsonl").read_bytes())
    assert body == {"prompt": "a"}


def test_a_rerun_without_endpoint_uses_the_jobs_own(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server()
    job = tmp_path / "job"
    texts = ["one", "two"]
    first = bq.run(texts, job=job, endpoint="/v1/embeddings", **options(server.url))
    assert all(r.ok and r.embedding for r in first)
    again = bq.run(texts, job=job, **options(server.url))  # the same cell, endpoint= left out
    assert [r.embedding for r in again] == [r.embedding for r in first]
    assert server.stats()["requests"] == 2


def test_fewer_requests_than_the_job_holds_are_refused(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    """Running them would run, and return, every stored request: not what was asked."""
    server = mock_server()
    job = tmp_path / "job"
    bq.run(["a", "b", "c"], job=job, **options(server.url))
    before = (job / "input.jsonl").read_bytes()
    with pytest.raises(bq.InputError, match="not the ones job"):
        bq.run(["a", "b"], job=job, **options(server.url))
    assert (job / "input.jsonl").read_bytes() == before
    assert [r.text for r in bq.run(["a", "b", "c", "d"], job=job, **options(server.url))] == [
        "Echo: a", "Echo: b", "Echo: c", "Echo: d",
    ]  # fmt: skip


def test_a_request_that_is_not_json_is_one_input_error(tmp_path: Path) -> None:
    with pytest.raises(bq.InputError, match="request 2 cannot be written as JSON"):
        bq.run(["a", {"prompt": object()}], job=tmp_path / "job", model="m", progress=False)


def test_the_job_folder_and_its_input_are_made_durably(
    mock_server: MockFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new folder's name is fsynced in its parent, as for every folder batchq makes."""
    server = mock_server()
    ops: list[tuple[str, Path]] = []
    monkeypatch.setattr(durable, "record", lambda op, path, arg: ops.append((op, path)))
    job = tmp_path / "jobs" / "new"
    bq.run(["a"], job=job, **options(server.url))
    assert ops.index(("mkdir", job.parent)) < ops.index(("fsync_dir", tmp_path))
    assert ops.index(("mkdir", job)) < ops.index(("fsync_dir", job.parent))
    renamed = [path for op, path in ops if op == "rename"]
    assert any(p.name.startswith(".input.jsonl.") for p in renamed), renamed
    assert ops.index(("fsync_dir", job)) > 0
