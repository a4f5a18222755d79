"""The built-in endpoint's Files + Batches API, driven by a real aiohttp client over sockets.

Batches run on the server's virtual clock; a test waits for a state by polling the batch,
with a bound, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner
from conftest import MockFactory

from batchq.cli import cli
from batchq.mockserver import MockOptions
from batchq.mockserver import live as mockserver

# A day per real second, 100 lines per virtual second: a small batch ends in milliseconds.
FAST = {"batch_time_scale": 86_400.0, "batch_lines_per_second": 100.0, "batch_step_seconds": 60.0}
CHAT = "/v1/chat/completions"
DASHSCOPE = "/compatible-mode/v1"


def line(custom_id: str, prompt: str, model: str = "gpt-4o-mini", url: str = CHAT) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in lines)


class Api:
    """A provider's Files + Batches API at `base` (".../v1" or ".../compatible-mode/v1")."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            return resp.status, await resp.json()

    async def upload(self, data: bytes, purpose: str = "batch") -> tuple[int, Any]:
        form = aiohttp.FormData()
        form.add_field("purpose", purpose)
        form.add_field("file", data, filename="input.jsonl")
        return await self.call("POST", "/files", data=form)

    async def submit(self, lines: list[Any], window: str = "24h", endpoint: str = CHAT) -> Any:
        status, file = await self.upload(jsonl(lines))
        assert status == 200, file
        status, batch = await self.create(file["id"], window, endpoint)
        assert status == 200, batch
        return batch

    async def create(self, file_id: str, window: str = "24h", endpoint: str = CHAT) -> Any:
        wanted = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window}
        return await self.call("POST", "/batches", json=wanted)

    async def batch(self, batch_id: str) -> Any:
        status, batch = await self.call("GET", f"/batches/{batch_id}")
        assert status == 200, batch
        return batch

    async def wait(self, batch_id: str, *statuses: str, bound: float = 20.0) -> Any:
        """Poll the batch until its status is one of `statuses`, for at most `bound` s."""
        deadline = time.monotonic() + bound
        while (batch := await self.batch(batch_id))["status"] not in statuses:
            assert time.monotonic() < deadline, f"still {batch['status']}, not {statuses}"
            await asyncio.sleep(0.005)
        return batch

    async def lines(self, file_id: str | None) -> list[Any]:
        if file_id is None:
            return []
        async with self.session.get(f"{self.base}/files/{file_id}/content") as resp:
            assert resp.status == 200
            data = await resp.read()
            assert resp.headers["Content-Length"] == str(len(data))
        return [orjson.loads(raw) for raw in data.splitlines()]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def root(url: str) -> str:
    return url.removesuffix("/v1")


def without_ids(body: Any) -> Any:
    return {key: value for key, value in body.items() if key not in ("id", "created")}


# --- The lifecycle, in both dialects -----------------------------------------------------


async def test_openai_batch_runs_to_completed_with_the_live_routes_answers(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, seed=7)
    api = Api(session, mock.url)
    requests = [line(f"req-{i}", f"question {i}") for i in range(12)]
    status, file = await api.upload(jsonl(requests))
    assert status == 200
    assert file["id"].startswith("file-") and file["object"] == "file"
    assert file["bytes"] == len(jsonl(requests)) and file["purpose"] == "batch"
    assert (await api.call("GET", f"/files/{file['id']}")) == (200, file)
    status, created = await api.create(file["id"])
    assert status == 200 and created["status"] == "validating"
    assert created["id"].startswith("batch_")
    assert created["expires_at"] == created["created_at"] + 86_400
    assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}

    done = await api.wait(created["id"], "completed")
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert done["error_file_id"] is None  # OpenAI: no failures, no error file
    assert done["in_progress_at"] <= done["finalizing_at"] <= done["completed_at"]
    output = await api.lines(done["output_file_id"])
    ids = [item["custom_id"] for item in output]
    assert sorted(ids) == sorted(r["custom_id"] for r in requests)
    assert ids != [r["custom_id"] for r in requests]  # never in input order
    for item in output[:3]:  # each body is what the live route answers for the same body
        wanted = next(r["body"] for r in requests if r["custom_id"] == item["custom_id"])
        async with session.post(f"{mock.url}/chat/completions", json=wanted) as resp:
            live = await resp.json()
        assert item["response"]["status_code"] == 200 and item["error"] is None
        assert without_ids(item["response"]["body"]) == without_ids(live)
    stats = mock.stats()["batches"]
    assert stats["files_uploaded"] == 1 and stats["batches_created"] == 1
    assert stats["lines_billed"] == 12 and stats["lines_billed_twice"] == 3  # the 3 live ones
    status, gone = await api.call("DELETE", f"/files/{file['id']}")
    assert (status, gone["deleted"]) == (200, True)
    assert (await api.call("GET", f"/files/{file['id']}"))[0] == 404


async def test_dashscope_batch_has_its_ids_windows_and_null_expiry(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST)
    api = Api(session, root(mock.url) + DASHSCOPE)
    status, file = await api.upload(jsonl([line("a", "hello", "qwen-plus")]))
    assert status == 200 and file["id"].startswith("file-batch-")
    for refused in ("48", "23h", "337h", "15d"):
        status, body = await api.create(file["id"], refused)
        assert status == 400 and body["error"]["param"] == "completion_window"
    status, body = await api.create(file["id"], "14d", "/v1/completions")  # not batched there
    assert status == 400 and body["error"]["param"] == "endpoint"
    status, created = await api.create(file["id"], "14d")
    assert status == 200 and created["expires_at"] is None
    done = await api.wait(created["id"], "completed")
    assert done["output_file_id"].startswith("file-batch_output-")
    assert done["expires_at"] is None and done["error_file_id"] is None
    [item] = await api.lines(done["output_file_id"])
    assert item["response"]["body"]["choices"][0]["message"]["content"] == "Echo: hello"
    # The accounts are apart: OpenAI's routes know nothing of DashScope's batch.
    assert (await Api(session, mock.url).call("GET", f"/batches/{created['id']}"))[0] == 404
    # DashScope's live routes answer under the same prefix.
    body = line("b", "live", "qwen-plus")["body"]
    async with session.post(f"{api.base}/chat/completions", json=body) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("dialect", ["openai", "dashscope"])
async def test_a_24h_window_passes_in_a_second_and_expires_with_partial_output(
    mock_server: MockFactory, session: aiohttp.ClientSession, dialect: str
) -> None:
    # A day per second; 4.5 lines fit in the day, so 4 of the 10 finish before it ends.
    mock = mock_server(
        batch_time_scale=86_400.0, batch_lines_per_second=4.5 / 86_400, batch_step_seconds=0.0
    )
    api = Api(session, mock.url if dialect == "openai" else root(mock.url) + DASHSCOPE)
    requests = [line(f"r{i}", f"p{i}") for i in range(10)]
    started = time.monotonic()
    batch = await api.submit(requests)
    midway = await api.wait(batch["id"], "in_progress")
    assert midway["request_counts"]["total"] == 10
    expired = await api.wait(batch["id"], "expired")
    assert time.monotonic() - started >= 0.9  # the virtual day took a real second
    assert expired["expired_at"] - expired["created_at"] == 86_400
    counts = expired["request_counts"]
    output = await api.lines(expired["output_file_id"])
    errors = await api.lines(expired["error_file_id"])
    assert counts["completed"] == len(output) == 4
    if dialect == "openai":  # the rest are listed as batch_expired
        assert counts["failed"] == len(errors) == 6
        assert {item["error"]["code"] for item in errors} == {"batch_expired"}
        assert all(item["response"] is None for item in errors)
    else:  # DashScope: the rest were never run and are in no file
        assert counts["failed"] == len(errors) == 0 and expired["error_file_id"] is None
    seen = {item["custom_id"] for item in output + errors}
    assert len(seen) == len(output) + len(errors)
    assert mock.stats()["batches"]["lines_billed"] == 4


@pytest.mark.parametrize("dialect", ["openai", "dashscope"])
async def test_cancel_keeps_the_finished_lines_and_their_rest_can_go_again(
    mock_server: MockFactory, session: aiohttp.ClientSession, dialect: str
) -> None:
    # 50 lines at 10 ms (real) each: a cancel lands well inside the work; cancelling: 50 ms.
    mock = mock_server(batch_time_scale=100.0, batch_lines_per_second=1.0, batch_step_seconds=5.0)
    api = Api(session, mock.url if dialect == "openai" else root(mock.url) + DASHSCOPE)
    requests = [line(f"r{i}", f"p{i}") for i in range(50)]
    batch = await api.submit(requests)
    deadline = time.monotonic() + 20
    while (await api.batch(batch["id"]))["request_counts"]["completed"] < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    status, cancelling = await api.call("POST", f"/batches/{batch['id']}/cancel")
    assert status == 200 and cancelling["status"] == "cancelling"
    deadline = time.monotonic() + 20
    while (cancelled := await api.batch(batch["id"]))["status"] == "cancelling":
        assert cancelled["request_counts"] == cancelling["request_counts"]  # work stopped
        assert time.monotonic() < deadline
        await asyncio.sleep(0.005)
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"] >= cancelled["cancelling_at"]
    output = await api.lines(cancelled["output_file_id"])
    errors = await api.lines(cancelled["error_file_id"])
    assert 2 <= len(output) == cancelled["request_counts"]["completed"] < 50
    if dialect == "dashscope":  # its unfinished lines count as failed, in the error file
        assert len(errors) == cancelled["request_counts"]["failed"] == 50 - len(output)
    else:
        assert errors == [] and cancelled["request_counts"]["failed"] == 0
    status, body = await api.call("POST", f"/batches/{batch['id']}/cancel")
    assert status == 409 and "cancelled" in body["error"]["message"]

    # The unfinished lines may go again: that is neither a duplicate nor billed twice.
    finished = {item["custom_id"] for item in output}
    rest = [request for request in requests if request["custom_id"] not in finished]
    again = await api.submit(rest)
    await api.wait(again["id"], "completed", bound=30)
    stats = mock.stats()["batches"]
    assert stats["lines_billed"] == 50
    assert stats["duplicate_batches"] == stats["lines_billed_twice"] == 0


# --- Validation --------------------------------------------------------------------------


async def test_validation_fails_the_batch_with_each_bad_line_numbered(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST)
    api = Api(session, mock.url)
    data = b"".join(
        [
            orjson.dumps(line("a", "fine")) + b"\n",
            b"{not json\n",
            orjson.dumps(line("a", "again")) + b"\n",
            b"\n",  # blank lines are skipped, but counted
            orjson.dumps(line("c", "other model", model="gpt-4o")) + b"\n",
            orjson.dumps(line("d", "other url", url="/v1/embeddings")) + b"\n",
            orjson.dumps(line("e", "not batched", url="/v1/moderations")) + b"\n",
        ]
    )
    status, file = await api.upload(data)
    assert status == 200
    status, created = await api.create(file["id"])
    assert status == 200 and created["status"] == "validating"
    failed = await api.wait(created["id"], "failed")
    assert failed["failed_at"] >= failed["created_at"] and failed["output_file_id"] is None
    assert [(e["line"], e["code"]) for e in failed["errors"]["data"]] == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (5, "mismatched_model"),
        (6, "mismatched_endpoint"),
        (7, "url_not_found"),
    ]
    assert mock.stats()["batches"]["lines_billed"] == 0


async def test_too_many_lines_and_the_enqueued_token_limit_fail_at_validation(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, batch_max_lines=3, batch_enqueued_tokens=100)
    api = Api(session, mock.url)
    many = await api.submit([line(f"r{i}", "p") for i in range(4)])
    failed = await api.wait(many["id"], "failed")
    assert [(e["line"], e["code"]) for e in failed["errors"]["data"]] == [(4, "too_many_requests")]
    big = await api.submit([line("big", "x" * 400)])  # 100 prompt tokens + 16: over 100
    failed = await api.wait(big["id"], "failed")
    [error] = failed["errors"]["data"]
    assert error["code"] == "token_limit_exceeded" and error["line"] is None
    assert "Limit: 100 enqueued tokens" in error["message"]
    small = await api.submit([line("small", "x")])
    assert (await api.wait(small["id"], "completed"))["request_counts"]["completed"] == 1


async def test_uploads_and_creates_are_refused_with_a_reason(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, batch_max_file_bytes=200)
    api = Api(session, mock.url)
    status, body = await api.upload(jsonl([line(f"r{i}", "p") for i in range(5)]))
    assert status == 400 and body["error"]["code"] == "file_too_large"
    status, body = await api.upload(jsonl([line("a", "p")]), purpose="fine-tune")
    assert status == 400 and body["error"]["param"] == "purpose"
    status, body = await api.create("file-nope")
    assert status == 404 and body["error"]["param"] == "input_file_id"
    status, file = await api.upload(jsonl([line("a", "p")]))
    assert (await api.create(file["id"], "48h"))[0] == 400  # OpenAI: 24h only
    assert (await api.call("GET", "/batches/batch_nope"))[0] == 404
    assert mock.stats()["batches"]["files_uploaded"] == 1


# --- Listing -----------------------------------------------------------------------------


async def test_list_pages_newest_first_with_after_and_limit(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST)
    api = Api(session, mock.url)
    ids = [(await api.submit([line(f"r{i}", f"p{i}")]))["id"] for i in range(5)]
    newest_first = ids[::-1]
    status, page = await api.call("GET", "/batches?limit=2")
    assert status == 200 and page["object"] == "list"
    assert [b["id"] for b in page["data"]] == newest_first[:2]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (*newest_first[:2], True)
    seen = [b["id"] for b in page["data"]]
    while page["has_more"]:
        status, page = await api.call("GET", f"/batches?limit=2&after={page['last_id']}")
        seen += [b["id"] for b in page["data"]]
    assert seen == newest_first
    assert (await api.call("GET", "/batches?limit=0"))[0] == 400
    empty = await Api(session, root(mock.url) + DASHSCOPE).call("GET", "/batches")
    assert empty == (200, {"object": "list", "data": None, "first_id": None, "last_id": None,
                           "has_more": False})  # fmt: skip
    openai_empty = await api.call("GET", f"/batches?after={newest_first[-1]}")
    assert openai_empty[1]["data"] == [] and openai_empty[1]["has_more"] is False


# --- Faults ------------------------------------------------------------------------------


async def test_lost_answers_leave_the_work_done(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, batch_lost_upload_rate=1.0)
    api = Api(session, mock.url)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.upload(jsonl([line("a", "p")]))
    assert mock.stats()["batches"]["files_uploaded"] == 1  # stored, though unanswered

    mock = mock_server(**FAST, batch_lost_create_rate=1.0)
    api = Api(session, mock.url)
    _, file = await api.upload(jsonl([line("a", "p")]))
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.create(file["id"])
    _, page = await api.call("GET", "/batches")
    [batch] = page["data"]  # created, though unanswered: listing finds it
    assert batch["input_file_id"] == file["id"]
    await api.wait(batch["id"], "completed")

    mock = mock_server(batch_time_scale=1.0, batch_lost_cancel_rate=1.0)
    api = Api(session, mock.url)
    batch = await api.submit([line("a", "p")])
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await api.call("POST", f"/batches/{batch['id']}/cancel")
    assert (await api.batch(batch["id"]))["status"] == "cancelling"


async def test_late_failure_and_the_expiry_fault(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, batch_late_failure_rate=1.0)
    api = Api(session, mock.url)
    batch = await api.submit([line("a", "p")])
    assert batch["status"] == "validating"
    failed = await api.wait(batch["id"], "failed")
    [error] = failed["errors"]["data"]
    assert error["code"] == "validation_failed" and error["line"] is None

    mock = mock_server(**FAST, batch_expire_rate=1.0)
    api = Api(session, mock.url)
    batch = await api.submit([line(f"r{i}", f"p{i}") for i in range(10)])
    expired = await api.wait(batch["id"], "expired")
    assert expired["request_counts"] == {"total": 10, "completed": 5, "failed": 5}
    assert len(await api.lines(expired["output_file_id"])) == 5


async def test_truncated_download_sends_less_than_its_content_length(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, batch_truncated_download_rate=1.0)
    api = Api(session, mock.url)
    _, file = await api.upload(jsonl([line(f"r{i}", f"p{i}") for i in range(20)]))
    async with session.get(f"{mock.url}/files/{file['id']}/content") as resp:
        assert resp.headers["Content-Length"] == str(file["bytes"])
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_rate_limits_and_server_errors_on_every_files_and_batches_route(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    api = Api(session, mock_server(**FAST, batch_rate_429=1.0).url)
    for method, path in (("GET", "/batches"), ("GET", "/files/x"), ("POST", "/batches")):
        async with session.request(method, api.base + path, json={}) as resp:
            assert resp.status == 429 and float(resp.headers["retry-after"]) > 0
    status, _ = await api.upload(jsonl([line("a", "p")]))
    assert status == 429
    api = Api(session, mock_server(**FAST, batch_rate_5xx=1.0).url)
    assert (await api.call("GET", "/batches"))[0] == 500
    assert (await api.upload(jsonl([line("a", "p")])))[0] == 500


async def test_live_faults_become_error_lines_and_an_all_failed_batch_has_no_output(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST, rate_500=1.0)
    api = Api(session, mock.url)
    batch = await api.submit([line(f"r{i}", f"p{i}") for i in range(4)])
    done = await api.wait(batch["id"], "completed")
    assert done["output_file_id"] is None  # every line failed
    assert done["request_counts"] == {"total": 4, "completed": 0, "failed": 4}
    errors = await api.lines(done["error_file_id"])
    assert {item["response"]["status_code"] for item in errors} == {500}
    assert all("error" in item["response"]["body"] for item in errors)
    assert mock.stats()["batches"]["lines_billed"] == 0


# --- Accounting --------------------------------------------------------------------------


async def test_stats_count_lines_billed_twice_across_batches_and_live_routes(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(**FAST)
    api = Api(session, mock.url)
    first = [line("a", "alpha"), line("b", "beta")]
    async with session.post(f"{mock.url}/chat/completions", json=first[1]["body"]) as resp:
        assert resp.status == 200  # b answered live before its batch ran
    batch = await api.submit(first)
    await api.wait(batch["id"], "completed")
    stats = mock.stats()["batches"]
    assert (stats["lines_billed"], stats["lines_billed_twice"]) == (2, 1)
    assert stats["duplicate_batches"] == 0

    again = await api.submit([line("a", "alpha"), line("c", "gamma")])  # a: billed already
    await api.wait(again["id"], "completed")
    stats = mock.stats()["batches"]
    assert (stats["lines_billed"], stats["lines_billed_twice"]) == (4, 2)
    assert stats["duplicate_batches"] == 1

    async with session.post(f"{mock.url}/chat/completions", json=first[0]["body"]) as resp:
        assert resp.status == 200  # a, billed by a batch, now live too
    assert mock.stats()["batches"]["lines_billed_twice"] == 3
    other = line("a", "a different body")  # the same custom_id with another body is new
    await api.wait((await api.submit([other]))["id"], "completed")
    assert mock.stats()["batches"]["lines_billed_twice"] == 3
    mock.reset()
    assert mock.stats()["batches"]["lines_billed"] == 0


def test_mock_server_batch_flags_become_options(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[MockOptions] = []

    async def serve(options: MockOptions, *, host: str, port: int, ready: Any) -> None:
        served.append(options)

    monkeypatch.setattr(mockserver, "serve_forever", serve)
    flags = "--batch-time-scale 3600 --batch-lines-per-second 5 --batch-step-seconds 1"
    flags += " --batch-max-lines 10 --batch-max-file-bytes 1000 --batch-enqueued-tokens 99"
    flags += " --batch-lost-upload-rate 0.1 --batch-lost-create-rate 0.2"
    flags += " --batch-lost-cancel-rate 0.3 --batch-late-failure-rate 0.4"
    flags += " --batch-expire-rate 0.5 --batch-truncated-download-rate 0.6"
    flags += " --batch-rate-429 0.7 --batch-rate-5xx 0.8"
    result = CliRunner().invoke(cli, ["mock-server", *flags.split()])
    assert result.exit_code == 0, result.output
    assert served == [
        MockOptions(
            batch_time_scale=3600.0,
            batch_lines_per_second=5.0,
            batch_step_seconds=1.0,
            batch_max_lines=10,
            batch_max_file_bytes=1000,
            batch_enqueued_tokens=99,
            batch_lost_upload_rate=0.1,
            batch_lost_create_rate=0.2,
            batch_lost_cancel_rate=0.3,
            batch_late_failure_rate=0.4,
            batch_expire_rate=0.5,
            batch_truncated_download_rate=0.6,
            batch_rate_429=0.7,
            batch_rate_5xx=0.8,
        )
    ]
    result = CliRunner().invoke(cli, ["mock-server", "--batch-time-scale", "0"])
    assert result.exit_code == 2  # a usage error, not a traceback
