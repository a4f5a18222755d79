"""batchq from Python, measured against its command line (issue 14).

1. **``batchq.run`` against ``batchq run``.** One ``batchq mock-server`` (its own process, no
   latency) serves both; both read the same N-line input (``harness.write_input``; 10,000
   lines) into a fresh job folder each run. The command line is
   ``python -m batchq run IN --job DIR --base-url URL --model m -q``; the API is a child
   ``python`` that calls ``batchq.run(IN, job=DIR, base_url=URL, model="m", progress=False)``
   and checks it got N results in input order. The two alternate, the first of a round
   changing from round to round so drift on the machine hits both alike. req/s is N / the
   child's wall time (start-up included, for both); goal: API ≥ 0.9× the command line.
   Each round also runs the API once more under ``tracemalloc`` (which slows it, so apart
   from the timed runs) for the memory of the list of results: what ``del results`` frees,
   per result, and the traced memory after the call minus before it (the engine's modules
   imported first, so their import is not counted).
2. **``batchq export`` of a finished M-line job** (1,000,000 lines, 1% of them failed),
   synthesised without sending M requests but by batchq's own code, so its files are what a
   run leaves: ``batchq.job.folder.open_job``, ``pin_input`` and ``save_settings`` make job.toml and
   state.json for the M-line input, as ``batchq run`` does; ``batchq.job.journal.Journal``
   appends ``Outcome``s whose lines ``batchq.records.result_line`` / ``error_line`` render,
   committing every 1,000 lines, each batch shuffled (outputs are in completion order, not
   input order). The answers are real ones: the mock's bodies for the input's first 1,000
   lines, from a ``batchq run`` of them, reused in turn; the failures are HTTP 500s
   rendered as the runner renders a ``ServerError``. ``batchq status`` must then say M done,
   and a resumed ``batchq run`` must find nothing to send. Timed:
   ``python -m batchq export JOB -o OUT.jsonl`` and ``... -o OUT.csv`` (alternating), with
   the child's peak RSS; the first of each is checked to hold M lines in input order.
   Goal: peak RSS ≤ 100 MiB.

Figures are medians of ``--runs`` rounds (default 3) with min–max. The tables are printed
and appended to ``benchmarks/API.md`` under the commit measured, newest last; ``--quick``
(2,000 and 50,000 lines) only prints, as a smoke test.

    python benchmarks/api.py [--quick] [--runs N]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import harness
import orjson
from harness import BenchError, Spread, table

from batchq.errors import ServerError
from batchq.job.folder import job_lock, open_job, pin_input, save_settings
from batchq.job.journal import Journal
from batchq.records import Outcome, Request, error_line, result_line

HERE = Path(__file__).resolve().parent
BATCHQ = Path(sys.executable).parent / "batchq"
REPORT = HERE / "API.md"
PYTHON = sys.executable

SAMPLE_LINES = 1_000  # real answers, reused for the synthesised job
COMMIT_EVERY = 1_000  # lines per journal record of the synthesised job
FAIL_EVERY = 100  # every 100th line failed: 1%
RSS_GOAL_MIB = 100
RATIO_GOAL = 0.9
_MARK = b'"batchq":{"line":'


@dataclasses.dataclass(frozen=True, slots=True)
class Mode:
    name: str
    api_lines: int
    export_lines: int


QUICK = Mode("quick", 2_000, 50_000)
FULL = Mode("full", 10_000, 1_000_000)


def say(message: str) -> None:
    print(f"[api] {message}", file=sys.stderr, flush=True)


# --- the children --------------------------------------------------------------------------

# argv: input, job, base URL, N. Checks what it got, so a fast wrong answer cannot pass.
API_RUN = """\
import sys, batchq
path, job, url, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
results = batchq.run(path, job=job, base_url=url, model="m", progress=False)
assert [r.line for r in results] == list(range(1, n + 1)), "not N results in input order"
assert all(r.ok and r.text for r in results), "a request failed"
"""

# The same call under tracemalloc; prints the figures as one JSON line.
API_MEMORY = """\
import gc, json, sys, time, tracemalloc, batchq
import batchq.live.runner, batchq.live.transport  # the engine loads on the first run: not the list
path, job, url, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tracemalloc.start()
gc.collect()
before = tracemalloc.get_traced_memory()[0]
results = batchq.run(path, job=job, base_url=url, model="m", progress=False)
gc.collect()
after = tracemalloc.get_traced_memory()[0]
assert len(results) == n and all(r.ok for r in results)
del results
gc.collect()
freed = after - tracemalloc.get_traced_memory()[0]
tracemalloc.stop()
start = time.perf_counter()  # what the list costs to build: the same again, untraced
again = list(batchq.open_job(job).results())
rebuild = time.perf_counter() - start
assert len(again) == n
print(json.dumps({"retained": after - before, "freed": freed, "rebuild": rebuild}), flush=True)
"""


def last_json(log: Path) -> dict[str, Any]:
    """The last JSON object line of a child's log (``measure`` sends stdout there)."""
    for line in reversed(log.read_bytes().splitlines()):
        if line.startswith(b"{"):
            found: dict[str, Any] = orjson.loads(line)
            return found
    raise BenchError(f"no JSON line in {log}")


class Bench:
    """The temp dir, numbered job folders and logs, and measuring one child."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._n = 0

    def fresh(self, name: str) -> Path:
        self._n += 1
        return self.tmp / f"{name}-{self._n}"

    def measure(self, cmd: Sequence[str | Path], log: Path, timeout: float) -> harness.Run:
        return harness.measure(cmd, timeout=timeout, log=log, cwd=self.tmp)


# --- 1. batchq.run against batchq run --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    cli: harness.Run
    api: harness.Run
    memory: harness.Run  # the API under tracemalloc
    retained: int  # bytes traced after batchq.run minus before
    freed: int  # bytes that `del results` released
    rebuild: float  # seconds list(batchq.open_job(DIR).results()) takes after the run


def api_round(bench: Bench, source: Path, url: str, lines: int, n: int) -> Round:
    timeout = 60 + lines / 50  # 50 req/s would be a hang

    def cli() -> harness.Run:
        job = bench.fresh("cli")
        cmd = [PYTHON, "-m", "batchq", "run", source, "--job", job, "--base-url", url]
        run = bench.measure([*cmd, "--model", "m", "-q"], job.with_suffix(".log"), timeout)
        if harness.count_lines(job / "results.jsonl") != lines:
            raise BenchError(f"batchq run left {job / 'results.jsonl'} without {lines} lines")
        return run

    def api(script: str, name: str) -> tuple[harness.Run, Path]:
        job = bench.fresh(name)
        log = job.with_suffix(".log")
        cmd = [PYTHON, "-c", script, source, job, url, str(lines)]
        return bench.measure(cmd, log, timeout * 3), log

    # Alternate which goes first, round by round.
    if n % 2:
        cli_run, (api_run, _) = cli(), api(API_RUN, "api")
    else:
        (api_run, _), cli_run = api(API_RUN, "api"), cli()
    memory, log = api(API_MEMORY, "api-memory")
    figures = last_json(log)
    return Round(
        cli_run, api_run, memory, figures["retained"], figures["freed"], figures["rebuild"]
    )


def api_section(bench: Bench, source: Path, url: str, lines: int, runs: int) -> str:
    rounds = []
    for n in range(1, runs + 1):
        say(f"batchq run vs batchq.run, {lines:,} lines (round {n} of {runs})")
        rounds.append(api_round(bench, source, url, lines, n))

    def spread(figure: Callable[[Round], float]) -> Spread:
        return Spread.of([figure(r) for r in rounds])

    def row(label: str, pick: Callable[[Round], harness.Run]) -> list[str]:
        return [
            label,
            spread(lambda r: lines / pick(r).wall).show(),
            spread(lambda r: pick(r).wall).show(".2f"),
            spread(lambda r: pick(r).cpu).show(".2f"),
            spread(lambda r: pick(r).rss_mib).show(".0f"),
        ]

    cli = "`python -m batchq run IN --job DIR --base-url URL --model m -q`"
    api = '`batchq.run(IN, job=DIR, base_url=URL, model="m", progress=False)`'
    speed = table(
        ["client", "req/s", "wall s", "CPU s", "peak RSS MiB"],
        [row(cli, lambda r: r.cli), row(api, lambda r: r.api)],
    )
    ratio = spread(lambda r: r.cli.wall / r.api.wall)  # req/s API / req/s CLI, per round
    by_cpu = spread(lambda r: r.cli.cpu / r.api.cpu)  # steadier on a shared machine
    rss = spread(lambda r: r.api.rss_mib - r.cli.rss_mib)
    gap = spread(lambda r: r.api.wall - r.cli.wall)
    rebuild = spread(lambda r: r.rebuild)
    memory = table(
        ["list of results (under tracemalloc)", f"{lines:,} results", "per result"],
        [
            [
                "freed by `del results`",
                spread(lambda r: r.freed / 2**20).show(",.1f") + " MiB",
                spread(lambda r: r.freed / lines).show(",.0f") + " B",
            ],
            [
                "traced after `batchq.run` minus before",
                spread(lambda r: r.retained / 2**20).show(",.1f") + " MiB",
                spread(lambda r: r.retained / lines).show(",.0f") + " B",
            ],
            [
                "peak RSS of that child",
                spread(lambda r: r.memory.rss_mib).show(".0f") + " MiB",
                "",
            ],
        ],
    )
    return (
        f"### 1. `batchq.run` against `batchq run`: {lines:,} requests, built-in endpoint "
        f"(no latency)\n\n{speed}\n\n"
        f"API / CLI req/s: **{ratio.show('.2f')}** (goal ≥ {RATIO_GOAL}: "
        f"{verdict(ratio.median >= RATIO_GOAL)}); in requests per CPU second, which other "
        f"processes on the machine disturb less: {by_cpu.show('.2f')}. Peak RSS, API child "
        "minus command line: "
        f"{rss.show('+.0f')} MiB, the list of results included. Wall time, API minus "
        f"command line: {gap.show('+.2f')} s; building the list of results, timed as "
        f"`list(batchq.open_job(DIR).results())` after a run (the same code: an index of "
        f"both output files, then every line parsed): {rebuild.show('.2f')} s, "
        f"{rebuild.median / lines * 1e6:.1f} µs per result.\n\n"
        f"{memory}"
    )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- 2. batchq export of a synthesised job -------------------------------------------------


def sample_answers(bench: Bench, source: Path, url: str) -> list[tuple[str | None, bytes]]:
    """(request id, raw body) of the mock's answers to the input's first SAMPLE_LINES lines."""
    head = bench.tmp / "sample.jsonl"
    harness.copy_bytes(source, head, 0, harness.line_offset(source, SAMPLE_LINES))
    job = bench.fresh("sample")
    cmd = [PYTHON, "-m", "batchq", "run", head, "--job", job, "--base-url", url, "--model", "m"]
    bench.measure([*cmd, "-q"], job.with_suffix(".log"), 120)
    answers: dict[int, tuple[str | None, bytes]] = {}
    with (job / "results.jsonl").open("rb") as f:
        for raw in f:
            out = orjson.loads(raw)
            response = out["response"]
            body = orjson.dumps(response["body"])
            answers[out["batchq"]["line"]] = (response["request_id"], body)
    return [answers[n] for n in range(1, SAMPLE_LINES + 1)]


def outcomes(lines: int, answers: Sequence[tuple[str | None, bytes]]) -> Iterator[list[Outcome]]:
    """Every line's Outcome, as the runner renders them, in shuffled batches of COMMIT_EVERY."""
    rng = random.Random(14)
    failure = ServerError(
        500,
        {
            "error": {
                "message": "The server had an error while processing your request.",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        },
        request_id="req_bench",
    )
    for start in range(1, lines + 1, COMMIT_EVERY):
        batch = []
        for n in range(start, min(start + COMMIT_EVERY, lines + 1)):
            if n % FAIL_EVERY == 0:  # as runner._failure_from renders a ServerError
                line = error_line(
                    n,
                    f"req-{n}",
                    failure.code,
                    str(failure),
                    status=failure.status,
                    request_id=failure.request_id,
                    body=failure.body,
                    attempts=8,
                    retryable=True,
                )
                batch.append(Outcome(n, False, line))
                continue
            request_id, raw = answers[(n - 1) % len(answers)]
            body = orjson.loads(raw)
            request = Request(n, f"req-{n}", "/v1/chat/completions", b"", 0)
            line = result_line(request, 200, request_id, raw, body, attempts=1)
            usage = body["usage"]
            batch.append(Outcome(n, True, line, usage["prompt_tokens"], usage["completion_tokens"]))
        rng.shuffle(batch)  # completion order
        yield batch


def synthesise(bench: Bench, source: Path, url: str, lines: int) -> Path:
    """A finished job of ``source``'s ``lines`` lines, left as ``batchq run`` leaves one."""
    answers = sample_answers(bench, source, url)
    folder = bench.tmp / "export-job"
    job, _ = open_job(
        source,
        job_dir=folder,
        overrides={"base_url": url, "model": "m"},
        defaults={},
        default_base_url=None,
        force=False,
    )
    with job_lock(job.dir):  # what runner._open does, then the pipeline's appends
        pinned = pin_input(job)
        if pinned.requests != lines:
            raise BenchError(f"{source} holds {pinned.requests} requests, not {lines}")
        save_settings(job)
        journal = Journal(job.dir, job.results, job.errors)
        try:
            for batch in outcomes(lines, answers):
                journal.append(batch)
                journal.commit()
        finally:
            journal.close()
    check_job(folder, url, lines)
    return folder


def check_job(folder: Path, url: str, lines: int) -> None:
    """``batchq status`` says every line is done; a resumed ``batchq run`` sends nothing."""
    cmd = [PYTHON, "-m", "batchq", "status", str(folder), "--json"]
    status = orjson.loads(subprocess.run(cmd, capture_output=True, timeout=60, check=True).stdout)
    want = {"state": "finished", "total": lines, "done": lines, "failed": lines // FAIL_EVERY}
    if got := {k: v for k, v in want.items() if status[k] != v}:
        raise BenchError(f"batchq status of the synthesised job: {got}, not {want}")
    cmd = [PYTHON, "-m", "batchq", "run", str(folder), "--base-url", url, "-q", "--json-summary"]
    done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    summary = orjson.loads(done.stdout.splitlines()[-1]) if done.stdout else {}
    sent = summary.get("this_run", {})
    if summary.get("pending") != 0 or sent.get("succeeded") or sent.get("failed"):
        raise BenchError(f"a resumed run of the synthesised job did something: {done!r}")


def check_jsonl(path: Path, lines: int) -> None:
    n = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            mark = raw.rfind(_MARK)
            line = int(raw[mark + len(_MARK) :].split(b",", 1)[0])
            failed = b'"error":{"code"' in raw
            if line != n or failed != (n % FAIL_EVERY == 0):
                raise BenchError(f"{path}: line {n} is input line {line} (failed: {failed})")
    if n != lines:
        raise BenchError(f"{path} holds {n:,} lines, not {lines:,}")


def check_csv(path: Path, lines: int) -> None:
    n = 0
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        if next(rows)[0] != "custom_id":
            raise BenchError(f"{path} does not start with the custom_id column")
        for n, row in enumerate(rows, 1):
            if row[0] != f"req-{n}" or bool(row[-1]) != (n % FAIL_EVERY == 0):
                raise BenchError(f"{path}: row {n} is {row[0]} (error: {row[-1][:60]!r})")
    if n != lines:
        raise BenchError(f"{path} holds {n:,} rows, not {lines:,}")


def export_section(bench: Bench, source: Path, url: str, lines: int, runs: int) -> str:
    say(f"synthesising a finished {lines:,}-line job")
    started = time.monotonic()
    job = synthesise(bench, source, url, lines)
    made = time.monotonic() - started
    found: dict[str, list[harness.Run]] = {"jsonl": [], "csv": []}
    sizes: dict[str, int] = {}
    for n in range(1, runs + 1):
        for fmt in ("jsonl", "csv") if n % 2 else ("csv", "jsonl"):
            say(f"batchq export --format {fmt}, {lines:,} lines (round {n} of {runs})")
            out = bench.tmp / f"export.{fmt}"
            cmd = [PYTHON, "-m", "batchq", "export", job, "-o", out]
            log = bench.fresh(f"export-{fmt}").with_suffix(".log")
            found[fmt].append(bench.measure(cmd, log, 60 + lines / 1000))
            if fmt not in sizes:
                (check_jsonl if fmt == "jsonl" else check_csv)(out, lines)
                sizes[fmt] = out.stat().st_size
            out.unlink()
    rows = []
    for fmt, measured in found.items():
        rss = Spread.of([r.rss_mib for r in measured])
        rows.append(
            [
                f"`batchq export JOB -o OUT.{fmt}`",
                Spread.of([r.wall for r in measured]).show(".2f"),
                Spread.of([lines / r.wall for r in measured]).show(),
                Spread.of([r.cpu for r in measured]).show(".2f"),
                rss.show(".0f"),
                f"{sizes[fmt] / 2**20:,.0f}",
                f"≤ {RSS_GOAL_MIB}: {verdict(rss.high <= RSS_GOAL_MIB)}",
            ]
        )
    inputs = {
        name: (job / name).stat().st_size / 2**20 for name in ("results.jsonl", "errors.jsonl")
    }
    headers = ["export", "wall s", "lines/s", "CPU s", "peak RSS MiB", "output MiB", "RSS goal"]
    return (
        f"### 2. `batchq export` of a finished {lines:,}-line job ({lines // FAIL_EVERY:,} "
        f"failed; results.jsonl {inputs['results.jsonl']:,.0f} MiB, errors.jsonl "
        f"{inputs['errors.jsonl']:,.1f} MiB, in completion order)\n\n"
        f"{table(headers, rows)}\n\n"
        f"Both outputs checked: {lines:,} lines in input order, the failures where they were. "
        f"Synthesising the job took {made:.0f} s (not timed above); `batchq status` said "
        f"{lines:,} done and a resumed `batchq run` had nothing to send."
    )


# --- main ----------------------------------------------------------------------------------


def report(
    mode: Mode, runs: int, sections: Sequence[str], argv: Sequence[str], took: float, load: float
) -> str:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/api.py", *argv])
    head = (
        f"## Python API ({mode.name}) — batchq {harness.revision(HERE.parent)} — {now}\n\n"
        f"- machine: {harness.machine()}; load average {load:.2f} when it began (other "
        f"processes share the machine)\n- command: `{command}` ({took:.0f} s); "
        f"medians of {runs} run{'s' if runs > 1 else ''} (min–max); wall time, CPU and peak "
        "RSS are the child process's, start-up included"
    )
    return "\n\n".join([head, *sections]) + "\n"


def append_report(text: str) -> None:
    if not REPORT.exists():
        REPORT.write_text(
            "# Python API benchmark\n\nWritten by `benchmarks/api.py` (issue 14); newest last.\n\n"
        )
    with REPORT.open("a") as f:
        f.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; print only")
    parser.add_argument("--runs", type=int, default=3, help="rounds (median reported)")
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    started, load = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="batchq-api-") as name:
        bench = Bench(Path(name))
        source = bench.tmp / f"input-{mode.export_lines}.jsonl"
        say(f"writing {mode.export_lines:,} input lines")
        harness.write_input(source, mode.export_lines)  # its head is the API's input
        head = bench.tmp / f"input-{mode.api_lines}.jsonl"
        harness.copy_bytes(source, head, 0, harness.line_offset(source, mode.api_lines))
        sections = []
        try:
            with harness.mock_server(BATCHQ, bench.tmp) as url:
                sections.append(api_section(bench, head, url, mode.api_lines, args.runs))
                print(sections[-1] + "\n", flush=True)
                sections.append(export_section(bench, source, url, mode.export_lines, args.runs))
                print(sections[-1] + "\n", flush=True)
        except BenchError as exc:
            print(f"api: {exc}", file=sys.stderr)
            return 1
    text = report(mode, args.runs, sections, argv, time.monotonic() - started, load)
    print(text.split("\n\n###", 1)[0], flush=True)  # the sections were printed as they came
    if not args.quick:
        append_report(text)
        say(f"appended to {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
