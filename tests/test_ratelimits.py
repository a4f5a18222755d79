"""Rate limits as the endpoint sees them: the built-in endpoint enforces RPM/TPM like OpenAI
(a sliding minute plus per-second smoothing) and records every arrival; batchq runs in a
subprocess. High limits and short runs keep each test to a few seconds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from conftest import MockFactory
from support import batchq, by_custom_id, chat, outputs, write_jsonl

pytestmark = pytest.mark.slow


def run(tmp_path: Path, url: str, *args: str) -> Any:
    return batchq("run", "in.jsonl", "--base-url", url, "--model", "m", "-q", *args, cwd=tmp_path)


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


def test_matched_rpm_runs_at_the_limit_without_429s(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(rpm=6000)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(300)])
    done = run(tmp_path, server.url, "--rpm", "6000")
    assert done.returncode == 0, done.stderr
    stats = server.stats()
    assert stats["rate_limited"] <= 1
    achieved = (stats["requests"] - 1) / (stats["last_at"] - stats["first_at"])
    assert achieved >= 0.9 * 100


def test_matched_tpm_with_varied_requests_gets_no_429s(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(tpm=300_000)
    rng = random.Random(4)
    lines = [
        chat("word " * rng.randint(5, 400), max_tokens=rng.randint(1, 300)) for _ in range(120)
    ]
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = run(tmp_path, server.url, "--tpm", "300000")
    assert done.returncode == 0, done.stderr
    assert server.stats()["rate_limited"] <= 1


def test_a_limit_set_too_high_is_learned_from_the_endpoint(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(rpm=600)
    ids = [f"w{i}" for i in range(40)]
    write_jsonl(tmp_path / "in.jsonl", [chat(c, custom_id=c) for c in ids])
    done = run(tmp_path, server.url, "--rpm", "100000")
    assert done.returncode == 0, done.stderr
    assert "the endpoint allows 600 requests/min" in done.stderr
    assert set(by_custom_id(outputs(tmp_path / "jobs" / "in")[0])) == set(ids)
    stats = server.stats()
    assert stats["rate_limited"] < 0.2 * len(ids)


def test_retry_after_is_honoured_by_the_whole_pool(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    lines = [chat("slow down [[mock:fail=2:429]]", custom_id="limited")]
    lines += [chat(f"other {i}") for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = run(tmp_path, server.url, "--concurrency", "4", "--rpm", "1200")
    assert done.returncode == 0, done.stderr
    stats = server.stats()
    assert len(stats["waits"]) == 2
    arrivals = [at for at, _ in stats["arrivals"]]
    for told_at, wait in stats["waits"]:
        # Requests already on their way when the 429 left may still land just after it.
        early = [at for at in arrivals if told_at + 0.02 < at < told_at + wait]
        assert early == [], f"{len(early)} requests came before the {wait}s asked for"
    (limited,) = (r for r in outputs(tmp_path / "jobs" / "in")[0] if r["custom_id"] == "limited")
    assert limited["batchq"]["attempts"] == 3


def test_no_burst_at_start(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat(f"b{i}") for i in range(250)])
    done = run(tmp_path, server.url, "--rpm", "6000", "--concurrency", "128")
    assert done.returncode == 0, done.stderr
    times = [at for at, _ in server.stats()["arrivals"]]
    assert busiest_second(times) <= 110


def test_a_request_too_large_for_the_tpm_budget_fails_at_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(
        tmp_path / "in.jsonl",
        [chat("huge", custom_id="huge", max_tokens=5000), chat("small", custom_id="small")],
    )
    done = run(tmp_path, server.url, "--tpm", "1000")
    assert done.returncode == 1
    (error,) = outputs(tmp_path / "jobs" / "in")[1]
    assert error["custom_id"] == "huge" and error["error"]["code"] == "request_too_large"
    assert server.stats()["prompts"] == {"small": 1}


def test_an_endpoint_that_rejects_a_request_as_too_large_fails_it_at_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(tpm=2000)
    write_jsonl(tmp_path / "in.jsonl", [chat("big", custom_id="big", max_tokens=3000)])
    done = run(tmp_path, server.url)  # batchq knows no budget; the endpoint says it
    assert done.returncode == 1
    (error,) = outputs(tmp_path / "jobs" / "in")[1]
    assert error["response"]["status_code"] == 429
    assert error["batchq"]["retryable"] is False
    assert server.stats()["requests"] == 1


@pytest.mark.parametrize(
    ("options", "prompt", "says"),
    [
        ({"insufficient_quota": True}, "q", "insufficient_quota"),
        ({}, "[[mock:status=403]]", "403"),
    ],
)
def test_fatal_answers_stop_the_job_and_leave_everything_pending(
    tmp_path: Path, mock_server: MockFactory, options: dict[str, Any], prompt: str, says: str
) -> None:
    server = mock_server(**options)
    write_jsonl(tmp_path / "in.jsonl", [chat(prompt)] + [chat(f"q{i}") for i in range(9)])
    done = run(tmp_path, server.url)
    assert done.returncode == 3
    assert says in done.stderr
    assert outputs(tmp_path / "jobs" / "in") == ([], [])
    fixed = mock_server()
    (tmp_path / "in.jsonl").write_bytes((tmp_path / "in.jsonl").read_bytes())
    again = batchq("run", "jobs/in", "--base-url", fixed.url, "-q", cwd=tmp_path)
    if prompt.startswith("[[mock"):  # the 403 line itself still fails on any endpoint
        assert again.returncode == 3
    else:
        assert again.returncode == 0, again.stderr
        assert len(outputs(tmp_path / "jobs" / "in")[0]) == 10
