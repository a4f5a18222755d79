"""`batchq run --metrics-port`: Prometheus metrics of a running job, scraped over a socket.

End to end: a real `batchq` process against the built-in endpoint, scraped while it
runs; every scrape must parse as the text exposition format 0.0.4 (the strict parser
below), counters must never go back, and what they say must agree with the summary
the process prints at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import socket
import subprocess
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MockFactory
from support import batchq, chat, outputs, start, wait_for, write_jsonl

import batchq as api
from batchq.auto import run_auto
from batchq.batch.executor import BatchOptions
from batchq.config import Settings
from batchq.errors import ConfigError
from batchq.job.folder import Job, open_job
from batchq.live.runner import RunOptions
from batchq.show.metrics import CONTENT_TYPE, Metrics, metrics_of, served
from batchq.show.progress import summary
from batchq.stats import Stats

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]

# --- A strict parser of the text exposition format 0.0.4 ---------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")
_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?|[+-]Inf|NaN")
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count", "")}


def parse(text: str) -> tuple[Series, dict[str, str]]:
    """Every sample of ``text`` by (name, labels), and each family's type; an assertion
    fails on anything the format (or Prometheus' own parser) would refuse."""
    assert text.endswith("\n"), "the last line must end with a newline"
    kinds: dict[str, str] = {}
    helped: set[str] = set()
    family: str | None = None
    series: Series = {}
    for line in text[:-1].split("\n"):
        if line.startswith(("# HELP ", "# TYPE ")):
            _, keyword, name, *rest = line.split(" ", 3)
            assert re.fullmatch(_NAME, name), line
            if keyword == "HELP":
                assert name not in helped, f"two HELP lines for {name}"
                helped.add(name)
                continue
            assert rest and rest[0] in ("counter", "gauge", "histogram", "summary", "untyped")
            assert name not in kinds, f"two TYPE lines for {name}"
            assert not any(n == name or n.startswith(name + "_") for n, _ in series), (
                f"TYPE of {name} after its samples"
            )
            kinds[name], family = rest[0], name
            continue
        assert not line.startswith("#") or line.startswith("# "), line
        if line.startswith("#") or not line:
            assert line, "an empty line"
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, f"not a sample: {line!r}"
        name, labels_text, value = match.groups()
        assert _FLOAT.fullmatch(value), f"not a Go float: {value!r}"
        assert family is not None, f"{name} has no TYPE"
        allowed = [family + s for s in _SUFFIXES.get(kinds[family], ("",))]
        assert name in allowed, f"{name} outside its family {family} (not contiguous?)"
        labels = _labels(labels_text or "")
        key = (name, frozenset(labels.items()))
        assert key not in series, f"a series twice: {line}"
        series[key] = float(value)
    for name, kind in kinds.items():
        if kind == "counter":
            assert name.endswith("_total"), f"counter {name} without _total"
        if kind == "histogram":
            _check_histogram(name, series)
    return series, kinds


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    at = 0
    while at < len(text):
        match = _LABEL.match(text, at)
        assert match, f"bad labels: {text!r}"
        name, raw = match[1], match[2]
        assert name not in labels, f"label {name} twice"
        labels[name] = re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], raw)
        at = match.end()
    return labels


def _check_histogram(name: str, series: Series) -> None:
    """Per label set: ``le`` ascending and ending at +Inf, counts cumulative, +Inf = _count."""
    buckets: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = defaultdict(list)
    for (sample, labels), value in series.items():
        if sample == f"{name}_bucket":
            le = dict(labels)["le"]
            buckets[labels - {("le", le)}].append((float(le), value))
    assert buckets, f"histogram {name} has no buckets"
    for labels, pairs in buckets.items():
        bounds = [le for le, _ in pairs]
        counts = [n for _, n in pairs]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds)
        assert bounds[-1] == math.inf
        assert counts == sorted(counts), "buckets are not cumulative"
        assert counts[-1] == series[(f"{name}_count", labels)]
        assert (f"{name}_sum", labels) in series


def value(series: Series, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for (n, ls), v in series.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name} {labels}: {len(found)} samples"
    return found[0]


def counters(series: Series, kinds: dict[str, str]) -> Series:
    """The samples that may never go down: counters and histograms."""
    monotonic = [n for n, k in kinds.items() if k in ("counter", "histogram")]
    return {key: v for key, v in series.items() if any(key[0].startswith(n) for n in monotonic)}


def scrape(url: str) -> tuple[Series, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"] == CONTENT_TYPE
        return parse(answer.read().decode())


# --- The command line ---------------------------------------------------------------------

N = 120
STRAGGLER = 6.0  # seconds the last line is held at the endpoint


def _input(tmp: Path) -> Path:
    """N lines: retried ones (503 twice, a 500, a 429), two failures, a straggler last."""
    lines: list[Any] = [chat(f"question {i}", custom_id=f"q{i}") for i in range(1, N)]
    for i in range(2, 6):
        lines[i] = chat(f"[[mock:fail=2]] question {i + 1}", custom_id=f"q{i + 1}")
    lines[10] = chat("[[mock:fail=1:500]] question 11", custom_id="q11")
    lines[12] = chat("[[mock:fail=1:429]] question 13", custom_id="q13")
    lines[20] = chat("[[mock:status=400]] question 21", custom_id="q21")
    lines.append(chat(f"[[mock:sleep={STRAGGLER}]] the last", custom_id="last"))
    path = write_jsonl(tmp / "in.jsonl", lines)
    text = path.read_bytes().split(b"\n")
    text[30] = b"{not json"  # a bad line: failed, never sent
    path.write_bytes(b"\n".join(text))
    return path


def _metrics_url(process: subprocess.Popen[str]) -> str:
    """The URL the run's notice names, read from its stderr as it comes: on loopback."""
    assert process.stderr is not None
    for line in process.stderr:
        if match := re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)$", line):
            return match[1]
    raise AssertionError(f"no metrics notice; exit {process.wait()}")


def test_scraped_during_a_run_the_counters_agree_with_the_summary(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.01)
    job = tmp_path / "nightly"
    process = start(
        "run", _input(tmp_path), "--job", job, "--base-url", server.url, "--model", "m",
        "--metrics-port", "0", "--no-hedge", "--price-in", "1", "--price-out", "2",
        "--max-cost", "100", "--json-summary", cwd=tmp_path,
    )  # fmt: skip
    try:
        url = _metrics_url(process)
        scrapes = [scrape(url)]

        def only_the_straggler_left() -> bool:
            scrapes.append(scrape(url))
            series = scrapes[-1][0]
            done = value(series, "batchq_job_requests_done")
            # The cost, like the gauges, is copied from the meter by the runner's timer (every
            # 0.2 s): wait for the copy made after the last answer's tokens were counted.
            tokens = value(series, "batchq_tokens_total", kind="prompt") + 2 * value(
                series, "batchq_tokens_total", kind="completion"
            )
            cost = value(series, "batchq_cost_total")
            caught_up = abs(cost - tokens / 1e6) < 2e-6
            return done == N - 1 and value(series, "batchq_in_flight") == 1 and caught_up

        wait_for(only_the_straggler_left, timeout=60)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 1, err  # finished, two lines failed
    figures = orjson.loads(out)
    run = figures["this_run"]
    held, _ = scrapes[-1]  # while the straggler was the only request at the endpoint
    results, _ = outputs(job)
    [last] = [r for r in results if r["custom_id"] == "last"]
    usage = last["response"]["body"]["usage"]

    labels = {"job": "nightly", "shard": "0/1"}
    assert value(held, "batchq_requests_total", status="ok", **labels) == run["succeeded"] - 1
    assert value(held, "batchq_requests_total", status="failed") == run["failed"] == 2
    causes = {dict(ls)["cause"]: v for (n, ls), v in held.items() if n == "batchq_retries_total"}
    assert causes == run["retries_by_cause"] == {"503": 8, "500": 1, "429": 1}
    assert value(held, "batchq_rate_limited_total") == run["rate_limited"] == 1
    prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
    assert value(held, "batchq_tokens_total", kind="prompt") == run["prompt_tokens"] - prompt
    assert (
        value(held, "batchq_tokens_total", kind="completion")
        == run["completion_tokens"] - completion
    )
    last_cost = (prompt * 1 + completion * 2) / 1e6
    assert value(held, "batchq_cost_total") == pytest.approx(
        run["cost"]["spent"] - last_cost, abs=1e-5
    )
    # a new job: what it spent is what this process spent
    assert value(held, "batchq_job_cost") == pytest.approx(value(held, "batchq_cost_total"))
    assert value(held, "batchq_job_budget") == 100
    assert value(held, "batchq_request_duration_seconds_count") == run["succeeded"] - 1
    assert value(held, "batchq_request_duration_seconds_sum") > 0
    assert value(held, "batchq_job_requests") == N
    assert value(held, "batchq_in_flight_allowance") >= 1
    assert value(held, "batchq_hedges_total") == 0
    for (before, kinds), (after, _) in itertools.pairwise(scrapes):
        grown = counters(after, kinds)
        for key, was in counters(before, kinds).items():
            assert grown.get(key, -1) >= was, f"{key} went back"
    with pytest.raises(OSError):  # the run is over: so is its endpoint
        urllib.request.urlopen(url, timeout=5)


def test_a_run_by_batch_shows_its_open_batches_while_they_run(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # A minute a real second: validating and finalizing take half a second each.
    server = mock_server(batch_time_scale=60.0, batch_lines_per_second=10.0)
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}", custom_id=f"q{i}") for i in range(40)])
    process = start(
        "run", "in.jsonl", "--base-url", server.url, "--model", "m", "--via", "batch",
        "--batch-max-lines", "20", "--batch-poll", "0.02", "--metrics-port", "0",
        "--json-summary", cwd=tmp_path,
    )  # fmt: skip
    try:
        url = _metrics_url(process)
        scrapes = [scrape(url)[0]]

        def batches_open() -> bool:
            scrapes.append(scrape(url)[0])
            return value(scrapes[-1], "batchq_batches_open") == 2

        wait_for(batches_open, timeout=60)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 0, err
    run = orjson.loads(out)["this_run"]
    assert value(scrapes[-1], "batchq_batches_created_total") == run["batches"]["created"] == 2
    assert value(scrapes[-1], "batchq_requests_total", status="ok") < run["succeeded"] == 40


def test_a_port_in_use_is_one_line_and_exit_2_before_anything_is_sent(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("hello")])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = batchq(
            "run", "in.jsonl", "--base-url", server.url, "--model", "m",
            "--metrics-port", str(port), cwd=tmp_path,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert errors == [
        f"batchq: error: --metrics-port {port} on 127.0.0.1: the port is in use; "
        "choose another, or 0 for a free one"
    ]
    assert "Traceback" not in done.stderr
    assert server.stats()["requests"] == 0
    status = batchq("status", "jobs/in", "--json", cwd=tmp_path)
    assert orjson.loads(status.stdout)["pending"] == 1  # nothing lost, nothing done


def test_a_second_run_of_a_running_job_is_told_it_runs_not_that_the_port_is_taken(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("[[mock:sleep=30]] held")])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = ["run", "in.jsonl", "--base-url", server.url, "--model", "m", "--metrics-port", port]
    first = start(*args, cwd=tmp_path)
    try:
        _metrics_url(first)  # it holds the job, and the port
        second = batchq(*args, cwd=tmp_path)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert "is already being run by process" in second.stderr
    assert "port" not in second.stderr


def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat("hello")])
    done = batchq("run", "in.jsonl", "--metrics-port", "70000", cwd=tmp_path)
    assert done.returncode == 2
    assert "--metrics-port" in done.stderr
    with pytest.raises(ConfigError, match="metrics_port"):
        api.run(["hello"], metrics_port=-1, base_url="http://127.0.0.1:9/v1")


# --- The Python API, shards, --via auto -------------------------------------------------


async def test_the_api_serves_a_shard_s_metrics_while_it_streams(
    tmp_path: Path, mock_server: MockFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = mock_server(latency=0.01)
    caplog.set_level(logging.INFO, logger="batchq")
    # The second shard takes the second half, which ends in lines held at the endpoint.
    requests = [f"question {i:02d}" for i in range(36)] + ["[[mock:sleep=30]] held 00"] * 4
    job = tmp_path / "colours"
    stream = api.stream(
        requests, job=job, shard="1/2", model="m", base_url=server.url, metrics_port=0,
        rpm=6000, progress=False,
    )  # fmt: skip
    async with stream as results, aiohttp.ClientSession() as client:
        seen = 0
        async for _ in results:
            seen += 1
            if seen == 5:
                break
        [url] = [m[1] for r in caplog.records if (m := re.search(r"(http://\S+)", r.message))]
        deadline = time.monotonic() + 30
        while True:  # until the runner's timer (every 0.2 s) has reported the pace
            async with client.get(url) as answer:
                assert answer.headers["Content-Type"] == CONTENT_TYPE
                series, kinds = parse(await answer.text())
            if "batchq_pace_per_second" in kinds:
                break
            assert time.monotonic() < deadline, "the pace was never reported"
            await asyncio.sleep(0.01)
    labels = {"job": "colours", "shard": "1/2"}
    assert 0 < value(series, "batchq_job_requests", **labels) < 40
    assert value(series, "batchq_requests_total", status="ok", **labels) >= 5  # those yielded
    # --rpm 6000 paced 2% under the limit (limiter.MARGIN), as the runner reports it
    assert value(series, "batchq_pace_per_second", limit="requests") == pytest.approx(98)
    assert "metrics_port = 0" in (job / "job.toml").read_text()


async def test_the_phases_of_via_auto_add_up_and_agree_with_the_summary(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(
        batch_time_scale=86_400.0, batch_lines_per_second=100.0, batch_step_seconds=60.0
    )
    lines: list[Any] = [chat(f"question {i}", custom_id=f"q{i}") for i in range(30)]
    lines[4] = {"custom_id": "cmp", "url": "/v1/completions", "body": {"model": "q", "prompt": "x"}}
    write_jsonl(tmp_path / "in.jsonl", lines)
    base = server.url.removesuffix("/v1") + "/compatible-mode/v1"  # DashScope: live for cmp
    overrides = {
        "base_url": base, "model": "qwen", "via": "auto", "deadline": "1h",
        "batch_poll": 0.02, "metrics_port": 0, "price_in": 1.0, "price_out": 1.0,
    }  # fmt: skip
    job, _ = open_job(
        tmp_path / "in.jsonl",
        job_dir=tmp_path / "job",
        overrides=overrides,
        defaults={},
        default_base_url=None,
        force=False,
    )
    notices: list[str] = []
    metrics = metrics_of(job, lambda message, level=0: notices.append(message))
    assert metrics is not None
    live, batch = RunOptions(on_stats=metrics.watch), BatchOptions(on_stats=metrics.watch)
    stats = await served(metrics, run_auto(job, live, batch))
    assert [s.ok for s in metrics.runs] == [29, 1]  # the batch phase, then the live one
    series, _ = parse(metrics.render().decode())
    run = summary(stats, results="", errors="", resume="", prices=(1.0, 1.0))["this_run"]
    assert value(series, "batchq_requests_total", status="ok") == run["succeeded"] == 30
    assert value(series, "batchq_tokens_total", kind="prompt") == run["prompt_tokens"]
    assert value(series, "batchq_tokens_total", kind="completion") == run["completion_tokens"]
    assert value(series, "batchq_cost_total") == pytest.approx(run["cost"]["spent"], abs=1e-5)
    assert value(series, "batchq_batches_created_total") == run["batches"]["created"] == 1
    assert value(series, "batchq_batches_open") == 0
    assert sum(n.startswith("metrics: http://127.0.0.1:") for n in notices) == 1  # one port


async def test_label_values_are_escaped_and_an_unopened_run_renders(tmp_path: Path) -> None:
    name = 'a "quoted"\\job\nname'
    job = Job(
        dir=tmp_path / name,
        settings=Settings(input="in.jsonl", metrics_port=0),
        input=tmp_path / "in.jsonl",
        results=tmp_path / "r",
        errors=tmp_path / "e",
    )
    metrics = Metrics(job, lambda message, level=0: None)
    series, _ = parse(metrics.render().decode())  # nothing opened yet: zeros, still valid
    assert value(series, "batchq_requests_total", status="ok", job=name) == 0
    stats = Stats(total=10, ok_before=3)
    stats.latency.add(0.2)
    stats.latency.add(5000.0)  # past the last exported bound: only in +Inf
    stats.retried("timeout")
    stats.invalid_answers = 2
    await metrics.watch(stats)
    await metrics.aclose()
    series, _ = parse(metrics.render().decode())
    assert value(series, "batchq_request_duration_seconds_bucket", le="0.2441") == 1
    assert value(series, "batchq_request_duration_seconds_bucket", le="3261") == 1
    assert value(series, "batchq_request_duration_seconds_bucket", le="+Inf") == 2
    assert value(series, "batchq_request_duration_seconds_sum") == pytest.approx(5000.2)
    assert value(series, "batchq_retries_total", cause="timeout") == 1
    assert value(series, "batchq_invalid_answers_total") == 2
    assert value(series, "batchq_job_requests_done") == 3


GOOD = (
    "# HELP x_total Things.\n# TYPE x_total counter\n"
    'x_total{job="j"} 1\n'
    "# TYPE h histogram\n"
    'h_bucket{le="0.5"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\n'
)


@pytest.mark.parametrize(
    "broken",
    [
        GOOD.removesuffix("\n"),  # no newline at the end
        GOOD.replace("# TYPE x_total counter\n", ""),  # a sample without its TYPE
        GOOD.replace("x_total counter", "x counter").replace("x_total{", "x{"),  # no _total
        GOOD + 'x_total{job="j"} 2\n',  # a series twice (and outside its family)
        GOOD.replace('job="j"', 'job="a\\q"'),  # an escape the format does not have
        GOOD.replace('job="j"', "job=j"),  # a label value without quotes
        GOOD.replace("} 1\n", "} 1_000\n", 1),  # Python reads it; Prometheus does not
        GOOD.replace('le="0.5"} 1', 'le="0.5"} 3'),  # buckets not cumulative
        GOOD.replace("h_count 2", "h_count 3"),  # +Inf is not the count
        GOOD.replace('h_bucket{le="+Inf"} 2\n', ""),  # no +Inf bucket
        GOOD.replace("# HELP x_total Things.\n", "# HELP x_total A.\n# HELP x_total B.\n"),
    ],
)
def test_the_parser_refuses_what_prometheus_would(broken: str) -> None:
    parse(GOOD)
    with pytest.raises(AssertionError):
        parse(broken)
