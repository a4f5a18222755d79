"""Issue 20's figures: a job through the provider's Batch API (``--via batch``, ``--via auto``).

    .venv/bin/python benchmarks/batch.py [--quick] [--runs 3] [--lines 1000000] [--kills 5]
        [--parts big,crash,auto]

Every endpoint is ``batchq mock-server`` in its own process, started fresh
for each run (its billing counters then count that run alone), on a fast
virtual clock unless said otherwise. Three parts:

* **1,000,000 lines through ``--via batch``** (short chat prompts, 50,000 a
  batch: 20 batches): wall time, CPU and peak RSS of the batchq process
  (``os.wait4``, harness.measure), against ``benchmarks/bare_batch.py`` on
  the same endpoint in the same rotation: the least a client does (the
  files already split; upload, create, poll, download; no ledger, no
  checkpoint). Its wall time is the provider's time, and batchq's beyond it
  is batchq's own (splitting, its ledger, checking and committing the
  answers). Where batchq's time goes is read from its ledger's time stamps
  (``batches.jsonl``). The mock's ``/_mock/stats`` must count 20 batches,
  no duplicate batch and no line billed twice, and the job one output line
  per input line.
* **Crash matrix**: a few thousand lines in batches of 200; a batchq whose
  executor SIGKILLs itself the k-th time it reaches a named step (the
  ``batchq.batch.executor.at_step`` hook, as tests/test_batch.py does), on
  an endpoint with its own seed and fault rates; then the same command
  without the hook, run to the end. Counted: every line once in
  results + errors, the mock's ``duplicate_batches`` and
  ``lines_billed_twice``.
* **``--via auto --deadline``** against slow batches (3 lines a real second):
  for a few deadlines, the wall time and the lines done by batch and live.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import orjson
from harness import BenchError, Run, Spread, table

HERE = Path(__file__).resolve().parent
BATCHQ = Path(sys.executable).with_name("batchq")
BARE = HERE / "bare_batch.py"
PER_BATCH = 50_000
POLL = "0.2"
#: A day of virtual time a real second, 100,000 lines a virtual second: a batch's virtual
#: work (a minute validating and finalizing, half a second of lines) is ~1 ms of real time.
FAST = (
    *("--batch-time-scale", "86400", "--batch-lines-per-second", "100000"),
    *("--batch-step-seconds", "30"),
)
STEPS = ("planned", "uploaded", "creating", "created", "downloaded", "committed")
RSS_BUDGET, OWN_BUDGET = 150.0, 60.0  # MiB; seconds beyond the provider's

_TOPICS = ("a prime", "the moon", "tea", "rivers", "JSON", "a haiku", "rain", "bees", "maps")


def say(message: str) -> None:
    print(f"[bench-batch] {message}", file=sys.stderr, flush=True)


def write_prompts(path: Path, lines: int, tag: str = "", *, split: Path | None = None) -> None:
    """``lines`` short chat prompts (~40 characters) with their own custom_ids.

    With ``split``, the same requests are also written there as batch input files of
    ``PER_BATCH`` lines, as batchq would upload them, for the bare client.
    """
    batch: list[bytes] = []
    upload: list[bytes] = []
    part = 0
    with path.open("wb") as f:
        for n in range(1, lines + 1):
            content = f"{tag}Question {n}: say something about {_TOPICS[n % len(_TOPICS)]}."
            messages = [{"role": "user", "content": content}]
            batch.append(orjson.dumps({"custom_id": f"q-{n}", "messages": messages}) + b"\n")
            if split is not None:
                body = {"messages": messages, "model": "m"}
                line: dict[str, Any] = {"custom_id": f"batchq-{n}", "method": "POST"}
                line |= {"url": "/v1/chat/completions", "body": body}
                upload.append(orjson.dumps(line) + b"\n")
                if len(upload) == PER_BATCH or n == lines:
                    part += 1
                    (split / f"part-{part:03d}.jsonl").write_bytes(b"".join(upload))
                    upload = []
            if len(batch) == 10_000:
                f.write(b"".join(batch))
                batch = []
        f.write(b"".join(batch))


@contextlib.contextmanager
def endpoint(tmp: Path, *options: str) -> Iterator[str]:
    """A fresh ``batchq mock-server`` with ``options``; its base URL."""
    with harness.mock_server(BATCHQ, tmp, options=options) as url:
        yield url


def billing(url: str) -> dict[str, Any]:
    batches: dict[str, Any] = harness.mock_call(url, "/_mock/stats")["batches"]
    return batches


def once_each(job: Path, lines: int) -> tuple[int, int, int]:
    """(lines written once, missing, written more than once) over results + errors."""
    outputs = (job / name for name in ("results.jsonl", "errors.jsonl"))
    return harness.once_each((p for p in outputs if p.exists()), lines)


def batchq_run(path: Path, job: Path, url: str, *options: str) -> list[str]:
    cmd = [str(BATCHQ), "run", str(path), "--job", str(job), "--base-url", url, "--model", "m"]
    return [*cmd, "--via", "batch", "--batch-poll", POLL, *options]


# --- 1M lines through --via batch --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phases:
    """Seconds of one batchq run, from its ledger's stamps."""

    split: float  # process start → every chunk planned (start-up, pinning the input, the split)
    upload: float  # uploads, one after the other
    create: float  # create calls: the provider reads the file and answers every line
    wait: float  # last batch created → first batch seen finished
    collect: float  # download, check and commit every batch
    exit: float  # the last batch collected → the process gone

    @classmethod
    def of(cls, job: Path, run: Run) -> Phases:
        steps = [orjson.loads(raw) for raw in (job / "batches.jsonl").read_bytes().splitlines()]
        steps = [s for s in steps if "step" in s]
        plan = max(s["at"] for s in steps if s["step"] == "plan")
        upload = create = 0.0
        before = plan
        for s in steps:
            if s["step"] == "upload":
                upload += s["at"] - before
            elif s["step"] == "created":
                create += s["at"] - before
            if s["step"] in ("upload", "create", "created"):
                before = s["at"]
        last_created = max(s["at"] for s in steps if s["step"] == "created")
        seen = min(s["at"] for s in steps if s["step"] == "status" and s["at"] >= last_created)
        collected = max(s["at"] for s in steps if s["step"] == "collected")
        end = run.started_at + run.wall
        return cls(
            plan - run.started_at,
            upload,
            create,
            seen - last_created,
            collected - seen,
            end - collected,
        )


def one_million(tmp: Path, lines: int, runs: int) -> tuple[str, dict[str, Any]]:
    """batchq and the bare client, alternating, each on a fresh endpoint; their table."""
    split = tmp / "split"
    split.mkdir()
    path = tmp / "big.jsonl"
    say(f"writing {lines:,} lines (and the bare client's batch files)")
    write_prompts(path, lines, split=split)
    size = path.stat().st_size
    parts = sorted(split.iterdir())
    expected = len(parts)
    ours: list[tuple[Run, Phases]] = []
    bare: list[Run] = []
    timeout = 600 + lines / 1000
    for n in range(1, runs + 1):
        say(f"run {n} of {runs}: batchq run --via batch on {lines:,} lines")
        job = tmp / "big-job"
        with endpoint(tmp, *FAST) as url:
            cmd = batchq_run(path, job, url, "-q")
            run = harness.measure(cmd, timeout=timeout, log=tmp / "big.log", cwd=tmp)
            billed = billing(url)
        once, missing, twice = once_each(job, lines)
        if (once, billed["batches_created"]) != (lines, expected) or billed["duplicate_batches"]:
            raise BenchError(
                f"{once:,} lines once, {missing:,} missing, {twice:,} twice; billing {billed}"
            )
        if billed["lines_billed_twice"] or billed["lines_billed"] != lines:
            raise BenchError(f"billing: {billed}")
        ours.append((run, Phases.of(job, run)))
        subprocess.run(["rm", "-rf", str(job)], check=True)
        say(f"run {n} of {runs}: the bare client on the same {expected} files")
        out = tmp / "bare-out"
        out.mkdir()
        with endpoint(tmp, *FAST) as url:
            cmd = [sys.executable, str(BARE), "--base-url", url, "--poll", POLL, str(out)]
            cmd += map(str, parts)
            bare.append(harness.measure(cmd, timeout=timeout, log=tmp / "bare.log", cwd=tmp))
            billed = billing(url)
        written = sum(harness.count_lines(p) for p in out.iterdir())
        subprocess.run(["rm", "-rf", str(out)], check=True)
        if written != lines or billed["batches_created"] != expected:
            raise BenchError(f"the bare client got {written:,} lines; billing {billed}")
    runs_ = [r for r, _ in ours]
    wall, bare_wall = Spread.of([r.wall for r in runs_]), Spread.of([r.wall for r in bare])
    own = Spread.of([r.wall - b.wall for r, b in zip(runs_, bare, strict=True)])
    rss = Spread.of([r.rss_mib for r in runs_])
    rows = [
        ["wall time, s", wall.show(".1f"), bare_wall.show(".1f")],
        [
            "CPU (user + sys), s",
            Spread.of([r.cpu for r in runs_]).show(".1f"),
            Spread.of([r.cpu for r in bare]).show(".1f"),
        ],
        [
            "peak RSS, MiB",
            rss.show(".1f"),
            Spread.of([r.rss_mib for r in bare]).show(".1f"),
        ],
        ["batchq's own time: its wall − the bare client's, s", own.show(".1f"), ""],
    ]
    head = (
        f"{lines:,} lines ({size / 2**20:,.0f} MiB of short chat prompts), {expected} batches "
        f"of {PER_BATCH:,}; `batchq mock-server {' '.join(FAST)}`, `--batch-poll {POLL}`; "
        f"median (min–max) of {runs} runs, batchq and the bare client alternating"
    )
    text = f"### {head}\n\n" + table(["", "batchq --via batch", "bare client"], rows)
    phases = [p for _, p in ours]
    rows = [
        [name, Spread.of([getattr(p, name) for p in phases]).show(".1f"), what]
        for name, what in (
            ("split", "process start → every chunk planned: start-up, pinning the input, split"),
            ("upload", f"{expected} uploads, one after the other"),
            ("create", f"{expected} creates: the provider reads each file and answers its lines"),
            ("wait", f"last batch created → first seen finished (polls every {POLL} s)"),
            ("collect", "download, check and commit every batch"),
            ("exit", "last batch collected → the process gone"),
        )
    ]
    text += "\n\nWhere batchq's wall time goes (its ledger's stamps), s:\n\n"
    text += table(["phase", "s", "what"], rows)
    found = {"rss": rss.median, "own": own.median, "wall": wall.median, "batches": expected}
    found["bare"] = bare_wall.median
    return text, found


# --- the crash matrix ------------------------------------------------------------------------


def _kill_at(step: str, nth: int) -> str:
    """A batchq whose batch executor SIGKILLs itself the nth time it reaches ``step``."""
    return (
        "import os, signal, sys\n"
        "import batchq.batch.executor as executor\n"
        "from batchq.cli import main\n"
        "seen = []\n"
        "def at(step):\n"
        f"    if step == {step!r}:\n"
        "        seen.append(step)\n"
        f"        if len(seen) == {nth}:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "executor.at_step = at\n"
        "sys.argv[0] = 'batchq'\n"
        "main()\n"
    )


#: The endpoint's faults, one set per kill of a step (seeded by the kill's number).
FAULTS: tuple[tuple[str, ...], ...] = (
    (),
    ("--batch-lost-create-rate", "0.3", "--batch-lost-upload-rate", "0.2"),
    ("--batch-expire-rate", "0.3", "--rate-500", "0.02"),
    ("--batch-truncated-download-rate", "0.3", "--batch-rate-429", "0.05"),
    ("--batch-rate-5xx", "0.05", "--batch-lost-create-rate", "0.2", "--batch-expire-rate", "0.2"),
)


@dataclass(frozen=True, slots=True)
class Kill:
    step: str
    nth: int
    killed: bool  # the step was reached nth times (else the run finished first)
    once: bool  # after the rerun, every line once in results + errors
    duplicate_batches: int
    lines_billed_twice: int
    rerun_code: int


def kill_once(tmp: Path, step: str, k: int, lines: int) -> Kill:
    """Kill a run at the k-th occurrence of ``step``, then rerun the same command without the
    hook. A job is planned once, and again for the lines of expired batches: ``planned`` is
    killed at the first plan three times, and at the second (half the batches expire) twice."""
    nth = k if step != "planned" else 1 + (k > 3)
    faults = FAULTS[(k - 1) % len(FAULTS)]
    if step == "planned" and nth > 1:  # a second plan needs lines a batch left undone
        faults = ("--batch-expire-rate", "0.5")
    work = tmp / f"kill-{step}-{k}"
    work.mkdir()
    path = work / "in.jsonl"
    write_prompts(path, lines, tag=f"[{step} {k}] ")
    job = work / "job"
    options = ("--seed", str(k), *FAST, *faults)
    with endpoint(work, *options) as url:
        cmd = batchq_run(path, job, url, "--batch-max-lines", "200", "-q")
        killed = subprocess.run(
            [sys.executable, "-c", _kill_at(step, nth), *cmd[1:]],
            cwd=work, env=harness.child_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if killed.returncode not in (-signal.SIGKILL, 0, 1):
            raise BenchError(f"kill at {step} #{nth}: exit {killed.returncode}: {killed.stderr}")
        rerun = subprocess.run(
            cmd, cwd=work, env=harness.child_env(), capture_output=True, text=True, timeout=300
        )
        if rerun.returncode not in (0, 1):
            raise BenchError(f"rerun after {step} #{nth}: exit {rerun.returncode}: {rerun.stderr}")
        billed = billing(url)
    once, _, _ = once_each(job, lines)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    return Kill(
        step, nth, killed.returncode == -signal.SIGKILL, once == lines,
        billed["duplicate_batches"], billed["lines_billed_twice"], rerun.returncode,
    )  # fmt: skip


def crash_matrix(tmp: Path, kills: int, lines: int) -> tuple[str, bool]:
    rows, clean = [], True
    for step in STEPS:
        say(f"crash matrix: {kills} kills at {step!r}")
        found = [kill_once(tmp, step, k, lines) for k in range(1, kills + 1)]
        killed = [f for f in found if f.killed]
        ok = sum(f.once for f in found)
        dup = sum(f.duplicate_batches for f in found)
        twice = sum(f.lines_billed_twice for f in found)
        clean &= ok == len(found) and dup == 0 and twice == 0 and len(killed) == len(found)
        rows.append(
            [
                f"`{step}`",
                f"{len(killed)} of {len(found)}",
                ", ".join(str(f.nth) for f in found),
                f"{ok} of {len(found)}",
                str(dup),
                str(twice),
            ]
        )
    head = (
        f"### Crash matrix: SIGKILL at each step, then the same command ({lines:,} lines a job, "
        f"`--batch-max-lines 200`; each kill on a fresh endpoint, seed = the kill's number, "
        "faults in turn: none; lost creates and uploads; expiry and 500s; truncated downloads "
        "and 429s; 5xx, lost creates and expiry)"
    )
    headers = ["step", "killed", "at occurrence", "runs exactly once", "duplicate batches"]
    return f"{head}\n\n" + table([*headers, "lines billed twice"], rows), clean


# --- --via auto --deadline --------------------------------------------------------------------

#: An hour of virtual time a minute, a line every 20 virtual seconds: 3 lines a real second.
SLOW = ("--batch-time-scale", "60", "--batch-lines-per-second", "0.05", "--batch-step-seconds", "1")
SLOW_PACE = 3.0  # lines a real second


def auto(tmp: Path, lines: int, deadlines: Sequence[int]) -> str:
    rows = []
    for seconds in deadlines:
        say(f"--via auto --deadline {seconds}s on {lines:,} lines")
        work = tmp / f"auto-{seconds}"
        work.mkdir()
        path = work / "in.jsonl"
        write_prompts(path, lines, tag=f"[auto {seconds}] ")
        job = work / "job"
        with endpoint(work, *SLOW) as url:
            cmd = batchq_run(path, job, url, "--via", "auto", "--deadline", f"{seconds}s")
            started = time.perf_counter()
            done = subprocess.run(
                [*cmd, "--json-summary"], cwd=work, env=harness.child_env(),
                capture_output=True, text=True, timeout=seconds + 120,
            )  # fmt: skip
            wall = time.perf_counter() - started
            billed = billing(url)
        if done.returncode != 0:
            raise BenchError(f"--via auto --deadline {seconds}s: exit {done.returncode}")
        summary = orjson.loads(done.stdout)
        by_batch = summary["this_run"]["batches"]["lines"]
        once, _, _ = once_each(job, lines)
        subprocess.run(["rm", "-rf", str(work)], check=True)
        most = min(lines, int(SLOW_PACE * seconds))  # the batch's pace, up to the deadline
        rows.append(
            [
                f"{seconds} s",
                f"{wall:.1f} s",
                "yes" if wall <= seconds else "**no**",
                f"{by_batch:,}",
                f"{lines - by_batch:,}",
                f"{most:,}",
                f"{by_batch / most:.0%}" if most else "",
                "yes" if once == lines else "**no**",
                str(billed["lines_billed_twice"]),
            ]
        )
    head = (
        f"### `--via auto --deadline D`: {lines:,} lines, slow batches (`batchq mock-server "
        f"{' '.join(SLOW)}`: {SLOW_PACE:g} lines a real second, so by batch alone "
        f"{lines / SLOW_PACE:.0f} s); the live route answers at once"
    )
    headers = ["deadline", "wall", "in time", "lines by batch", "live", "batch could at most"]
    headers += ["of that", "exactly once", "lines billed twice"]
    return f"{head}\n\n" + table(headers, rows)


# --- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes, printed")
    parser.add_argument("--lines", type=int, help="lines of the big run (default 1,000,000)")
    parser.add_argument("--runs", type=int, help="runs of the big run (median; default 3)")
    parser.add_argument("--kills", type=int, help="kills per step (default 5)")
    parser.add_argument(
        "--parts", default="big,crash,auto", help="which parts to run (the file: all three)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "BATCH.md", help="Markdown file")
    args = parser.parse_args(argv)
    lines = args.lines or (100_000 if args.quick else 1_000_000)
    runs = args.runs or (1 if args.quick else 3)
    kills = args.kills or (2 if args.quick else 5)
    crash_lines, auto_lines = (600, 60) if args.quick else (2_000, 120)
    deadlines = (10,) if args.quick else (10, 20, 30)
    parts = set(args.parts.split(","))
    began, revision = time.perf_counter(), harness.revision(HERE.parent)
    sections: list[str] = []

    def section(text: str) -> None:
        print(text + "\n", flush=True)
        sections.append(text)

    try:
        with tempfile.TemporaryDirectory(prefix="batchq-bench-batch-") as name:
            tmp = Path(name)
            found: dict[str, Any] = {}
            clean: bool | None = None
            if "big" in parts:
                big, found = one_million(tmp, lines, runs)
                section(big)
            if "crash" in parts:
                matrix, clean = crash_matrix(tmp, kills, crash_lines)
                section(matrix)
            if "auto" in parts:
                section(auto(tmp, auto_lines, deadlines))
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - began
    batches = -(-lines // PER_BATCH)
    targets = []
    if found:
        targets += [
            ["peak RSS of batchq", f"≤ {RSS_BUDGET:.0f} MiB", f"{found['rss']:.1f} MiB",
             found["rss"] <= RSS_BUDGET],
            ["batchq's own time beyond the provider's", f"≤ {OWN_BUDGET:.0f} s",
             f"{found['own']:.1f} s", found["own"] <= OWN_BUDGET],
            ["batches created", f"{batches}", str(found["batches"]), found["batches"] == batches],
        ]  # fmt: skip
    if clean is not None:
        targets.append(
            ["crash matrix: once, no duplicate batch, no line billed twice", "every kill",
             "every kill" if clean else "**not every kill**", clean]
        )  # fmt: skip
    verdict = table(
        ["target", "goal", "measured", ""],
        [[*row[:3], "PASS" if row[3] else "MISS"] for row in targets],
    )
    print(f"### Targets ({lines:,} lines)\n\n{verdict}\n\ntook {elapsed:.0f} s")
    if args.quick or parts != {"big", "crash", "auto"}:
        return 0  # a smoke run, or a part: printed only
    command = " ".join(["python benchmarks/batch.py", *(argv or sys.argv[1:])])
    head = (
        "# Batch API figures (issue 20)\n\n"
        "Written by `benchmarks/batch.py` (`make bench-batch`).\n\n"
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"
        f"- machine: {harness.machine()}\n"
        f"- batchq: {revision} (at the start)\n"
        f"- command: `{command}` ({elapsed:.0f} s)\n\n"
        f"### Targets\n\n{verdict}\n\n"
    )
    args.out.write_text(head + "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
