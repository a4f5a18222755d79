"""The whole pipeline, as a user runs it: `batchq run` in a subprocess against the built-in
endpoint, checked through the files it writes, its exit status and what the server received."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from conftest import MockFactory
from support import batchq, by_custom_id, chat, clean_env, outputs, write_jsonl


def test_both_line_forms_and_custom_ids(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    body = {"messages": [{"role": "user", "content": "batch"}]}
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body},
            {"custom_id": "b", "body": {"messages": [{"role": "user", "content": "together"}]}},
            chat("bare with id", custom_id="c"),
            chat("bare without id"),
            {"prompt": "just a prompt"},
        ],
    )
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert errors == []
    lines = by_custom_id(results)
    assert set(lines) == {"a", "b", "c", "line-4", "line-5"}
    assert {r["batchq"]["line"] for r in results} == {1, 2, 3, 4, 5}
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in results)
    assert all(r["response"]["request_id"] for r in results)
    reply = lines["line-5"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "just a prompt" in reply  # the prompt became a user message
    assert server.stats()["requests"] == 5


def test_job_defaults_fill_in_and_the_body_wins(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(
        tmp_path / "in.jsonl",
        [chat("x " * 400, custom_id="capped"), chat("own model", custom_id="own", model="mine")],
    )
    args = ["--base-url", server.url, "--model", "job-model", "--max-tokens", "5"]
    done = batchq("run", "in.jsonl", *args, "--system", "Be brief.", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = by_custom_id(outputs(tmp_path / "jobs" / "in")[0])
    capped = lines["capped"]["response"]["body"]
    assert capped["model"] == "job-model"
    assert capped["usage"]["completion_tokens"] <= 5
    assert capped["choices"][0]["message"]["content"].startswith("Echo: Be brief.")
    assert lines["own"]["response"]["body"]["model"] == "mine"
    assert "max_tokens = 5" in (tmp_path / "jobs" / "in" / "job.toml").read_text()


def test_bad_lines_are_reported_by_line_and_the_rest_succeeds(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    good = chat("fine", custom_id="good")
    (tmp_path / "in.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "first"}]}\n'
        "this is not json\n"
        "[1, 2]\n"
        '{"custom_id": "u", "url": "/v1/images", "body": {"prompt": "a cat"}}\n'
        "\n"
        '{"custom_id": "nothing", "temperature": 0.5}\n'
        + write_jsonl(tmp_path / "tail", [good]).read_text()
    )
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert {r["batchq"]["line"] for r in results} == {1, 7}
    by_line = {e["batchq"]["line"]: e for e in errors}
    assert set(by_line) == {2, 3, 4, 6}  # line 5 is blank: skipped, not an error
    assert by_line[2]["error"]["code"] == "invalid_json"
    assert "input line 3" in by_line[3]["error"]["message"]
    assert "/v1/images" in by_line[4]["error"]["message"]
    assert by_line[4]["custom_id"] == "u"
    assert "messages" in by_line[6]["error"]["message"]
    assert not any(e["batchq"]["retryable"] for e in errors)
    assert server.stats()["requests"] == 2


def test_a_file_that_is_not_jsonl_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text("custom_id,prompt\n1,hello\n")
    done = batchq("run", "in.jsonl", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("batchq: error:") and "not JSONL" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "jobs" / "in").exists()
    (tmp_path / "in.jsonl").write_text('\n\n[1]\n{"prompt": "a"}\n')
    done = batchq("run", "in.jsonl", cwd=tmp_path)
    assert "its first line (line 3) is not a JSON object" in done.stderr, done.stderr


def test_400_is_sent_once_and_recorded(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    prompt = "reject me [[mock:status=400]]"
    write_jsonl(tmp_path / "in.jsonl", [chat(prompt, custom_id="bad"), chat("ok")])
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert done.returncode == 1
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert len(results) == 1 and len(errors) == 1
    error = errors[0]
    assert error["custom_id"] == "bad"
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert error["batchq"] == {"line": 1, "attempts": 1, "retryable": False}
    assert server.stats()["prompts"][prompt] == 1


def test_5xx_and_dropped_connections_are_retried_until_success(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    prompts = ["a [[mock:fail=2]]", "b [[mock:fail=2:500]]", "c [[mock:drop=2]]"]
    write_jsonl(tmp_path / "in.jsonl", [chat(p, custom_id=p[0]) for p in prompts])
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert errors == []
    assert {r["custom_id"]: r["batchq"]["attempts"] for r in results} == {"a": 3, "b": 3, "c": 3}
    arrivals = server.stats()["prompts"]
    assert [arrivals[p] for p in prompts] == [3, 3, 3]


def test_retries_give_up_after_max_attempts(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("[[mock:fail=9]]", custom_id="x")])
    args = ["--base-url", server.url, "--model", "m", "--max-attempts", "2"]
    done = batchq("run", "in.jsonl", *args, cwd=tmp_path)
    assert done.returncode == 1
    (error,) = outputs(tmp_path / "jobs" / "in")[1]
    assert error["response"]["status_code"] == 503
    assert error["batchq"] == {"line": 1, "attempts": 2, "retryable": True}
    assert server.stats()["requests"] == 2
    assert "--retry-failed" in done.stderr


def test_a_timeout_is_an_error_line(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("slow [[mock:sleep=3]]", custom_id="slow")])
    args = ["--base-url", server.url, "--model", "m", "--timeout", "0.3", "--max-attempts", "1"]
    done = batchq("run", "in.jsonl", *args, cwd=tmp_path)
    assert done.returncode == 1
    (error,) = outputs(tmp_path / "jobs" / "in")[1]
    assert error["error"]["code"] == "timeout"
    assert error["response"] is None


KEY = "sk-test-7f3a9c1e5b2d"


def test_bad_key_stops_the_job_with_nothing_marked_failed(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(api_key=KEY)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(20)])
    args = [
        "run",
        "in.jsonl",
        "--base-url",
        server.url,
        "--model",
        "m",
        "--api-key-env",
        "BATCHQ_TEST_KEY",
    ]
    wrong = batchq(*args, cwd=tmp_path, env=clean_env(BATCHQ_TEST_KEY="sk-wrong-key"))
    assert wrong.returncode == 3
    assert "401" in wrong.stderr and "Traceback" not in wrong.stderr
    job = tmp_path / "jobs" / "in"
    assert outputs(job) == ([], [])

    fixed = batchq(*args, cwd=tmp_path, env=clean_env(BATCHQ_TEST_KEY=KEY))
    assert fixed.returncode == 0, fixed.stderr
    assert len(outputs(job)[0]) == 20
    for path in job.iterdir():
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in wrong.stderr + fixed.stderr + wrong.stdout + fixed.stdout


def test_insufficient_quota_stops_the_job(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(insufficient_quota=True)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(5)])
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert done.returncode == 3
    assert "quota" in done.stderr
    assert outputs(tmp_path / "jobs" / "in") == ([], [])


def test_an_unreachable_endpoint_stops_the_job(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    write_jsonl(tmp_path / "in.jsonl", [chat("q")])
    args = ["--base-url", f"http://127.0.0.1:{port}/v1", "--max-attempts", "2"]
    done = batchq("run", "in.jsonl", *args, cwd=tmp_path)
    assert done.returncode == 3
    assert "cannot be reached" in done.stderr
    assert outputs(tmp_path / "jobs" / "in") == ([], [])


@pytest.mark.parametrize(
    ("endpoint", "line", "expect"),
    [
        ("/v1/chat/completions", {"prompt": "hi"}, "chat.completion"),
        ("/v1/completions", {"prompt": "hi"}, "text_completion"),
        ("/v1/embeddings", {"input": "hi"}, "list"),
        ("/v1/responses", {"input": "hi"}, "response"),
    ],
)
def test_every_endpoint(
    tmp_path: Path, mock_server: MockFactory, endpoint: str, line: dict[str, str], expect: str
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [line])
    args = ["--base-url", server.url, "--endpoint", endpoint, "--model", "m"]
    done = batchq("run", "in.jsonl", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (result,) = outputs(tmp_path / "jobs" / "in")[0]
    assert result["response"]["body"]["object"] == expect
    assert server.stats()["by_path"] == {endpoint: 1}


def test_max_tokens_reaches_the_responses_endpoint_under_its_name_there(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()  # refuses max_tokens on /v1/responses, as OpenAI does
    write_jsonl(tmp_path / "in.jsonl", [{"input": "a prompt long enough to be cut " * 4}])
    args = ["--base-url", server.url, "--endpoint", "/v1/responses", "--model", "m"]
    done = batchq("run", "in.jsonl", *args, "--max-tokens", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (result,) = outputs(tmp_path / "jobs" / "in")[0]
    body = result["response"]["body"]
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["usage"]["output_tokens"] == 3


def test_one_file_may_mix_endpoints(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            chat("a chat", custom_id="chat"),
            {"custom_id": "emb", "url": "/v1/embeddings", "body": {"model": "e", "input": "x"}},
        ],
    )
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = by_custom_id(outputs(tmp_path / "jobs" / "in")[0])
    assert lines["emb"]["response"]["body"]["model"] == "e"  # the chat model was not forced on it
    assert server.stats()["by_path"] == {"/v1/chat/completions": 1, "/v1/embeddings": 1}


def test_a_second_run_sends_nothing_again(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(50)])
    first = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path)
    assert first.returncode == 0
    server.reset()
    again = batchq("run", "jobs/in", cwd=tmp_path)  # by job folder: the settings are in job.toml
    assert again.returncode == 0, again.stderr
    assert "resuming: 50 of 50 done" in again.stderr
    assert server.stats()["requests"] == 0
    assert len(outputs(tmp_path / "jobs" / "in")[0]) == 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.jsonl"], "does not exist"),
        (["run", "."], "has no job.toml"),
        (["run", "in.jsonl", "--endpoint", "/v1/images"], "Invalid value for '--endpoint'"),
        (["run", "in.jsonl", "--base-url", "localhost:8000"], "not an http(s) URL"),
        (["run", "in.jsonl", "--api-key-env", "sk-123"], "not the key itself"),
        (["run", "in.jsonl", "--concurrency", "0"], "--concurrency"),
        (["run", "in.jsonl", "-p", "novalue"], "not KEY=VALUE"),
    ],
)
def test_usage_mistakes_exit_2_without_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("q")])
    done = batchq(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_outputs_cannot_move_in_the_middle_of_a_job(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("q")])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m"]
    first = batchq(*args, "--output", "elsewhere.jsonl", cwd=tmp_path)
    assert first.returncode == 0
    assert (tmp_path / "elsewhere.jsonl").exists()  # relative to the current folder
    moved = batchq(*args, "--output", "other.jsonl", cwd=tmp_path)
    assert moved.returncode == 2 and "move the files and edit job.toml" in moved.stderr
    again = batchq(*args, cwd=tmp_path)  # job.toml remembers where the outputs are
    assert again.returncode == 0 and "resuming: 1 of 1 done" in again.stderr
