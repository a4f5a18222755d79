"""`batchq run --via batch`: a job through the provider's Batch API, exactly once.

End to end: a real `batchq` process against the built-in endpoint's Files + Batches
API (both dialects) over real sockets; what counts is on disk and in the server's
billing counters (batches created, lines billed twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest import MockFactory, RunningMock
from support import (
    batchq,
    batchq_cmd,
    batchq_peak_rss,
    chat,
    clean_env,
    outputs,
    read_jsonl,
    wait_for,
    write_jsonl,
)

# A day per real second: a batch of 50 lines is done in a few milliseconds.
FAST = {"batch_time_scale": 86_400.0, "batch_lines_per_second": 100.0, "batch_step_seconds": 60.0}
DASHSCOPE = "/compatible-mode/v1"


def prompts(n: int) -> list[dict[str, Any]]:
    """Chat lines; line 10 has no custom_id and lines 2 and 3 share one, as real files do."""
    lines = [chat(f"question {i}", custom_id=f"q{i}") for i in range(1, n + 1)]
    lines[9].pop("custom_id")  # line 10: line-10
    lines[1]["custom_id"] = lines[2]["custom_id"] = "twin"
    return lines


def run_batch(
    tmp: Path, server: RunningMock, *args: str, base: str = "/v1", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    url = server.url.removesuffix("/v1") + base
    return batchq(
        "run", tmp / "in.jsonl", "--job", tmp / "job", "--base-url", url,
        "--model", "gpt-4o-mini", "--via", "batch", "--batch-poll", "0.02", *args,
        cwd=tmp, timeout=timeout,
    )  # fmt: skip


def billing(server: RunningMock) -> dict[str, Any]:
    batches: dict[str, Any] = server.stats()["batches"]
    return batches


def assert_one_output_per_line(job: Path, n: int) -> None:
    """Every input line once, by line number (custom_ids repeat on purpose)."""
    results, errors = outputs(job)
    lines = sorted(o["batchq"]["line"] for o in results + errors)
    assert lines == list(range(1, n + 1))


@pytest.mark.parametrize("base", ["/v1", DASHSCOPE], ids=["openai", "dashscope"])
def test_a_job_goes_through_batches_and_each_line_is_written_once(
    tmp_path: Path, mock_server: MockFactory, base: str
) -> None:
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(120))
    done = run_batch(tmp_path, server, "--batch-max-lines", "50", base=base)
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job"
    assert_one_output_per_line(job, 120)
    results, errors = outputs(job)
    assert errors == []
    by_line = {o["batchq"]["line"]: o for o in results}
    # The user's ids come back, however the input wrote them, and the answers are the live ones.
    assert by_line[10]["custom_id"] == "line-10"
    assert by_line[2]["custom_id"] == by_line[3]["custom_id"] == "twin"
    assert by_line[4]["response"]["body"]["choices"][0]["message"]["content"] == "Echo: question 4"
    assert all(o["batchq"]["batch"].startswith("batch_") for o in results)
    billed = billing(server)
    assert billed["batches_created"] == 3  # 50 + 50 + 20 lines
    assert billed["lines_billed"] == 120
    assert billed["lines_billed_twice"] == 0
    assert not (job / "batches").exists() or not any((job / "batches").iterdir())


def test_an_endpoint_the_provider_does_not_batch_is_refused_before_any_upload(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    done = run_batch(tmp_path, server, "--endpoint", "/v1/completions", base=DASHSCOPE)
    assert done.returncode == 2, done.stderr
    assert "dashscope does not batch /v1/completions" in done.stderr
    assert "Traceback" not in done.stderr
    assert billing(server)["files_uploaded"] == 0


def test_faults_on_every_route_neither_lose_a_line_nor_pay_for_one_twice(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(
        **FAST,
        batch_lost_upload_rate=0.3,
        batch_lost_create_rate=0.5,
        batch_truncated_download_rate=0.3,
        batch_rate_429=0.1,
        batch_rate_5xx=0.1,
        batch_expire_rate=0.3,
        rate_500=0.05,
        seed=7,
    )
    write_jsonl(tmp_path / "in.jsonl", prompts(200))
    done = run_batch(tmp_path, server, "--batch-max-lines", "40", timeout=120)
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 200)
    billed = billing(server)
    assert billed["duplicate_batches"] == 0
    assert billed["lines_billed_twice"] == 0
    assert "looking for it" in done.stderr  # lost creates were found again, not made again


def test_lines_a_batch_keeps_failing_end_as_retryable_errors(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST, batch_late_failure_rate=1.0)
    write_jsonl(tmp_path / "in.jsonl", prompts(30))
    done = run_batch(tmp_path, server, "--max-attempts", "2")
    assert done.returncode == 1, done.stderr
    results, errors = outputs(tmp_path / "job")
    assert results == [] and len(errors) == 30
    assert all(e["batchq"]["retryable"] and e["batchq"]["attempts"] == 2 for e in errors)
    assert billing(server)["batches_created"] == 2  # one batch, then one retry of its lines
    assert "failed:" in done.stderr


def test_collecting_a_batch_holds_a_slice_of_its_answers_in_memory_not_all(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST)
    # 500 lines of 300 embeddings each: one batch of ~19 MB of answers.
    lines = ({"input": [f"{i}-{j}" for j in range(300)]} for i in range(500))
    write_jsonl(tmp_path / "in.jsonl", lines)
    done, peak = batchq_peak_rss(
        "run", tmp_path / "in.jsonl", "--job", tmp_path / "job", "--base-url", server.url,
        "--model", "m", "--endpoint", "/v1/embeddings", "--via", "batch", "--batch-poll", "0.02",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 500)
    assert (tmp_path / "job" / "results.jsonl").stat().st_size > 15_000_000
    # ~40 MiB; holding every answer of the batch at once (and a joined copy) took ~77 MiB.
    assert peak < 60, peak


def _kill_at(step: str, nth: int) -> str:
    """A batchq whose batch executor SIGKILLs itself the nth time it reaches ``step``."""
    return (
        "import os, signal, sys\n"
        "import batchq.batch.executor as executor\n"
        "from batchq.cli import main\n"
        "seen = []\n"
        "def at(step):\n"
        f"    if step == {step!r}:\n"
        "        seen.append(step)\n"
        f"        if len(seen) == {nth}:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "executor.at_step = at\n"
        "sys.argv[0] = 'batchq'\n"
        "main()\n"
    )


def _killed_at(step: str, nth: int, tmp: Path, server: RunningMock, *args: str) -> None:
    """``run_batch``'s command, SIGKILLed the nth time it reaches ``step``."""
    killed = subprocess.run(
        [sys.executable, "-c", _kill_at(step, nth), "run", str(tmp / "in.jsonl"),
         "--job", str(tmp / "job"), "--base-url", server.url, "--model", "gpt-4o-mini",
         "--via", "batch", "--batch-poll", "0.02", *args],
        cwd=tmp, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr


STEPS = ["planned", "uploaded", "creating", "created", "downloaded", "committed"]


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_then_a_rerun_pays_once_and_writes_once(
    tmp_path: Path, mock_server: MockFactory, step: str
) -> None:
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(90))
    _killed_at(step, 1 if step == "planned" else 2, tmp_path, server, "--batch-max-lines", "30")
    done = run_batch(tmp_path, server, "--batch-max-lines", "30")
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 90)
    billed = billing(server)
    assert billed["duplicate_batches"] == 0
    assert billed["lines_billed_twice"] == 0
    assert billed["batches_created"] == 3


def test_ctrl_c_leaves_the_batches_running_and_the_same_command_collects_them(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # Slow batches: an hour of virtual time a real second, half a line a virtual second.
    server = mock_server(batch_time_scale=3600.0, batch_lines_per_second=0.5)
    write_jsonl(tmp_path / "in.jsonl", prompts(20))
    args = ["--job", tmp_path / "job", "--base-url", server.url, "--model", "gpt-4o-mini"]
    process = subprocess.Popen(
        [sys.executable, "-m", "batchq", "run", tmp_path / "in.jsonl", *args,
         "--via", "batch", "--batch-poll", "0.02"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: billing(server)["batches_created"] == 1)
    wait_for(lambda: b'"created"' in (tmp_path / "job" / "batches.jsonl").read_bytes())
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "go on running at the provider" in stderr
    server_batches = billing(server)
    assert server_batches["batches_created"] == 1
    done = run_batch(tmp_path, server, "--batch-poll", "0.02", timeout=120)
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 20)
    assert billing(server)["batches_created"] == 1  # collected, not sent again


@pytest.mark.parametrize("lost", [0.0, 1.0], ids=["answered", "cancel-answer-lost"])
def test_cancel_collects_what_finished_and_a_live_rerun_does_the_rest(
    tmp_path: Path, mock_server: MockFactory, lost: float
) -> None:
    server = mock_server(
        batch_time_scale=60.0, batch_lines_per_second=0.01, batch_lost_cancel_rate=lost
    )  # 0.6 lines a second
    write_jsonl(tmp_path / "in.jsonl", prompts(20))
    detached = run_batch(tmp_path, server, "--detach")
    assert detached.returncode == 0, detached.stderr
    assert "go on running" in detached.stderr
    job = tmp_path / "job"
    assert outputs(job) == ([], [])
    status = orjson.loads(batchq("status", job, "--json", cwd=tmp_path).stdout)
    (row,) = status["batches"]
    assert row["open"] and row["lines"] == 20 and row["batch_id"].startswith("batch_")
    assert row["deadline"] == pytest.approx(time.time() + 24 * 3600, abs=60)
    # A live run meanwhile leaves the batch's lines alone.
    live = batchq("run", job, "--via", "live", cwd=tmp_path)
    assert live.returncode == 0, live.stderr
    assert "20 lines are in open provider batches" in live.stderr
    assert outputs(job) == ([], [])
    cancelled = batchq("cancel", job, cwd=tmp_path, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert billing(server)["by_outcome"] == {"cancelled": 1}
    rerun = batchq("run", job, "--via", "live", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert_one_output_per_line(job, 20)
    ledger = read_jsonl(job / "batches.jsonl")
    assert ledger[-1]["step"] == "collected" and ledger[-1]["status"] == "cancelled"


def test_lines_appended_after_the_batches_were_created_go_in_a_batch_of_their_own(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(30))
    assert run_batch(tmp_path, server, "--detach").returncode == 0
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(b"".join(orjson.dumps(chat(f"late {i}")) + b"\n" for i in range(5)))
    done = run_batch(tmp_path, server)
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 35)
    assert billing(server)["batches_created"] == 2
    assert billing(server)["lines_billed_twice"] == 0


def live_calls(server: RunningMock) -> int:
    """Requests the endpoint answered in real time (not in a batch)."""
    by_path: dict[str, int] = server.stats()["by_path"]
    return sum(n for path, n in by_path.items() if path.endswith("/chat/completions"))


def test_auto_sends_live_what_its_batch_cannot_finish_before_the_deadline(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # 3 lines a real second: the batch of 60 lines would need ~20 s, the deadline is 6 s.
    server = mock_server(batch_time_scale=60.0, batch_lines_per_second=0.05, batch_step_seconds=1)
    write_jsonl(tmp_path / "in.jsonl", prompts(60))
    started = time.monotonic()
    done = run_batch(tmp_path, server, "--via", "auto", "--deadline", "6s")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert elapsed < 6 + 3  # the deadline, and a process's start and stop
    assert "cannot finish before the deadline" in done.stderr
    assert_one_output_per_line(tmp_path / "job", 60)
    results, _ = outputs(tmp_path / "job")
    by_batch = sum("batch" in o["batchq"] for o in results)
    assert 0 < by_batch < 60  # the batch did what it could; the rest went live
    # ... until the deadline less a tenth (5.4 s at 3 lines a second, from its create): not
    # cancelled as soon as its pace showed it could not finish, which left 1 line by batch.
    assert by_batch >= 5
    assert live_calls(server) == 60 - by_batch
    assert billing(server)["lines_billed_twice"] == 0
    assert f"{by_batch:,} lines by batch, {60 - by_batch:,} live" in done.stderr


def test_auto_with_time_to_spare_sends_nothing_live(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(40))
    done = run_batch(
        tmp_path, server, "--via", "auto", "--deadline", "1h",
        "--price-in", "1000000", "--price-out", "1000000", "--json-summary",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 40)
    assert live_calls(server) == 0
    assert billing(server)["lines_billed"] == 40
    run = orjson.loads(done.stdout)["this_run"]
    tokens = run["total_tokens"]  # a dollar a token: the cost is the count
    assert run["cost"] == {"spent": tokens / 2, "all_live": tokens}
    assert run["batches"]["lines"] == 40


def test_auto_sends_live_the_lines_no_batch_takes_and_those_a_batch_failed(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST, rate_500=0.2, seed=3)
    lines = prompts(40)
    body = {"model": "gpt-4o-mini", "prompt": "x"}
    lines[4] = {"custom_id": "cmp", "url": "/v1/completions", "body": body}
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = run_batch(tmp_path, server, "--via", "auto", "--deadline", "1h", base=DASHSCOPE)
    assert done.returncode == 0, done.stderr
    assert "1 lines cannot go by batch and go live" in done.stderr
    assert_one_output_per_line(tmp_path / "job", 40)
    results, _ = outputs(tmp_path / "job")
    live = sorted(o["batchq"]["line"] for o in results if "batch" not in o["batchq"])
    assert 5 in live and len(live) > 1  # the line DashScope does not batch, and the 500s
    assert billing(server)["batches_created"] == 1
    assert billing(server)["lines_billed_twice"] == 0


def test_the_python_api_runs_a_job_by_batch(tmp_path: Path, mock_server: MockFactory) -> None:
    import batchq

    server = mock_server(**FAST)
    prompts_ = [f"tell me {i}" for i in range(25)]
    options = {"base_url": server.url, "model": "gpt-4o-mini", "batch_poll": 0.02}
    results = batchq.run(prompts_, job=tmp_path / "job", via="batch", progress=False, **options)
    assert [r.ok for r in results] == [True] * 25
    assert results[3].text == "Echo: tell me 3"
    assert billing(server)["batches_created"] == 1
    again = batchq.run(prompts_, job=tmp_path / "job", via="batch", progress=False, **options)
    assert [r.text for r in again] == [r.text for r in results]
    assert billing(server)["batches_created"] == 1  # all done: nothing sent again


@pytest.mark.parametrize("via", ["batch", "auto"])
async def test_a_resumed_stream_by_batch_yields_every_line_once(
    tmp_path: Path, mock_server: MockFactory, via: str
) -> None:
    import batchq

    # Under auto, a fifth of the lines fail in their batch and go live afterwards: the
    # live phase opens the job again, and must not yield the batch's lines a second time.
    server = mock_server(**FAST, rate_500=0.2 if via == "auto" else 0.0, seed=3)
    prompts_ = [f"tell me {i}" for i in range(25)]
    options: dict[str, Any] = {"base_url": server.url, "model": "gpt-4o-mini", "via": via}
    options.update(batch_poll=0.02, progress=False, max_attempts=1)
    if via == "auto":
        options["deadline"] = "1h"
    job = tmp_path / "job"
    await batchq.arun(prompts_[:10], job=job, **{**options, "via": "batch"})
    async with batchq.stream(prompts_, job=job, **options) as stream:
        lines = [result.line async for result in stream]
    assert lines[:10] == list(range(1, 11))  # those done before, first, in input order
    assert sorted(lines) == list(range(1, 26))


def test_validate_shows_the_batches_a_run_would_make_and_what_none_would_take(
    tmp_path: Path,
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", max_tokens=10) for i in range(120)])
    shown = batchq(
        "validate", tmp_path / "in.jsonl", "--via", "batch", "--model", "m",
        "--batch-max-lines", "50", "--price-in", "1000000", "--price-out", "0", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    plan = orjson.loads(shown.stdout)["batch"]
    assert plan["dialect"] == "openai" and plan["batches"] == 3
    assert plan["cost_batch"] == plan["cost_live"] / 2 > 0
    write_jsonl(tmp_path / "cmp.jsonl", [{"prompt": "x"}])
    dashscope = "https://dashscope.aliyuncs.com/compatible-mode/v1"
    refused = batchq(
        "validate", tmp_path / "cmp.jsonl", "--via", "batch", "--model", "m",
        "--endpoint", "/v1/completions", "--base-url", dashscope, cwd=tmp_path,
    )  # fmt: skip
    assert "cannot go by batch: 1 lines on /v1/completions" in refused.stdout


def test_an_answer_too_deep_to_read_back_is_sent_again_not_written(tmp_path: Path) -> None:
    from batchq.batch.collect import collect
    from batchq.job.batches import Chunk

    shallow = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    output = tmp_path / "out.jsonl"
    line = b'{"custom_id":"batchq-%d","response":{"status_code":200,"body":%b},"error":null}\n'
    # Line 2's answer: orjson reads 300 levels, but cannot write them back.
    output.write_bytes(line % (1, orjson.dumps(shallow)) + line % (2, _deep_json(300)))
    chunk = Chunk(1, [[1, 2]], 2, 1, "/v1/chat/completions", None, 0, batch_id="batch_x")
    ids = {"batchq-1": (1, "one"), "batchq-2": (2, "two")}
    written: list[Any] = []
    left = collect([output], chunk, ids, set(), max_attempts=3, emit=written.append)
    assert [o.line_no for o in written] == [1]
    assert orjson.loads(written[0].line)["custom_id"] == "one"
    assert written[0].prompt_tokens == 3
    assert left.retry == [2]


def _deep_json(levels: int) -> bytes:
    return b'{"a":' * levels + b"{}" + b"}" * levels


def test_lines_a_failed_batch_names_fail_for_good_and_the_rest_go_again() -> None:
    from batchq.batch.collect import collect, rejected_lines
    from batchq.job.batches import Chunk

    chunk = Chunk(1, [[4, 5], [9, 9]], 3, 1, "/v1/chat/completions", None, 0, batch_id="b")
    failed = {"errors": {"data": [{"code": "invalid_request", "message": "bad body", "line": 2}]}}
    ids = {"batchq-4": (4, "four"), "batchq-5": (5, "five"), "batchq-9": (9, "nine")}
    written: list[Any] = []
    left = collect(
        [], chunk, ids, set(), max_attempts=3, emit=written.append,
        rejected=rejected_lines(chunk, failed),
    )  # fmt: skip
    (line,) = [orjson.loads(o.line) for o in written]
    assert line["custom_id"] == "five" and line["batchq"]["line"] == 5
    assert line["error"]["code"] == "invalid_request" and not line["batchq"]["retryable"]
    assert left.retry == [4, 9]


@pytest.mark.parametrize(
    "answer",
    [b"{}", b'{"id": null}', b"<html>login</html>", b'{"id": "file-1"}'],
    ids=["no-id", "null-id", "html", "file-but-no-batch-id"],
)
def test_a_provider_answering_nonsense_is_one_line_and_exit_3(
    tmp_path: Path, hostile: Any, answer: bytes
) -> None:
    from aiohttp import web

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/batches") and answer == b'{"id": "file-1"}':
            return web.Response(body=b'{"object": "batch"}', content_type="application/json")
        return web.Response(body=answer, content_type="application/json")

    server = hostile(handler)
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = batchq(
        "run", tmp_path / "in.jsonl", "--job", tmp_path / "job", "--base-url", server.url,
        "--model", "m", "--via", "batch", "--batch-poll", "0.01", "--api-key-env", "KEY",
        cwd=tmp_path, env=clean_env(KEY="sk-secret-0123456789abcdef"), timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and "sk-secret" not in done.stderr
    assert done.stderr.count("error:") == 1


def test_a_batch_refused_for_a_full_account_goes_again_once_the_others_are_done(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # About 2,000 tokens a batch of 20 lines: two fit under the limit, the third does not.
    server = mock_server(
        batch_time_scale=60.0, batch_lines_per_second=2.0, batch_step_seconds=1.0,
        batch_enqueued_tokens=4_500,
    )  # fmt: skip
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", max_tokens=100) for i in range(60)])
    done = run_batch(tmp_path, server, "--batch-max-lines", "20", "--max-attempts", "1")
    assert done.returncode == 0, done.stderr
    assert "token_limit_exceeded" in done.stderr
    assert_one_output_per_line(tmp_path / "job", 60)
    results, _ = outputs(tmp_path / "job")
    assert {o["batchq"]["attempts"] for o in results} == {1}  # the refusal was not a try
    billed = billing(server)
    assert billed["batches_created"] >= 4 and billed["lines_billed_twice"] == 0


def test_the_python_api_wants_a_job_folder_for_batches() -> None:
    import batchq
    from batchq.errors import ConfigError

    with pytest.raises(ConfigError, match="needs job=DIR"):
        batchq.run(["a"], via="batch", base_url="http://127.0.0.1:9/v1", progress=False)


def test_a_second_detached_run_collects_what_finished(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(30))
    first = run_batch(tmp_path, server, "--detach")
    assert first.returncode == 0 and outputs(tmp_path / "job") == ([], [])
    assert "--detach" not in first.stderr.split("to resume:")[-1]
    wait_for(lambda: billing(server)["by_outcome"] == {"completed": 1})
    second = run_batch(tmp_path, server, "--detach")
    assert second.returncode == 0, second.stderr
    assert_one_output_per_line(tmp_path / "job", 30)
    assert billing(server)["batches_created"] == 1


def _provider(retrieve: dict[str, Any] | None) -> Any:
    """A Batch API that takes uploads and creates, then answers a retrieve with ``retrieve``
    (None: 404, the batch unknown) and lists no batches."""
    from aiohttp import web

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        path = request.path
        if path.endswith("/files"):
            answer: Any = {"id": "file-1", "object": "file"}
        elif path.endswith("/batches") and request.method == "POST":
            answer = {"id": "batch_1", "object": "batch", "status": "validating"}
        elif path.endswith("/batches"):
            answer = {"data": [], "has_more": False}
        elif retrieve is None:
            return web.json_response({"error": {"message": "No such batch"}}, status=404)
        else:
            answer = {"id": "batch_1", **retrieve}
        return web.json_response(answer)

    return handler


def test_a_batch_the_provider_no_longer_knows_sends_its_lines_again(
    tmp_path: Path, hostile: Any
) -> None:
    server = hostile(_provider(None))
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = batchq(
        "run", tmp_path / "in.jsonl", "--job", tmp_path / "job", "--base-url", server.url,
        "--model", "m", "--via", "batch", "--batch-poll", "0.01", "--max-attempts", "1",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "unknown to the provider (HTTP 404)" in done.stderr
    _, errors = outputs(tmp_path / "job")
    assert sorted(e["batchq"]["line"] for e in errors) == list(range(1, 13))
    assert all(e["error"]["code"] == "batch_unanswered" for e in errors)
    assert {e["custom_id"] for e in errors} >= {"q1", "twin", "line-10"}  # the user's ids


def test_a_completed_batch_that_names_no_file_is_not_paid_for_again(
    tmp_path: Path, hostile: Any
) -> None:
    counts = {"total": 12, "completed": 12, "failed": 0}
    server = hostile(_provider({"status": "completed", "request_counts": counts}))
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = batchq(
        "run", tmp_path / "in.jsonl", "--job", tmp_path / "job", "--base-url", server.url,
        "--model", "m", "--via", "batch", "--batch-poll", "0.01", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "names no output or error file" in done.stderr
    creates = [s for s in server.seen if s.method == "POST" and s.path.endswith("/batches")]
    assert len(creates) == 1
    assert outputs(tmp_path / "job") == ([], [])


def test_cancel_stops_the_batches_of_every_shard(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(batch_time_scale=60.0, batch_lines_per_second=0.01)
    write_jsonl(tmp_path / "in.jsonl", prompts(20))
    for shard in ("0/2", "1/2"):
        detached = run_batch(tmp_path, server, "--shard", shard, "--detach")
        assert detached.returncode == 0, detached.stderr
    cancelled = batchq("cancel", tmp_path / "job", cwd=tmp_path, timeout=60)
    assert cancelled.returncode == 0, cancelled.stderr
    assert billing(server)["by_outcome"] == {"cancelled": 2}
    for shard in ("0/2", "1/2"):
        live = batchq("run", tmp_path / "job", "--shard", shard, "--via", "live", cwd=tmp_path)
        assert live.returncode == 0, live.stderr
    exported = batchq("export", tmp_path / "job", cwd=tmp_path)
    assert [orjson.loads(line)["batchq"]["line"] for line in exported.stdout.splitlines()] == (
        list(range(1, 21))
    )


def test_a_damaged_download_that_echoes_the_key_leaves_no_copy_of_it(
    tmp_path: Path, hostile: Any
) -> None:
    from aiohttp import web

    key = "sk-echoed-0123456789abcdef"
    content = (
        b'{"custom_id": "batchq-1", "response": {"status_code": 200, "body": {"k": "%b"}}}\n'
        b"not json\n" % key.encode()
    )
    completed = {"id": "batch_1", "status": "completed", "output_file_id": "file-out"}
    fallback = _provider(completed)

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/files/file-out"):
            return web.json_response({"id": "file-out", "bytes": len(content)})
        if request.path.endswith("/files/file-out/content"):
            return web.Response(body=content)
        response: web.StreamResponse = await fallback(request, body)
        return response

    server = hostile(handler)
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = batchq(
        "run", tmp_path / "in.jsonl", "--job", tmp_path / "job", "--base-url", server.url,
        "--model", "m", "--via", "batch", "--batch-poll", "0.01", "--api-key-env", "KEY",
        cwd=tmp_path, env=clean_env(KEY=key),
    )  # fmt: skip
    # Damaged in every download: what can be read is collected; the other lines may be the
    # unreadable one, answered and paid for, so they are not sent again unasked.
    assert done.returncode == 1, done.stderr
    assert "damaged" in done.stderr
    results, errors = outputs(tmp_path / "job")
    assert [r["batchq"]["line"] for r in results] == [1]
    assert sorted(e["batchq"]["line"] for e in errors) == list(range(2, 13))
    assert {e["error"]["code"] for e in errors} == {"batch_unmatched"}
    assert all(e["batchq"]["retryable"] for e in errors)
    assert len(_creates(server)) == 1
    for path in (tmp_path / "job").rglob("*"):
        assert not path.is_file() or key.encode() not in path.read_bytes(), path


def _creates(server: Any) -> list[Any]:
    return [s for s in server.seen if s.method == "POST" and s.path.endswith("/batches")]


def _answering(output: Callable[[int], bytes] | None, *, described: bool = True) -> Any:
    """A provider whose batch completes with an output file of ``output(n)`` for each of
    batchq's lines ``batchq-n`` (None: the file is gone, 404); not ``described``: a
    gateway that serves the file's content, but 404 for what it is."""
    from aiohttp import web

    completed = {"id": "batch_1", "status": "completed", "output_file_id": "file-out"}
    fallback = _provider(completed)
    uploaded: list[bytes] = []

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.endswith("/files") and request.method == "POST":
            uploaded.append(body)
        if request.path.endswith("/files/file-out") or request.path.endswith("/content"):
            if output is None or (not described and request.path.endswith("/file-out")):
                return web.json_response({"error": {"message": "No such file"}}, status=404)
            lines = len(re.findall(rb'"custom_id": ?"batchq-', uploaded[-1]))
            content = b"".join(output(n) for n in range(1, lines + 1))
            if request.path.endswith("/file-out"):
                return web.json_response({"id": "file-out", "bytes": len(content)})
            return web.Response(body=content)
        response: web.StreamResponse = await fallback(request, body)
        return response

    return handler


def _batch_job(tmp: Path, server: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return batchq(
        "run", tmp / "in.jsonl", "--job", tmp / "job", "--base-url", server.url,
        "--model", "m", "--via", "batch", "--batch-poll", "0.01", *args, cwd=tmp,
    )  # fmt: skip


def test_answers_under_ids_the_job_never_sent_are_not_paid_for_again(
    tmp_path: Path, hostile: Any
) -> None:
    """A gateway that renames custom_id: every line answered, none matched. Sent again, each
    batch would come back the same, billed each time, until the tries ran out."""

    def renamed(n: int) -> bytes:
        body = {"choices": [{"message": {"content": "hi"}}]}
        line = {"custom_id": f"req-batchq-{n}", "response": {"status_code": 200, "body": body}}
        return orjson.dumps(line) + b"\n"

    server = hostile(_answering(renamed))
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = _batch_job(tmp_path, server)
    assert done.returncode == 1, done.stderr
    assert len(_creates(server)) == 1
    results, errors = outputs(tmp_path / "job")
    assert results == []
    assert sorted(e["batchq"]["line"] for e in errors) == list(range(1, 13))
    assert {e["error"]["code"] for e in errors} == {"batch_unmatched"}
    assert "12 lines it was not sent" in done.stderr


def test_an_output_file_the_provider_no_longer_has_fails_its_lines_unpaid_again(
    tmp_path: Path, hostile: Any
) -> None:
    """A detached job that came back after the provider dropped its output file: the job
    ends instead of holding its lines for good, and pays for none of them twice."""
    server = hostile(_answering(None))
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = _batch_job(tmp_path, server)
    assert done.returncode == 1, done.stderr
    assert "is gone (HTTP 404)" in done.stderr
    assert len(_creates(server)) == 1
    _, errors = outputs(tmp_path / "job")
    assert sorted(e["batchq"]["line"] for e in errors) == list(range(1, 13))
    assert {e["error"]["code"] for e in errors} == {"batch_output_gone"}
    assert all(e["batchq"]["retryable"] for e in errors)


def test_an_output_file_served_but_not_described_is_collected(tmp_path: Path, hostile: Any) -> None:
    def answered(n: int) -> bytes:
        body = {"choices": [{"message": {"content": "hi"}}]}
        line = {"custom_id": f"batchq-{n}", "response": {"status_code": 200, "body": body}}
        return orjson.dumps(line) + b"\n"

    server = hostile(_answering(answered, described=False))
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = _batch_job(tmp_path, server)
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 12)
    assert len(_creates(server)) == 1


@pytest.mark.parametrize(
    "damage", ["deleted once created", "deleted before the upload", "an ids file damaged"]
)
def test_a_batches_folder_lost_or_damaged_is_read_again_from_the_input(
    tmp_path: Path, mock_server: MockFactory, damage: str
) -> None:
    import shutil

    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(30))
    if damage == "deleted before the upload":
        _killed_at("planned", 1, tmp_path, server)
    else:
        assert run_batch(tmp_path, server, "--detach").returncode == 0
    if damage.startswith("deleted"):
        shutil.rmtree(tmp_path / "job" / "batches")  # it looks like a cache
    else:
        with (tmp_path / "job" / "batches" / "chunk-00001.ids").open("ab") as ids:
            ids.write(b"garbage\n")
    done = run_batch(tmp_path, server)
    assert done.returncode == 0, done.stderr
    assert_one_output_per_line(tmp_path / "job", 30)
    by_line = {o["batchq"]["line"]: o for o in outputs(tmp_path / "job")[0]}
    assert by_line[10]["custom_id"] == "line-10" and by_line[2]["custom_id"] == "twin"
    assert billing(server)["batches_created"] == 1


def test_a_download_a_kill_left_behind_is_removed_by_the_next_run(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    """It holds the answers as the provider sent them: an echoed key, unscrubbed."""
    server = mock_server(**FAST)
    write_jsonl(tmp_path / "in.jsonl", prompts(30))
    _killed_at("downloaded", 1, tmp_path, server)
    left = tmp_path / "job" / "batches" / "chunk-00001.output.jsonl"
    assert left.exists()
    live = batchq("run", tmp_path / "job", "--via", "live", cwd=tmp_path)
    assert live.returncode == 0, live.stderr  # its lines are the open batch's
    assert not left.exists()


def _signalled_at_ledger(signals: int) -> str:
    """A batchq that sends itself SIGINT ``signals`` times as the batch ledger opens."""
    return (
        "import os, signal, sys\n"
        "import batchq.batch.executor as executor\n"
        "from batchq.cli import main\n"
        "class Ledger(executor.Ledger):\n"
        "    def __init__(self, *args):\n"
        f"        for _ in range({signals}):\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "        super().__init__(*args)\n"
        "executor.Ledger = Ledger\n"
        "sys.argv[0] = 'batchq'\n"
        "main()\n"
    )


def test_ctrl_c_while_a_batch_job_opens_sends_nothing(tmp_path: Path, hostile: Any) -> None:
    server = hostile(_answering(None))
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    done = subprocess.run(
        [sys.executable, "-c", _signalled_at_ledger(1), "run", str(tmp_path / "in.jsonl"),
         "--job", str(tmp_path / "job"), "--base-url", server.url, "--model", "m",
         "--via", "batch"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert server.seen == []


def test_a_second_ctrl_c_during_a_provider_call_stops_at_once_and_cleanly(
    tmp_path: Path, hostile: Any
) -> None:
    from aiohttp import web

    released = threading.Event()

    async def upload_hangs(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.to_thread(released.wait, 60)  # until the test ends
        return web.json_response({}, status=500)

    server = hostile(upload_hangs)
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    run = subprocess.Popen(
        batchq_cmd("run", tmp_path / "in.jsonl", "--job", tmp_path / "job",
                   "--base-url", server.url, "--model", "m", "--via", "batch"),
        cwd=tmp_path, env=clean_env(), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: len(server.seen) == 1)  # the upload is in, and never answered
        run.send_signal(signal.SIGINT)
        assert run.stderr is not None
        said = [run.stderr.readline() for _ in range(3)]
        assert "Ctrl-C again to stop at once" in said[-1], said
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
        released.set()
    assert run.returncode == 130, stderr
    assert "Traceback" not in stderr


def test_a_credential_in_the_base_url_is_in_no_message_of_a_provider_that_speaks_no_http(
    tmp_path: Path,
) -> None:
    """aiohttp's errors quote the URL, and a ?api-key= stays at its end."""
    secret = "query-secret-0123456789"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def garble() -> None:
            with contextlib.suppress(OSError):
                while True:
                    peer, _ = listener.accept()
                    with peer:
                        peer.recv(65536)
                        peer.sendall(b"garbage\r\n\r\n")

        threading.Thread(target=garble, daemon=True).start()
        write_jsonl(tmp_path / "in.jsonl", prompts(12))
        done = batchq(
            "run", tmp_path / "in.jsonl", "--job", tmp_path / "job", "--model", "m",
            "--base-url", f"http://127.0.0.1:{port}/v1?api-key={secret}", "--via", "batch",
            "--batch-poll", "0.01", cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "POST /files failed" in done.stderr and secret not in done.stderr + done.stdout
