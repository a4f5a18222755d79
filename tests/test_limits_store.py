"""Shared limits (--limits-store): the ledger on its own, then real batchq processes
sharing a real Redis against one built-in endpoint. Never a mocked Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from conftest import REDIS_PASSWORD, MockFactory, RedisServer
from support import (
    assert_exactly_once,
    batchq,
    batchq_cmd,
    chat,
    clean_env,
    outputs,
    wait_for,
    write_jsonl,
)

import batchq as batchq_api
from batchq.config import LIMITS_STORE_PASSWORD_ENV, Settings, store_password, strip_secrets
from batchq.errors import ConfigError
from batchq.live.limiter import Pacer
from batchq.live.limits_store import (
    BLOCK_SECONDS,
    GRACE_SECONDS,
    HORIZON_SECONDS,
    Ledger,
    SharedLimits,
    default_key,
    redact,
)


def busiest_second(times: list[float]) -> int:
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


# --- The ledger: pure, no I/O ------------------------------------------------------------


def test_ledger_spaces_a_block_at_its_rate() -> None:
    ledger = Ledger(10.0)
    ledger.grant(100.0, 5, 10.0)
    starts = [ledger.reserve(1, 100.0) for _ in range(5)]
    assert starts == pytest.approx([100.0, 100.1, 100.2, 100.3, 100.4])
    assert ledger.reserve(1, 100.0) is None  # empty: the store must grant more


def test_ledger_drops_units_whose_time_passed() -> None:
    ledger = Ledger(10.0)
    ledger.grant(100.0, 5, 10.0)
    late = 100.25 + GRACE_SECONDS
    assert ledger.held(late) == pytest.approx(2.5)
    assert ledger.reserve(1, late) == pytest.approx(late)  # no burst of the missed ones
    assert ledger.held(101.0) == 0


def test_ledger_keeps_a_unit_the_worker_is_about_to_take() -> None:
    ledger = Ledger(1e6)  # at a million a second, a unit "passes" in a microsecond
    ledger.grant(100.0, 1, 1e6)
    assert ledger.reserve(1, 100.001) == pytest.approx(100.001)


def test_ledger_request_across_blocks_starts_with_the_later_block() -> None:
    ledger = Ledger(100.0)
    ledger.grant(0.0, 50, 100.0)
    ledger.grant(2.0, 100, 100.0)
    assert ledger.reserve(40, 0.0) == 0.0
    assert ledger.reserve(30, 0.0) == 2.0  # 10 units of the first block, 20 of the second
    assert ledger.held(0.0) == pytest.approx(80)


def test_ledger_replan_voids_what_it_holds() -> None:
    ledger = Ledger(10.0)
    ledger.grant(0.0, 5, 10.0)
    ledger.replan(0.0)
    assert ledger.reserve(1, 0.0) is None


def test_default_key_never_holds_the_api_key() -> None:
    key = default_key("https://api.example.com/v1/", "sk-secret-1234567890")
    assert "sk-secret" not in key and key.startswith("https://api.example.com/v1#")
    assert key == default_key("https://api.example.com/v1", "sk-secret-1234567890")
    assert key != default_key("https://api.example.com/v1", "sk-other-1234567890")
    assert redact("redis://user:pw@host:6379/0") == "redis://host:6379/0"


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3cret@h:6379/0",
        "redis://h:6379/0?password=s3cret",
        "rediss://alice:s3cret@h:6380/1?ssl_cert_reqs=none",
        "unix://:s3cret@/run/redis.sock?db=2",
        "unix:///run/redis.sock?db=2&password=s3cret",
    ],
)
def test_a_store_url_is_never_shown_with_its_password(url: str) -> None:
    # Issue 19, item 5: redis-py honours ?password= too, also in unix:// URLs.
    public, password = store_password(url, {})
    assert password == "s3cret"
    assert "s3cret" not in public and "s3cret" not in redact(url)
    assert public.split("://")[0] == url.split("://")[0] and "://" in public
    assert store_password(public, {LIMITS_STORE_PASSWORD_ENV: "env-pw"}) == (public, "env-pw")


@pytest.mark.parametrize("password", ["Zq9/x+Ab=", "Zq9#xAb", "Zq9?xAb"])
def test_a_password_whose_slash_ends_the_host_early_is_refused_unshown(
    tmp_path: Path, password: str
) -> None:
    """An Azure Cache for Redis key is base64: a '/' in it, unencoded, ends the URL's host,
    and urllib then finds no password to keep out of job.toml or of a message."""
    url = f"redis://:{password}@127.0.0.1:6379/0"
    assert password not in strip_secrets(url)[0] and password not in redact(url)
    with pytest.raises(ConfigError, match="%2F"):
        store_password(url, {})
    write_jsonl(tmp_path / "in.jsonl", [chat("q", "a")])
    done = batchq("run", "in.jsonl", "--model", "m", "--limits-store", url, cwd=tmp_path)
    assert done.returncode == 2 and password not in done.stderr, done.stderr
    assert not (tmp_path / "jobs").exists()


def test_credentials_in_the_base_url_stay_out_of_the_key_name() -> None:
    for base in ("https://user:s3cret@host/v1", "https://host/v1?api-key=s3cret"):
        key = default_key(base, None)
        assert "s3cret" not in key and key.startswith(("https://user@host/v1#", "https://host/v1#"))
        assert key != default_key(base.replace("s3cret", "other"), None)  # another account


def test_limits_store_must_be_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="Redis URL"):
        Settings(input="in.jsonl", limits_store="http://127.0.0.1:6379")
    assert Settings(input="x", limits_store="redis://h:1/0").limits_store == "redis://h:1/0"


# --- The store: a real Redis ------------------------------------------------------------


async def _ahead(shared: SharedLimits) -> float:
    """How far the store's requests timeline runs ahead of its clock, in seconds."""
    tat = await shared._redis.hget(shared._state, "tat:requests")
    seconds, micros = await shared._redis.time()
    return float(tat) - (seconds + micros / 1e6)


async def test_the_store_books_nothing_beyond_its_horizon(redis_server: RedisServer) -> None:
    async with SharedLimits(redis_server.url, "k") as shared:
        grants = [await shared.grant("requests", 5, 100.0) for _ in range(10)]  # 50 ms each
        booked = [g for g in grants if g.booked]
        assert booked and len(booked) < len(grants)
        assert all(g.delay <= HORIZON_SECONDS for g in booked)
        assert [g.booked for g in grants] == [True] * len(booked) + [False] * (10 - len(booked))
        refused = [g.delay for g in grants if not g.booked]
        assert HORIZON_SECONDS < refused[0] <= HORIZON_SECONDS + BLOCK_SECONDS
        assert refused == sorted(refused, reverse=True)  # a refusal books nothing
        assert await _ahead(shared) <= HORIZON_SECONDS + BLOCK_SECONDS


async def test_waiting_workers_do_not_book_the_timeline_far_ahead(
    redis_server: RedisServer,
) -> None:
    # 200 workers waiting for their turn at 98/s would once each hold a unit booked for
    # them, two seconds of the account ahead: all lost to the others if this process died.
    async with SharedLimits(redis_server.url, "k") as shared:
        pacer = Pacer(rpm=6000, shared=shared)
        pacer.answered()  # no probe: every worker waits for the pace at once
        waiting = [asyncio.create_task(pacer.wait_turn(1)) for _ in range(200)]
        try:
            for turns, turn in enumerate(asyncio.as_completed(waiting), 1):
                await turn
                assert await _ahead(shared) <= HORIZON_SECONDS + 2 * BLOCK_SECONDS
                if turns == 20:
                    break
        finally:
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)


async def test_a_restarted_store_is_not_lost_again_by_the_connections_it_had(
    redis_server: RedisServer,
) -> None:
    # Issue 19, item 4: the pool kept connections to the Redis that was killed; after the
    # store came back, the next commands that took one of them declared it lost again.
    notices: list[str] = []

    def notice(message: str, level: int = 0) -> None:
        notices.append(message)

    async with SharedLimits(redis_server.url, "k", on_notice=notice) as shared:
        await asyncio.gather(*(shared.grant("requests", 1, 1000.0) for _ in range(5)))
        redis_server.kill()
        assert await shared.grant("requests", 1, 1000.0) is None and shared.lost
        redis_server.start()
        await shared._reconnect()
        assert not shared.lost
        grants = await asyncio.gather(*(shared.grant("requests", 1, 1000.0) for _ in range(5)))
    assert all(grant is not None and grant.booked for grant in grants), notices
    lost_back = [("lost the" in n, "is back" in n) for n in notices]
    assert lost_back == [(True, False), (False, True)], notices


# --- Real processes, real Redis ----------------------------------------------------------


def _inputs(tmp_path: Path, parts: int, lines: int) -> list[list[str]]:
    ids = []
    for p in range(parts):
        part = [f"p{p}-{i}" for i in range(lines)]
        write_jsonl(tmp_path / f"part{p}.jsonl", [chat(f"q {c}", c) for c in part])
        ids.append(part)
    return ids


def _start(tmp_path: Path, part: int, url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    cmd = batchq_cmd(f"part{part}.jsonl", "--base-url", url, "--model", "m", "-q", *args)
    cmd.insert(3, "run")
    return subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _each_finishes_exactly_once(
    tmp_path: Path, runs: list[subprocess.Popen[str]], ids: list[list[str]]
) -> None:
    for p, process in enumerate(runs):
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert_exactly_once(tmp_path / "jobs" / f"part{p}", ids[p])


@pytest.mark.slow
@pytest.mark.parametrize("headers", [True, False], ids=["headers", "no-headers"])
def test_three_processes_share_one_accounts_rpm(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer, headers: bool
) -> None:
    server = mock_server(rpm=6000, rate_limit_headers=headers)
    ids = _inputs(tmp_path, 3, 150)
    runs = [
        # each is given the account's whole limit; the store makes them share it
        _start(tmp_path, p, server.url, "--rpm", "6000", "--limits-store", redis_server.url)
        for p in range(3)
    ]
    _each_finishes_exactly_once(tmp_path, runs, ids)
    stats = server.stats()
    assert stats["rate_limited"] <= 2, stats["by_status"]
    times = [at for at, _ in stats["arrivals"]]
    assert busiest_second(times) <= 110  # the account's 100/s, not three times that
    assert (len(times) - 1) / (max(times) - min(times)) >= 80  # and most of it is used


@pytest.mark.slow
def test_a_429_pauses_every_process_and_the_store_cuts_their_shared_pace(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer
) -> None:
    # The endpoint allows 3,000/min; the processes are told 6,000 and the endpoint sends no
    # headers: they can only learn from 429s, and each 429 slows all of them.
    server = mock_server(rpm=3000, rate_limit_headers=False)
    ids = _inputs(tmp_path, 2, 120)
    runs = [
        _start(tmp_path, p, server.url, "--rpm", "6000", "--limits-store", redis_server.url)
        for p in range(2)
    ]
    _each_finishes_exactly_once(tmp_path, runs, ids)
    assert server.stats()["rate_limited"] <= 20  # a few at the start, not a storm


@pytest.mark.slow
def test_limits_key_separates_accounts_and_env_names_the_store(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer
) -> None:
    server = mock_server()
    _inputs(tmp_path, 1, 20)
    done = batchq(
        "run", "part0.jsonl", "--base-url", server.url, "--model", "m", "-q",
        "--rpm", "60000", "--limits-key", "team-a",
        cwd=tmp_path,
        env=clean_env(BATCHQ_LIMITS_STORE=redis_server.url, OPENAI_API_KEY="sk-zz-12345678"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    keys = redis_server.command("KEYS", "*")
    assert b"batchq:limits:{team-a}" in keys
    assert b"sk-zz" not in keys


def test_redis_down_at_start_is_one_line_and_exit_2(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    _inputs(tmp_path, 1, 5)
    done = batchq(
        "run", "part0.jsonl", "--base-url", server.url, "--model", "m", "-q",
        "--rpm", "6000", "--limits-store", "redis://:hunter2@127.0.0.1:1/0",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "batchq: error: cannot reach the limits store redis://127.0.0.1:1/0"
    )
    assert len([line for line in lines if "error" in line]) == 1
    assert "hunter2" not in done.stderr and "Traceback" not in done.stderr
    assert server.stats()["requests"] == 0


def test_a_store_url_redis_cannot_use_is_one_line_and_exit_2(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # An unknown query parameter made redis-py raise TypeError: exit 70, a traceback.
    server = mock_server()
    _inputs(tmp_path, 1, 5)
    store = f"redis://127.0.0.1:1/0?foo=1&password={REDIS_PASSWORD}"
    done = batchq("run", "part0.jsonl", "--base-url", server.url, "--model", "m", "-q",
                  "--limits-store", store, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("batchq: error: cannot reach the limits store redis://127.0.0.1:1/0?foo=1: ")
    )
    assert "Traceback" not in done.stderr and REDIS_PASSWORD not in done.stderr
    assert server.stats()["requests"] == 0


@pytest.mark.slow
def test_redis_killed_mid_run_says_so_once_and_finishes_exactly_once(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer
) -> None:
    server = mock_server(rpm=6000)
    ids = _inputs(tmp_path, 1, 400)
    process = _start(tmp_path, 0, server.url, "--rpm", "6000", "--limits-store", redis_server.url)
    wait_for(lambda: server.stats()["requests"] >= 100)
    redis_server.kill()
    began = time.monotonic()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert stderr.count("lost the limits store") == 1, stderr
    assert "1/1 of the limits" in stderr
    assert_exactly_once(tmp_path / "jobs" / "part0", ids[0])
    results, errors = outputs(tmp_path / "jobs" / "part0")
    assert len(results) == 400 and not errors
    assert server.stats()["rate_limited"] <= 2
    assert time.monotonic() - began < 30


@pytest.mark.slow
def test_a_process_killed_mid_run_leaves_its_pace_to_the_others_at_once(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer
) -> None:
    server = mock_server(rpm=6000)
    ids = _inputs(tmp_path, 3, 500)
    args = ("--rpm", "6000", "--limits-store", redis_server.url)
    runs = [_start(tmp_path, p, server.url, *args) for p in range(3)]
    wait_for(lambda: server.stats()["by_status"].get("200", 0) >= 300)
    os.kill(runs[0].pid, signal.SIGKILL)  # `python -m batchq` itself, no wrapper
    killed = time.time()  # the mock's clock too
    for process in runs[1:]:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
    runs[0].communicate(timeout=10)
    accepted = sorted(at for at, _ in server.stats()["accepted"])
    assert accepted[-1] > killed + 3.0  # the two others were still at it
    # The account's 98/s, from half a second after the kill: not a dip while the bookings
    # of the dead process come due (seconds of them, once).
    taken = sum(killed + 0.5 <= at < killed + 2.5 for at in accepted)
    assert taken >= 0.9 * 2 * 98, taken  # 196 measured; 155 when the bookings ran ahead
    resumed = _start(tmp_path, 0, server.url, *args)
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, stderr
    for p in range(3):
        assert_exactly_once(tmp_path / "jobs" / f"part{p}", ids[p])


@pytest.mark.slow
def test_a_store_that_comes_back_is_shared_again(
    tmp_path: Path, mock_server: MockFactory, redis_server: RedisServer
) -> None:
    server = mock_server(rpm=6000)
    ids = _inputs(tmp_path, 1, 1200)
    store = ["--limits-store", redis_server.url, "--limits-key", "k"]
    process = _start(tmp_path, 0, server.url, "--rpm", "6000", *store)
    wait_for(lambda: server.stats()["requests"] >= 100)
    redis_server.kill()
    sent = server.stats()["requests"]
    wait_for(lambda: server.stats()["requests"] >= sent + 200)  # on alone, at its share
    redis_server.start()  # the same port, empty, as a restarted Redis without persistence
    wait_for(lambda: b"tat:requests" in redis_server.command("HKEYS", "batchq:limits:{k}"))
    rejoined = server.stats()["requests"]
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert stderr.count("lost the limits store") == 1, stderr
    assert stderr.count("is back: sharing the limits again") == 1, stderr
    assert rejoined < 1200  # it paced from the store again before the end
    assert_exactly_once(tmp_path / "jobs" / "part0", ids[0])
    assert server.stats()["rate_limited"] <= 2


def test_the_api_shares_limits_through_the_store_the_environment_names(
    tmp_path: Path,
    mock_server: MockFactory,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = mock_server()
    monkeypatch.setenv("BATCHQ_LIMITS_STORE", redis_server.url)
    results = batchq_api.run(
        ["a", "b"], base_url=server.url, model="m", rpm=6000, limits_key="nb", progress=False
    )
    assert [r.text for r in results] == ["Echo: a", "Echo: b"]
    assert b"batchq:limits:{nb}" in redis_server.command("KEYS", "*")


BASE_SECRET = "basepw-Xk3"  # the base URL's own credential


def _no_secret_in(
    *texts: str | bytes, secrets: tuple[str, ...] = (REDIS_PASSWORD, BASE_SECRET)
) -> None:
    for text in texts:
        text = text if isinstance(text, str) else text.decode(errors="replace")
        assert not any(secret in text for secret in secrets), text


def test_no_secret_reaches_job_toml_the_output_or_the_key_names(
    tmp_path: Path, mock_server: MockFactory, redis_with_password: RedisServer
) -> None:
    # Issue 19, item 5. A store URL with a password on the command line, a base URL with
    # credentials, and a bad line so that the summary prints the retry command.
    redis = redis_with_password
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("q", "a")])
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write("not json\n")
    base = server.url.replace("://", f"://user:{BASE_SECRET}@")
    store = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis.port}/0"
    args = ("--model", "m", "-q", "--rpm", "6000", "--json-summary")
    first = batchq("run", "in.jsonl", "--base-url", base, "--limits-store", store, *args,
                   cwd=tmp_path)  # fmt: skip
    assert first.returncode == 1, first.stderr  # the bad line
    toml = (tmp_path / "jobs" / "in" / "job.toml").read_text()
    keys = redis.command("KEYS", "*")
    _no_secret_in(first.stdout, first.stderr, keys)
    _no_secret_in(toml)
    assert f'limits_store = "redis://127.0.0.1:{redis.port}/0"' in toml
    assert "next time, set BATCHQ_LIMITS_STORE_PASSWORD" in first.stderr
    retry = orjson.loads(first.stdout)["retry_failed"]
    assert f"--limits-store redis://127.0.0.1:{redis.port}/0" in retry
    assert "--base-url 'http://user:***@127.0.0.1:" in retry, retry
    assert b"batchq:limits:{http://user@127.0.0.1:" in keys  # the base URL, shared, no secret

    # Next time the URL comes from job.toml, the password from the environment (or the
    # URL in BATCHQ_LIMITS_STORE, ?password= as well); without it, one line and exit 2.
    with (tmp_path / "in.jsonl").open("a") as f:
        f.write(orjson.dumps(chat("q", "b")).decode() + "\n")
    refused = batchq("run", "jobs/in", *args, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "(its password: BATCHQ_LIMITS_STORE_PASSWORD)" in refused.stderr
    env = clean_env(BATCHQ_LIMITS_STORE_PASSWORD=REDIS_PASSWORD)
    again = batchq("run", "jobs/in", *args, cwd=tmp_path, env=env)
    assert again.returncode == 1 and orjson.loads(again.stdout)["succeeded"] == 2, again.stderr
    in_env = f"redis://127.0.0.1:{redis.port}/0?password={REDIS_PASSWORD}"
    env = clean_env(BATCHQ_LIMITS_STORE=in_env)
    fresh = batchq("run", "in.jsonl", "--job", "jobs/env", "--base-url", server.url, *args,
                   cwd=tmp_path, env=env)  # fmt: skip
    assert fresh.returncode == 1, fresh.stderr
    assert "next time" not in fresh.stderr  # the environment will say it again
    toml = (tmp_path / "jobs" / "env" / "job.toml").read_text()
    _no_secret_in(refused.stderr, again.stdout, again.stderr, fresh.stdout, fresh.stderr)
    keys = redis.command("KEYS", "*")
    _no_secret_in(keys)
    assert b"batchq:limits:{http://127.0.0.1:" in keys  # the job from the environment's URL
    files = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    _no_secret_in(*files, secrets=(REDIS_PASSWORD,))
