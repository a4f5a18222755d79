"""One job, many endpoints (issue 23): routing, pacing, failover and resume across a pool.

The breaker and the router are pure and tested on a fake clock. Everything
else runs ``batchq run`` as a user does, against several built-in endpoints
(and scripted ones) on free ports, and checks what a user sees: the output
files, the exit status, the summary and ``status``, and what each server got.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import MockFactory, RedisServer
from hostile import HostileServer
from support import (
    assert_exactly_once,
    batchq,
    chat,
    clean_env,
    outputs,
    read_jsonl,
    start,
    wait_for,
    write_jsonl,
)

import batchq as bq
from batchq.config import DeploymentSpec, build_settings, parse_deployments
from batchq.errors import ConfigError, EndpointUnreachable, FatalEndpointError
from batchq.job.settings import read_job_toml, write_job_toml
from batchq.live.concurrency import Pool
from batchq.live.deployments import Breaker, Copies, Deployment, Router
from batchq.live.limiter import Pacer
from batchq.live.transport import Response

# -- the breaker and the router, on a fake clock ------------------------------------------


def test_breaker_takes_out_after_failures_in_a_row_and_ignores_late_ones() -> None:
    b = Breaker(threshold=3, first_break=1.0, longest_break=8.0)
    assert not b.failed(0.0, "HTTP 500", probe=False)
    b.succeeded()  # an answer in between: the count starts again
    assert not b.failed(0.1, "HTTP 500", probe=False)
    assert not b.failed(0.2, "HTTP 500", probe=False)
    assert b.failed(0.3, "HTTP 503", probe=False)
    assert (b.state, b.why, b.until) == ("out", "HTTP 503", 1.3)
    # Requests sent before it went out fail too: they neither extend nor count.
    assert not b.failed(0.5, "HTTP 500", probe=False)
    assert b.until == 1.3 and not b.due(1.29) and b.due(1.3)


def test_breaker_probe_doubles_the_break_until_one_answers() -> None:
    b = Breaker(first_break=1.0, longest_break=3.0)
    assert b.failed(0.0, "unreachable", probe=False, at_once=True)
    breaks = []
    for now in (1.0, 3.0, 6.0, 9.0):
        assert b.due(now)
        b.state = "probing"  # as the router marks the one request it sends
        assert b.failed(now, "unreachable", probe=True)
        breaks.append(b.pause)
    assert breaks == [2.0, 3.0, 3.0, 3.0]
    b.state = "probing"
    b.succeeded()
    assert (b.state, b.pause, b.outs) == ("in", 0.0, 5)


def _deployment(name: str, slots: int, weight: float = 1.0) -> Deployment:
    return Deployment(name, Pacer(clock=lambda: 0.0), Pool(slots, slots), weight=weight)


def test_router_sends_to_most_room_and_weights_break_ties() -> None:
    small, big = _deployment("small", 4), _deployment("big", 16)
    router = Router([small, big])
    assert router.pick(0.0) == (big, False)
    big.pool.gate.used = 14  # 2 free against 4
    assert router.pick(0.0) == (small, False)
    small.pool.gate.used, big.pool.gate.used = 4, 16
    assert router.pick(0.0) is None  # all full: wait for room, in no one queue
    small.pacer.pause(5.0)
    small.pool.gate.used = 0
    assert router.pick(0.0) is None  # room, but paused by a 429
    tied = Router([_deployment("a", 4, weight=1.0), _deployment("b", 4, weight=3.0)])
    assert tied.pick(0.0)[0].name == "b"
    narrow = Deployment("narrow", Pacer(tpm=1000, clock=lambda: 0.0), Pool(64, 64))
    assert Router([narrow, small]).pick(0.0, tokens=5000) is None  # too big for it; small full


def test_router_probes_once_and_stops_when_every_deployment_is_out_for_good() -> None:
    a, b = _deployment("a", 4), _deployment("b", 4)
    router = Router([a, b])
    router.observe(a, False, EndpointUnreachable("cannot connect to 127.0.0.1:9"), 0.0)
    assert a.breaker.state == "out" and router.pick(0.5) == (b, False)
    assert router.pick(1.0) == (a, True)  # its break is over: one probe
    assert router.pick(1.0) == (b, False)  # and only one
    router.observe(a, True, Response(200, {}, b"{}", None), 1.1)
    assert a.breaker.state == "in"
    refused = Response(401, {}, b'{"error": {"message": "bad key"}}', None)
    router.observe(a, False, refused, 2.0)
    router.observe(b, False, refused, 2.0)
    with pytest.raises(FatalEndpointError, match=r"a: the endpoint refused the API key.*b: "):
        router.pick(100.0)


def test_router_keeps_trying_the_soonest_back_when_all_are_out_for_a_while() -> None:
    a, b = _deployment("a", 4), _deployment("b", 4)
    router = Router([a, b])
    for _ in range(5):
        router.observe(a, False, Response(500, {}, b"{}", None), 0.0)
        router.observe(b, False, Response(500, {}, b"{}", None), 0.5)
    assert router.all_out()
    assert router.pick(0.6) == (a, False)  # as with one endpoint: retried with backoff


def test_router_never_sends_a_line_where_its_endpoint_is_not_served_even_with_its_own_out() -> None:
    chat_path, embed_path = "/v1/chat/completions", "/v1/embeddings"
    both, chat_only = _deployment("both", 4), _deployment("chat", 4)
    both.endpoints, chat_only.endpoints = (chat_path, embed_path), (chat_path,)
    router = Router([both, chat_only])
    refused = Response(401, {}, b'{"error": {"message": "bad key"}}', None)
    router.observe(both, False, refused, 0.0)  # out for good, until its probe
    assert router.pick(0.5, 0, chat_path) == (chat_only, False)
    assert router.pick(0.5, 0, embed_path) is None  # wait for its probe, never "chat"
    assert router.pick(1.0, 0, embed_path) == (both, True)


def test_a_hedge_copy_goes_only_where_the_request_fits_the_tpm() -> None:
    first, narrow = _deployment("first", 4), _deployment("narrow", 64)
    narrow.pacer = Pacer(tpm=1000, clock=lambda: 0.0)
    router = Router([first, narrow])
    url = "/v1/chat/completions"
    assert router.elsewhere(first, 0.0, url, tokens=500) is narrow
    assert router.elsewhere(first, 0.0, url, tokens=5000) is None  # above its whole tpm


async def test_a_further_copy_goes_where_no_copy_went_before_if_it_can() -> None:
    first, roomy, other = _deployment("first", 4), _deployment("roomy", 64), _deployment("o", 4)
    request = bq.records.Request(1, "r", "/v1/chat/completions", b"{}", 5)
    copies = Copies(Router([first, roomy, other]), first, request)
    async with copies.place():
        pass
    assert copies.next is roomy  # the most room
    copies.went.append(roomy)  # its copy straggles there
    async with copies.place():
        pass
    assert copies.next is other
    copies.went.append(other)
    async with copies.place():
        pass
    assert copies.next is roomy
    other.pool.gate.used = 4
    copies.went[:] = [roomy]
    async with copies.place():
        pass
    assert copies.next is roomy  # the one no copy went to is full


def test_a_line_out_of_its_deployment_goes_at_once_only_to_another_that_serves_it() -> None:
    chat_path, embed_path = "/v1/chat/completions", "/v1/embeddings"
    both, chat_only = _deployment("both", 4), _deployment("chat", 4)
    both.endpoints, chat_only.endpoints = (chat_path, embed_path), (chat_path,)
    router = Router([both, chat_only])
    router.observe(both, False, EndpointUnreachable("cannot connect to 127.0.0.1:9"), 0.0)
    assert router.others(both, chat_path) == [chat_only]  # its retry goes there at once
    assert router.others(both, embed_path) == []  # none: it backs off, as with one endpoint


def test_a_deployment_serves_the_jobs_model_under_its_own_name() -> None:
    pool, pacer = Pool(1, 1), Pacer(clock=lambda: 0.0)
    d = Deployment("local", pacer, pool, model="qwen2.5-7b", job_model="gpt")
    request = bq.records.Request(1, "r", "/v1/chat/completions", b'{"model":"gpt","x":1}', 5)
    assert orjson.loads(d.request(request).body) == {"model": "qwen2.5-7b", "x": 1}
    other = replace(request, body=b'{"model":"gpt-mini","x":1}')  # a line naming its own
    assert d.request(other) is other  # sent as named (as validate checks it), not renamed
    unnamed = Deployment("local", pacer, pool, model="qwen2.5-7b")  # the lines name theirs
    assert orjson.loads(unnamed.request(other).body)["model"] == "qwen2.5-7b"


# -- settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ([{"name": "a"}], 'deployment 1 ("a"): needs base_url'),
        ([{"name": "a", "base_url": "ftp://x"}], 'deployment 1 ("a"): base_url'),
        ([{"name": "a", "base_url": "http://x/v1", "colour": 1}], "unknown field(s) colour"),
        ([{"name": "a b", "base_url": "http://x/v1"}], "name must be 1-64 letters"),
        (
            [{"name": "a", "base_url": "http://x/v1", "api_key_env": "sk-abcdefgh12345678"}],
            "api_key_env must be the *name*",
        ),
        ([{"name": "a", "base_url": "http://x/v1", "weight": 0}], "weight must be > 0"),
        ([{"name": "a", "base_url": "http://x/v1", "max_concurrency": 0}], "max_concurrency"),
        (
            [{"name": "a", "base_url": "http://x/v1"}, {"name": "a", "base_url": "http://y/v1"}],
            "a appears twice",
        ),
        ("http://x/v1", "a list of [[deployments]] tables"),
        ([], "deployments is empty"),  # not: quietly to base_url, with its key
        (
            [{"name": "a", "base_url": "http://x/v1", "endpoints": "/v1/chat/completions"}],
            "endpoints must be a list",
        ),
    ],
)
def test_bad_deployments_are_one_line_errors(tables: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_deployments(tables)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert "sk-abcdefgh" not in str(caught.value)


def test_a_deployment_that_cannot_serve_the_jobs_endpoint_is_refused() -> None:
    tables = [{"name": "embed", "base_url": "http://x/v1", "endpoints": ["/v1/embeddings"]}]
    with pytest.raises(ConfigError, match="deployment 'embed' does not serve"):
        build_settings({"input": "in.jsonl", "deployments": tables}, {})


def test_job_toml_keeps_deployments_and_never_a_key(tmp_path: Path) -> None:
    tables = [
        {"name": "gpu-a", "base_url": "http://10.0.0.1:8000/v1", "max_concurrency": 16},
        {"name": "cloud", "base_url": "https://x/v1", "api_key_env": "CLOUD_KEY", "rpm": 600},
    ]
    settings = build_settings({"input": "in.jsonl", "deployments": tables}, {})
    write_job_toml(tmp_path / "job.toml", settings)
    text = (tmp_path / "job.toml").read_text()
    assert text.count("[[deployments]]") == 2 and "CLOUD_KEY" in text
    again = build_settings(read_job_toml(tmp_path / "job.toml"), {})
    assert again.deployments == settings.deployments
    assert again.deployments[1] == DeploymentSpec(
        name="cloud", base_url="https://x/v1", api_key_env="CLOUD_KEY", rpm=600.0
    )


# -- end to end, against several endpoints ------------------------------------------------


def _pool(folder: Path, *tables: dict[str, Any]) -> Path:
    lines = []
    for table in tables:
        lines.append("[[deployments]]")
        lines.extend(f"{k} = {orjson.dumps(v).decode()}" for k, v in table.items())
    path = folder / "pool.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _input(folder: Path, n: int, prompt: str = "q") -> tuple[Path, list[str]]:
    ids = [f"r{i}" for i in range(n)]
    return write_jsonl(
        folder / "in.jsonl", [chat(f"{prompt} {i}", cid) for i, cid in enumerate(ids)]
    ), ids


def _run(tmp_path: Path, pool: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    done = batchq(
        "run",
        "in.jsonl",
        "--job",
        "job",
        "--deployments",
        pool,
        "--model",
        "m",
        "--json-summary",
        "-q",
        *args,
        cwd=tmp_path,
        env=env,
    )
    return done


def _summary(done: Any) -> dict[str, Any]:
    return orjson.loads(done.stdout.splitlines()[-1])


def _served(job: Path) -> dict[str, int]:
    results, _ = outputs(job)
    counts: dict[str, int] = {}
    for line in results:
        name = line["batchq"]["deployment"]
        counts[name] = counts.get(name, 0) + 1
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_lines_go_where_there_is_capacity(tmp_path: Path, mock_server: MockFactory) -> None:
    small = mock_server(latency=0.05, slots=4)
    big = mock_server(latency=0.05, slots=32)
    _, ids = _input(tmp_path, 600)
    pool = _pool(
        tmp_path,
        {"name": "small", "base_url": small.url, "max_concurrency": 4},
        {"name": "big", "base_url": big.url, "max_concurrency": 32},
    )
    done = _run(tmp_path, pool)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    served = _served(tmp_path / "job")
    assert served["big"] > 3 * served["small"] > 0
    rows = _summary(done)["this_run"]["deployments"]
    assert rows["big"]["succeeded"] == served["big"] == big.stats()["requests"]
    assert rows["small"]["requests"] == small.stats()["requests"]
    assert "deployment big:" in done.stderr and "deployment small:" in done.stderr
    status = orjson.loads(batchq("status", "job", "--json", cwd=tmp_path).stdout)
    assert status["deployments"]["big"]["succeeded"] == served["big"]
    assert "deployment small:" in batchq("status", "job", cwd=tmp_path).stdout


def test_a_refused_deployment_is_taken_out_and_its_lines_go_elsewhere(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    good = mock_server(latency=0.01)
    dead = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    _, ids = _input(tmp_path, 200)
    pool = _pool(
        tmp_path, {"name": "dead", "base_url": dead}, {"name": "good", "base_url": good.url}
    )
    done = _run(tmp_path, pool, "--max-attempts", "3")
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    assert _served(tmp_path / "job") == {"good": 200}
    row = _summary(done)["this_run"]["deployments"]["dead"]
    assert row["taken_out"] >= 1 and "cannot connect" in row["why"]
    assert "deployment dead is out of the pool" in done.stderr


def test_a_5xx_storm_takes_a_deployment_out(tmp_path: Path, mock_server: MockFactory) -> None:
    storm = mock_server(rate_500=1.0)
    good = mock_server(latency=0.01)
    _, ids = _input(tmp_path, 300)
    pool = _pool(
        tmp_path,
        {"name": "storm", "base_url": storm.url, "weight": 10},  # first choice, at first
        {"name": "good", "base_url": good.url},
    )
    done = _run(tmp_path, pool)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    assert _served(tmp_path / "job") == {"good": 300}
    row = _summary(done)["this_run"]["deployments"]["storm"]
    assert row["why"] == "HTTP 500" and row["taken_out"] >= 1
    # Taken out after a few failures, probed now and then: not sent every line.
    assert storm.stats()["requests"] < 150


def test_a_refused_key_takes_one_deployment_out_and_is_never_written(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    strict = mock_server(api_key="right-key-0123456789")
    other = mock_server(api_key="other-key-0123456789")
    _, ids = _input(tmp_path, 100)
    pool = _pool(
        tmp_path,
        {"name": "strict", "base_url": strict.url, "api_key_env": "STRICT_KEY"},
        {"name": "other", "base_url": other.url, "api_key_env": "OTHER_KEY"},
    )
    env = clean_env(STRICT_KEY="wrong-key-0123456789", OTHER_KEY="other-key-0123456789")
    done = _run(tmp_path, pool, env=env)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    assert _served(tmp_path / "job") == {"other": 100}
    assert "401" in _summary(done)["this_run"]["deployments"]["strict"]["why"]
    for path in (tmp_path / "job").rglob("*"):
        if path.is_file():
            assert b"-key-0123456789" not in path.read_bytes(), path
    assert "-key-0123456789" not in done.stderr + done.stdout


def test_every_deployment_refusing_stops_the_job_naming_each(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    a = mock_server(api_key="a-key-0123456789")
    b = mock_server(insufficient_quota=True)
    _input(tmp_path, 50)
    pool = _pool(tmp_path, {"name": "a", "base_url": a.url}, {"name": "b", "base_url": b.url})
    done = _run(tmp_path, pool)
    assert done.returncode == 3, done.stderr
    assert "every deployment is out" in done.stderr
    assert "a: the endpoint refused the API key (401)" in done.stderr
    assert "b: the account has no quota left" in done.stderr
    assert outputs(tmp_path / "job") == ([], [])  # nothing marked failed: fix it and rerun


def test_a_429_pauses_only_its_deployment(tmp_path: Path, mock_server: MockFactory) -> None:
    limited = mock_server(rpm=120)  # the server answers 429 past 120 a minute
    free = mock_server(latency=0.02)
    _, ids = _input(tmp_path, 300)
    pool = _pool(
        tmp_path,
        {"name": "limited", "base_url": limited.url, "weight": 10},
        {"name": "free", "base_url": free.url},
    )
    done = _run(tmp_path, pool)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    rows = _summary(done)["this_run"]["deployments"]
    assert rows["free"]["rate_limited"] == 0 and rows["free"]["succeeded"] > 200
    assert rows["limited"]["succeeded"] <= 121  # no more than the server let through
    assert rows["limited"]["taken_out"] == 0  # a 429 slows a deployment; it does not fail it


def test_each_deployment_keeps_its_own_pace(tmp_path: Path, mock_server: MockFactory) -> None:
    paced = mock_server(rate_limit_headers=False)
    other = mock_server(latency=0.05, slots=8)
    _, ids = _input(tmp_path, 400)
    pool = _pool(
        tmp_path,
        {"name": "paced", "base_url": paced.url, "rpm": 1200, "weight": 10},  # 20 a second
        {"name": "other", "base_url": other.url, "max_concurrency": 8},
    )
    done = _run(tmp_path, pool)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    arrivals = sorted(at for at, _ in paced.stats()["arrivals"])
    assert len(arrivals) > 20
    # Smooth, not in bursts: no second holds much more than 20 of them.
    busiest = max(
        sum(1 for t in arrivals[i:] if t < start + 1.0) for i, start in enumerate(arrivals)
    )
    assert busiest <= 24
    assert other.stats()["requests"] == 400 - len(arrivals)


def test_each_deployment_has_its_own_key_in_the_limits_store(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer
) -> None:
    a, b = mock_server(), mock_server()
    _, ids = _input(tmp_path, 40)
    pool = _pool(
        tmp_path,
        {"name": "a", "base_url": a.url, "rpm": 60000, "limits_key": "region-a"},
        {"name": "b", "base_url": b.url, "rpm": 60000, "api_key_env": "B_KEY"},
    )
    env = clean_env(B_KEY="sk-bb-0123456789")
    done = _run(tmp_path, pool, "--limits-store", redis_server.url, env=env)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    keys = redis_server.command("KEYS", "*")
    assert b"batchq:limits:{region-a}" in keys
    assert f"batchq:limits:{{{b.url}#".encode() in keys  # its base URL and a hash of its key
    assert b"sk-bb" not in keys


class Flaky:
    """An endpoint that answers 503 until ``heal``, then as the built-in one would."""

    def __init__(self) -> None:
        self.healed = threading.Event()
        self.server = HostileServer(self._answer)

    async def _answer(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if not self.healed.is_set():
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        reply = {"choices": [{"message": {"content": "ok"}}], "usage": {"prompt_tokens": 1}}
        return web.json_response(reply)


def test_a_deployment_comes_back_after_its_break(tmp_path: Path, mock_server: MockFactory) -> None:
    flaky = Flaky()
    try:
        steady = mock_server(latency=0.02, slots=2)
        _, ids = _input(tmp_path, 400)
        pool = _pool(
            tmp_path,
            {"name": "flaky", "base_url": flaky.server.url},
            {"name": "steady", "base_url": steady.url, "max_concurrency": 2},
        )
        args = ("--deployments", str(pool), "--model", "m", "--json-summary", "-q")
        process = start("run", "in.jsonl", "--job", "job", *args, cwd=tmp_path)
        wait_for(lambda: len(flaky.server.seen) >= 5)  # enough 503s to take it out
        flaky.healed.set()
        stdout, stderr = process.communicate(timeout=120)
    finally:
        flaky.server.close()
    assert process.returncode == 0, stderr
    assert_exactly_once(tmp_path / "job", ids)
    assert _served(tmp_path / "job").get("flaky", 0) > 0  # back in the pool, serving
    row = orjson.loads(stdout.splitlines()[-1])["this_run"]["deployments"]["flaky"]
    assert row["taken_out"] >= 1 and row["state"] == "in"


def test_a_job_resumed_with_another_pool_finishes_exactly_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    a, b, c = (mock_server(latency=0.01, slots=2) for _ in range(3))
    _, ids = _input(tmp_path, 400)
    first = _pool(
        tmp_path,
        {"name": "a", "base_url": a.url, "max_concurrency": 2},
        {"name": "b", "base_url": b.url, "max_concurrency": 2},
    )
    process = start(
        "run", "in.jsonl", "--job", "job", "--deployments", first, "--model", "m", cwd=tmp_path
    )
    wait_for(lambda: len(read_jsonl(tmp_path / "job" / "results.jsonl")) >= 50)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    before = set(_served(tmp_path / "job"))
    assert before <= {"a", "b"}
    (tmp_path / "pool.toml").unlink()
    second = _pool(
        tmp_path,
        {"name": "b", "base_url": b.url, "max_concurrency": 2},
        {"name": "c", "base_url": c.url, "max_concurrency": 2},
    )
    done = _run(tmp_path, second)
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    assert _summary(done)["this_run"]["deployments"].keys() == {"b", "c"}
    assert c.stats()["requests"] > 0


def test_one_base_url_is_one_deployment_and_lines_are_as_before(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    _input(tmp_path, 20)
    done = batchq(
        "run",
        "in.jsonl",
        "--job",
        "job",
        "--base-url",
        server.url,
        "--model",
        "m",
        "--json-summary",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    results, _ = outputs(tmp_path / "job")
    assert all("deployment" not in line["batchq"] for line in results)
    assert _summary(done)["this_run"]["deployments"] is None


def test_base_url_beside_deployments_is_ignored_with_one_notice(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    _input(tmp_path, 10)
    pool = _pool(tmp_path, {"name": "only", "base_url": server.url})
    done = _run(tmp_path, pool, "--base-url", "http://127.0.0.1:9/v1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("--base-url / OPENAI_BASE_URL is not used") == 1
    assert _served(tmp_path / "job") == {"only": 10}


def test_the_python_api_takes_deployments(tmp_path: Path, mock_server: MockFactory) -> None:
    a, b = mock_server(), mock_server()
    pool = [{"name": "a", "base_url": a.url}, {"name": "b", "base_url": b.url, "model": "m2"}]
    results = bq.run([f"q {i}" for i in range(40)], model="m1", deployments=pool, progress=False)
    assert all(r.ok for r in results)
    assert a.stats()["requests"] + b.stats()["requests"] == 40


def test_deployments_are_for_live_runs() -> None:
    tables = [{"name": "a", "base_url": "http://x/v1"}]
    with pytest.raises(ConfigError, match="are for --via live"):
        build_settings({"input": "in.jsonl", "deployments": tables, "via": "batch"}, {})


def test_validate_asks_each_deployment_which_lines_it_would_refuse(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    a = mock_server(models=("m",))
    b = mock_server(models=("m-awq",))
    job = tmp_path / "job"
    job.mkdir()
    write_jsonl(job / "in.jsonl", [chat(f"q {i}", f"r{i}") for i in range(3)])
    toml = f'''input = "in.jsonl"
model = "m"
[[deployments]]
name = "a"
base_url = "{a.url}"
[[deployments]]
name = "b"
base_url = "{b.url}"
'''
    (job / "job.toml").write_text(toml)
    done = batchq("validate", job, "--check-endpoint", "--json", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    pool = orjson.loads(done.stdout)["deployments"]
    assert pool["a"]["would_fail_lines"] == []
    assert {line["custom_id"] for line in pool["b"]["would_fail_lines"]} == {"r0", "r1", "r2"}
    (job / "job.toml").write_text(toml + 'model = "m-awq"\n')  # b serves it under its name
    done = batchq("validate", job, "--check-endpoint", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deployment b:" in done.stdout


def test_a_hedge_goes_to_another_deployment(tmp_path: Path, mock_server: MockFactory) -> None:
    released = threading.Event()

    async def stuck(request: web.Request, body: bytes) -> web.StreamResponse:
        await asyncio.to_thread(released.wait, 120)  # a replica that holds what it gets
        return web.json_response({"choices": []})

    fast = mock_server(latency=0.01)
    slow = HostileServer(stuck)
    try:
        _, ids = _input(tmp_path, 300)
        pool = _pool(
            tmp_path,
            {"name": "fast", "base_url": fast.url},
            {"name": "stuck", "base_url": slow.url, "max_concurrency": 2},
        )
        done = _run(tmp_path, pool, "--hedge")
        held = len(slow.seen)
    finally:
        released.set()
        slow.close()
    assert done.returncode == 0, done.stderr
    assert_exactly_once(tmp_path / "job", ids)
    results, _ = outputs(tmp_path / "job")
    hedged = [line for line in results if line["batchq"].get("hedged")]
    assert held == len(hedged) >= 1  # each stuck line was sent there once, never copied there
    assert {line["batchq"]["deployment"] for line in hedged} == {"fast"}
    rows = _summary(done)["this_run"]["deployments"]
    assert rows["fast"]["requests"] == fast.stats()["requests"]  # the copies with them
    assert rows["stuck"]["requests"] == held


def test_a_copy_that_straggles_too_gets_another_where_it_went(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    a, b = mock_server(latency=0.01), mock_server(latency=0.01)
    late = "late [[mock:sleep=30:1]]"  # each deployment answers its first arrival in 30 s
    _input(tmp_path, 199)
    with (tmp_path / "in.jsonl").open("ab") as f:  # 200 lines: two copies in all may go
        f.write(orjson.dumps(chat(late, "late")) + b"\n")
    pool = _pool(tmp_path, {"name": "a", "base_url": a.url}, {"name": "b", "base_url": b.url})
    done = _run(tmp_path, pool)
    assert done.returncode == 0, done.stderr
    results, errors = outputs(tmp_path / "job")
    assert errors == [] and len(results) == 200
    line = next(r for r in results if r["custom_id"] == "late")
    seen = {"a": a.stats()["prompts"][late], "b": b.stats()["prompts"][late]}
    assert sorted(seen.values()) == [1, 2]  # both copies went to the other deployment
    assert line["batchq"]["hedged"] is True and seen[line["batchq"]["deployment"]] == 2
    rows = _summary(done)["this_run"]["deployments"]
    assert (rows["a"]["requests"], rows["b"]["requests"]) == (
        a.stats()["requests"],
        b.stats()["requests"],
    )
    assert _summary(done)["this_run"]["hedges"]["sent"] == 2


def test_when_every_copy_fails_the_last_counts_where_it_went(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    a, b = mock_server(latency=0.01, record=True), mock_server(latency=0.01, record=True)
    late = "late [[mock:sleep=3:1]] [[mock:drop=1]]"  # each drops its first arrival, in 3 s
    _input(tmp_path, 99)
    with (tmp_path / "in.jsonl").open("ab") as f:  # 100 lines: one copy may go
        f.write(orjson.dumps(chat(late, "late")) + b"\n")
    pool = _pool(tmp_path, {"name": "a", "base_url": a.url}, {"name": "b", "base_url": b.url})
    done = _run(tmp_path, pool)
    assert done.returncode == 0, done.stderr
    went = {
        name: min(at for at, p in s.stats()["arrivals"] if p == late)
        for name, s in {"a": a, "b": b}.items()
    }
    first, copy = sorted(went, key=went.__getitem__)
    rows = _summary(done)["this_run"]["deployments"]
    # The copy failed last, so its failure was the attempt's: counted where the copy went.
    # (It used to be counted at the first's, and charge its breaker.)
    assert (rows[first]["errors"], rows[copy]["errors"]) == (0, 1)
    assert_exactly_once(tmp_path / "job", [f"r{i}" for i in range(99)] + ["late"])


def test_a_line_goes_only_to_deployments_that_serve_its_own_endpoint(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    chat_only, both = mock_server(), mock_server()
    chat_lines = [chat(f"q {i}", f"c{i}") for i in range(40)]
    embed = {"method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}}
    embed_lines = [{"custom_id": f"e{i}", **embed} for i in range(20)]
    unserved = {"custom_id": "nowhere", "method": "POST", "url": "/v1/completions"}
    unserved["body"] = {"model": "m", "prompt": "x"}
    write_jsonl(tmp_path / "in.jsonl", [*chat_lines, *embed_lines, unserved])
    chat_path = "/v1/chat/completions"
    pool = _pool(
        tmp_path,
        {"name": "chat", "base_url": chat_only.url, "endpoints": [chat_path]},
        {"name": "both", "base_url": both.url, "endpoints": [chat_path, "/v1/embeddings"]},
    )
    done = _run(tmp_path, pool)
    assert done.returncode == 1, done.stderr  # the one line no deployment serves failed
    results, errors = outputs(tmp_path / "job")
    by_id = {line["custom_id"]: line for line in results}
    assert {by_id[f"e{i}"]["batchq"]["deployment"] for i in range(20)} == {"both"}
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("nowhere", "endpoint_not_served")
    ]
    assert "/v1/embeddings" not in chat_only.stats()["by_path"]
    assert "/v1/completions" not in {**chat_only.stats()["by_path"], **both.stats()["by_path"]}
    assert len(results) == 60 and "Traceback" not in done.stderr


def test_a_line_too_large_for_the_only_deployment_serving_it_fails_at_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    small, big = mock_server(), mock_server()
    embed_path = "/v1/embeddings"
    large = {"custom_id": "large", "method": "POST", "url": embed_path}
    large["body"] = {"model": "m", "input": "word " * 8000}
    write_jsonl(tmp_path / "in.jsonl", [chat("q", "c0"), large])
    chat_path = "/v1/chat/completions"
    pool = _pool(
        tmp_path,
        {"name": "big", "base_url": big.url, "tpm": 1_000_000, "endpoints": [chat_path]},
        {"name": "small", "base_url": small.url, "tpm": 1000, "endpoints": [chat_path, embed_path]},
    )
    done = _run(tmp_path, pool)
    assert done.returncode == 1, done.stderr
    results, errors = outputs(tmp_path / "job")
    assert [line["custom_id"] for line in results] == ["c0"]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("large", "request_too_large")
    ]
    assert embed_path not in {**small.stats()["by_path"], **big.stats()["by_path"]}
