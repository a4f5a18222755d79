"""An endpoint that misbehaves cannot fool batchq (issue 13).

Each test runs `batchq` as a user does, against a small server that
misbehaves in one way real proxies, gateways and half-configured servers do,
and checks the exit status, the one line it says, what is in results.jsonl and
errors.jsonl, that `status` agrees, and that no line is lost or written twice.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import gzip
import subprocess
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import MockFactory
from hostile import HostileServer, completion, echo, prompt_of
from support import (
    batchq,
    batchq_peak_rss,
    by_custom_id,
    chat,
    clean_env,
    outputs,
    write_jsonl,
)

import batchq as api
from batchq.live.serverload import TIMEOUT as READING_TIMEOUT

Hostile = Callable[..., HostileServer]
KEY = "sk-proj-" + "A1b2C3d4" * 6  # what a real key looks like
MARKER = "[api key removed]"


def job_of(tmp_path: Path) -> Path:
    return tmp_path / "jobs" / "in"


def run(tmp_path: Path, url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``batchq run in.jsonl`` against ``url``, quietly, as a user would type it."""
    args = ("--base-url", url, "--model", "m", "-q", *args)
    return batchq("run", "in.jsonl", *args, cwd=tmp_path, env=clean_env(**env))


def two_lines(tmp_path: Path, *prompts: str) -> list[str]:
    prompts = prompts or ("one", "two")
    write_jsonl(tmp_path / "in.jsonl", [chat(p, custom_id=p) for p in prompts])
    return list(prompts)


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line batchq said about why it stopped; never a traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("batchq: error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def agrees(tmp_path: Path, ids: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every line in at most one file, once; `status` counts what the files hold."""
    results, errors = outputs(job_of(tmp_path))
    ok, failed = by_custom_id(results), by_custom_id(errors)
    assert not set(ok) & set(failed), "a request is in both files"
    assert set(ok) | set(failed) <= set(ids)
    shown = batchq("status", job_of(tmp_path), "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    figures = orjson.loads(shown.stdout)
    assert (figures["succeeded"], figures["failed"]) == (len(ok), len(failed))
    assert figures["pending"] == len(ids) - len(ok) - len(failed)
    return ok, failed


# --- 1. waits: capped by --max-wait, nonsense is no header ---------------------------------


def answer(status: int, headers: dict[str, str]) -> Callable[..., Any]:
    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        error = {"error": {"message": "slow down", "type": "requests"}}
        return web.Response(status=status, body=orjson.dumps(error), headers=headers)

    return handler


IN_2100 = email.utils.format_datetime(datetime(2100, 1, 1, tzinfo=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("status", "headers", "said"),
    [
        (429, {"Retry-After": "999999"}, "retry-after: 999999"),
        (503, {"Retry-After": "999999"}, "HTTP 503, retry-after: 999999"),
        (429, {"retry-after-ms": "999999999"}, "11.6 days"),
        (429, {"Retry-After": IN_2100}, "years"),
        (
            429,
            {"x-ratelimit-reset-requests": "999h", "x-ratelimit-remaining-requests": "0"},
            "x-ratelimit-reset-requests: 999h",
        ),
    ],
    ids=["429-retry-after", "503-retry-after", "retry-after-ms", "date-2100", "reset-999h"],
)
def test_a_wait_longer_than_max_wait_stops_the_job_and_keeps_it(
    tmp_path: Path,
    hostile: Hostile,
    mock_server: MockFactory,
    status: int,
    headers: dict[str, str],
    said: str,
) -> None:
    ids = two_lines(tmp_path)
    server = hostile(answer(status, headers))
    done = run(tmp_path, server.url, "--max-wait", "600")
    assert done.returncode == 3, done.stderr
    line = error_line(done)
    assert "the endpoint asked to wait" in line and said in line, line
    assert "--max-wait (10m00s)" in line and "nothing pending is lost" in line
    if "years" not in said:
        assert "run the same command again after 20" in line  # when to come back
    assert len(server.seen) == len(ids)  # each sent once, then it stopped: no retries
    assert agrees(tmp_path, ids) == ({}, {})  # both still pending
    # The same command, once the endpoint behaves, finishes the job: each line once.
    fine = mock_server()
    again = run(tmp_path, fine.url, "--max-wait", "600")
    assert again.returncode == 0, again.stderr
    ok, _ = agrees(tmp_path, ids)
    assert set(ok) == set(ids)


def test_a_wait_within_max_wait_is_waited(tmp_path: Path, hostile: Hostile) -> None:
    ids = two_lines(tmp_path, "one")
    count = 0

    async def once_429(request: web.Request, body: bytes) -> web.StreamResponse:
        nonlocal count
        count += 1
        if count == 1:
            return web.Response(status=429, headers={"retry-after-ms": "50"}, text="{}")
        return await echo(request, body)

    server = hostile(once_429)
    done = run(tmp_path, server.url, "--max-wait", "0.1")
    assert done.returncode == 0, done.stderr
    assert len(server.seen) == 2
    assert set(agrees(tmp_path, ids)[0]) == {"one"}


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "-5"},
        {"retry-after-ms": "nan"},
        {"retry-after-ms": "inf", "Retry-After": "1e400"},
        {"Retry-After": "soon", "x-ratelimit-reset-requests": "-3s"},
    ],
    ids=["negative", "nan", "infinite", "words"],
)
def test_nonsense_waits_are_no_header(
    tmp_path: Path, hostile: Hostile, headers: dict[str, str]
) -> None:
    # As if the header were absent: batchq's own backoff, not a zero wait (which made
    # 1,516 requests in 20 s for 2 lines) and not a stop.
    ids = two_lines(tmp_path)
    answered: dict[str, int] = {}

    async def twice_429(request: web.Request, body: bytes) -> web.StreamResponse:
        prompt = prompt_of(body)
        answered[prompt] = answered.get(prompt, 0) + 1
        if answered[prompt] <= 2:
            return web.Response(status=429, headers=headers, text="{}")
        return await echo(request, body)

    server = hostile(twice_429)
    done = run(tmp_path, server.url, "--max-wait", "60")
    assert done.returncode == 0, done.stderr
    assert answered == {"one": 3, "two": 3}
    assert len(server.seen) == 6
    assert set(agrees(tmp_path, ids)[0]) == set(ids)


# --- 2. a 2xx that is not a JSON object ------------------------------------------------------

NOT_JSON = {
    "html": ("text/html", b"<html><body>Login required</body></html>"),
    "text": ("text/plain", b"upstream connect error"),
    "array": ("application/json", b"[1, 2]"),
    "empty": ("application/json", b""),
}


async def not_json(request: web.Request, body: bytes) -> web.StreamResponse:
    kind, text = NOT_JSON[prompt_of(body)]
    return web.Response(body=text, headers={"Content-Type": kind})


def test_a_2xx_that_is_not_a_json_object_is_a_retryable_failure(
    tmp_path: Path, hostile: Hostile, mock_server: MockFactory
) -> None:
    ids = two_lines(tmp_path, *NOT_JSON)
    server = hostile(not_json)
    done = run(tmp_path, server.url, "--max-attempts", "2")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert len(server.seen) == 2 * len(ids)  # each one retried, then given up
    ok, failed = agrees(tmp_path, ids)
    assert ok == {}
    for name, (kind, text) in NOT_JSON.items():
        line = failed[name]
        assert line["error"]["code"] == "invalid_response"
        assert line["batchq"]["retryable"] is True
        message = line["error"]["message"]
        assert message.startswith(f"HTTP 200 ({kind}") and "not a JSON object" in message
        assert (text.decode()[:20] in message) if text else "empty" in message
    # --retry-failed sends them again, to an endpoint that now answers properly.
    fine = mock_server()
    again = run(tmp_path, fine.url, "--retry-failed")
    assert again.returncode == 0, again.stderr
    ok, failed = agrees(tmp_path, ids)
    assert set(ok) == set(ids) and failed == {}


# --- 3. redirects ----------------------------------------------------------------------------


def redirect(status: int, location: Callable[[web.Request], str]) -> Callable[..., Any]:
    """Redirects requests under /v1 to ``location``; answers (echoing the method) elsewhere."""

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            return web.Response(status=status, headers={"Location": location(request)})
        if request.method != "POST" or not body:
            return completion("turned into a GET")
        return completion(f"{request.method} " + prompt_of(body))

    return handler


def redirected(
    tmp_path: Path, hostile: Hostile, status: int, location: Callable[[web.Request], str]
) -> tuple[subprocess.CompletedProcess[str], HostileServer]:
    """A run whose every request is redirected with ``status`` to ``location``."""
    server = hostile(redirect(status, location))
    return run(tmp_path, server.url, "--api-key-env", "K", K=KEY), server


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_would_turn_post_into_get_fails_naming_the_location(
    tmp_path: Path, hostile: Hostile, status: int
) -> None:
    ids = two_lines(tmp_path)
    done, server = redirected(tmp_path, hostile, status, lambda r: "/moved/chat/completions")
    assert done.returncode == 1, done.stderr
    assert [s.method for s in server.seen] == ["POST", "POST"]  # nothing followed
    ok, failed = agrees(tmp_path, ids)
    assert ok == {}
    for line in failed.values():
        assert line["error"]["code"] == "redirected"
        assert line["response"]["status_code"] == status
        assert "/moved/chat/completions" in line["error"]["message"]
        assert "--base-url" in line["error"]["message"]
        assert line["batchq"]["retryable"] is True  # once --base-url is fixed


@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_are_followed_with_method_body_and_key(
    tmp_path: Path, hostile: Hostile, status: int
) -> None:
    ids = two_lines(tmp_path)
    done, server = redirected(tmp_path, hostile, status, lambda r: "/v2/chat/completions")
    assert done.returncode == 0, done.stderr
    ok, _ = agrees(tmp_path, ids)
    for prompt, line in ok.items():
        reply = line["response"]["body"]["choices"][0]["message"]["content"]
        assert reply == f"POST {prompt}"
    paths = sorted(s.path for s in server.seen)
    assert paths == ["/v1/chat/completions"] * 2 + ["/v2/chat/completions"] * 2
    assert {s.authorization for s in server.seen} == {f"Bearer {KEY}"}
    moved = [s for s in server.seen if s.path.startswith("/v2")]
    assert sorted(s.body for s in moved) == sorted(s.body for s in server.seen if s not in moved)


@pytest.mark.parametrize(
    ("location", "said"),
    [
        (lambda r: f"http://localhost:{r.url.port}/v2/chat/completions", "localhost"),
        (lambda r: "/v1/chat/completions", "more than 5 redirects"),
        (lambda r: "", "redirects to nowhere"),
    ],
    ids=["another-host", "loop", "no-location"],
)
def test_307_elsewhere_in_circles_or_nowhere_fails(
    tmp_path: Path, hostile: Hostile, location: Callable[[web.Request], str], said: str
) -> None:
    ids = two_lines(tmp_path, "one")
    done, server = redirected(tmp_path, hostile, 307, location)
    assert done.returncode == 1, done.stderr
    assert all(s.path.startswith("/v1/") for s in server.seen)  # the key went nowhere else
    _, failed = agrees(tmp_path, ids)
    assert failed["one"]["error"]["code"] == "redirected"
    assert said in failed["one"]["error"]["message"]


# --- 4. answers too large, even compressed ---------------------------------------------------

MiB = 1 << 20


async def huge(request: web.Request, body: bytes) -> web.StreamResponse:
    """64 MiB of JSON string, sent as fast as the client reads it."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    chunk = b"x" * MiB
    try:
        await response.write(b'{"x": "')
        for _ in range(64):
            await response.write(chunk)
        await response.write(b'"}')
    except (ConnectionError, RuntimeError):
        pass  # the client hung up, as it should
    return response


def gzip_bomb(unpacked: int) -> bytes:
    """``unpacked`` bytes of zeros, gzipped, built a megabyte at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(MiB)
    parts = [packer.compress(zeros) for _ in range(unpacked // MiB)]
    return b"".join(parts) + packer.flush()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = gzip_bomb(256 * MiB)
    assert len(data) < 300_000
    return data


def test_answers_over_max_response_bytes_fail_and_memory_stays_bounded(
    tmp_path: Path, hostile: Hostile, bomb: bytes
) -> None:
    ids = [f"r{i}" for i in range(16)]
    write_jsonl(tmp_path / "in.jsonl", [chat(i, custom_id=i) for i in ids])

    async def huge_or_bomb(request: web.Request, body: bytes) -> web.StreamResponse:
        if int(prompt_of(body)[1:]) % 2:
            return await huge(request, body)
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        return web.Response(body=bomb, headers=headers)

    server = hostile(huge_or_bomb)
    done, peak = batchq_peak_rss(
        "run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q",
        "--concurrency", "16",  # the default bound, 32 MiB
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert len(server.seen) == len(ids)  # not retried
    ok, failed = agrees(tmp_path, ids)
    assert ok == {} and set(failed) == set(ids)
    for line in failed.values():
        assert line["error"]["code"] == "response_too_large"
        assert "larger than --max-response-bytes (33,554,432 bytes" in line["error"]["message"]
        assert line["batchq"]["retryable"] is True
    # 16 answers of 64 or 256 MiB at once (1.1 GB RSS before the bound, 520 MB with a bound
    # but no limit on how many large answers are read at a time): one or two bounds' worth.
    assert peak < 200
    assert (job_of(tmp_path) / "errors.jsonl").stat().st_size < 10_000


def test_a_small_max_response_bytes_and_an_answer_just_within_it(
    tmp_path: Path, hostile: Hostile
) -> None:
    ids = two_lines(tmp_path, "short", "long" * 300)
    server = hostile(echo)
    done = run(tmp_path, server.url, "--max-response-bytes", "1000")
    assert done.returncode == 1, done.stderr
    ok, failed = agrees(tmp_path, ids)
    assert set(ok) == {"short"} and set(failed) == {"long" * 300}
    assert "job.toml" not in done.stderr
    assert "max_response_bytes = 1000" in (job_of(tmp_path) / "job.toml").read_text()


# --- 5. the API key is never written ---------------------------------------------------------


async def echo_the_key(request: web.Request, body: bytes) -> web.StreamResponse:
    """Echo the Authorization header in every way an answer can."""
    auth = request.headers.get("Authorization", "")
    key = auth.removeprefix("Bearer ")
    escaped = "".join(f"\\u{ord(c):04x}" for c in key)
    way = prompt_of(body)
    headers = {"x-request-id": f"req-{key}"}
    if way == "ok":
        return completion(f"you sent {auth}", headers={"x-request-id": key}, echoed=auth)
    if way == "escaped":
        text = b'{"choices": [{"message": {"content": "' + escaped.encode() + b'"}}]}'
        return web.Response(body=text, content_type="application/json", headers=headers)
    if way == "html":
        return web.Response(text=f"<p>bad key {auth}</p>", content_type="text/html")
    if way == "redirect":
        return web.Response(status=301, headers={"Location": f"/login?key={key}"})
    status = {"rejected": 400, "broken": 500}[way]
    error = {"error": {"message": f"oops: {auth}", "code": key}, "key": key, key: auth}
    return web.Response(status=status, body=orjson.dumps(error), headers=headers)


def everything_written(tmp_path: Path, *runs: subprocess.CompletedProcess[str]) -> str:
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "in.jsonl"]
    text = "".join(p.read_bytes().decode("utf-8", "replace") for p in files)
    return text + "".join(r.stdout + r.stderr for r in runs)


def test_a_key_the_endpoint_echoes_is_written_nowhere(tmp_path: Path, hostile: Hostile) -> None:
    ways = ["ok", "escaped", "html", "redirect", "rejected", "broken"]
    ids = two_lines(tmp_path, *ways)
    server = hostile(echo_the_key)
    done = run(
        tmp_path, server.url, "--api-key-env", "K", "--max-attempts", "1", "--json-summary", K=KEY
    )
    assert done.returncode == 1, done.stderr
    assert {s.authorization for s in server.seen} == {f"Bearer {KEY}"}  # it was sent
    shown = batchq("status", job_of(tmp_path), "--json", cwd=tmp_path)
    assert KEY not in everything_written(tmp_path, done, shown)
    ok, failed = agrees(tmp_path, ids)
    assert set(ok) == {"ok", "escaped"}
    assert ok["ok"]["response"]["body"]["echoed"] == f"Bearer {MARKER}"
    assert ok["ok"]["response"]["request_id"] == MARKER
    assert ok["escaped"]["response"]["body"]["choices"][0]["message"]["content"] == MARKER
    assert ok["escaped"]["response"]["request_id"] == f"req-{MARKER}"
    broken = failed["broken"]
    assert broken["error"]["message"] == f"HTTP 500: oops: Bearer {MARKER}"
    assert broken["response"]["body"] == {
        "error": {"message": f"oops: Bearer {MARKER}", "code": MARKER},
        "key": MARKER,
        MARKER: f"Bearer {MARKER}",
    }
    assert MARKER in failed["html"]["error"]["message"]
    assert f"/login?key={MARKER}" in failed["redirect"]["error"]["message"]


def test_a_base_url_s_credentials_are_used_echoed_nowhere_and_kept_out_of_job_toml(
    tmp_path: Path, hostile: Hostile
) -> None:
    """A proxy's basic auth, and an Azure-style ?api-key=: each a key by another name."""
    secret = "proxy-pass-0123456789"
    basic = "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()

    async def guarded(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.headers.get("Authorization") != basic or request.query.get("api-key") != secret:
            return web.json_response({"error": {"message": "no"}}, status=401)
        return completion(f"{request.url} {request.headers['Authorization']} {secret}")

    server = hostile(guarded)
    ids = two_lines(tmp_path, "a", "b")
    base = server.url.replace("://", f"://me:{secret}@") + f"?api-key={secret}"
    first = run(tmp_path, base)
    assert first.returncode == 0, first.stderr
    assert "credentials are not kept in job.toml" in first.stderr
    assert {s.path for s in server.seen} == {"/v1/chat/completions"}
    toml = (job_of(tmp_path) / "job.toml").read_text()
    assert f'base_url = "{server.url.replace("://", "://me@")}"' in toml
    # The next run finds them where the user keeps them: here, OPENAI_BASE_URL.
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write(orjson.dumps(chat("c", "c")).decode() + "\n")
    again = batchq("run", job_of(tmp_path), "-q", cwd=tmp_path, env=clean_env(OPENAI_BASE_URL=base))
    assert again.returncode == 0, again.stderr
    assert len(agrees(tmp_path, [*ids, "c"])[0]) == 3
    assert secret not in everything_written(tmp_path, first, again)


def test_a_refused_key_stops_the_job_without_showing_it(tmp_path: Path, hostile: Hostile) -> None:
    ids = two_lines(tmp_path)

    async def refuse(request: web.Request, body: bytes) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        error = {"error": {"message": f"Incorrect API key provided: {auth}"}}
        return web.Response(status=401, body=orjson.dumps(error))

    server = hostile(refuse)
    done = run(tmp_path, server.url, "--api-key-env", "K", K=KEY)
    assert done.returncode == 3, done.stderr
    assert "401" in error_line(done)
    assert KEY not in everything_written(tmp_path, done)
    assert agrees(tmp_path, ids) == ({}, {})
    assert "is not set" not in done.stderr
    unset = run(tmp_path, server.url, "--api-key-env", "NO_SUCH_VARIABLE")
    assert "none was sent: $NO_SUCH_VARIABLE is not set" in error_line(unset)


# --- 6. smaller trust problems ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a3f9" + "0123456789abcdef" * 3 + "0123456789ab",  # 64 hex digits, a letter first
        "Ab3dE5gH7jK9mN1pQ3sT5vW7",  # random letters and digits
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123",
    ],
)
def test_a_key_where_a_variable_name_belongs_is_refused_unseen(tmp_path: Path, name: str) -> None:
    two_lines(tmp_path)
    done = run(tmp_path, "http://127.0.0.1:9/v1", "--api-key-env", name)
    assert done.returncode == 2
    assert "the *name* of an environment variable" in error_line(done)
    assert name not in done.stderr
    assert not (job_of(tmp_path) / "job.toml").exists()


def test_a_wrongly_typed_model_in_job_toml_is_refused(tmp_path: Path, hostile: Hostile) -> None:
    two_lines(tmp_path)
    server = hostile(echo)
    assert run(tmp_path, server.url, "--model", "m").returncode == 0
    toml = job_of(tmp_path) / "job.toml"
    toml.write_text(toml.read_text().replace('model = "m"', "model = 5"))
    done = batchq("run", job_of(tmp_path), "-q", cwd=tmp_path)
    assert done.returncode == 2
    assert error_line(done) == "batchq: error: model in job.toml must be a string, not 5"


def test_a_relative_output_is_taken_from_the_current_folder(
    tmp_path: Path, hostile: Hostile
) -> None:
    ids = two_lines(tmp_path)
    (tmp_path / "out").mkdir()
    server = hostile(echo)
    done = run(
        tmp_path, server.url, "--output", "out/results.jsonl", "--errors", "out/errors.jsonl"
    )
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "out" / "results.jsonl").read_bytes().splitlines()) == len(ids)
    assert not (job_of(tmp_path) / "out").exists()
    shown = orjson.loads(batchq("status", job_of(tmp_path), "--json", cwd=tmp_path).stdout)
    assert shown["results"] == str(tmp_path / "out" / "results.jsonl")
    assert shown["succeeded"] == len(ids)
    # The same command again resumes: nothing moved, nothing sent twice.
    again = run(
        tmp_path, server.url, "--output", "out/results.jsonl", "--errors", "out/errors.jsonl"
    )
    assert again.returncode == 0, again.stderr
    assert len(server.seen) == len(ids)


def test_bad_lines_are_described_in_words(tmp_path: Path, hostile: Hostile) -> None:
    write_jsonl(
        tmp_path / "in.jsonl",
        [
            {"custom_id": 1.5, "body": {"messages": [{"role": "user", "content": "x"}]}},
            {"custom_id": "evil", "url": "http://evil.example/v1/chat", "body": {"prompt": "x"}},
            {"custom_id": "get", "method": "GET", "body": {"prompt": "x"}},
            chat("fine", custom_id="fine"),
        ],
    )
    server = hostile(echo)
    done = run(tmp_path, server.url)
    assert done.returncode == 1, done.stderr
    ok, failed = agrees(tmp_path, ["line-1", "evil", "get", "fine"])
    assert set(ok) == {"fine"}
    messages = {k: v["error"]["message"] for k, v in failed.items()}
    assert (
        messages["line-1"] == "input line 1: custom_id must be a string or a whole number, not 1.5"
    )
    assert messages["evil"].startswith(
        'input line 2: url "http://evil.example/v1/chat" is not one of /v1/chat/completions'
    )
    assert messages["get"] == 'input line 3: method must be POST, not "GET"'
    assert all("b'" not in m and "'/v1http" not in m for m in messages.values())


def test_a_gzipped_input_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(gzip.compress(orjson.dumps(chat("x")) + b"\n"))
    done = run(tmp_path, "http://127.0.0.1:9/v1")
    assert done.returncode == 2
    assert error_line(done) == (
        "batchq: error: in.jsonl is gzip-compressed, not JSONL text; unpack it first"
    )


def test_binary_input_is_not_utf8_text(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_bytes(b"\xff\xfe{\x00}\x00\n")
    done = run(tmp_path, "http://127.0.0.1:9/v1")
    assert done.returncode == 2
    assert "not UTF-8 text" in error_line(done) and "surrogates" not in done.stderr


def test_an_absurd_reset_on_a_success_pauses_at_most_max_wait(
    tmp_path: Path, hostile: Hostile
) -> None:
    # remaining 0 on a 200 pauses the pool until the reset; 999h of it would look hung.
    ids = two_lines(tmp_path, "one", "two", "three")

    async def exhausted(request: web.Request, body: bytes) -> web.StreamResponse:
        headers = {
            "x-ratelimit-limit-requests": "60000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "999h",
        }
        return completion("Echo: " + prompt_of(body), headers=headers)

    server = hostile(exhausted)
    done = run(tmp_path, server.url, "--max-wait", "0.2")
    assert done.returncode == 0, done.stderr
    assert len(server.seen) == len(ids)
    assert set(agrees(tmp_path, ids)[0]) == set(ids)


# --- 7. odd answers: each line once, and `status` agrees --------------------------------------


def nested(depth: int, inner: Any) -> Any:
    for _ in range(depth):
        inner = {"a": inner}
    return inner


async def odd(request: web.Request, body: bytes) -> web.StreamResponse:
    """Answers that are valid, but not as batchq usually sees them."""
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    way = prompt_of(body)
    if way == "deep-ok":  # deeper than orjson writes, and pretty-printed over many lines
        deep = orjson.dumps(nested(200, key), option=orjson.OPT_INDENT_2)
        text = b'{"choices": [],\r\n "deep": ' + deep.replace(b'"a": {', b'"a":\n{') + b"}"
        return web.Response(body=text, content_type="application/json")
    if way == "deep-error":
        text = b'{"error": ' + b'{"a": ' * 300 + orjson.dumps(key) + b"}" * 301
        return web.Response(status=500, body=text, content_type="application/json")
    if way == "big-number":
        return web.Response(body=b'{"n": 123456789012345678901234567890, "choices": []}')
    return completion("Echo \u2028 " + way)


def test_odd_answers_each_give_one_line_and_status_agrees(tmp_path: Path, hostile: Hostile) -> None:
    ids = two_lines(tmp_path, "deep-ok", "deep-error", "big-number", "plain")
    server = hostile(odd)
    done = run(tmp_path, server.url, "--max-attempts", "1", "--api-key-env", "K", K=KEY)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    ok, failed = agrees(tmp_path, ids)
    assert set(ok) == {"deep-ok", "big-number", "plain"} and set(failed) == {"deep-error"}
    deep = ok["deep-ok"]["response"]["body"]["deep"]
    assert nested(200, MARKER) == deep
    assert failed["deep-error"]["response"]["body"] == "(not kept: nested too deeply)"
    assert failed["deep-error"]["batchq"]["retryable"] is True
    assert KEY not in everything_written(tmp_path, done)


async def nested_answer(request: web.Request, body: bytes) -> web.StreamResponse:
    """A 2xx nested as deep as the prompt says: ``depth-N``."""
    depth = int(prompt_of(body).removeprefix("depth-"))
    deep = b"[" * (depth - 1) + b"]" * (depth - 1)  # in an object: the answer is N deep
    return web.Response(body=b'{"choices": [], "deep": ' + deep + b"}")


def test_an_answer_too_deep_to_read_back_is_invalid_and_the_job_stays_readable(
    tmp_path: Path, hostile: Hostile
) -> None:
    # orjson reads 1,024 levels; the result line holds the answer two levels deeper.
    ids = two_lines(tmp_path, "depth-1022", "depth-1023", "depth-1024")
    server = hostile(nested_answer)
    done = run(tmp_path, server.url, "--max-attempts", "1")
    assert done.returncode == 1, done.stderr
    ok, failed = agrees(tmp_path, ids)
    assert set(ok) == {"depth-1022"} and set(failed) == {"depth-1023", "depth-1024"}
    assert {f["error"]["code"] for f in failed.values()} == {"invalid_response"}
    assert "nested more than 1,022 levels" in failed["depth-1023"]["error"]["message"]

    exported = batchq("export", job_of(tmp_path), "--format", "csv", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert len(exported.stdout.splitlines()) == 1 + len(ids)
    results = api.open_job(job_of(tmp_path)).results()
    assert [r.ok for r in results] == [True, False, False]
    again = api.run(
        tmp_path / "in.jsonl", job=job_of(tmp_path), base_url=server.url, model="m", progress=False
    )  # a rerun sends nothing and reads every line back
    assert [r.custom_id for r in again] == ids
    assert len(server.seen) == len(ids)


async def deep_json(request: web.Request, body: bytes) -> web.StreamResponse:
    """JSON text 1,001 levels deep: orjson reads it, but writes only 255 levels."""
    return completion('{"c":' * 1000 + "{}" + "}" * 1000)


def test_a_deeply_nested_json_answer_is_checked_and_exported_in_one_line(
    tmp_path: Path, hostile: Hostile
) -> None:
    ids = two_lines(tmp_path, "deep")
    server = hostile(deep_json)
    tree = tmp_path / "tree.json"  # a recursive schema: its validator recurses a level a call
    tree.write_text('{"type": "object", "properties": {"c": {"$ref": "#"}}}')
    checked = run(tmp_path, server.url, "--json-schema", str(tree), "--job", "checked")
    assert checked.returncode == 1, checked.stderr
    assert "Traceback" not in checked.stderr
    results, errors = outputs(tmp_path / "checked")
    assert results == [] and len(errors) == 1
    assert "nested too deeply to check" in errors[0]["error"]["message"]
    assert len(server.seen) == 1  # final: not asked again this run

    done = run(tmp_path, server.url, "--json-mode", "--job", "parsed")
    assert done.returncode == 0, done.stderr
    for fields in ("custom_id,parsed", "custom_id,parsed.c"):
        exported = batchq("export", "parsed", "--format", "csv", "--fields", fields, cwd=tmp_path)
        assert exported.returncode == 0, exported.stderr
        assert exported.stdout.splitlines()[1:] == [f"{ids[0]},(nested too deeply to write)"]


# --- A /metrics page that lies, hangs or is no page -----------------------------------------

_METRICS = {
    "hangs": None,
    "html": ("text/html", b"<html><body>Sign in to continue</body></html>"),
    "infinite": ("text/plain", b"vllm:num_requests_running inf\nvllm:num_requests_waiting inf\n"),
    "always-full": (
        "text/plain",
        b"vllm:num_requests_running 1e9\nvllm:num_requests_waiting 1e12\n",
    ),
    "huge": ("text/plain", b"# " + b"x" * (8 << 20) + b"\n"),
}


def test_gauges_at_the_end_of_a_long_page_are_read(tmp_path: Path, hostile: Hostile) -> None:
    # vLLM's page is ~100 KB of histograms: it arrives in many reads.
    bucket = b'vllm:e2e_request_latency_seconds_bucket{le="%d"} 1\n'
    page = b"".join(bucket % i for i in range(8000))
    page += b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"

    async def gauges(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(body=page, content_type="text/plain")

    server = hostile(echo, gauges)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(100)])
    base = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--json-summary"]
    done = batchq(*base, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "publishes vLLM's load gauges" in done.stderr  # found in the first reading


@pytest.mark.parametrize("page", sorted(_METRICS))
def test_a_hostile_metrics_page_costs_the_job_nothing(
    tmp_path: Path, hostile: Hostile, page: str
) -> None:
    async def gauges(request: web.Request, body: bytes) -> web.StreamResponse:
        served = _METRICS[page]
        if served is None:
            await asyncio.sleep(READING_TIMEOUT + 1)  # answers after the reading gave up
            served = _METRICS["always-full"]
        assert served is not None
        return web.Response(body=served[1], content_type=served[0])

    server = hostile(echo, gauges)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(60)])
    base = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", "--json-summary"]
    done = batchq(*base, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert (len(results), errors) == (60, [])
    assert "Traceback" not in done.stderr
    assert server.gauge_reads  # it was asked
