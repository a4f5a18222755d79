"""Reaching the endpoint's capacity with no tuning, checked from the endpoint's side.

Each test runs `batchq run` with no --concurrency flag against the built-in
endpoint in one of its shapes (slots, slow answers, stragglers) and asserts
what the server saw: how many requests it held at once, what arrived when
relative to what it had answered, how many copies of a request it got.
Never how fast anything was.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from conftest import MockFactory
from hostile import HostileServer
from support import (
    assert_exactly_once,
    batchq,
    batchq_cmd,
    by_custom_id,
    chat,
    clean_env,
    outputs,
    start,
    wait_for,
    write_jsonl,
)

from batchq.live.concurrency import REGROW
from batchq.live.hedge import MIN_WAIT, QUIET, REFUSED_AT_LEAST

pytestmark = pytest.mark.slow


def run(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    base = ["run", "in.jsonl", "--base-url", url, "--model", "m", "-q", "--json-summary"]
    return batchq(*base, *args, cwd=tmp_path)


def summary(done: subprocess.CompletedProcess[str]) -> dict[str, object]:
    figures = orjson.loads(done.stdout)
    assert isinstance(figures, dict)
    return figures


def test_auto_fills_a_slot_server_without_flooding_its_queue(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(slots=8, latency=0.05, record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(1500)])
    done = run(tmp_path, server.url)
    assert done.returncode == 0, done.stderr
    seen = server.stats()
    assert seen["max_serving"] == 8  # every slot was used
    assert seen["max_in_flight"] <= 8 * 4  # slow start overshoots the knee fourfold at most
    assert summary(done)["this_run"]["concurrency"]["peak_in_flight"] == seen["max_in_flight"]  # type: ignore[index]


def test_under_a_pace_the_pool_opens_to_rate_times_latency(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # 200 requests a second, each taking a second: the pace binds only with ~200 in flight,
    # far more than the 64 workers batchq used to have.
    server = mock_server(latency=1.0, record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(1000)])
    done = run(tmp_path, server.url, "--rpm", "12000")
    assert done.returncode == 0, done.stderr
    assert server.stats()["max_in_flight"] >= 150


def test_a_slow_first_answer_does_not_hold_the_pool_back(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=3.0)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(4)])
    done = run(tmp_path, server.url)
    assert done.returncode == 0, done.stderr
    arrivals = sorted(at for at, _ in server.stats()["arrivals"])
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] < 3.0  # all four went before the first answer came


def test_by_default_a_straggler_is_sent_twice_and_written_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.01)
    lines = [chat(f"q{i}", custom_id=f"c{i}") for i in range(99)]
    lines.append(chat("late [[mock:sleep=3:1]]", custom_id="late"))  # only its first copy
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = run(tmp_path, server.url)  # no flag: the tail hedge is on by default
    assert done.returncode == 0, done.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert errors == []
    lines_by_id = by_custom_id(results)  # asserts no custom_id twice
    assert len(lines_by_id) == 100
    assert lines_by_id["late"]["batchq"]["hedged"] is True
    assert sum(1 for r in results if r["batchq"].get("hedged")) == 1
    assert server.stats()["prompts"]["late [[mock:sleep=3:1]]"] == 2
    hedges = summary(done)["this_run"]["hedges"]  # type: ignore[index]
    assert hedges["sent"] == 1 and hedges["estimated_tokens"] > 0  # type: ignore[index]


def test_a_copy_that_straggles_too_gets_one_more(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(latency=0.01)
    late = "late [[mock:sleep=30:2]]"  # its first two arrivals answer in 30 s, the third at once
    lines = [chat(f"q{i}", custom_id=f"c{i}") for i in range(199)]
    write_jsonl(tmp_path / "in.jsonl", [*lines, chat(late, custom_id="late")])
    done = run(tmp_path, server.url)  # 200 lines: two copies in all may go
    assert done.returncode == 0, done.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert errors == [] and len(by_custom_id(results)) == 200
    assert by_custom_id(results)["late"]["batchq"]["hedged"] is True
    first, copy, again = sorted(at for at, prompt in server.stats()["arrivals"] if prompt == late)
    assert first < copy < again < first + 30.0  # the third went while both were still out
    assert summary(done)["this_run"]["hedges"]["sent"] == 2  # type: ignore[index]


def test_copies_wait_until_every_line_has_gone(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(latency=0.01)
    slowish = [f"slowish {i} [[mock:sleep=3:1]]" for i in range(3)]  # first in the file
    late = [f"late {i} [[mock:sleep=30:1]]" for i in range(3)]  # last: the job's true tail
    prompts = slowish + [f"q{i}" for i in range(294)] + late
    write_jsonl(tmp_path / "in.jsonl", [chat(p) for p in prompts])  # 300 lines: 3 copies
    # Every line is taken at once and sent 50 a second: the slowish lines are out for
    # seconds while the rest wait for their turn, and answer long before the last one goes.
    done = run(tmp_path, server.url, "--rpm", "3000", "--concurrency", "300")
    assert done.returncode == 0, done.stderr
    seen = server.stats()["prompts"]
    assert [seen[p] for p in slowish] == [1, 1, 1]  # no copy spent on them
    assert [seen[p] for p in late] == [2, 2, 2]


def test_copies_take_a_place_in_the_pool(tmp_path: Path, mock_server: MockFactory) -> None:
    # A copy is a request in flight like any other: with --concurrency 2, a straggler and its
    # copy fill the pool, and the copy's own copy waits for a place. It was counted as sent,
    # and paid for, while it waited for a connection instead; and an auto pool below its
    # ceiling had no such bound (on a server of one slot, copies only queue behind their first).
    server = mock_server(latency=0.01)
    late = "late [[mock:sleep=4:2]]"  # its first two arrivals answer in 4 s, the third at once
    prompts = [f"q{i}" for i in range(199)] + [late]  # 200 lines: two copies may go
    write_jsonl(tmp_path / "in.jsonl", [chat(p) for p in prompts])
    done = run(tmp_path, server.url, "--concurrency", "2")
    assert done.returncode == 0, done.stderr
    seen = server.stats()
    assert seen["max_in_flight"] == 2
    assert seen["prompts"][late] == 2  # the first answered before a place came free
    figures = summary(done)["this_run"]
    assert figures["hedges"]["sent"] == 1  # type: ignore[index]
    assert figures["concurrency"]["peak_in_flight"] == 2  # type: ignore[index]


def test_with_no_hedge_a_straggler_is_sent_once(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(latency=0.01)
    lines = [chat(f"q{i}") for i in range(59)] + [chat("late [[mock:sleep=3:1]]")]
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = run(tmp_path, server.url, "--no-hedge")
    assert done.returncode == 0, done.stderr
    assert server.stats()["prompts"]["late [[mock:sleep=3:1]]"] == 1
    assert summary(done)["this_run"]["hedges"]["sent"] == 0  # type: ignore[index]


def test_hedges_are_bounded_to_one_percent_of_the_jobs_requests(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.01)
    slow = [f"slow {i} [[mock:sleep=8:1]]" for i in range(3)]
    stuck = [f"stuck {i} [[mock:sleep=60:1]]" for i in range(3)]
    lines = [chat(f"q{i}") for i in range(294)] + [chat(p) for p in slow + stuck]
    write_jsonl(tmp_path / "in.jsonl", lines)
    done = run(tmp_path, server.url, "--concurrency", "16")  # all six out at once
    assert done.returncode == 0, done.stderr
    assert summary(done)["this_run"]["hedges"]["sent"] == 3  # type: ignore[index]
    prompts = server.stats()["prompts"]
    # Three copies cannot shorten a tail of six: they wait until three are left.
    assert [prompts[p] for p in slow + stuck] == [1, 1, 1, 2, 2, 2]
    results, _ = outputs(tmp_path / "jobs" / "in")
    assert sum(1 for r in results if r["batchq"].get("hedged")) == 3
    assert_exactly_once(tmp_path / "jobs" / "in", [f"line-{i}" for i in range(1, 301)])


@pytest.mark.parametrize(
    ("refusal", "lines", "chance"), [("fail=30:429", 1, 0), ("fail=5:503", 10, REFUSED_AT_LEAST)]
)
def test_no_hedge_goes_while_the_endpoint_refuses(
    tmp_path: Path, mock_server: MockFactory, refusal: str, lines: int, chance: int
) -> None:
    # Lines refused for seconds (429s, each a 0.1 s pause; or 503s with backoff, a tenth of
    # the answers) while a straggler is out: its copy waits until the endpoint has refused
    # nothing for QUIET seconds, or, of 503s, fewer than ``chance`` (the odd 503 among many
    # answers, or a few in a tail of few, would not hold it).
    server = mock_server(latency=0.01)
    refused = [f"refused {i} [[mock:{refusal}]]" for i in range(lines)]
    late = "late [[mock:sleep=60:1]]"
    inputs = [chat(f"q{i}") for i in range(99 - lines)] + [chat(p) for p in [*refused, late]]
    write_jsonl(tmp_path / "in.jsonl", inputs)
    done = run(tmp_path, server.url)
    assert done.returncode == 0, done.stderr
    arrivals = server.stats()["arrivals"]
    first, copy = [at for at, prompt in arrivals if prompt == late]  # hedged, once quiet
    count = int(refusal.removeprefix("fail=").partition(":")[0])
    refusals = [at for p in refused for at in [at for at, q in arrivals if q == p][:count]]
    assert max(refusals) - first > 2 * MIN_WAIT  # a copy would have gone into refusals
    recent = [at for at in refusals if copy - QUIET <= at < copy]  # answered after arriving
    assert len(recent) < max(chance, 1)
    assert_exactly_once(tmp_path / "jobs" / "in", [f"line-{i}" for i in range(1, 101)])


def test_a_copy_s_429_pauses_sending_as_any_429(tmp_path: Path) -> None:
    # Two stragglers get a copy each. The first's copy is refused 429 (retry after 3 s); at
    # that instant the second and its copy fail with a 500. Its retry must wait out the
    # pause, as after a 429 of its own. The copy's 429 reached only the hedger once: the
    # retry went after its backoff (under half a second), into the endpoint's refusal.
    refused, failed_copy = threading.Event(), threading.Event()
    refused_at: list[float] = []
    retried_at: list[float] = []
    arrivals = {"late": 0, "failed": 0}

    async def serve(request: web.Request, body: bytes) -> web.StreamResponse:
        prompt = orjson.loads(body)["messages"][0]["content"]
        if prompt in arrivals and not refused.is_set():
            arrivals[prompt] += 1
        if prompt == "late":
            if arrivals["late"] == 1:  # the first: answers once its copy is refused
                await asyncio.to_thread(refused.wait, 60)
            elif not refused.is_set():  # its copy (once the other's went, if it has one)
                await asyncio.to_thread(failed_copy.wait, 5)
                refused_at.append(time.monotonic())
                refused.set()
                return web.json_response({"error": {}}, status=429, headers={"retry-after": "3"})
        elif prompt == "failed":
            if refused.is_set():
                retried_at.append(time.monotonic())
            else:  # it, and its copy, out when the other's copy is refused
                if arrivals["failed"] == 2:
                    failed_copy.set()
                await asyncio.to_thread(refused.wait, 60)
                # A moment after the 429, as an endpoint's 500 would be: both answers in the
                # same instant, the client could take the 500s first, and draw a retry's
                # backoff (up to half a second) too short to meet the pause.
                await asyncio.sleep(0.2)
                return web.json_response({"error": {}}, status=500)
        return web.json_response({"choices": [{"message": {"content": "ok"}}]})

    server = HostileServer(serve)
    try:
        prompts = [f"q{i}" for i in range(298)] + ["late", "failed"]  # 300 lines: 3 copies
        write_jsonl(tmp_path / "in.jsonl", [chat(p) for p in prompts])
        done = run(tmp_path, server.url)
    finally:
        refused.set()
        server.close()
    assert done.returncode == 0, done.stderr
    assert len(refused_at) == 1 and retried_at  # the copy was refused; "failed" went again
    assert min(retried_at) - refused_at[0] >= 2.9  # nothing went until the pause was over
    assert_exactly_once(tmp_path / "jobs" / "in", [f"line-{i}" for i in range(1, 301)])


def test_kill_during_hedged_tail_then_resume_writes_each_line_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.01)
    ids = [f"c{i}" for i in range(200)]
    lines = [chat(f"q{i}", custom_id=cid) for i, cid in enumerate(ids[:-2])]
    stragglers = ["slow a [[mock:sleep=60:2]]", "slow b [[mock:sleep=60:2]]"]
    lines += [chat(p, custom_id=cid) for p, cid in zip(stragglers, ids[-2:], strict=True)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    proc = start(*args, cwd=tmp_path)
    # Both stragglers and their second copies are out, and sleeping: the tail.
    wait_for(lambda: all(server.stats()["prompts"].get(p) == 2 for p in stragglers))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    job = tmp_path / "jobs" / "in"
    results, _ = outputs(job)
    assert len(results) == 198  # everything but the two stragglers was written
    resumed = batchq(*args, cwd=tmp_path)  # their third arrivals are quick
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(job, ids)


def test_a_pool_larger_than_the_open_file_limit_allows_is_cut_to_fit(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(300)])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]

    def few_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    done = subprocess.run(
        [*batchq_cmd(*args), "--concurrency", "3000"],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=few_files,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "ulimit -n" in done.stderr and "at most 192" in done.stderr
    assert len(outputs(tmp_path / "jobs" / "in")[0]) == 300


def test_a_stopped_run_sends_nothing_that_was_still_waiting_for_a_slot(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # The auto pool starts at 4 in flight while its other workers hold requests, waiting
    # for a slot: after Ctrl-C those stay pending instead of going out as slots free up.
    server = mock_server(latency=2.0, record=False)  # the probe's answer comes after the 4 go
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(100)])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: server.stats()["in_flight"] == 4)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert server.stats()["requests"] == 4
    assert len(outputs(tmp_path / "jobs" / "in")[0]) == 4


def test_a_signal_while_requests_wait_for_a_slot_exits_130(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # Under a pace most workers wait at the gate or for their turn; when the drain time is
    # up they are all cancelled at once, which once ended in exit 70.
    server = mock_server(rpm=6000, record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(1000)])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    args += ["--rpm", "6000", "--drain-timeout", "0"]
    proc = start(*args, cwd=tmp_path)
    wait_for(lambda: server.stats()["requests"] >= 100)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "internal error" not in stderr
    resumed = batchq(*args[:-2], cwd=tmp_path, timeout=120)  # the rest, once each
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(tmp_path / "jobs" / "in", [f"line-{i}" for i in range(1, 1001)])


def test_under_a_pace_above_its_capacity_the_pool_sheds_the_slot_servers_queue(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # 8 slots serve ~100 a second; the pace allows 1,000. The pool used to follow the queue's
    # latency to its ceiling (here 256) and hold it there: once the endpoint is seen holding
    # a queue, the pool is capped at what fills its slots and the queue drains.
    server = mock_server(slots=8, latency=0.05, record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(1500)])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", "--json-summary"]
    proc = start(*args, "--rpm", "60000", "--max-concurrency", "256", cwd=tmp_path)
    wait_for(lambda: server.stats()["requests"] >= 1200, timeout=60)
    late = server.stats()["in_flight"]  # 1,200 sent: long after the first second's flood
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    # Little's law at the lowest mean latency seen, which the first second's queue already
    # inflated: a few batches, not the ceiling (probes shed more, over later windows).
    assert late <= 8 * 10
    assert len(outputs(tmp_path / "jobs" / "in")[0]) == 1500
    assert orjson.loads(stdout)["succeeded"] == 1500


def test_a_stopped_run_sends_no_second_copy_of_its_stragglers(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # Ctrl-C ends the input for the workers, but it is not the input's end: the stragglers
    # among the requests draining are no tail to hedge, and their copies would be paid for.
    server = mock_server(latency=0.05)
    stragglers = ["slow a [[mock:sleep=3:1]]", "slow b [[mock:sleep=3:1]]"]
    lines = [chat(p) for p in stragglers] + [chat(f"q{i}") for i in range(2000)]
    write_jsonl(tmp_path / "in.jsonl", lines)
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]  # hedged
    proc = start(*args, "--concurrency", "8", cwd=tmp_path)

    def stragglers_out_and_p95_known() -> bool:
        seen = server.stats()
        answered = seen["by_status"].get("200", 0)
        return answered >= 40 and all(p in seen["prompts"] for p in stragglers)

    wait_for(stragglers_out_and_p95_known)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    prompts = server.stats()["prompts"]
    assert [prompts[p] for p in stragglers] == [1, 1]
    assert max(prompts.values()) == 1  # no request went twice, before the stop or after


# --- The server's own load gauges ---------------------------------------------------------


def test_a_server_s_gauges_size_the_pool_to_its_batch(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(slots=64, latency=0.05, gauges="vllm", record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(3000)])
    done = run(tmp_path, server.url)
    assert done.returncode == 0, done.stderr
    seen = server.stats()
    assert seen["gauge_reads"] > 1
    assert seen["max_serving"] == 64
    # Doubling while none wait overshoots the batch once at most (probing: 4 → 16 → 64 → 256).
    assert seen["max_in_flight"] <= 2 * 64
    # At the batch, less what finished between the server's count and the reading's turn;
    # past it, an eighth more per REGROW seconds, as many as the run lasted (a loaded machine
    # stretches this ~2 s job, and each step is the design, looking for a larger batch).
    this_run = summary(done)["this_run"]
    allowed = 64
    for _ in range(1 + int(this_run["elapsed_s"] // REGROW)):  # type: ignore[index]
        allowed += allowed // 8
    assert 56 <= this_run["concurrency"]["allowance"] <= allowed  # type: ignore[index]


def test_llama_cpp_s_gauges_keep_one_request_on_its_one_slot(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(slots=1, latency=0.05, gauges="llamacpp", api_key="sk-gauges-test")
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(40)])
    env = clean_env(OPENAI_API_KEY="sk-gauges-test")
    base = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", "--json-summary"]
    done = batchq(*base, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert server.stats()["gauge_reads"] > 1  # the key went with the readings (else 401)
    assert summary(done)["this_run"]["concurrency"]["allowance"] == 1  # type: ignore[index]
    assert_exactly_once(tmp_path / "jobs" / "in", [f"line-{i}" for i in range(1, 41)])


def test_an_endpoint_without_gauges_is_asked_once(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(latency=0.01)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(200)])
    assert run(tmp_path, server.url).returncode == 0
    assert server.stats()["gauge_reads"] == 1
    assert server.stats()["requests"] == 200  # the reading is no request of the job's


def test_a_fixed_pool_reads_no_gauges(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(gauges="vllm")
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(20)])
    assert run(tmp_path, server.url, "--concurrency", "8").returncode == 0
    assert server.stats()["gauge_reads"] == 0


def test_deployments_on_one_server_share_its_gauges_and_its_batch(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # Two models (or two keys) on one vLLM read the same gauges. Each used to act as the
    # server's only client: 8 + 8 of ours, 16 running and none waiting, doubled both to 16,
    # and with 20 running and 12 waiting neither had more of its own out than the server ran,
    # so neither shrank: the server held 32, 12 of them queued, for the rest of the run.
    server = mock_server(slots=20, latency=0.15, gauges="vllm", record=False)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(1500)])
    pool = tmp_path / "pool.toml"
    pool.write_text(
        "".join(f'[[deployments]]\nname = "{name}"\nbase_url = "{server.url}"\n' for name in "ab")
    )
    args = ["run", "in.jsonl", "--deployments", pool, "--model", "m", "-q", "--json-summary"]
    proc = start(*args, cwd=tmp_path)
    in_server = []  # what the server holds, at each poll from the 300th request to the 1,300th

    def sampled(until: int) -> bool:
        seen = server.stats()
        if seen["requests"] >= 300:
            in_server.append(seen["in_flight"])
        return seen["requests"] >= until

    wait_for(lambda: sampled(1300), timeout=60)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    seen = server.stats()
    assert seen["max_serving"] == 20
    # Most of the time: the batch, or the eighth past it that the pools try (was 32 throughout).
    assert sorted(in_server)[len(in_server) // 2] <= 20 + 20 // 8
    assert stderr.count("load gauges") == 1  # one reader for the server, found once
    assert "a, b: the server publishes vLLM's load gauges" in stderr
    assert orjson.loads(stdout)["succeeded"] == 1500
