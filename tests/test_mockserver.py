"""The built-in endpoint, driven by a real aiohttp client over real sockets."""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from click.testing import CliRunner
from multidict import CIMultiDictProxy
from support import wait_for

from batchq.cli import cli
from batchq.mockserver import live as mockserver
from batchq.mockserver.live import (
    _STATE,
    MockOptions,
    MockServer,
    _Call,
    _Mock,
    _RateLimiter,
    format_duration,
    serve_forever,
)

MockFactory = Callable[..., Any]  # the `mock_server` fixture of conftest.py
Answer = tuple[int, Any, CIMultiDictProxy[str]]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def chat(content: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


async def post(session: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any) -> Answer:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    async with session.post(url, data=data, headers=headers, **kwargs) as response:
        return response.status, await response.json(), response.headers


# --- Replies -----------------------------------------------------------------------------


async def test_chat_completion_reply_and_usage(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    status, body, headers = await post(
        session, f"{mock.url}/chat/completions", chat("Hello, world")
    )
    assert status == 200
    assert re.fullmatch(r"req_[0-9a-f]+", headers["x-request-id"])
    assert body["object"] == "chat.completion"
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == "Echo: Hello, world"
    assert body["choices"][0]["finish_reason"] == "stop"
    # 12 prompt chars -> 3 tokens; 18 reply chars -> 5 tokens.
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


async def test_chat_prompt_joins_messages_and_text_parts(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    parts = [
        {"type": "text", "text": "a"},
        {"type": "image_url", "image_url": {"url": "http://x"}},
        {"type": "text", "text": "b"},
    ]
    request = {
        "model": "m",
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": parts}],
    }
    _, first, headers1 = await post(session, f"{mock.url}/chat/completions", request)
    _, second, headers2 = await post(session, f"{mock.url}/chat/completions", request)
    assert first["choices"][0]["message"]["content"] == "Echo: sys\na\nb"
    assert second["choices"] == first["choices"]  # deterministic
    assert headers1["x-request-id"] != headers2["x-request-id"]
    assert mock.stats()["prompts"] == {"sys\na\nb": 2}


async def test_completions_reply(mock_server: MockFactory, session: aiohttp.ClientSession) -> None:
    mock = mock_server()
    status, body, _ = await post(
        session, f"{mock.url}/completions", {"model": "m", "prompt": ["ab", "cd"]}
    )
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["model"] == "m"
    assert body["choices"][0]["text"] == "Echo: ab\ncd"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


async def test_embeddings_are_deterministic_per_input(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    url = f"{mock.url}/embeddings"
    status, body, _ = await post(session, url, {"model": "e", "input": ["alpha", "beta"]})
    _, again, _ = await post(session, url, {"model": "e", "input": "alpha"})
    assert status == 200
    assert body["object"] == "list"
    assert body["model"] == "e"
    assert [item["index"] for item in body["data"]] == [0, 1]
    vectors = [item["embedding"] for item in body["data"]]
    assert all(len(v) == 8 and all(-1.0 <= x <= 1.0 for x in v) for v in vectors)
    assert vectors[0] != vectors[1]
    assert again["data"][0]["embedding"] == vectors[0]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # "alpha\nbeta"


@pytest.mark.parametrize(
    "given", ["hi", [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]]
)
async def test_responses_reply(
    mock_server: MockFactory, session: aiohttp.ClientSession, given: Any
) -> None:
    mock = mock_server()
    status, body, _ = await post(session, f"{mock.url}/responses", {"model": "r", "input": given})
    assert status == 200
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["model"] == "r"
    part = body["output"][0]["content"][0]
    assert (part["type"], part["text"]) == ("output_text", "Echo: hi")
    assert body["usage"] == {"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/chat/completions", chat("Hello, world", max_tokens=2)),
        ("/chat/completions", chat("Hello, world", max_completion_tokens=2)),
        ("/completions", {"model": "m", "prompt": "Hello, world", "max_tokens": 2}),
        ("/responses", {"model": "m", "input": "Hello, world", "max_output_tokens": 2}),
    ],
)
async def test_max_tokens_cuts_the_reply_short(
    mock_server: MockFactory, session: aiohttp.ClientSession, path: str, request_body: Any
) -> None:
    mock = mock_server()
    _, body, _ = await post(session, mock.url + path, request_body)
    usage = body["usage"]
    assert usage.get("completion_tokens", usage.get("output_tokens")) == 2
    if path == "/responses":
        assert body["status"] == "incomplete"
        assert body["output"][0]["content"][0]["text"] == "Echo: He"
    else:
        assert body["choices"][0]["finish_reason"] == "length"
    assert mock.stats()["completion_tokens"] == 2


async def test_models(mock_server: MockFactory, session: aiohttp.ClientSession) -> None:
    mock = mock_server()
    async with session.get(f"{mock.url}/models") as response:
        body = await response.json()
        assert response.status == 200
        assert "x-request-id" in response.headers
    assert body["object"] == "list"
    assert "gpt-4o-mini" in [model["id"] for model in body["data"]]


# --- Bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "request_body", "param"),
    [
        ("/chat/completions", b"{not json", None),
        ("/chat/completions", b'["a list"]', None),
        ("/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/chat/completions", {"model": "m"}, "messages"),
        ("/chat/completions", {"model": "m", "messages": "not a list"}, "messages"),
        ("/completions", {"model": "m"}, "prompt"),
        ("/embeddings", {"model": "m"}, "input"),
        ("/responses", {"model": "m"}, "input"),
        ("/chat/completions", chat("x", max_tokens="10"), "max_tokens"),
        ("/chat/completions", chat("[[mock:fail=lots]]"), None),
        ("/chat/completions", chat("[[mock:explode=1]]"), None),
        ("/responses", {"model": "m", "input": "x", "max_tokens": 5}, "max_tokens"),
    ],
)
async def test_bad_request_is_400_with_openai_error(
    mock_server: MockFactory,
    session: aiohttp.ClientSession,
    path: str,
    request_body: Any,
    param: str | None,
) -> None:
    mock = mock_server()
    status, body, headers = await post(session, mock.url + path, request_body)
    assert status == 400
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert body["error"]["code"] is None
    assert "x-request-id" in headers


@pytest.mark.parametrize(("method", "path"), [("POST", "/nowhere"), ("GET", "/chat/completions")])
async def test_unknown_route_is_404_with_openai_error(
    mock_server: MockFactory, session: aiohttp.ClientSession, method: str, path: str
) -> None:
    mock = mock_server()
    async with session.request(method, mock.url + path) as response:
        body = await response.json()
        assert response.status == 404
    assert body["error"]["message"] == f"Invalid URL ({method} /v1{path})"


# --- Scripted faults ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("directive", "code"), [("[[mock:fail=2]]", 503), ("[[mock:fail=2:500]]", 500)]
)
async def test_fail_directive_fails_first_arrivals_then_succeeds(
    mock_server: MockFactory, session: aiohttp.ClientSession, directive: str, code: int
) -> None:
    mock = mock_server()
    url = f"{mock.url}/chat/completions"
    answers = [await post(session, url, chat(f"a {directive}")) for _ in range(3)]
    assert [status for status, _, _ in answers] == [code, code, 200]
    assert answers[0][1]["error"]["type"] == "server_error"
    # Another prompt with the same directive has its own count.
    assert (await post(session, url, chat(f"b {directive}")))[0] == code


async def test_drop_directive_closes_the_connection(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    url = f"{mock.url}/chat/completions"
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, url, chat("[[mock:drop=1]]"))
    assert (await post(session, url, chat("[[mock:drop=1]]")))[0] == 200
    stats = mock.stats()
    assert stats["dropped"] == 1
    assert stats["by_status"] == {"200": 1}


@pytest.mark.parametrize(
    ("code", "error_type", "error_code"),
    [
        (400, "invalid_request_error", None),
        (401, "invalid_request_error", "invalid_api_key"),
        (403, "request_forbidden", "unsupported_country_region_territory"),
        (429, "requests", "rate_limit_exceeded"),
        (502, "server_error", None),
    ],
)
async def test_status_directive_always_answers_that_status(
    mock_server: MockFactory,
    session: aiohttp.ClientSession,
    code: int,
    error_type: str,
    error_code: str | None,
) -> None:
    mock = mock_server()
    url = f"{mock.url}/chat/completions"
    answers = [await post(session, url, chat(f"[[mock:status={code}]]")) for _ in range(3)]
    assert [status for status, _, _ in answers] == [code] * 3
    error = answers[0][1]["error"]
    assert (error["type"], error["code"]) == (error_type, error_code)
    assert ("retry-after-ms" in answers[0][2]) == (code == 429)


async def test_sleep_directive_delays_the_answer(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    url = f"{mock.url}/chat/completions"
    with pytest.raises(TimeoutError):
        await post(
            session, url, chat("[[mock:sleep=30]]"), timeout=aiohttp.ClientTimeout(total=0.2)
        )
    started = time.monotonic()
    assert (await post(session, url, chat("[[mock:sleep=0.2]]")))[0] == 200
    assert time.monotonic() - started >= 0.2


async def test_directives_are_counted_without_record(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(record=False)
    url = f"{mock.url}/chat/completions"
    statuses = [(await post(session, url, chat("[[mock:fail=1]]")))[0] for _ in range(2)]
    assert statuses == [503, 200]
    assert "prompts" not in mock.stats()
    assert "arrivals" not in mock.stats()


# --- Faults set by options ---------------------------------------------------------------


async def test_api_key_is_required_and_never_echoed(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(api_key="sk-right")
    url = f"{mock.url}/chat/completions"
    expected = {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
        status, body, _ = await post(session, url, chat("x"), headers=headers)
        assert (status, body) == (401, expected)
        assert "sk-" not in orjson.dumps(body).decode()
    status, _, _ = await post(session, url, chat("x"), headers={"Authorization": "Bearer sk-right"})
    assert status == 200


async def test_insufficient_quota(mock_server: MockFactory, session: aiohttp.ClientSession) -> None:
    mock = mock_server(insufficient_quota=True)
    status, body, _ = await post(session, f"{mock.url}/chat/completions", chat("x"))
    assert status == 429
    assert body["error"]["type"] == body["error"]["code"] == "insufficient_quota"
    assert body["error"]["message"].startswith("You exceeded your current quota")


async def test_random_faults_follow_rates_and_seed(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    async def statuses(mock: Any) -> list[int]:
        return [
            (await post(session, f"{mock.url}/embeddings", {"model": "m", "input": "x"}))[0]
            for _ in range(30)
        ]

    first = await statuses(mock_server(rate_500=0.5, seed=7))
    assert set(first) == {200, 500}
    assert await statuses(mock_server(rate_500=0.5, seed=7)) == first
    assert set(await statuses(mock_server(rate_503=1.0))) == {503}


async def test_drop_rate_closes_connections(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(drop_rate=1.0)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post(session, f"{mock.url}/chat/completions", chat("x"))
    assert mock.stats()["dropped"] == 1


async def test_slow_body_dribbles_after_the_headers(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(slow_body=0.2)
    async with session.post(
        f"{mock.url}/completions", json={"model": "m", "prompt": "p"}
    ) as response:
        headers_at = time.monotonic()
        body = await response.json()
        # 4 chunks, each after a quarter of slow_body; the headers come with the first.
        assert time.monotonic() - headers_at >= 0.1
    assert body["choices"][0]["text"] == "Echo: p"


@pytest.mark.parametrize("option", ["latency", "slow_body"])
async def test_latency_and_slow_body_delay_the_answer(
    mock_server: MockFactory, session: aiohttp.ClientSession, option: str
) -> None:
    mock = mock_server(**{option: 0.2})
    started = time.monotonic()
    status, body, _ = await post(session, f"{mock.url}/chat/completions", chat("slow"))
    assert time.monotonic() - started >= 0.2
    assert (status, body["choices"][0]["message"]["content"]) == (200, "Echo: slow")


# --- Rate limits -------------------------------------------------------------------------


async def test_rpm_limit_answers_429_with_openai_headers(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(rpm=60)  # at most ceil(60 / 60 * 1.2) = 2 in any second
    url = f"{mock.url}/chat/completions"
    answers = [await post(session, url, chat("x")) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    assert answers[0][2]["x-ratelimit-limit-requests"] == "60"
    assert answers[0][2]["x-ratelimit-remaining-requests"] == "59"
    assert answers[0][2]["x-ratelimit-reset-requests"] == "0s"
    _, body, headers = answers[2]
    assert body["error"]["type"] == "requests"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "requests per min (RPM): Limit 60, Used 2, Requested 1." in body["error"]["message"]
    wait_ms = int(headers["retry-after-ms"])
    assert 0 < wait_ms <= 1000
    assert headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    assert headers["x-ratelimit-remaining-requests"] == "58"
    assert re.fullmatch(r"\d+ms|1s", headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-limit-tokens" not in headers  # no TPM was set
    assert mock.stats()["rate_limited"] == 1


async def test_tpm_counts_prompt_and_max_tokens(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(tpm=6000)
    url = f"{mock.url}/chat/completions"
    _, _, headers = await post(session, url, chat("x" * 40, max_tokens=10))  # 10 + 10
    assert headers["x-ratelimit-limit-tokens"] == "6000"
    assert headers["x-ratelimit-remaining-tokens"] == "5980"
    _, _, headers = await post(session, url, chat("x" * 40))  # 10 + 16 by default
    assert headers["x-ratelimit-remaining-tokens"] == "5954"
    status, body, headers = await post(session, url, chat("x", max_tokens=7000))
    assert status == 429
    assert body["error"]["type"] == "tokens"
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert "Request too large" in body["error"]["message"]
    assert "Limit 6000, Requested 7001" in body["error"]["message"]
    assert "retry-after" not in headers  # waiting would not help


async def test_rate_limit_headers_can_be_left_out(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(rpm=60, rate_limit_headers=False)  # vLLM-like: 429s, no budget
    url = f"{mock.url}/chat/completions"
    answers = [await post(session, url, chat("x")) for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    assert not [key for _, _, h in answers for key in h if key.startswith("x-ratelimit")]
    assert 0 < int(answers[2][2]["retry-after-ms"]) <= 1000  # the wait is still told


def _call(tokens: int) -> _Call:
    """A call charged `tokens` tokens: 1 for its prompt, the rest for max_tokens."""
    return _Call(body={}, model="m", prompt="abcd", max_tokens=tokens - 1, script=None)


def test_limiter_minute_window_slides() -> None:
    limiter = _RateLimiter(rpm=3, tpm=0)  # 1 per second, 3 per minute
    assert [limiter.admit(_call(20), now) for now in (0.0, 1.0, 2.0)] == [None] * 3
    rejected = limiter.admit(_call(20), 3.0)
    assert rejected is not None
    assert rejected[1] == pytest.approx(57.0)
    assert limiter.headers(3.0)["x-ratelimit-reset-requests"] == "57s"
    assert limiter.headers(3.0)["x-ratelimit-remaining-requests"] == "0"
    assert limiter.admit(_call(20), 60.0) is None  # the first one left the window


def test_limiter_smooths_tokens_per_second() -> None:
    limiter = _RateLimiter(rpm=0, tpm=600)  # at most 12 tokens in any second
    assert limiter.admit(_call(10), 0.0) is None
    rejected = limiter.admit(_call(10), 0.5)
    assert rejected is not None
    assert rejected[1] == pytest.approx(0.5)
    assert b'"type":"tokens"' in rejected[0]
    assert limiter.admit(_call(2), 0.5) is None  # 10 + 2 still fit in the second
    assert limiter.admit(_call(10), 1.0) is None
    # A request over the 1-second share still passes once the second is empty.
    assert limiter.admit(_call(50), 2.0) is None


# --- Latency shapes and slots ----------------------------------------------------------


def test_lognormal_latency_has_the_median_and_p99_asked_for() -> None:
    options = MockOptions(latency=0.1, latency_p50=0.8, latency_p99=10.0, seed=5)
    mock = _Mock(options)
    draws = sorted(mock._delay(0.0) - 0.1 for _ in range(20_000))
    # Sampling error at n = 20,000: ~1% on the median, ~3% on the 99th percentile.
    assert statistics.median(draws) == pytest.approx(0.8, rel=0.05)
    assert draws[int(0.99 * len(draws))] == pytest.approx(10.0, rel=0.15)
    first, second = _Mock(options), _Mock(options)
    assert [first._delay(0.0) for _ in range(5)] == [second._delay(0.0) for _ in range(5)]


async def test_lognormal_latency_delays_each_answer_by_its_draw(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    options = {"latency_p50": 0.005, "latency_p99": 0.05, "seed": 11}
    mock = mock_server(**options)
    for _ in range(21):  # one at a time, so the server's draws come in this order
        assert (await post(session, f"{mock.url}/chat/completions", chat("x")))[0] == 200
    # Each answer spent at least its own draw in the server, so the medians compare too.
    twin = _Mock(MockOptions(**options))
    drawn = statistics.median(twin._delay(0.0) for _ in range(21))
    assert mock.stats()["latency_p50"] >= drawn


async def until(condition: Callable[[], bool]) -> None:
    """Wait for the server's state in a thread, while this loop's requests go on."""
    await asyncio.to_thread(wait_for, condition)


async def test_slots_serve_at_most_k_and_queue_the_rest(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(slots=2, latency=60.0)  # nothing is answered while we look
    url = f"{mock.url}/chat/completions"
    requests = [asyncio.create_task(post(session, url, chat(f"{n}"))) for n in range(6)]
    await until(lambda: mock.stats()["in_flight"] == 6)
    stats = mock.stats()
    assert (stats["max_in_flight"], stats["max_serving"]) == (6, 2)
    mock.reset()  # the requests are still inside: a reset keeps counting them
    assert {k: mock.stats()[k] for k in ("in_flight", "max_in_flight", "max_serving")} == {
        "in_flight": 6,
        "max_in_flight": 6,
        "max_serving": 2,
    }
    for request in requests:
        request.cancel()
    await asyncio.gather(*requests, return_exceptions=True)
    await until(lambda: mock.stats()["in_flight"] == 0)  # a client gone leaves its slot


async def test_slots_queue_first_in_first_out(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(slots=1, latency=0.5)  # long enough for all four to be in, loaded
    url = f"{mock.url}/chat/completions"
    answered: list[str] = []

    async def ask(prompt: str) -> None:
        assert (await post(session, url, chat(prompt)))[0] == 200
        answered.append(prompt)

    async with asyncio.TaskGroup() as group:
        for arrived, prompt in enumerate("abcd", start=1):
            group.create_task(ask(prompt))
            await until(lambda n=arrived: mock.stats()["requests"] == n)  # then the next
    assert answered == list("abcd")
    stats = mock.stats()
    assert (stats["in_flight"], stats["max_in_flight"], stats["max_serving"]) == (0, 4, 1)
    assert 0 < stats["queue_wait_p50"] < stats["latency_p50"]


async def test_a_fuller_batch_serves_each_request_slower() -> None:
    options = MockOptions(slots=4, slot_load_factor=1.0, latency=0.05)
    async with MockServer(options) as server, aiohttp.ClientSession() as client:
        url = f"{server.url}/chat/completions"
        await asyncio.gather(*(post(client, url, chat(f"{n}")) for n in range(4)))
        busy = server.stats()["max_serving"]
        times = server._app[_STATE].stats.latency.values
    # The request that found `busy` slots taken was stretched by 1 + 1.0 * (busy - 1) / 4.
    assert max(times) >= 0.05 * (1 + (busy - 1) / 4)


async def test_without_slots_every_request_in_the_server_is_served(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(latency=0.01)
    url = f"{mock.url}/chat/completions"
    await asyncio.gather(*(post(session, url, chat(f"{n}")) for n in range(3)))
    stats = mock.stats()
    assert stats["max_serving"] == stats["max_in_flight"] >= 1
    assert stats["queue_wait_p50"] == 0.0
    assert stats["latency_p50"] >= 0.01
    assert stats["in_flight"] == 0


# --- Stats -------------------------------------------------------------------------------


async def test_stats_count_and_reset(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    url = mock.url
    before = time.time()
    await post(session, f"{url}/chat/completions", chat("Hello, world"))
    await post(session, f"{url}/chat/completions", chat("[[mock:fail=1]]"))
    await post(session, f"{url}/completions", {"model": "m"})
    async with session.get(f"{url}/models"):
        pass
    stats = mock.stats()
    assert stats["requests"] == 4
    assert stats["by_status"] == {"200": 2, "400": 1, "503": 1}
    assert stats["by_path"] == {"/v1/chat/completions": 2, "/v1/completions": 1, "/v1/models": 1}
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (3, 5)
    assert before <= stats["first_at"] <= stats["last_at"] <= time.time()
    assert stats["prompts"] == {"Hello, world": 1, "[[mock:fail=1]]": 1, "": 1}
    assert [prompt for _, prompt in stats["arrivals"]] == ["Hello, world", "[[mock:fail=1]]", ""]
    async with session.get(f"{url.removesuffix('/v1')}/_mock/stats") as response:
        assert await response.json() == stats

    async with session.post(f"{url.removesuffix('/v1')}/_mock/reset") as response:
        assert response.status == 200
    stats = mock.stats()
    assert (stats["requests"], stats["by_status"], stats["first_at"], stats["arrivals"]) == (
        0,
        {},
        None,
        [],
    )
    # Reset also re-arms the directive counts.
    assert (await post(session, f"{url}/chat/completions", chat("[[mock:fail=1]]")))[0] == 503


async def test_stats_count_the_tpm_charge_of_accepted_requests(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server(tpm=60)  # 2 tokens in any second, once something is in it
    url = f"{mock.url}/chat/completions"
    before = time.time()
    assert (await post(session, url, chat("x" * 9, max_tokens=1)))[0] == 200  # 3 + 1
    assert (await post(session, url, chat("[[mock:fail=1]]", max_tokens=0)))[0] == 503
    assert (await post(session, url, chat("y", max_tokens=100)))[0] == 429  # larger than the TPM
    assert (await post(session, url, chat("z")))[0] == 429  # 1 + 16: over the second
    stats = mock.stats()
    assert stats["accepted_tokens"] == 4  # neither the scripted 503 nor the 429s
    [[at, tokens]] = stats["accepted"]
    assert (tokens, stats["first_at"]) == (4, at)  # the arrival time, on the stats' clock
    assert before <= at <= time.time()

    unlimited = mock_server(record=False)
    await post(session, f"{unlimited.url}/chat/completions", chat("x" * 40))  # 10 + 16
    stats = unlimited.stats()
    assert stats["accepted_tokens"] == 26 and "accepted" not in stats  # counted without a TPM


# --- Options and the server itself -------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rate_500": 1.5}, "rate_500 must be between 0 and 1"),
        ({"drop_rate": -0.1}, "drop_rate must be between 0 and 1"),
        ({"rate_500": 0.6, "rate_503": 0.6}, "must not exceed 1"),
        ({"latency": -1.0}, "latency must be a non-negative number"),
        ({"slow_body": math.nan}, "slow_body must be a non-negative number"),
        ({"rpm": -5}, "rpm must be a non-negative number"),
        ({"slots": -1}, "slots must be a non-negative number"),
        ({"latency_p99": 2.0}, "latency_p99 needs 0 < latency_p50 <= latency_p99"),
        ({"latency_p50": 2.0, "latency_p99": 1.0}, "latency_p50=2.0, latency_p99=1.0"),
    ],
)
def test_options_are_validated(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MockOptions(**options)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),
        (1, "1s"),
        (360, "6m0s"),
        (90.5, "1m30.5s"),
        (0, "0s"),
        (0.0004, "1ms"),
        (3661, "1h1m1s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_mock_server_runs_as_context_manager() -> None:
    server = MockServer()
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018
    async with server, aiohttp.ClientSession() as client:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", server.url)
        async with client.get(f"{server.url}/models") as response:
            assert response.status == 200
        assert server.stats()["requests"] == 1
        server.reset()
        assert server.stats()["requests"] == 0
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018


async def test_serve_forever_reports_url_and_stops_when_cancelled() -> None:
    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_forever(MockOptions(), host="127.0.0.1", port=0, ready=url.set_result)
    )
    base = await asyncio.wait_for(url, timeout=5)
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{base}/models") as response:
            assert response.status == 200
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(aiohttp.ClientConnectionError):
            async with client.get(f"{base}/models"):
                pass


async def test_limits_can_change_while_serving(
    mock_server: MockFactory, session: aiohttp.ClientSession
) -> None:
    mock = mock_server()
    root = mock.url.removesuffix("/v1")
    async with session.post(f"{root}/_mock/limits", data=b'{"rpm": 60}') as resp:
        assert resp.status == 200 and await resp.json() == {"rpm": 60, "tpm": 0}
    async with session.post(f"{mock.url}/chat/completions", json=chat("one")) as resp:
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-requests"] == "60"
    statuses = [(await post(session, f"{mock.url}/chat/completions", chat(p)))[0] for p in "ab"]
    assert statuses == [200, 429]  # 60/min, smoothed: at most ceil(1.2) = 2 in a second
    async with session.post(f"{root}/_mock/limits", data=b'{"rpm": "many"}') as resp:
        assert resp.status == 400


def test_mock_server_flags_become_options(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[MockOptions] = []

    async def serve(options: MockOptions, *, host: str, port: int, ready: Any) -> None:
        served.append(options)

    monkeypatch.setattr(mockserver, "serve_forever", serve)
    flags = "--latency-p50 0.8 --latency-p99 10 --slots 16 --slot-load-factor 0.25"
    flags += " --no-rate-limit-headers --record"
    result = CliRunner().invoke(cli, ["mock-server", *flags.split()])
    assert result.exit_code == 0, result.output
    assert served == [
        MockOptions(
            latency_p50=0.8,
            latency_p99=10.0,
            slots=16,
            slot_load_factor=0.25,
            rate_limit_headers=False,
            record=True,
        )
    ]
    result = CliRunner().invoke(cli, ["mock-server", "--latency-p50", "2", "--latency-p99", "1"])
    assert result.exit_code == 2  # a usage error, not a traceback
    assert "latency_p99 needs 0 < latency_p50 <= latency_p99" in result.output
