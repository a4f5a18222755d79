"""batchq's benchmark suite: is the endpoint, not batchq, the bottleneck?

``make bench`` (quick, about a minute) and ``make bench-full`` run it. It starts
its own endpoints on 127.0.0.1 and stops them again:

* **nginx** answering ``POST /v1/chat/completions`` with a fixed chat.completion
  (with ``usage`` and an ``x-request-id``) from ``return 200``; wrk shows it
  answers many times faster than any Python client, so what is measured
  against it is the client's own cost;
* **the built-in mock server** (``batchq mock-server``, own process) with
  200 ms latency for the latency-bound case, and with none for the resume case,
  since its ``/_mock/stats`` says when the first request arrived.

What it measures, and why:

* **throughput** (requests/s = lines / wall time of the process, CPU seconds
  per 1,000 requests, peak RSS) of ``batchq run`` (checkpointing on) and of
  ``benchmarks/bare_client.py``, the least a Python client can do, on the
  same input and endpoint; batchq's figures over the baseline's are the price
  of its promises. At 20k / 200k / 1M lines (full), the RSS column also shows
  whether memory grows with the input;
* **latency-bound**: 256 workers against 200 ms answers can reach 1,280 req/s;
  how close batchq gets shows whether its per-request overhead ever shows when
  the endpoint is slow, as real ones are;
* **checkpoint overhead**: ``--fsync`` against ``--no-fsync``, i.e. what
  power-loss safety costs;
* **start-up**: ``batchq --help``, the time from ``batchq run`` of a new job
  to its first request at the endpoint, and the import chain behind them;
* **resume** (full): a 1M-line job 90% done; time from process start to the
  first new request at the endpoint, and that run's peak RSS.

Every figure is the median of ``--runs`` (default 3) with its min–max; batchq
and baseline runs alternate so that drift on a noisy machine hits both. The
tables are printed and written to ``benchmarks/RESULTS.md`` (each variant
replaces its own section), with PASS/MISS against the targets of the issue.
``--profile`` instead profiles one 200k-line run with cProfile (see PROFILE.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import harness
from harness import BenchError, Run, Spread, table

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
BATCHQ = BIN / "batchq"
BARE = HERE / "bare_client.py"
CONCURRENCY = 64
LATENCY = 0.2
LATENCY_CONCURRENCY = 256
LATENCY_LINES = 12_800  # 50 waves of 256 at 200 ms: 10 s at the ideal 1,280 req/s
RESUME_LINES, RESUME_DONE = 1_000_000, 900_000
FIRST_REQUEST_LINES = 1_000
NO_FSYNC = "batchq --no-fsync"
UVLOOP_BATCHQ = (
    "import sys, uvloop; uvloop.install(); sys.argv[0] = 'batchq'; "
    "from batchq.cli import main; main()"
)


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    sizes: tuple[int, ...]  # input lines of the throughput runs
    fsync_lines: int
    wrk_seconds: int
    resume: bool  # the 1M-line resume case
    latency_bare: bool  # the bare client in the latency-bound case too


QUICK = Variant("quick", (20_000,), 20_000, 3, resume=False, latency_bare=False)
FULL = Variant("full", (20_000, 200_000, 1_000_000), 200_000, 10, resume=True, latency_bare=True)


TARGETS = (  # the targets, in the order the tables list them
    "throughput, batchq / bare (worst size)",
    "peak RSS at 1M lines",
    "RSS growth 20k → 1M lines",
    "latency-bound throughput (lines / wall)",
    "`batchq --help`",
    "first request of a new job",
    "resume: first new request",
    "resume: peak RSS",
    "checkpoint overhead (--fsync)",
)


@dataclass(frozen=True, slots=True)
class Target:
    what: str
    goal: str
    measured: str
    ok: bool | None  # None: not measured in this variant


@dataclass
class Report:
    sections: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def section(self, title: str, body: str) -> None:
        text = f"### {title}\n\n{body}\n"
        print(text, flush=True)
        self.sections.append(text)

    def target(self, what: str, goal: str, measured: str, ok: bool | None) -> None:
        self.targets.append(Target(what, goal, measured, ok))

    def targets_table(self) -> str:
        verdict = {True: "PASS", False: "MISS", None: "n/a"}
        ordered = sorted(self.targets, key=lambda t: TARGETS.index(t.what))
        rows = [[t.what, t.goal, t.measured, verdict[t.ok]] for t in ordered]
        return table(["target", "goal", "measured", ""], rows)


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- running the two clients ---------------------------------------------------------------


class Bench:
    """The temp dir, the inputs made so far, and how to run each client once."""

    def __init__(self, tmp: Path, runs: int) -> None:
        self.tmp, self.runs = tmp, runs
        self._inputs: dict[int, Path] = {}
        self._ids = itertools.count(1)

    def input(self, lines: int) -> Path:
        if lines not in self._inputs:
            path = self.tmp / f"input-{lines}.jsonl"
            say(f"writing {lines:,} input lines")
            harness.write_input(path, lines)
            self._inputs[lines] = path
        return self._inputs[lines]

    def batchq(
        self,
        path: Path,
        url: str,
        *options: str,
        lines: int,
        job: Path | None = None,
        uvloop: bool = False,
    ) -> Run:
        """``batchq run`` on ``path``; checks that the job holds one result per line.

        A ``job`` given is kept (and may hold results of an earlier run); otherwise
        a fresh job folder is made and removed.
        """
        fresh = job is None
        job = job or self.tmp / f"job-{next(self._ids)}"
        head = [sys.executable, "-c", UVLOOP_BATCHQ] if uvloop else [BATCHQ]
        cmd = [*head, "run", path, "--job", job, "--base-url", url, "--model", "m", "-q"]
        log = self.tmp / "batchq.log"
        run = harness.measure([*cmd, *options], timeout=_timeout(lines), log=log, cwd=self.tmp)
        written = harness.count_lines(job / "results.jsonl")
        if fresh:
            shutil.rmtree(job)
        if written != lines:
            raise BenchError(f"batchq's job holds {written:,} results for {lines:,} lines")
        return run

    def bare(
        self, path: Path, url: str, *, lines: int, workers: str = "64", uvloop: bool = False
    ) -> Run:
        out = self.tmp / "bare-out.jsonl"
        cmd = [sys.executable, BARE, path, out, "--base-url", url, "--workers", workers]
        cmd += ["--uvloop"] if uvloop else []
        run = harness.measure(cmd, timeout=_timeout(lines), log=self.tmp / "bare.log", cwd=self.tmp)
        written = harness.count_lines(out)
        out.unlink()
        if written != lines:
            raise BenchError(f"the bare client wrote {written:,} results for {lines:,} lines")
        return run


def _timeout(lines: int) -> float:
    return 120 + lines / 200  # 40x slower than expected is a hang, not a measurement


def alternate(runs: int, *jobs: Callable[[], Run]) -> list[list[Run]]:
    """Run each job ``runs`` times, round-robin, so drift on the machine hits all alike."""
    results: list[list[Run]] = [[] for _ in jobs]
    for _ in range(runs):
        for job, out in zip(jobs, results, strict=True):
            out.append(job())
    return results


# --- the cases -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """What one client did at one input size, over the runs."""

    rate: Spread  # requests/s
    cpu_per_1k: Spread  # CPU seconds per 1,000 requests
    rss: Spread  # peak RSS, MiB
    wall: Spread

    @classmethod
    def of(cls, runs: Sequence[Run], lines: int) -> Figures:
        return cls(
            Spread.of([lines / r.wall for r in runs]),
            Spread.of([r.cpu / lines * 1000 for r in runs]),
            Spread.of([r.rss_mib for r in runs]),
            Spread.of([r.wall for r in runs]),
        )

    def row(self, lines: int, client: str) -> list[str]:
        return [
            f"{lines:,}",
            client,
            self.rate.show(),
            self.cpu_per_1k.show(".3f"),
            self.rss.show(".1f"),
            "",
        ]


def throughput(
    bench: Bench, report: Report, url: str, variant: Variant, uvloop: bool
) -> dict[int, dict[str, Figures]]:
    """batchq against the bare baseline on nginx, at each input size.

    At ``variant.fsync_lines`` lines, ``batchq --no-fsync`` runs in the same
    rotation, for the checkpoint overhead.
    """
    rows: list[list[str]] = []
    found: dict[int, dict[str, Figures]] = {}
    for lines in variant.sizes:
        path = bench.input(lines)
        ours = partial(bench.batchq, path, url, "--concurrency", str(CONCURRENCY), lines=lines)
        bare = partial(bench.bare, path, url, lines=lines)
        jobs: dict[str, Callable[[], Run]] = {"batchq": ours, "bare aiohttp": bare}
        if lines == variant.fsync_lines:
            jobs[NO_FSYNC] = partial(ours, "--no-fsync")
        if uvloop:
            jobs |= {"batchq + uvloop": partial(ours, uvloop=True)}
            jobs |= {"bare + uvloop": partial(bare, uvloop=True)}
        say(f"{lines:,} lines against nginx: {', '.join(jobs)}; {bench.runs} runs each")
        runs = alternate(bench.runs, *jobs.values())
        found[lines] = figures = {
            name: Figures.of(r, lines) for name, r in zip(jobs, runs, strict=True)
        }
        rows += [f.row(lines, name) for name, f in figures.items() if name != NO_FSYNC]
        mine, base = figures["batchq"], figures["bare aiohttp"]
        ratio = mine.rate.median / base.rate.median
        rows.append(
            [
                f"{lines:,}",
                "**batchq / bare**",
                f"{ratio:.2f}",
                f"{mine.cpu_per_1k.median / base.cpu_per_1k.median:.2f}",
                f"{mine.rss.median / base.rss.median:.2f}",
                "PASS" if ratio >= 0.8 else "MISS",
            ]
        )
    headers = ["lines", "client", "req/s", "CPU s / 1k req", "peak RSS MiB", "≥ 80% of bare"]
    report.section(
        f"Throughput against nginx (concurrency {CONCURRENCY}; median (min–max) of "
        f"{bench.runs} runs)",
        table(headers, rows),
    )
    return found


def endpoint_speed(report: Report, rate: float | None, fastest: float, seconds: int) -> None:
    """wrk's rate against nginx, over the fastest client median measured on it."""
    if rate is None:
        report.section("The endpoint", "wrk is not installed: nginx's own rate was not measured.")
        return
    body = (
        f"wrk (1 thread, 64 connections, {seconds} s) gets **{rate:,.0f} req/s** from the "
        f"nginx endpoint: {rate / fastest:.1f}× the fastest client median above "
        f"({fastest:,.0f} req/s), so the clients, not nginx, are what the throughput table "
        "measures."
    )
    report.section("The endpoint", body)


def memory_targets(report: Report, found: dict[int, dict[str, Figures]]) -> None:
    largest = max(found)
    rss = found[largest]["batchq"].rss.median
    if largest < 1_000_000:
        report.target("peak RSS at 1M lines", "≤ 100 MiB", "full run only", None)
        report.target("RSS growth 20k → 1M lines", "≤ +10 MiB", "full run only", None)
        return
    report.target("peak RSS at 1M lines", "≤ 100 MiB", f"{rss:.1f} MiB", rss <= 100)
    growth = rss - found[min(found)]["batchq"].rss.median
    report.target("RSS growth 20k → 1M lines", "≤ +10 MiB", f"{growth:+.1f} MiB", growth <= 10)


def checkpoint_overhead(report: Report, synced: Figures, unsynced: Figures, lines: int) -> None:
    """``--fsync`` (the default) against ``--no-fsync``: what power-loss safety costs."""
    slower = synced.wall.median / unsynced.wall.median - 1
    rows = [
        [name, f.wall.show(".2f"), f.rate.show(), f.cpu_per_1k.show(".3f")]
        for name, f in (("--fsync", synced), ("--no-fsync", unsynced))
    ]
    rows.append(["**fsync cost**", f"{slower:+.1%}", "", ""])
    report.section(
        f"Checkpoint overhead ({lines:,} lines against nginx, in the same rotation)",
        table(["batchq run", "wall s", "req/s", "CPU s / 1k req"], rows),
    )
    overlap = synced.wall.low <= unsynced.wall.high and unsynced.wall.low <= synced.wall.high
    measured = f"{slower:+.1%}" + (" (min–max ranges overlap: noise)" if overlap else "")
    report.target("checkpoint overhead (--fsync)", "≤ 5% slower", measured, slower <= 0.05)


def latency_bound(bench: Bench, report: Report, tmp: Path, *, with_bare: bool) -> None:
    """256 workers against 200 ms answers: the ideal is 256 / 0.2 = 1,280 req/s.

    Measured two ways: lines / process wall time (start-up and the last answer's
    200 ms included), and at the endpoint from its first to its last arrival
    (the steady rate). ``with_bare``: the bare client with 256 workers too, which
    shows what the Python mock server itself allows.
    """
    ideal = LATENCY_CONCURRENCY / LATENCY
    lines, path = LATENCY_LINES, bench.input(LATENCY_LINES)
    workers = str(LATENCY_CONCURRENCY)
    clients: dict[str, Callable[[str], Run]] = {
        "batchq": lambda url: bench.batchq(path, url, "--concurrency", workers, lines=lines)
    }
    if with_bare:
        clients["bare aiohttp"] = lambda url: bench.bare(path, url, lines=lines, workers=workers)
    say(f"latency-bound: {lines:,} lines at {LATENCY * 1000:.0f} ms: {', '.join(clients)}")
    rows, shares = [], []
    with harness.mock_server(BATCHQ, tmp, latency=LATENCY) as url:

        def measured(client: Callable[[str], Run]) -> tuple[Run, float]:
            harness.mock_call(url, "/_mock/reset", post=True)
            run = client(url)
            stats = harness.mock_call(url, "/_mock/stats")
            return run, (stats["requests"] - 1) / (stats["last_at"] - stats["first_at"])

        results = alternate(bench.runs, *(partial(measured, c) for c in clients.values()))
    for name, pairs in zip(clients, results, strict=True):
        process = Spread.of([lines / run.wall for run, _ in pairs])
        steady = Spread.of([rate for _, rate in pairs])
        rss = Spread.of([run.rss_mib for run, _ in pairs])
        shares.append(process.median / ideal)
        rows.append(
            [
                name,
                process.show(),
                f"{process.median / ideal:.1%}",
                steady.show(),
                f"{steady.median / ideal:.1%}",
                rss.show(".1f"),
            ]
        )
    headers = ["client", "lines / wall s", "% of ideal", "at the endpoint", "% of ideal", "RSS MiB"]
    report.section(
        f"Latency-bound ({LATENCY * 1000:.0f} ms per answer, {LATENCY_CONCURRENCY} workers, "
        f"{lines:,} lines, mock server; ideal {ideal:,.0f} req/s; median (min–max) of "
        f"{bench.runs} runs)",
        table(headers, rows),
    )
    share = shares[0]
    report.target(
        "latency-bound throughput (lines / wall)",
        f"≥ 90% of {ideal:,.0f} req/s",
        f"{share:.1%}",
        share >= 0.9,
    )


def start_up(bench: Bench, report: Report, tmp: Path) -> None:
    """``batchq --help`` wall time, a new job's first request, and the imports behind them."""
    say("start-up: batchq --help ×10, a new job's first request ×10, python -X importtime")

    def wall(*cmd: str | Path) -> float:
        return harness.measure(cmd, timeout=30, log=tmp / "start-up.log", cwd=tmp).wall

    wall(BATCHQ, "--help")  # warm the caches first
    help_time = Spread.of([wall(BATCHQ, "--help") for _ in range(10)])
    bare_python = Spread.of([wall(sys.executable, "-c", "pass") for _ in range(5)])
    first = Spread.of(first_requests(bench, tmp, FIRST_REQUEST_LINES, runs=10))
    rows = [
        ["`batchq --help` (median of 10)", help_time.show(".3f")],
        [
            f"`batchq run`, new {FIRST_REQUEST_LINES:,}-line job: process start → first "
            "request at the endpoint (median of 10)",
            first.show(".3f"),
        ],
        ["`python -c pass` (median of 5), for scale", bare_python.show(".3f")],
    ]
    report.section("Start-up (seconds)", table(["command", "wall s"], rows))
    imports = importtime()
    report.section(
        "Imports behind `import batchq.cli` (top 12 by cumulative time)",
        table(
            ["module", "cumulative ms", "self ms"],
            [[f"`{m}`", f"{c / 1000:.1f}", f"{s / 1000:.1f}"] for m, c, s in imports],
        ),
    )
    seconds = help_time.median
    report.target("`batchq --help`", "≤ 0.3 s", f"{seconds:.3f} s", seconds <= 0.3)
    seconds = first.median
    report.target("first request of a new job", "≤ 0.3 s", f"{seconds:.3f} s", seconds <= 0.3)


def first_requests(bench: Bench, tmp: Path, lines: int, *, runs: int) -> list[float]:
    """Seconds from ``batchq run``'s fork to the first request at a mock server, per run."""
    path, found = bench.input(lines), []
    with harness.mock_server(BATCHQ, tmp) as url:
        for _ in range(runs):
            harness.mock_call(url, "/_mock/reset", post=True)
            run = bench.batchq(path, url, lines=lines)
            found.append(harness.mock_call(url, "/_mock/stats")["first_at"] - run.started_at)
    return found


def importtime(top: int = 12) -> list[tuple[str, int, int]]:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import batchq.cli"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = []
    for line in done.stderr.splitlines():
        if m := re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line):
            found.append((m.group(4), int(m.group(2)), int(m.group(1))))
    return sorted(found, key=lambda item: -item[1])[:top]


def resume(bench: Bench, report: Report, tmp: Path) -> None:
    """A 1M-line job 90% done: how soon does the resumed run send, and in how much memory?

    Made real: batchq runs a 900k-line input to completion, the last 100k
    lines are appended, and the resumed run sends them. Both talk to a mock
    server whose ``first_at`` says when the first request arrived, so the
    first run also tells how soon a new job of that size starts sending.
    """
    full = bench.input(RESUME_LINES)
    path, pristine = tmp / "resume.jsonl", tmp / "resume-job-90"
    split = harness.line_offset(full, RESUME_DONE)
    harness.copy_bytes(full, path, 0, split)
    first, rss, sent, walls = [], [], [], []
    with harness.mock_server(BATCHQ, tmp) as url:
        say(f"resume: running the first {RESUME_DONE:,} lines to completion")
        run = bench.batchq(path, url, lines=RESUME_DONE, job=pristine)
        new_job_first = harness.mock_call(url, "/_mock/stats")["first_at"] - run.started_at
        harness.copy_bytes(full, path, split, full.stat().st_size)  # appended: new requests
        for n in range(bench.runs):
            say(f"resume run {n + 1} of {bench.runs}")
            job = tmp / "resume-job"
            shutil.copytree(pristine, job)
            harness.mock_call(url, "/_mock/reset", post=True)
            run = bench.batchq(path, url, lines=RESUME_LINES, job=job)
            stats = harness.mock_call(url, "/_mock/stats")
            shutil.rmtree(job)
            first.append(stats["first_at"] - run.started_at)
            rss.append(run.rss_mib)
            sent.append(stats["requests"])
            walls.append(run.wall)
    first_s, rss_m = Spread.of(first), Spread.of(rss)
    rows = [
        [
            f"for scale: the new {RESUME_DONE:,}-line job's first request, s (one run)",
            f"{new_job_first:.2f}",
            "",
        ],
        ["process start → first new request at the endpoint, s", first_s.show(".2f"), "< 3 s"],
        ["peak RSS of the resumed run, MiB", rss_m.show(".1f"), "< 100 MiB"],
        [
            "requests the resumed run sent",
            Spread.of(sent).show(),
            f"{RESUME_LINES - RESUME_DONE:,}",
        ],
        ["wall time of the resumed run, s", Spread.of(walls).show(".1f"), ""],
    ]
    report.section(
        f"Resume: a {RESUME_LINES:,}-line job, {RESUME_DONE:,} done (mock server, no latency)",
        table(["measure", "median (min–max)", "target"], rows),
    )
    report.target(
        "resume: first new request", "< 3 s", f"{first_s.median:.2f} s", first_s.median < 3
    )
    report.target("resume: peak RSS", "< 100 MiB", f"{rss_m.median:.1f} MiB", rss_m.median < 100)


# --- profile -------------------------------------------------------------------------------


def profile(bench: Bench, url: str, lines: int, top: int = 30) -> str:
    """cProfile one ``batchq run`` of ``lines`` lines; the top functions by own time."""
    path, out = bench.input(lines), bench.tmp / "batchq.prof"
    job = bench.tmp / "profiled-job"
    cmd = [sys.executable, "-m", "cProfile", "-o", out, "-m", "batchq", "run", path, "--job", job]
    cmd += ["--base-url", url, "--model", "m", "--concurrency", str(CONCURRENCY), "-q"]
    say(f"profiling batchq run on {lines:,} lines")
    run = harness.measure(
        cmd, timeout=_timeout(lines) * 3, log=bench.tmp / "prof.log", cwd=bench.tmp
    )
    stats = pstats.Stats(str(out))
    total = stats.total_tt
    rows = []
    entries = stats.stats
    for (file, line, name), (_, calls, own, cumulative, _) in sorted(
        entries.items(), key=lambda item: -item[1][2]
    )[:top]:
        where = _short(file, line, name)
        per = own / calls * 1e6 if calls else 0.0
        rows.append(
            [
                f"`{where}`",
                f"{calls:,}",
                f"{own:.2f}",
                f"{own / total:.1%}",
                f"{per:.2f}",
                f"{cumulative:.2f}",
            ]
        )
    head = (
        f"`batchq run` of {lines:,} lines against nginx under cProfile: {run.wall:.1f} s wall, "
        f"{run.cpu:.1f} s CPU, {total:.1f} s profiled.\n\n"
    )
    headers = ["function", "calls", "own s", "own %", "µs / call", "cumulative s"]
    return head + table(headers, rows)


def _short(file: str, line: int, name: str) -> str:
    """``batchq/live/runner.py:123 _call``, ``aiohttp/client.py:456 _request``, or a builtin."""
    if file == "~":
        return name
    for marker in ("site-packages/", "/lib/python3.11/", "/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line} {name}"


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="20k / 200k / 1M lines, and resume")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--uvloop", action="store_true", help="also run both clients on uvloop")
    parser.add_argument("--profile", action="store_true", help="only profile a 200k-line run")
    parser.add_argument(
        "--results", type=Path, default=HERE / "RESULTS.md", help="Markdown file to update"
    )
    return parser.parse_args(argv)


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="batchq-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_suite(args: argparse.Namespace, tmp: Path) -> Report:
    variant = FULL if args.full else QUICK
    bench, report = Bench(tmp, args.runs), Report()
    with harness.nginx(tmp) as url:
        say(f"nginx at {url}; wrk for {variant.wrk_seconds} s")
        rate = harness.wrk_rate(url + "/chat/completions", tmp, variant.wrk_seconds)
        found = throughput(bench, report, url, variant, args.uvloop)
        fastest = max(f.rate.median for sizes in found.values() for f in sizes.values())
        endpoint_speed(report, rate, fastest, variant.wrk_seconds)
        fsync = found[variant.fsync_lines]
        checkpoint_overhead(report, fsync["batchq"], fsync[NO_FSYNC], variant.fsync_lines)
        if variant.resume:
            resume(bench, report, tmp)
    latency_bound(bench, report, tmp, with_bare=variant.latency_bare)
    start_up(bench, report, tmp)
    worst = min(f["batchq"].rate.median / f["bare aiohttp"].rate.median for f in found.values())
    report.target("throughput, batchq / bare (worst size)", "≥ 80%", f"{worst:.0%}", worst >= 0.8)
    memory_targets(report, found)
    if not variant.resume:
        report.target("resume: first new request", "< 3 s", "full run only", None)
        report.target("resume: peak RSS", "< 100 MiB", "full run only", None)
    return report


def save(path: Path, variant: str, text: str) -> None:
    """Replace this variant's section of ``path`` (RESULTS.md), keeping the other's."""
    start, end = f"<!-- {variant}:start -->", f"<!-- {variant}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = (
        path.read_text()
        if path.exists()
        else "# Benchmark results\n\nWritten by `benchmarks/run.py`.\n"
    )
    if start in old and end in old:
        before, rest = old.split(start, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    began, revision = time.perf_counter(), harness.revision(HERE.parent)
    try:
        harness.ensure_nginx(say)
        with workspace() as tmp:
            if args.profile:
                with harness.nginx(tmp) as url:
                    print(profile(Bench(tmp, 1), url, 200_000))
                return 0
            report = run_suite(args, tmp)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - began
    variant, make = ("full", "make bench-full") if args.full else ("quick", "make bench")
    targets = report.targets_table()
    print(f"### Targets\n\n{targets}\n\n{variant} benchmark took {elapsed:.0f} s")
    command = " ".join(["python benchmarks/run.py", *(argv or sys.argv[1:])])
    head = (
        f"## {variant.capitalize()} — `{make}`\n\n"
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"
        f"- machine: {harness.machine()}\n"
        f"- batchq: {revision} (at the start)\n"
        f"- command: `{command}` ({elapsed:.0f} s)\n\n"
        f"### Targets\n\n{targets}\n\n"
    )
    save(args.results, variant, head + "\n".join(report.sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
