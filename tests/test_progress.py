"""What a user sees: the live progress (terminal or log), the summary, status, validate."""

from __future__ import annotations

import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
from pathlib import Path

import orjson
import pytest
from conftest import MockFactory
from support import batchq, batchq_cmd, chat, clean_env, outputs, wait_for, write_jsonl

pytestmark = pytest.mark.slow


def slow_job(tmp_path: Path, n: int = 60) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"progress {i}", custom_id=f"p{i}") for i in range(n)])


@pytest.mark.parametrize("columns", [160, 0])  # 0: a terminal that reports no width
def test_progress_on_a_terminal_is_a_live_bar(
    tmp_path: Path, mock_server: MockFactory, columns: int
) -> None:
    server = mock_server(latency=0.1)
    slow_job(tmp_path)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--concurrency", "4"]
    proc = subprocess.Popen(
        batchq_cmd(*args), cwd=tmp_path, env=clean_env(), stdin=slave, stdout=slave, stderr=slave
    )
    os.close(slave)
    screen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.wait(timeout=30) == 0
    text = screen.decode(errors="replace")
    assert "\r" in text  # redrawn in place
    assert "/60 " in text and "%" in text and "req/s" in text and "tok/s" in text
    assert "finished" in text  # and the summary after it


def test_progress_in_a_log_is_plain_periodic_lines(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.1)
    slow_job(tmp_path)
    args = ["--base-url", server.url, "--model", "m", "--concurrency", "4"]
    done = batchq("run", "in.jsonl", *args, "--progress-every", "0.2", cwd=tmp_path)
    assert done.returncode == 0
    lines = [line for line in done.stderr.splitlines() if "/60 done" in line]
    assert len(lines) >= 3
    assert all(line.startswith("batchq: ") and "req/s" in line for line in lines)
    assert "\r" not in done.stderr

    quiet = batchq(
        "run", "in.jsonl", *args, "--job", "q", "--progress-every", "0.2", "-q", cwd=tmp_path
    )
    assert quiet.returncode == 0
    assert "done ·" not in quiet.stderr


def test_the_summary_matches_the_files_and_the_endpoint(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    lines = [chat(f"s{i}") for i in range(30)] + [chat("[[mock:status=400]]")]
    lines += [chat("flaky [[mock:fail=1]]")]
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = batchq(
        "run", "in.jsonl", "--base-url", server.url, "--model", "m", "--json-summary", cwd=tmp_path
    )
    assert done.returncode == 1
    figures = orjson.loads(done.stdout)
    results, errors = outputs(tmp_path / "jobs" / "in")
    stats = server.stats()
    assert (figures["succeeded"], figures["failed"], figures["pending"]) == (31, 1, 0)
    assert (len(results), len(errors)) == (31, 1)
    run = figures["this_run"]
    assert run["prompt_tokens"] == stats["prompt_tokens"]
    assert run["completion_tokens"] == stats["completion_tokens"]
    assert run["retries_by_cause"] == {"503": 1}
    assert run["latency_s"]["p50"] > 0
    assert figures["retry_failed"] == (
        f"batchq run in.jsonl --base-url {server.url} --model m --json-summary --retry-failed"
    )
    assert "31 succeeded, 1 failed, 0 pending" in done.stderr
    assert run["cost"] is None  # no price given: nothing shown, nothing guessed
    assert "cost:" not in done.stderr


def test_a_price_shows_the_cost_of_a_live_run(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat(f"s{i}") for i in range(5)])
    args = ["--base-url", server.url, "--model", "m", "--json-summary"]
    done = batchq("run", "in.jsonl", *args, "--price-in", "2", "--price-out", "8", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = orjson.loads(done.stdout)["this_run"]
    cost = (run["prompt_tokens"] * 2 + run["completion_tokens"] * 8) / 1e6
    assert run["cost"] == {"spent": pytest.approx(cost), "all_live": pytest.approx(cost)} and cost


def test_status_of_a_finished_and_an_interrupted_job(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.05)
    slow_job(tmp_path, 400)
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--concurrency", "2"]
    proc = subprocess.Popen(
        batchq_cmd(*args), cwd=tmp_path, env=clean_env(), stderr=subprocess.PIPE, text=True
    )
    results = tmp_path / "jobs" / "in" / "results.jsonl"
    wait_for(lambda: results.exists() and results.stat().st_size > 0)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    figures = orjson.loads(batchq("status", "jobs/in", "--json", cwd=tmp_path).stdout)
    assert figures["state"] == "interrupted" and figures["pid"] is None
    assert figures["done"] + figures["pending"] == figures["total"] == 400
    assert figures["done"] == len(outputs(tmp_path / "jobs" / "in")[0])

    elapsed_before = figures["elapsed_s"]
    assert elapsed_before > 0
    assert batchq(*args, "--concurrency", "64", cwd=tmp_path).returncode == 0
    text = batchq("status", "jobs/in", cwd=tmp_path).stdout
    assert "finished" in text and "400 of 400 done: 400 succeeded, 0 failed, 0 pending" in text
    figures = orjson.loads(batchq("status", "jobs/in", "--json", cwd=tmp_path).stdout)
    assert figures["elapsed_s"] > elapsed_before  # the time of both runs


def test_validate_counts_bad_lines_duplicates_and_tokens(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    good = [
        chat("Tell me about " + "tides " * i, custom_id=f"v{i}", max_tokens=50) for i in range(40)
    ]
    good[5]["custom_id"] = "v1"  # a duplicate of line 2's id
    path = write_jsonl(tmp_path / "in.jsonl", good)
    path.write_bytes(path.read_bytes() + b"{oops\n\n" + orjson.dumps({"custom_id": "x"}) + b"\n")
    args = ["in.jsonl", "--model", "m", "--price-in", "1", "--price-out", "2", "--json"]
    done = batchq("validate", *args, cwd=tmp_path)
    assert done.returncode == 1
    report = orjson.loads(done.stdout)
    assert (report["lines"], report["blank"], report["usable"], report["bad"]) == (43, 1, 40, 2)
    assert [b["line"] for b in report["bad_lines"]] == [41, 43]
    assert report["duplicates"] == [{"custom_id": "v1", "first_line": 2, "line": 6}]
    assert report["max_completion_tokens"] == 40 * 50
    assert report["cost"]["completion"] == pytest.approx(40 * 50 * 2 / 1e6)

    server = mock_server()  # what the endpoint itself counts for the same requests
    ran = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", cwd=tmp_path)
    assert ran.returncode == 1
    counted = server.stats()["prompt_tokens"]
    assert abs(report["prompt_tokens"] - counted) <= 0.1 * counted


def test_validate_of_a_clean_file_exits_0_and_sends_nothing(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("fine")])
    done = batchq("validate", "in.jsonl", cwd=tmp_path)
    assert done.returncode == 0
    assert "1 usable, 0 bad" in done.stdout
    assert not (tmp_path / "jobs").exists()
