"""Does batchq reach an endpoint's capacity with no concurrency flag? (issue 11)

Three endpoint shapes, each served by ``batchq mock-server`` in its own process, a fresh one
per run so that its ``/_mock/stats`` tell that run alone; ``batchq run`` is a child process
too, and nothing in a case sets ``--concurrency`` except the sweeps it is compared with:

1. **Makespan under a pace.** N chat requests at ``--rpm 10000`` (the mock enforces the same
   limit and sends OpenAI's headers), latency lognormal with p50 0.8 s and p99 10 s, 1% 500s
   and 1% 503s. Makespan is batchq's wall time; the floor is N / limit: N / 10,000 × 60 s.
   The default hedges the tail (issue 21); run again with ``--no-hedge``. A batchq without
   that flag (exit 2, "No such option") gets an n/a row. Goals: ≤ 1.15× the floor by default,
   ≤ 1.25× with ``--no-hedge``; the spread column is the fastest and slowest run.
2. **A GPU server with 256 slots**, 0.2 s base latency and no rate-limit headers (vLLM's
   shape): batchq's default against a sweep of fixed ``--concurrency`` values, in req/s
   (lines / wall time). Goal: the default ≥ 90% of the best fixed value.
3. **The same with 16 slots**: the default's req/s against the sweep's best, and the
   server-side median time in the server (queue + service, from the mock's stats) over the
   unloaded latency, which a run of 20 requests at ``--concurrency 1`` measures first.
   Goal: ≥ 90% of the best, with the median ≤ 2× the unloaded latency.
4. **The same 16 slots under a pace far above them** (``--rpm 60000``: 1,000 a second
   against the ~53 they serve): req/s against the unpaced default, the server-side median
   over the unloaded latency, the most in flight, and the requests in the server once the
   run is 2/3 sent (after the start's flood). Before the cap under a pace the pool followed
   the queue's latency to its ceiling. Goal: ≥ 90% of the unpaced req/s; the late in-flight
   a few batches of 16, not the ceiling.
5. **One slot** (llama.cpp's shape), 0.2 s, a short job of 120 requests: the default's req/s
   against one request at a time, and its server p50 against the unloaded one. Goal:
   ≥ 0.95× and ≤ 2×.
6. **An endpoint answering in 1 ms** (no slots, no headers): batchq's own CPU binds, not the
   endpoint; the default against ``--concurrency`` 16, 64 and 256. Goal: ≥ 95% of the best.

Quick (the default) runs 3,000 / 4,000 / 400 / 3,000 / 120 / 10,000 lines once per configuration,
for a smoke run of a few minutes; ``--full`` runs 20,000 / 20,000 / 2,000 / 6,000 / 120 / 30,000
lines three times. Figures are medians of ``--repeat`` runs (the configurations alternate,
so drift on the machine hits all alike); req/s and the server's p50 give the runs' lowest and
highest beside the median. The tables are printed and appended to
``benchmarks/CAPACITY.md`` under the commit measured, newest last.

    python benchmarks/capacity.py [--full] [--repeat N] [--cases 1,2,3] [--batchq-args ARGS]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import itertools
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import harness
import orjson
from harness import BenchError, table

HERE = Path(__file__).resolve().parent
BATCHQ = Path(sys.executable).parent / "batchq"
REPORT = HERE / "CAPACITY.md"

RPM = 10_000
ISSUE_LINES = 20_000  # the makespan goals are for this many requests
PACED = ("--latency-p50", "0.8", "--latency-p99", "10", "--rate-500", "0.01", "--rate-503", "0.01")
BASE_LATENCY = 0.2
GPU = ("--latency", str(BASE_LATENCY), "--no-rate-limit-headers")  # what vLLM looks like
SWEEP_256 = (64, 128, 256, 384, 512)
SWEEP_16 = (8, 16, 24, 32, 64)
SWEEP_FAST = (16, 64, 256)
FAST = ("--latency", "0.001", "--no-rate-limit-headers")  # batchq's own CPU is what binds
UNLOADED_LINES = 20
ONE_SLOT_LINES = 120  # issue 21's short job
SEED = 11  # of the mock's faults and latencies: every run draws the same sequence
ATTEMPTS = 3  # of a run that fails


@dataclasses.dataclass(frozen=True, slots=True)
class Mode:
    name: str
    makespan_lines: int
    slots_256_lines: int  # ~6 s at the ~850 req/s that 256 slots serve
    slots_16_lines: int  # ~7 s at the ~54 req/s that 16 slots serve
    paced_16_lines: int  # case 4: ~1 minute
    fast_lines: int  # case 6: a few seconds at the ~3,000-5,000 req/s a 1 ms endpoint allows
    repeat: int


QUICK = Mode("quick", 3_000, 4_000, 400, 3_000, 10_000, 1)
FULL = Mode("full", 20_000, 20_000, 2_000, 6_000, 30_000, 3)


def say(message: str) -> None:
    print(f"[capacity] {message}", file=sys.stderr, flush=True)


# --- one run -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """One ``batchq run`` and what the endpoint saw."""

    lines: int
    run: harness.Run
    summary: dict[str, Any]  # batchq's --json-summary
    stats: dict[str, Any]  # the mock's /_mock/stats once batchq had exited
    late_in_flight: int | None = None  # the server's in_flight once `sample_at` had arrived

    @property
    def rate(self) -> float:
        return self.lines / self.run.wall


# A configuration: its label and batchq's flags; the mock's flags come with the case.
Config = tuple[str, tuple[str, ...]]
DEFAULT: Config = ("default (no --concurrency)", ())
# The default again, against a server that publishes its load as vLLM does (mock flags below).
GAUGED: Config = ("default, the server's gauges", ())
MOCK_FLAGS = {GAUGED[0]: ("--gauges", "vllm")}


def fixed(n: int) -> Config:
    return f"--concurrency {n}", ("--concurrency", str(n))


class Bench:
    """The temp dir, the inputs made so far, and how to run batchq once against a mock."""

    def __init__(self, tmp: Path, mode: Mode, extra: Sequence[str]) -> None:
        self.tmp, self.mode, self.extra = tmp, mode, tuple(extra)
        self.notes: list[str] = []  # runs that failed and were run again
        self.sample_at: int | None = None  # requests received when in_flight is sampled
        self._inputs: dict[int, Path] = {}
        self._ids = itertools.count(1)

    def input(self, lines: int) -> Path:
        if lines not in self._inputs:
            self._inputs[lines] = path = self.tmp / f"input-{lines}.jsonl"
            harness.write_input(path, lines)
        return self._inputs[lines]

    def run(self, lines: int, mock: Sequence[str], flags: Sequence[str]) -> Outcome | None:
        """``batchq run`` of ``lines`` lines against a fresh mock with ``mock`` flags.

        None when this batchq lacks one of ``flags`` (a flag of a later version).
        """
        job = self.tmp / f"job-{next(self._ids)}"
        log = job.with_suffix(".log")
        timeout = 120 + lines / RPM * 60 * 20  # 20× the slowest expected is a hang
        with harness.mock_server(BATCHQ, self.tmp, options=[*mock, "--seed", str(SEED)]) as url:
            cmd: list[str | Path] = [BATCHQ, "run", self.input(lines), "--job", job]
            cmd += ["--base-url", url, "--model", "m", "-q", "--json-summary", *flags, *self.extra]
            sampler = _Sampler(url, self.sample_at)
            try:
                run = harness.measure(cmd, timeout=timeout, log=log, cwd=self.tmp)
            except BenchError as exc:
                if _unknown_flag(str(exc), flags):
                    return None
                raise
            finally:
                sampler.stop()
            stats = harness.mock_call(url, "/_mock/stats")
        shutil.rmtree(job)
        summary = _json_summary(log)
        if summary["succeeded"] != lines:
            raise BenchError(f"batchq succeeded on {summary['succeeded']:,} of {lines:,} lines")
        return Outcome(lines, run, summary, stats, sampler.found)

    def runs(
        self, lines: int, mock: Sequence[str], configs: Sequence[Config]
    ) -> dict[str, list[Outcome]]:
        """Each configuration ``repeat`` times, round-robin; a skipped one maps to []."""
        found: dict[str, list[Outcome]] = {label: [] for label, _ in configs}
        for n in range(1, self.mode.repeat + 1):
            for label, flags in configs:
                say(f"{lines:,} lines, {label} (run {n} of {self.mode.repeat})")
                server = (*mock, *MOCK_FLAGS.get(label, ()))
                if (outcome := self.attempt(lines, server, flags)) is not None:
                    found[label].append(outcome)
        return found

    def attempt(self, lines: int, mock: Sequence[str], flags: Sequence[str]) -> Outcome | None:
        """`run`, again when it fails: on a shared machine a mock can be killed from outside."""
        for n in range(1, ATTEMPTS + 1):
            try:
                return self.run(lines, mock, flags)
            except BenchError as exc:
                if n == ATTEMPTS:
                    raise
                mock_log = self.tmp / "mock-0.log"  # where harness.mock_server logs
                tail = mock_log.read_text(errors="replace")[-500:] if mock_log.exists() else ""
                note = f"{lines:,} lines, {shlex.join(flags)}: attempt {n} failed, run again"
                self.notes.append(f"{note}: {str(exc)[-300:]!r}; mock log: {tail!r}")
                say(f"{note}: {exc}")
        raise AssertionError("unreachable")


class _Sampler:
    """The mock's in_flight once it has received ``at`` requests, polled from a thread."""

    def __init__(self, url: str, at: int | None) -> None:
        self.found: int | None = None
        self._done = threading.Event()
        self._thread = None
        if at is not None:
            self._thread = threading.Thread(target=self._poll, args=(url, at), daemon=True)
            self._thread.start()

    def _poll(self, url: str, at: int) -> None:
        while not self._done.wait(0.05):
            try:
                stats = harness.mock_call(url, "/_mock/stats")
            except OSError:
                continue
            if stats["requests"] >= at:
                self.found = int(stats["in_flight"])
                return

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _unknown_flag(error: str, flags: Sequence[str]) -> bool:
    """Whether click refused one of ``flags`` (a bad ``--batchq-args`` still fails the run)."""
    # Click says "No such option: --x" or, since 8.2, "No such option '--x'".
    return any(re.search(rf"No such option:? '?{re.escape(flag)}\b", error) for flag in flags)


def _json_summary(log: Path) -> dict[str, Any]:
    """The --json-summary line: `harness.measure` sends stdout to the log with stderr."""
    lines = log.read_bytes().splitlines()
    found = next((line for line in reversed(lines) if line.startswith(b"{")), None)
    if found is None:
        raise BenchError(f"no JSON summary in {log}")
    summary: dict[str, Any] = orjson.loads(found)
    return summary


def median(outcomes: Sequence[Outcome], figure: Callable[[Outcome], float]) -> float:
    return statistics.median(figure(o) for o in outcomes)


def spread(outcomes: Sequence[Outcome], figure: Callable[[Outcome], float], spec: str) -> str:
    """The median of ``figure``, and its runs' lowest and highest when there are several."""
    values = [figure(o) for o in outcomes]
    middle = format(statistics.median(values), spec)
    if len(values) < 2:
        return middle
    return f"{middle} ({format(min(values), spec)}–{format(max(values), spec)})"


def rate(o: Outcome) -> float:
    return o.rate


def p50(o: Outcome) -> float:
    return float(o.stats["latency_p50"])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# --- the cases -----------------------------------------------------------------------------


def makespan(bench: Bench) -> str:
    lines = bench.mode.makespan_lines
    floor = lines / RPM * 60
    mock = ("--rpm", str(RPM), *PACED)
    pace = ("--rpm", str(RPM))
    configs = [("default", pace), ("--no-hedge", (*pace, "--no-hedge"))]
    found = bench.runs(lines, mock, configs)
    rows = []
    for (label, _), goal in zip(configs, (1.15, 1.25), strict=True):
        if not (outcomes := found[label]):
            rows.append([label, "n/a: this batchq has no such flag", *[""] * 8])
            continue
        wall = median(outcomes, lambda o: o.run.wall)
        walls = [o.run.wall / floor for o in outcomes]
        requests = median(outcomes, lambda o: o.stats["requests"])
        retries = median(outcomes, lambda o: o.summary["this_run"]["retries"])
        rows.append(
            [
                label,
                f"{wall:,.1f}",
                f"{wall / floor:.2f}×",
                f"{min(walls):.2f}–{max(walls):.2f}×",
                f"{requests / lines:.3f}",
                f"{retries:,.0f}",
                f"{(requests - lines - retries) / lines:.1%}",  # hedges, if any
                f"{median(outcomes, lambda o: o.stats['rate_limited']):,.0f}",
                f"{median(outcomes, lambda o: o.stats['max_in_flight']):,.0f}",
                _goal(wall / floor, goal, lines),
            ]
        )
    headers = ["batchq --rpm 10000", "makespan s", "× floor", "spread", "requests / line"]
    headers += ["retries"]
    headers += ["other extra requests", "429s", "max in flight", "goal"]
    title = (
        f"### 1. Makespan: {lines:,} requests at {RPM:,} RPM (floor {floor:,.0f} s), latency "
        "lognormal p50 0.8 s / p99 10 s, 1% 500s, 1% 503s"
    )
    return f"{title}\n\n{table(headers, rows)}"


def _goal(ratio: float, goal: float, lines: int) -> str:
    # The tail after the last send (~10 s or more: the lognormal's slowest draws, and the
    # retries of 5xx) weighs on a short run's makespan far more than on the issue's 20,000.
    if lines < ISSUE_LINES:
        return f"≤ {goal:.2f}× at {ISSUE_LINES:,} lines"
    return f"≤ {goal:.2f}×: {verdict(ratio <= goal)}"


def sweep(bench: Bench, slots: int, lines: int, values: Sequence[int]) -> dict[str, list[Outcome]]:
    mock = ("--slots", str(slots), *GPU)
    return bench.runs(lines, mock, [DEFAULT, GAUGED, *map(fixed, values)])


def best_fixed(found: dict[str, list[Outcome]]) -> float:
    defaults = (DEFAULT[0], GAUGED[0])
    return max(median(o, rate) for label, o in found.items() if label not in defaults)


def slots_256(bench: Bench) -> str:
    lines = bench.mode.slots_256_lines
    found = sweep(bench, 256, lines, SWEEP_256)
    title = (
        f"### 2. GPU-like server, 256 slots, {BASE_LATENCY:g} s base latency, no rate-limit "
        f"headers ({lines:,} requests)"
    )
    return _against_best(found, title, 0.9)


def _against_best(found: dict[str, list[Outcome]], title: str, goal: float) -> str:
    best = best_fixed(found)
    rows = [
        [
            label,
            spread(outcomes, rate, ",.0f"),
            f"{median(outcomes, rate) / best:.0%}",
            spread(outcomes, p50, ".3f"),
            f"{median(outcomes, lambda o: o.stats['max_in_flight']):,.0f}",
            f"{median(outcomes, lambda o: o.stats['max_serving']):,.0f}",
        ]
        for label, outcomes in found.items()
    ]
    ratio = median(found[DEFAULT[0]], rate) / best
    headers = ["batchq", "req/s", "of best fixed", "server p50 s", "max in flight", "max serving"]
    return (
        f"{title}\n\n{table(headers, rows)}\n\n"
        f"Default / best fixed: **{ratio:.0%}** (goal ≥ {goal:.0%}: {verdict(ratio >= goal)})."
        + _gauged(found, best, goal)
    )


def _gauged(found: dict[str, list[Outcome]], reference: float, goal: float) -> str:
    """The default's share with the server's gauges, where the case ran it."""
    if not found.get(GAUGED[0]):
        return ""
    ratio = median(found[GAUGED[0]], rate) / reference
    return f" With the server's gauges: **{ratio:.0%}** ({verdict(ratio >= goal)})."


def fast(bench: Bench) -> str:
    """An endpoint answering in ~1 ms: batchq's own CPU binds, not the endpoint (issue 21:
    the default at 0.71-0.83 of --concurrency 64)."""
    lines = bench.mode.fast_lines
    found = bench.runs(lines, FAST, [DEFAULT, *map(fixed, SWEEP_FAST)])
    title = f"### 6. An endpoint answering in 1 ms, no slots, no headers ({lines:,} requests)"
    return _against_best(found, title, 0.95)


def unloaded_p50(bench: Bench, mock: tuple[str, ...]) -> float:
    say("16 slots: the unloaded latency, one request at a time")
    probe = bench.attempt(UNLOADED_LINES, mock, ("--concurrency", "1"))
    assert probe is not None  # --concurrency exists in every batchq
    return float(probe.stats["latency_p50"])


def _with_latency(
    found: dict[str, list[Outcome]],
    reference: float,
    unloaded: float,
    *,
    spec: str,
    share: Callable[[float], str],
) -> tuple[list[list[str]], dict[str, tuple[float, float]]]:
    """A row per configuration (req/s, its share of ``reference``, server p50 against
    ``unloaded``, most in flight); each default's share and p50 over ``unloaded``."""
    rows = []
    for label, outcomes in found.items():
        rows.append(
            [
                label,
                spread(outcomes, rate, spec),
                share(median(outcomes, rate) / reference),
                spread(outcomes, p50, ".3f"),
                f"{median(outcomes, p50) / unloaded:.1f}×",
                f"{median(outcomes, lambda o: o.stats['max_in_flight']):,.0f}",
            ]
        )
    defaults = {
        label: (
            median(found[label], rate) / reference,
            median(found[label], p50) / unloaded,
        )
        for label in (DEFAULT[0], GAUGED[0])
        if found.get(label)
    }
    return rows, defaults


def _latency_goals(
    defaults: dict[str, tuple[float, float]], share: Callable[[float], str], floor: float
) -> str:
    """A sentence per default: its share, its p50 against the unloaded one, the verdict."""
    said = []
    for label, (ratio, inflation) in defaults.items():
        who = "Default" if label == DEFAULT[0] else "With the server's gauges"
        ok = ratio >= floor and inflation <= 2
        said.append(
            f"{who}: **{share(ratio)}**, server p50 **{inflation:.1f}×** the unloaded "
            f"latency (goal ≥ {share(floor)} and ≤ 2×: {verdict(ok)})."
        )
    return " ".join(said)


def slots_16(bench: Bench) -> str:
    lines = bench.mode.slots_16_lines
    mock = ("--slots", "16", *GPU)
    unloaded = unloaded_p50(bench, mock)
    found = sweep(bench, 16, lines, SWEEP_16)
    share = "{:.0%} of the best fixed".format
    rows, defaults = _with_latency(
        found, best_fixed(found), unloaded, spec=",.1f", share=lambda x: f"{x:.0%}"
    )
    headers = ["batchq", "req/s", "of best fixed", "server p50 s", "× unloaded", "max in flight"]
    return (
        f"### 3. GPU-like server, 16 slots, {BASE_LATENCY:g} s base latency, no rate-limit "
        f"headers ({lines:,} requests; unloaded server p50 {unloaded:.3f} s)\n\n"
        f"{table(headers, rows)}\n\n{_latency_goals(defaults, share, 0.9)}"
    )


def paced_16(bench: Bench) -> str:
    lines = bench.mode.paced_16_lines
    mock = ("--slots", "16", *GPU)
    unloaded = unloaded_p50(bench, mock)
    configs: list[Config] = [DEFAULT, ("--rpm 60000", ("--rpm", "60000"))]
    bench.sample_at = lines * 2 // 3
    try:
        found = bench.runs(lines, mock, configs)
    finally:
        bench.sample_at = None
    unpaced = median(found[DEFAULT[0]], rate)
    rows = []
    for label, outcomes in found.items():
        rows.append(
            [
                label,
                spread(outcomes, rate, ",.1f"),
                f"{median(outcomes, rate) / unpaced:.0%}",
                spread(outcomes, p50, ".3f"),
                f"{median(outcomes, p50) / unloaded:.1f}×",
                f"{median(outcomes, lambda o: o.stats['queue_wait_p50']):.3f}",
                f"{median(outcomes, lambda o: o.stats['max_in_flight']):,.0f}",
                f"{median(outcomes, lambda o: o.late_in_flight or 0):,.0f}",
            ]
        )
    headers = ["batchq", "req/s", "of unpaced", "server p50 s", "× unloaded", "queue wait p50 s"]
    headers += ["max in flight", f"in flight at {lines * 2 // 3:,} sent"]
    return (
        f"### 4. The 16 slots paced far above them: --rpm 60000 ({lines:,} requests; unloaded "
        f"server p50 {unloaded:.3f} s)\n\n{table(headers, rows)}"
    )


def one_slot(bench: Bench) -> str:
    """llama.cpp serves one request at a time; a short job (issue 21: p50 7.4× a
    one-at-a-time run)."""
    lines, mock = ONE_SLOT_LINES, ("--slots", "1", *GPU)
    unloaded = unloaded_p50(bench, mock)
    found = bench.runs(lines, mock, [DEFAULT, GAUGED, fixed(1), fixed(2)])
    alone = median(found[fixed(1)[0]], rate)
    rows, defaults = _with_latency(found, alone, unloaded, spec=",.2f", share=lambda x: f"{x:.2f}×")
    share = "{:.2f}× the throughput of one at a time".format
    headers = ["batchq", "req/s", "of one at a time", "server p50 s", "× unloaded"]
    headers += ["max in flight"]
    return (
        f"### 5. One slot (llama.cpp), {BASE_LATENCY:g} s, {lines:,} requests (unloaded server "
        f"p50 {unloaded:.3f} s)\n\n{table(headers, rows)}\n\n"
        f"{_latency_goals(defaults, share, 0.95)}"
    )


CASES = {
    "1": makespan,
    "2": slots_256,
    "3": slots_16,
    "4": paced_16,
    "5": one_slot,
    "6": fast,
}


# --- main ----------------------------------------------------------------------------------


def report(bench: Bench, sections: Sequence[str], argv: Sequence[str], took: float) -> str:
    mode = bench.mode
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", "benchmarks/capacity.py", *argv])
    head = (
        f"## Capacity ({mode.name}) — batchq {harness.revision(HERE.parent)} — {now}\n\n"
        f"- machine: {harness.machine()}\n- command: `{command}` ({took:.0f} s); "
        f"medians of {mode.repeat} run{'s' if mode.repeat > 1 else ''}; req/s and makespan "
        "are lines / wall time of the batchq process"
    )
    parts = [head, *sections]
    if bench.notes:
        parts.append("Runs run again:\n\n" + "\n".join(f"- {note}" for note in bench.notes))
    return "\n\n".join(parts) + "\n"


def append_report(text: str) -> None:
    if not REPORT.exists():
        REPORT.write_text(
            "# Capacity benchmark\n\nWritten by `benchmarks/capacity.py` (issue 11); "
            "newest last.\n\n"
        )
    with REPORT.open("a") as f:
        f.write(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes, 3 runs each")
    parser.add_argument("--repeat", type=int, help="runs per configuration (median reported)")
    parser.add_argument("--cases", default="1,2,3", help="which cases, e.g. 2,3")
    parser.add_argument("--batchq-args", default="", help="more flags for every batchq run")
    args = parser.parse_args(argv)
    mode = FULL if args.full else QUICK
    if args.repeat:
        mode = dataclasses.replace(mode, repeat=args.repeat)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batchq-capacity-") as name:
        bench = Bench(Path(name), mode, shlex.split(args.batchq_args))
        sections = []
        try:
            for case in args.cases.split(","):
                sections.append(CASES[case.strip()](bench))
                print(sections[-1] + "\n", flush=True)
        except BenchError as exc:
            print(f"capacity: {exc}", file=sys.stderr)
            return 1
    text = report(bench, sections, argv, time.monotonic() - started)
    append_report(text)
    say(f"appended to {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
