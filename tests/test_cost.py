"""Cost live and a budget: prices, what the endpoint billed, and --max-cost (exit 4).

The arithmetic is tested pure; the promises end to end, against the built-in
endpoint, whose own count of the tokens it answered (/_mock/stats) is the bill.
"""

from __future__ import annotations

import base64
import random
import shlex
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import MockFactory
from hostile import HostileServer, completion, prompt_of
from support import (
    assert_exactly_once,
    batchq,
    by_custom_id,
    chat,
    outputs,
    read_jsonl,
    start,
    wait_for,
    write_jsonl,
)

import batchq as api
from batchq.cost import (
    IMAGE_WORST_TOKENS,
    WORST_COMPLETION_TOKENS,
    Meter,
    Price,
    Prices,
    Tally,
    Verdict,
    projected,
    prompt_bound,
    suggested_budget,
    usage_tokens,
)
from batchq.job.history import read_history
from batchq.job.journal import read_journal
from batchq.job.settings import read_job_toml
from batchq.records import Request
from batchq.show.picture import open_folder, picture
from batchq.show.progress import PlainProgress
from batchq.stats import Stats

PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # per million tokens: large, so a few lines cost units


def _bill(prompt: int, completion: int) -> float:
    return (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6


def _request(prompt: int, cap: int | None, model: str | None = "m") -> Request:
    """A request whose body has ``prompt`` bytes (its estimate a quarter of that)."""
    body = b"x" * prompt
    return Request(
        1, "a", "/v1/chat/completions", body, prompt + (cap or 0), model, prompt // 4, cap
    )


# --- The arithmetic -------------------------------------------------------------------


def test_cached_prompt_tokens_cost_their_own_price_or_else_the_prompt_price() -> None:
    assert Price(1.0, 4.0, 0.25).of(1_000_000, 400_000, 500_000) == pytest.approx(0.6 + 0.1 + 2.0)
    assert Price(1.0, 4.0).of(1_000_000, 400_000, 0) == pytest.approx(1.0)  # no discount guessed


def test_no_price_is_no_prices_and_a_table_wins_over_the_flags_by_model() -> None:
    assert Prices.from_settings(0.0, 0.0, None, {}) is None
    prices = Prices.from_settings(1.0, 2.0, None, {"big": {"in": 10.0, "out": 20.0}})
    assert prices is not None
    assert prices.of("big") == Price(10.0, 20.0)
    assert prices.of("small") == prices.of(None) == Price(1.0, 2.0)
    only_table = Prices.from_settings(0.0, 0.0, None, {"big": {"in": 10.0, "out": 20.0}})
    assert only_table is not None and only_table.of("small") is None
    tally = Tally()
    tally.add("small", 1_000_000, 0, 0)
    assert only_table.cost(tally) == 0.0  # nothing guessed for a model with no price
    assert only_table.unpriced(tally) == ["small"]


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 5}, (10, 0, 5)),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
            (10, 8, 5),
        ),
        (
            {"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 2}},
            (7, 2, 3),
        ),
        ({"prompt_tokens": 4}, (4, 0, 0)),  # embeddings
        ({"prompt_tokens": -4, "completion_tokens": "5"}, (0, 0, 0)),  # nonsense counts nothing
        ({"prompt_tokens": 4, "prompt_tokens_details": {"cached_tokens": 9}}, (4, 4, 0)),
        (None, (0, 0, 0)),
    ],
)
def test_usage_tokens_of_every_endpoint_shape(
    usage: dict[str, Any] | None, tokens: tuple[int, int, int]
) -> None:
    assert usage_tokens({"usage": usage}) == tokens


def test_the_meter_sends_waits_for_what_is_in_flight_or_stops() -> None:
    prices = Prices(Price(PRICE_IN, PRICE_OUT))
    meter = Meter.open(prices, Tally(), 1.1)
    request = _request(100, 100)  # worst: 0.1 + 0.2
    worst = meter.worst(request)
    assert worst is not None and worst == pytest.approx(0.3)
    for _ in range(3):
        assert meter.verdict(worst) is Verdict.SEND
        meter.reserve(worst)
    assert meter.verdict(worst) is Verdict.WAIT  # 0.9 in flight at its worst
    meter.release(worst)
    meter.paid(request, 100, 0, 10)  # 0.12
    assert meter.verdict(worst) is Verdict.SEND
    meter.release(worst)
    meter.release(worst)
    assert meter.reserved == 0.0 and meter.reservations == 0
    meter.spent = 0.9
    assert meter.verdict(worst) is Verdict.STOP  # would cross even with nothing in flight
    for _ in range(1000):  # float crumbs of many reservations never outlive them
        meter.reserve(0.1)
    for _ in range(1000):
        meter.release(0.1)
    assert meter.reserved == 0.0


def test_the_worst_case_assumes_a_stated_cap_and_a_token_a_byte_or_more_if_seen() -> None:
    meter = Meter.open(Prices(Price(PRICE_IN, PRICE_OUT)), Tally(), 10.0)
    assert meter.worst(_request(100, None)) == pytest.approx(_bill(100, WORST_COMPLETION_TOKENS))
    meter.paid(_request(100, 10), 90, 0, 5)  # fewer than the body's bytes, as ever
    assert meter.worst(_request(100, 10)) == pytest.approx(_bill(100, 10))
    meter.paid(_request(100, 10), 300, 0, 5)  # an image by URL: thrice the bytes
    assert meter.worst(_request(100, 10)) == pytest.approx(_bill(300, 10))
    assert meter.worst(_request(100, 10, model="unpriced")) is not None  # the default price
    assert Meter.open(Prices(None), Tally(), 1.0).worst(_request(1, 1, "x")) is None


def test_an_inlined_image_counts_its_worst_tokens_not_its_bytes() -> None:
    image = b"data:image/png;base64," + base64.b64encode(bytes(300_000))
    part = b'{"type":"image_url","image_url":{"url":"%b"}}' % image
    body = b'{"messages":[{"role":"user","content":[%b]}]}' % part
    assert prompt_bound(body) == len(body) - len(image) + IMAGE_WORST_TOKENS
    two = body.replace(part, part + b"," + part)
    assert prompt_bound(two) == len(two) - 2 * len(image) + 2 * IMAGE_WORST_TOKENS
    assert prompt_bound(b'{"prompt":"hi"}') == 15


def test_projection_and_the_suggested_budget() -> None:
    assert projected(2.0, 0, 10) is None
    assert projected(2.0, 20, 80) == pytest.approx(10.0)
    assert suggested_budget(2.0, 20, 80, 2.0) == pytest.approx(11.0)
    assert suggested_budget(2.0, 20, 0, 2.0) == pytest.approx(3.0)  # never below 1.5x
    assert suggested_budget(0.0, 0, 10, 2.0, wanted=10.0) == pytest.approx(11.0)
    # the last request needs room for its worst on top of what the others will have cost
    assert suggested_budget(2.0, 20, 80, 2.0, wanted=3.0) == pytest.approx(12.1, abs=0.01)


def test_a_tally_round_trips_through_json() -> None:
    tally = Tally()
    tally.add("a", 10, 2, 5)
    tally.add(None, 1, 0, 1)
    tally.add("a", 10, 0, 5)
    again = Tally.from_json(orjson.loads(orjson.dumps(tally.as_json())))
    assert again == tally and again.answers == 3
    with pytest.raises(ValueError):
        Tally.from_json({"a": {"prompt_tokens": -1}})


# --- End to end -----------------------------------------------------------------------


def _lines(n: int) -> list[dict[str, Any]]:
    # ~104 prompt tokens each; the mock's echo needs 27 completion tokens, under the cap of 50
    return [chat(f"question {i:03d} " + "x" * 400, f"q{i}", max_tokens=50) for i in range(n)]


def _spent_on_disk(job: Path) -> float:
    tokens = orjson.loads((job / "spend.json").read_bytes())["tokens"]
    return sum(_bill(t["prompt_tokens"], t["completion_tokens"]) for t in tokens.values())


def _mock_bill(stats: dict[str, Any]) -> float:
    return _bill(stats["prompt_tokens"], stats["completion_tokens"])


def test_the_budget_stops_the_job_below_it_exit_4_and_a_higher_one_finishes_it_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.02, rate_500=0.2, seed=7)
    write_jsonl(tmp_path / "in.jsonl", _lines(100))
    base = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--max-attempts", "20"]
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    stopped = batchq(*base, *prices, "--max-cost", "5", "--json-summary", cwd=tmp_path)

    assert stopped.returncode == 4, stopped.stderr
    job = tmp_path / "jobs" / "in"
    billed = _mock_bill(server.stats())  # what the endpoint answered with 200, retries too
    assert 0 < billed <= 5.0
    assert _spent_on_disk(job) == pytest.approx(billed)
    figures = orjson.loads(stopped.stdout)
    assert figures["state"] == "budget_reached"
    assert figures["cost"]["spent"] == pytest.approx(billed)
    assert figures["cost"]["budget"] == 5.0
    results, errors = outputs(job)
    assert len(results) + len(errors) + figures["pending"] == 100 and figures["pending"] > 0
    assert server.stats()["by_status"]["500"] > 0  # retries happened, and cost nothing
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("batchq: stopped at the budget: ")
    assert f"{figures['pending']:,} lines pending" in last
    command = shlex.split(last.partition("to go on: ")[2])
    assert command[:2] == ["batchq", "run"] and "--max-cost" in command
    assert command.count("--max-cost") == 1  # the old budget gave way

    status = orjson.loads(batchq("status", job, "--json", cwd=tmp_path).stdout)
    assert status["cost"]["spent"] == pytest.approx(billed)
    assert status["cost"]["budget"] == 5.0

    resumed = batchq(*command[1:], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_exactly_once(job, [f"q{i}" for i in range(100)])
    assert server.stats()["by_status"]["200"] == 100  # every line answered once, all runs
    assert _spent_on_disk(job) == pytest.approx(_mock_bill(server.stats()))


def test_the_budget_holds_across_resumes_from_the_jobs_files(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(40))
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--concurrency", "4"]
    args.append("--no-fsync")  # spend.json is kept the same way without fsync
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    hedged = batchq(*args, *prices, "--max-cost", "2", "--hedge", cwd=tmp_path)
    assert hedged.returncode == 4
    assert "no hedges under --max-cost" in hedged.stderr
    first = _mock_bill(server.stats())
    again = batchq(*args, *prices, "--max-cost", "2", cwd=tmp_path)  # the same budget again
    assert again.returncode == 4, again.stderr
    assert _mock_bill(server.stats()) == pytest.approx(first)  # not a token more was sent
    assert server.stats()["requests"] == len(outputs(tmp_path / "jobs" / "in")[0])
    more = batchq(*args, *prices, "--max-cost", "4", cwd=tmp_path)
    assert more.returncode == 4
    assert first < _mock_bill(server.stats()) <= 4.0


def test_no_price_no_cost_shown_and_nothing_kept(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(10))
    done = batchq(
        *("run", "in.jsonl", "--base-url", server.url, "--model", "m", "--json-summary"),
        *("--progress-every", "0.1"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    figures = orjson.loads(done.stdout)
    assert figures["cost"] is None and figures["this_run"]["cost"] is None
    assert "spent" not in done.stderr and "cost:" not in done.stderr and "$" not in done.stderr
    job = tmp_path / "jobs" / "in"
    assert not (job / "spend.json").exists()
    status = batchq("status", job, cwd=tmp_path)
    assert "  cost:" not in status.stdout and "$" not in status.stdout
    assert orjson.loads(batchq("status", job, "--json", cwd=tmp_path).stdout)["cost"] is None


def test_prices_by_model_for_a_mixed_file(
    tmp_path: Path, mock_server: MockFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = mock_server()
    models = ["other", "big", "small"]  # "other" has no price, and there is no default
    lines = [chat(f"q{i} " + "y" * 40, f"q{i}", model=models[i % 3]) for i in range(30)]
    table = {"big": {"in": 10.0, "out": 30.0}, "small": {"in": 1.0, "out": 2.0, "cached_in": 0.5}}
    with caplog.at_level("WARNING", logger="batchq"):
        results = api.run(
            lines, base_url=server.url, job=tmp_path / "job", prices=table, progress=False
        )
    assert all(r.ok for r in results)
    warned = [r.getMessage() for r in caplog.records if "has no price" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("model other has no price")
    expected = 0.0
    for line in read_jsonl(tmp_path / "job" / "results.jsonl"):
        usage, model = line["response"]["body"]["usage"], line["response"]["body"]["model"]
        if model in table:
            price = table[model]
            expected += usage["prompt_tokens"] * price["in"] / 1e6
            expected += usage["completion_tokens"] * price["out"] / 1e6
    status = orjson.loads(batchq("status", tmp_path / "job", "--json", cwd=tmp_path).stdout)
    assert status["cost"]["spent"] == pytest.approx(expected)
    assert status["cost"]["projected"] == pytest.approx(expected)  # nothing pending
    assert read_job_toml(tmp_path / "job" / "job.toml")["prices"] == table  # kept, as given


def test_the_api_raises_budget_reached_and_a_higher_budget_goes_on(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    lines = _lines(30)
    options: dict[str, Any] = {
        "base_url": server.url,
        "model": "m",
        "job": tmp_path / "job",
        "price_in": PRICE_IN,
        "price_out": PRICE_OUT,
        "progress": False,
    }
    with pytest.raises(api.BudgetReached) as stopped:
        api.run(lines, max_cost=1.5, **options)
    assert stopped.value.exit_code == 4
    assert 0 < stopped.value.spent <= 1.5 and stopped.value.limit == 1.5
    assert stopped.value.pending and stopped.value.pending > 0
    assert stopped.value.spent == pytest.approx(_mock_bill(server.stats()))
    results = api.run(lines, max_cost=100.0, **options)
    assert [r.custom_id for r in results] == [f"q{i}" for i in range(30)]
    assert len(by_custom_id(read_jsonl(tmp_path / "job" / "results.jsonl"))) == 30


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-cost", "5"], "--max-cost needs prices"),
        (["--max-cost", "5", "--price-in", "1", "--via", "batch"], "goes with --via live"),
        (["--max-cost", "5", "--price-in", "1", "--shard", "0/2"], "does not go with --shard"),
        (["--max-cost", "0", "--price-in", "1"], "--max-cost"),
    ],
)
def test_a_budget_that_cannot_be_kept_is_refused_exit_2(
    tmp_path: Path, mock_server: MockFactory, extra: list[str], message: str
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(4))
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", *extra, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert server.stats()["requests"] == 0


def test_a_job_first_run_without_a_price_is_priced_from_its_done_lines(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(10))
    write_jsonl(tmp_path / "more.jsonl", _lines(20))
    args = ["--base-url", server.url, "--model", "m"]
    assert batchq("run", "in.jsonl", "--job", "job", *args, cwd=tmp_path).returncode == 0
    first = _mock_bill(server.stats())
    (tmp_path / "in.jsonl").write_bytes((tmp_path / "more.jsonl").read_bytes())  # appended
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    done = batchq("run", "in.jsonl", "--job", "job", *args, *prices, "--json-summary", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cost = orjson.loads(done.stdout)["cost"]
    assert cost["spent"] == pytest.approx(_mock_bill(server.stats()))
    assert orjson.loads(done.stdout)["this_run"]["cost"]["spent"] == pytest.approx(
        _mock_bill(server.stats()) - first
    )


def test_the_progress_line_shows_spent_projected_and_the_budget() -> None:
    stats = Stats(total=100, ok_before=20, cost=2.0, budget=20.0)
    line = PlainProgress(stats, stream=None).render()  # type: ignore[arg-type]
    assert line.endswith("$2.00 spent, ~$10.00 in all (budget $20.00)")
    assert "spent" not in PlainProgress(Stats(total=100), stream=None).render()  # type: ignore[arg-type]


def test_after_kill_9_every_committed_line_has_its_cost_on_disk(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.002, latency_jitter=0.02, seed=3)
    ids = [f"q{i}" for i in range(600)]
    write_jsonl(tmp_path / "in.jsonl", _lines(600))
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    args += ["--concurrency", "8", "--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    job = tmp_path / "jobs" / "in"
    rng = random.Random(22)
    for _ in range(6):
        proc = start(*args, cwd=tmp_path)
        # called within this iteration only: B023's late binding cannot bite
        wait_for(lambda: (job / "spend.json").exists() or proc.poll() is not None)  # noqa: B023
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        _, totals, _ = read_journal(job / "journal.bin")
        row = orjson.loads((job / "spend.json").read_bytes())["tokens"]["m"]
        assert row["answers"] >= totals.ok  # the spend file is saved before each record
        assert row["prompt_tokens"] >= totals.prompt_tokens
        assert row["completion_tokens"] >= totals.completion_tokens
    assert batchq(*args, cwd=tmp_path).returncode == 0
    assert_exactly_once(job, ids)
    # An answer missing from the file came after the last save before a kill: its line
    # was not committed either, so it was sent again, and that answer is counted.
    answers = orjson.loads((job / "spend.json").read_bytes())["tokens"]["m"]["answers"]
    assert 600 <= answers <= server.stats()["by_status"]["200"]
    assert _spent_on_disk(job) <= _mock_bill(server.stats()) + 1e-9


def test_cached_prompt_tokens_are_priced_apart_end_to_end(
    tmp_path: Path, hostile: Callable[[Any], HostileServer]
) -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 100}
    usage["prompt_tokens_details"] = {"cached_tokens": 600}  # type: ignore[assignment]

    async def cached(request: web.Request, body: bytes) -> web.StreamResponse:
        answer = {"id": "x", "object": "chat.completion", "choices": [], "usage": usage}
        return web.json_response(answer)

    server = hostile(cached)
    write_jsonl(tmp_path / "in.jsonl", _lines(5))
    done = batchq(
        *("run", "in.jsonl", "--base-url", server.url, "--model", "m", "--json-summary"),
        *("--price-in", "2", "--price-out", "8", "--price-cached-in", "0.5"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    each = (400 * 2 + 600 * 0.5 + 100 * 8) / 1e6
    assert orjson.loads(done.stdout)["cost"]["spent"] == pytest.approx(5 * each)
    job = tmp_path / "jobs" / "in"  # batchq view and report, and the history they chart
    assert picture(open_folder(job))["figures"]["cost"] == pytest.approx(5 * each)
    assert read_history(job)[-1]["cost"] == pytest.approx(5 * each)


def test_a_budget_too_small_for_one_request_sends_nothing_and_says_what_would_do(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(3))
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", *prices]
    done = batchq(*args, "--max-cost", "0.01", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert server.stats()["requests"] == 0
    assert "$0.00 spent of $0.0100 (--max-cost), 3 lines pending" in done.stderr
    command = shlex.split(done.stderr.strip().splitlines()[-1].partition("to go on: ")[2])
    budget = float(command[command.index("--max-cost") + 1])
    assert budget >= _bill(104, 50)  # the worst of one request: its prompt and max_tokens
    assert batchq(*command[1:], cwd=tmp_path).returncode in (0, 4)
    assert server.stats()["requests"] >= 1


def test_a_budget_counts_every_answer_a_request_asks_for(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [{**line, "n": 8} for line in _lines(3)])
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", *prices]
    # One answer's worst fits (about $0.20); eight, billed 8 × max_tokens, do not ($0.90).
    done = batchq(*args, "--max-cost", "0.5", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert server.stats()["requests"] == 0
    command = shlex.split(done.stderr.strip().splitlines()[-1].partition("to go on: ")[2])
    assert float(command[command.index("--max-cost") + 1]) >= _bill(104, 8 * 50)


def test_status_sums_the_cost_of_a_sharded_job(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(20))
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    for shard in ("0/2", "1/2"):
        args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--shard", shard]
        assert batchq(*args, *prices, cwd=tmp_path).returncode == 0
    status = orjson.loads(batchq("status", "jobs/in", "--json", cwd=tmp_path).stdout)
    assert status["cost"]["spent"] == pytest.approx(_mock_bill(server.stats()))
    assert all(s["spent"] > 0 for s in status["shards"]) and len(status["shards"]) == 2


def test_a_prices_table_added_to_job_toml_by_hand_prices_the_job(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(10))
    assert (
        batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", cwd=tmp_path).returncode
        == 0
    )
    toml = tmp_path / "jobs" / "in" / "job.toml"
    assert "prices" not in toml.read_text()  # no empty table in the way of the user's
    with toml.open("a") as f:
        f.write(f'\n[prices."m"]\nin = {PRICE_IN}\nout = {PRICE_OUT}\n')
    status = orjson.loads(batchq("status", "jobs/in", "--json", cwd=tmp_path).stdout)
    assert status["cost"]["spent"] == pytest.approx(_mock_bill(server.stats()))


def test_many_in_flight_wait_for_room_and_the_budget_is_used_up_to_one_request(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.05)
    write_jsonl(tmp_path / "in.jsonl", _lines(200))
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--concurrency", "32"]
    done = batchq(*args, *prices, "--max-cost", "5", cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    billed = _mock_bill(server.stats())
    worst = _bill(len(orjson.dumps(_lines(1)[0])), 50)  # a token a byte of (more than) its body
    # 32 in flight at their worst would be 6.5: the gate held requests back until the
    # answers (each under its worst) made room, and stopped only when one more could not fit
    # even with nothing in flight.
    assert 5.0 - worst < billed <= 5.0
    assert server.stats()["max_in_flight"] > 1
    assert "sets no max_tokens" not in done.stderr


def test_prompts_of_a_token_a_character_stay_within_the_budget(
    tmp_path: Path, hostile: Callable[..., HostileServer]
) -> None:
    """Chinese makes about a token a character, four times the characters / 4 that pace
    --tpm: reserved at that estimate, 20 first requests in flight passed the budget."""
    prompts: list[int] = []

    async def per_character(request: web.Request, body: bytes) -> web.StreamResponse:
        prompts.append(len(prompt_of(body)))
        usage = {"prompt_tokens": prompts[-1], "completion_tokens": 1}
        return completion("好", usage={**usage, "total_tokens": prompts[-1] + 1})

    server = hostile(per_character)
    write_jsonl(tmp_path / "in.jsonl", [chat("请" * 4000, f"q{i}") for i in range(100)])
    prices = ["--price-in", "1", "--price-out", "1", "--max-tokens", "1", "--max-cost", "0.03"]
    args = ["--base-url", server.url, "--model", "qwen-max", "--concurrency", "20"]
    done = batchq("run", "in.jsonl", *args, *prices, cwd=tmp_path)
    assert done.returncode == 4, done.stderr
    assert sum(p + 1 for p in prompts) / 1e6 <= 0.03, prompts  # $0.004 each
    assert len(prompts) >= 3  # and it was spent, up to one request's worst


def test_a_budget_warns_once_of_requests_that_set_no_max_tokens(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", f"q{i}") for i in range(5)])
    prices = ["--price-in", "1", "--price-out", "1", "--max-cost", "100"]
    done = batchq(
        "run", "in.jsonl", "--base-url", server.url, "--model", "m", *prices, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("sets no max_tokens: the budget counts such requests at 4,096") == 1


def test_invalid_answers_asked_again_cost_and_count_against_the_budget(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(invalid_json_rate=0.4, seed=11)
    write_jsonl(tmp_path / "in.jsonl", _lines(60))
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--json-mode"]
    args += ["--reask", "--max-invalid", "3", "--json-summary", "-q"]
    args += ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    stopped = batchq(*args, "--max-cost", "4", cwd=tmp_path)
    assert stopped.returncode == 4, stopped.stderr
    figures = orjson.loads(stopped.stdout)
    assert figures["this_run"]["invalid_answers"] > 0  # asked again: extra paid requests
    billed = _mock_bill(server.stats())
    assert billed <= 4.0
    assert figures["cost"]["spent"] == pytest.approx(billed)
    job = tmp_path / "jobs" / "in"
    assert _spent_on_disk(job) == pytest.approx(billed)
    done = batchq(*args, "--max-cost", "1000", cwd=tmp_path)
    assert done.returncode in (0, 1), done.stderr
    assert_exactly_once(job, [f"q{i}" for i in range(60)])
    assert _spent_on_disk(job) == pytest.approx(_mock_bill(server.stats()))


def test_a_model_with_no_price_under_a_budget_stops_the_sending_nothing_lost(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    lines = _lines(30)
    lines[20]["model"] = "other"
    table = {"m": {"in": PRICE_IN, "out": PRICE_OUT}}
    options: dict[str, Any] = {"base_url": server.url, "model": "m", "prices": table}
    with pytest.raises(api.ConfigError, match="model other has no price"):
        api.run(lines, job=tmp_path / "job", concurrency=2, max_cost=100.0, **options)
    results = read_jsonl(tmp_path / "job" / "results.jsonl")
    assert 0 < len(results) == server.stats()["requests"] < 30  # every answer paid for is kept
    options["prices"] = {**table, "other": {"in": 1.0, "out": 1.0}}  # the budget stays
    assert len(api.run(lines, job=tmp_path / "job", progress=False, **options)) == 30


def test_a_damaged_spend_file_is_one_line_exit_2(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(3))
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--price-in", "1"]
    assert batchq(*args, cwd=tmp_path).returncode == 0
    (tmp_path / "jobs" / "in" / "spend.json").write_bytes(b'{"tokens": {"m": {"answers": -1}}}')
    for done in (batchq(*args, cwd=tmp_path), batchq("status", "jobs/in", cwd=tmp_path)):
        assert done.returncode == 2
        assert "spend.json is damaged" in done.stderr and "Traceback" not in done.stderr


def test_status_shows_the_cost_of_a_running_job(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server(latency=0.05)
    write_jsonl(tmp_path / "in.jsonl", _lines(400))
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q"]
    proc = start(*args, "--concurrency", "4", "--price-in", "1", "--price-out", "1", cwd=tmp_path)
    try:
        job = tmp_path / "jobs" / "in"
        # spend.json is saved before each journal record: a line done is a cost on disk
        wait_for(lambda: read_journal(job / "journal.bin")[1].ok > 0 or proc.poll() is not None)
        status = orjson.loads(batchq("status", job, "--json", cwd=tmp_path).stdout)
        assert status["state"] == "running"
        assert status["cost"]["spent"] > 0 and status["cost"]["projected"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 130


def test_the_printed_command_replaces_a_budget_typed_with_an_equals_sign(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", _lines(10))
    prices = ["--price-in", str(PRICE_IN), "--price-out", str(PRICE_OUT)]
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", *prices]
    done = batchq(*args, "--max-cost=1", cwd=tmp_path)  # room for a few of its worst
    assert done.returncode == 4, done.stderr
    command = shlex.split(done.stderr.strip().splitlines()[-1].partition("to go on: ")[2])
    assert [a for a in command if a.startswith("--max-cost")] == ["--max-cost"]
    assert batchq(*command[1:], cwd=tmp_path).returncode == 0  # the projection, and a tenth
    assert_exactly_once(tmp_path / "jobs" / "in", [f"q{i}" for i in range(10)])
