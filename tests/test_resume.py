"""Exactly once, whatever stops the job: real processes, real signals, real files.

Each test runs `batchq run` as a subprocess against the built-in endpoint,
interrupts it the way the world does (SIGKILL, SIGINT, SIGTERM, a torn
write, a changed input, a second runner) and checks the promise at the
level a user sees it: every input line has exactly one output line, and
what the server received.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import orjson
import pytest
from conftest import MockFactory
from support import (
    assert_exactly_once,
    batchq,
    chat,
    outputs,
    read_jsonl,
    start,
    wait_for,
    write_jsonl,
)

pytestmark = pytest.mark.slow


def results_exist(job: Path) -> bool:
    path = job / "results.jsonl"
    return path.exists() and path.stat().st_size > 0


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.002, latency_jitter=0.02, rate_503=0.02, seed=1)
    ids = [f"id-{i}" for i in range(3000)]
    lines = [chat(f"chaos {i}", custom_id=cid) for i, cid in enumerate(ids)]
    lines[7] = chat("never [[mock:status=400]]", custom_id=ids[7])  # errors.jsonl too
    write_jsonl(tmp_path / "in.jsonl", lines)
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    args += ["--concurrency", "16"]
    rng = random.Random(20261126)
    kills = 0
    for _ in range(200):
        proc = start(*args, cwd=tmp_path)
        if kills < 25:
            # The kill moment is random on purpose: start-up, mid-run, the final flush.
            time.sleep(rng.uniform(0.0, 0.8))
            if proc.poll() is None:
                proc.kill()
                kills += 1
        proc.communicate(timeout=60)
        if proc.returncode in (0, 1):
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.returncode == 1  # finished by itself, with the one 400 in errors.jsonl
    assert kills >= 20
    job = tmp_path / "jobs" / "in"
    assert_exactly_once(job, ids)
    server.reset()
    again = batchq(*args, cwd=tmp_path)
    assert again.returncode == 1
    assert server.stats()["requests"] == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_gracefully_with_130_and_the_rerun_finishes(
    tmp_path: Path, mock_server: MockFactory, sig: signal.Signals
) -> None:
    server = mock_server(latency=0.02)
    ids = [f"s-{i}" for i in range(600)]
    write_jsonl(tmp_path / "in.jsonl", [chat(cid, custom_id=cid) for cid in ids])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--concurrency", "4"]
    job = tmp_path / "jobs" / "in"
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: results_exist(job))
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "to resume: batchq run in.jsonl" in stderr
    done_before = len(read_jsonl(job / "results.jsonl"))
    assert 0 < done_before < len(ids)

    rerun = batchq(*args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {done_before:,} of" in rerun.stderr
    assert_exactly_once(job, ids)
    # In-flight requests were given time to finish, so nothing was sent twice.
    assert server.stats()["requests"] == len(ids)


def test_a_second_signal_stops_at_once_and_is_still_safe(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.3)
    ids = [f"d-{i}" for i in range(200)]
    write_jsonl(tmp_path / "in.jsonl", [chat(cid, custom_id=cid) for cid in ids])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--drain-timeout", "60"]
    job = tmp_path / "jobs" / "in"
    proc = start(*args, "--concurrency", "8", cwd=tmp_path)
    wait_for(lambda: results_exist(job))
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    for line in proc.stderr:  # the first signal has been handled once it says so
        if line.startswith("batchq: stopping"):
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)  # far less than the 60 s drain timeout
    assert proc.returncode == 130
    assert batchq(*args, cwd=tmp_path).returncode == 0
    assert_exactly_once(job, ids)


def test_a_torn_last_line_is_cut_away_and_its_request_sent_again(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    ids = [f"t-{i}" for i in range(200)]
    path = write_jsonl(tmp_path / "in.jsonl", [chat(c, custom_id=c) for c in ids[:100]])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m"]
    assert batchq(*args, cwd=tmp_path).returncode == 0
    job = tmp_path / "jobs" / "in"
    journal = job / "journal.bin"
    first_run_journal = journal.stat().st_size
    with path.open("ab") as f:  # a second run adds commits of its own
        f.write(b"".join(orjson.dumps(chat(c, custom_id=c)) + b"\n" for c in ids[100:]))
    assert batchq(*args, cwd=tmp_path).returncode == 0

    # Make it look as if the process died while writing the second run's lines: none of
    # its commits happened (a slow machine makes several), and results.jsonl ends in half
    # a line.
    with journal.open("r+b") as f:
        f.truncate(first_run_journal)
    results = job / "results.jsonl"
    first_run = sum(len(orjson.dumps(r)) + 1 for r in read_jsonl(results)[:100])
    with results.open("r+b") as f:
        f.truncate(first_run + 150)
    assert not results.read_bytes().endswith(b"\n")

    server.reset()
    assert batchq(*args, cwd=tmp_path).returncode == 0
    assert server.stats()["requests"] == 100  # only the uncommitted ones
    assert_exactly_once(job, ids)


def test_a_changed_input_is_refused_and_an_appended_one_continues(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    path = write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", custom_id=f"q{i}") for i in range(10)])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m"]
    assert batchq(*args, cwd=tmp_path).returncode == 0

    with path.open("ab") as f:
        f.write(b"\n \t\n" + orjson.dumps(chat("new", custom_id="new")) + b"\n")
    server.reset()
    appended = batchq(*args, cwd=tmp_path)
    assert appended.returncode == 0
    assert server.stats()["prompts"] == {"new": 1}
    figures = orjson.loads(batchq("status", "jobs/in", "--json", cwd=tmp_path).stdout)
    assert (figures["total"], figures["pending"]) == (11, 0)  # blank lines are no requests

    path.write_bytes(path.read_bytes().replace(b'"q3"', b'"q9"'))
    changed = batchq(*args, cwd=tmp_path)
    assert changed.returncode == 2
    assert "has changed since job" in changed.stderr and "in.jsonl" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_one_runner_per_job_and_a_killed_runner_does_not_block(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.05)
    ids = [f"l-{i}" for i in range(400)]
    write_jsonl(tmp_path / "in.jsonl", [chat(c, custom_id=c) for c in ids])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--concurrency", "2"]
    job = tmp_path / "jobs" / "in"
    first = start(*args, cwd=tmp_path)
    wait_for(lambda: results_exist(job))
    second = batchq(*args, cwd=tmp_path)
    assert second.returncode == 2
    assert f"already being run by process {first.pid}" in second.stderr

    status = batchq("status", "jobs/in", "--json", cwd=tmp_path)
    figures = orjson.loads(status.stdout)
    assert figures["state"] == "running" and figures["pid"] == first.pid

    first.kill()
    first.communicate()
    resumed = batchq(*args, "--concurrency", "64", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(job, ids)
    figures = orjson.loads(batchq("status", "jobs/in", "--json", cwd=tmp_path).stdout)
    assert figures["state"] == "finished"
    assert (figures["done"], figures["succeeded"], figures["pending"]) == (400, 400, 0)


def test_retry_failed_sends_only_the_transient_failures_again(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    lines = [
        chat("permanent [[mock:status=422]]", custom_id="permanent"),
        chat("transient [[mock:fail=2]]", custom_id="transient"),
        chat("fine", custom_id="fine"),
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    (tmp_path / "in.jsonl").write_bytes((tmp_path / "in.jsonl").read_bytes() + b"not json\n")
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--max-attempts", "2"]
    assert batchq(*args, cwd=tmp_path).returncode == 1
    job = tmp_path / "jobs" / "in"
    assert sorted(e["custom_id"] for e in outputs(job)[1]) == ["line-4", "permanent", "transient"]

    retried = batchq(*args, "--retry-failed", cwd=tmp_path)
    assert retried.returncode == 1  # the permanent failure and the bad line remain
    assert "1 retryable failures back to pending" in retried.stderr
    results, errors = outputs(job)
    assert sorted(r["custom_id"] for r in results) == ["fine", "transient"]
    assert sorted(e["custom_id"] for e in errors) == ["line-4", "permanent"]
    arrivals = server.stats()["prompts"]
    assert arrivals["permanent [[mock:status=422]]"] == 1
    assert arrivals["transient [[mock:fail=2]]"] == 3
    assert_exactly_once(job, ["permanent", "transient", "fine", "line-4"])


def test_status_of_a_job_that_never_ran_and_of_a_folder_that_is_no_job(tmp_path: Path) -> None:
    missing = batchq("status", ".", cwd=tmp_path)
    assert missing.returncode == 2 and "not a batchq job folder" in missing.stderr
    os.makedirs(tmp_path / "j")
    (tmp_path / "j" / "job.toml").write_text('input = "../in.jsonl"\n')
    figures = orjson.loads(batchq("status", "j", "--json", cwd=tmp_path).stdout)
    assert figures["state"] == "not started" and figures["done"] == 0
