"""history.jsonl: bounded, torn-line tolerant, written by a real run; and the series made of it."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import orjson
from conftest import MockFactory
from support import batchq, chat, outputs, write_jsonl

from batchq.job.history import HISTORY, History, read_history
from batchq.show.picture import job_series, open_folder, picture
from batchq.show.view import page
from batchq.stats import Stats


class Clock:
    """Unix seconds that move only when a record is written."""

    def __init__(self, now: float = 1.7e9) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _run(history: History, stats: Stats, records: int, clock: Clock) -> None:
    """Write ``records`` records, one request done and one latency between each."""
    for _ in range(records):
        stats.ok += 1
        stats.prompt_tokens += 10
        stats.latency.add(0.5)
        history.record(stats, clock.now, pace=None)
        clock.now += history.every


def test_the_history_is_thinned_to_its_bound_and_keeps_every_count(tmp_path: Path) -> None:
    clock = Clock()
    history = History(tmp_path, max_records=8, every=2.0, clock=clock)
    stats = Stats(total=1_000)
    _run(history, stats, 100, clock)
    history.close()
    records = read_history(tmp_path)
    assert 4 <= len(records) <= 8  # thinned to half each time it reached the bound
    # 100 records into 8 lines: the interval doubled each time the file was thinned
    assert history.every > 2.0 and math.log2(history.every / 2.0).is_integer()
    assert records[-1]["ok"] == 100  # the newest is always kept, and counts everything
    assert records[-1]["prompt_tokens"] == 1_000
    oks = [r["ok"] for r in records]
    assert oks == sorted(oks) and len(set(oks)) == len(oks)
    series = job_series([records])
    assert series["t"] == [r["t"] for r in records]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    clock = Clock()
    history = History(tmp_path, clock=clock)
    _run(history, Stats(), 3, clock)
    history.close()
    with (tmp_path / HISTORY).open("ab") as f:
        f.write(b'{"t": 17960, "done": 4')  # a crash in the middle of a record
    assert [r["ok"] for r in read_history(tmp_path)] == [1, 2, 3]


def test_a_damaged_record_s_fields_count_as_missing(tmp_path: Path) -> None:
    """A line edited by hand or by another tool: a report of it, not a crash (exit 70)."""
    good = {"t": 1.0, "run": 1.0, "done": 1, "retries": {"429": 1}, "in_flight": 2, "pace": 1.0}
    hostile = {"t": 2.0, "run": 1.0, "done": 2, "retries": [1], "in_flight": "x", "pace": {}}
    other = {"t": 3.0, "run": 1.0, "done": 3, "retries": "x", "p50": "slow", "allowance": []}
    series = job_series([[good, hostile, other]])
    assert series["done"] == [1, 2, 3]
    assert series["in_flight"] == [2, None, None]
    sharded = job_series([[good, hostile], [good, other]])  # shards add their gauges up
    assert sharded["done"][-1] == 5 and sharded["in_flight"][-1] is None


def test_a_damaged_progress_json_of_a_live_process_is_no_crash(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    """progress.json edited outside batchq: its figures count as missing (exit 70 before)."""
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("q", "r")])
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = tmp_path / "jobs" / "in"
    live = {"pid": os.getpid(), "updated": time.time(), "elapsed_s": "x", "in_flight": "y"}
    (job / "progress.json").write_bytes(orjson.dumps(live))  # this process: alive
    shown = picture(open_folder(job))["figures"]
    assert shown["state"] == "running" and shown["in_flight"] == 0


def test_a_resumed_run_keeps_the_interval_and_adds_to_the_counts(tmp_path: Path) -> None:
    clock = Clock()
    first = History(tmp_path, max_records=4, clock=clock)
    stats = Stats()
    _run(first, stats, 10, clock)
    first.close()
    grown = first.every
    assert grown > 2.0
    clock.now += 3_600  # resumed an hour later
    second = History(tmp_path, max_records=4, clock=clock)
    assert second.every == grown  # a resume does not start the thinning over
    again = Stats(ok_before=stats.ok)  # a new run's counters start at zero
    _run(second, again, 2, clock)
    second.close()
    series = job_series([read_history(tmp_path)])
    tokens_rate = series["prompt_tps"]
    # the first point of the second run starts a new line: no rate across the gap
    assert tokens_rate[-2] is None
    assert tokens_rate[-1] == round(10 / second.every, 3)  # not negative: the counts go on
    assert series["done"][-1] == 12


def test_a_run_writes_a_history_that_ends_where_its_files_do(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    prompts = [chat(f"q{i}", f"r{i}") for i in range(300)]
    prompts.append(chat("refused [[mock:status=400]]", "bad"))
    write_jsonl(tmp_path / "in.jsonl", prompts)
    done = batchq(
        "run",
        "in.jsonl",
        "--base-url",
        server.url,
        "--model",
        "m",
        "--price-in",
        "1",
        "--price-out",
        "2",
        "-q",
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    job = tmp_path / "jobs" / "in"
    results, errors = outputs(job)
    records = read_history(job)
    assert records, "no history written"
    last = records[-1]
    assert (last["done"], last["ok"], last["failed"]) == (301, len(results), len(errors))
    tokens = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in results)
    assert last["prompt_tokens"] == tokens
    assert last["cost"] > 0
    shown = picture(open_folder(job))
    assert shown["figures"]["state"] == "finished"
    assert shown["figures"]["failed"] == 1
    codes = shown["failures"]["codes"]
    assert [(c["code"], c["count"]) for c in codes] == [(errors[0]["error"]["code"], 1)]
    assert codes[0]["first"]["custom_id"] == "bad"
    assert orjson.loads(orjson.dumps(shown)) == shown  # all of it JSON, for the page


def test_a_sharded_jobs_series_add_up_its_shards(tmp_path: Path, mock_server: MockFactory) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", f"r{i}") for i in range(200)])
    for shard in ("0/2", "1/2"):  # one after the other: the second adds to the first's
        done = batchq(
            "run",
            "in.jsonl",
            "--base-url",
            server.url,
            "--model",
            "m",
            "--shard",
            shard,
            "-q",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
    job = tmp_path / "jobs" / "in"
    shown = picture(open_folder(job))
    assert shown["figures"]["done"] == shown["figures"]["total"] == 200
    assert shown["figures"]["shards"] == 2
    series = shown["series"]
    shards = [read_history(job / f"shard-{i}-of-2") for i in range(2)]
    assert len(series["t"]) == sum(len(records) for records in shards)
    assert series["done"][-1] == 200  # the last point counts both shards' lines
    halfway = len(shards[0]) - 1
    assert series["done"][halfway] == shards[0][-1]["done"]


def test_a_run_through_batches_keeps_a_history_too(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(batch_time_scale=86_400.0, batch_lines_per_second=100.0)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", f"r{i}") for i in range(120)])
    done = batchq(
        "run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "gpt-4o-mini",
        "--via", "batch", "--batch-poll", "0.02", "--batch-max-lines", "50", "-q",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = read_history(tmp_path / "job")
    assert len(records) >= 2  # the first look at the batches, and the end
    assert records[-1]["done"] == records[-1]["ok"] == 120
    assert records[0]["done"] < 120
    assert picture(open_folder(tmp_path / "job"))["series"]["done"][-1] == 120


def test_a_report_keeps_hostile_text_inside_its_data(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    hostile = "</script><!--<script>alert(1)</script> [[mock:status=400]]"
    write_jsonl(tmp_path / "in.jsonl", [chat("fine", "a"), chat(hostile, "</script>")])
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    folder = open_folder(tmp_path / "jobs" / "in")
    shown = picture(folder)
    assert shown["failures"]["codes"][0]["first"]["custom_id"] == "</script>"
    html = page(folder, shown)
    # the data adds no tag: the only scripts are the boot line, uPlot and the page's own
    assert html.count("<script") == 3 and html.count("</script>") == 3
    assert "<!--" not in html
