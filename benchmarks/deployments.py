"""One job, many endpoints (issue 23): how close a pool gets to the sum of its parts.

Every endpoint is ``batchq mock-server`` in its own process; ``batchq run`` is a child
process too, measured from the outside (``harness.measure``). Four cases:

1. **Share of capacity.** Four GPU-like endpoints (``--slots`` 16, 64, 256, 256, 0.2 s
   base latency, no rate-limit headers). Each alone first: batchq's req/s against it (its
   capacity as batchq reaches it, ``--concurrency auto``); then one job over the four as
   ``[[deployments]]``; and the input split by hand into four jobs, one per endpoint, run
   side by side (what a user does today). Figures: the pool's req/s over the four alone
   summed and over the split jobs', and each one's server-side p50 (queue + service, from
   its ``/_mock/stats``) over the unloaded latency. Goal: ≥ 90%, each ≤ 2×.
2. **One of three killed.** Three endpoints (``--slots`` 32, 0.2 s); once the job runs,
   one is SIGKILLed, and restarted on the same port ``--down`` seconds later. The results
   file is read every 0.25 s: req/s per 2 s before, during and after; how long until the
   two left carry the rate (goal: within 2 s); how long the restarted one took to answer
   again against its break (goal: within its probe interval); every line exactly once.
3. **Overhead of the pool.** One fast endpoint (``--latency 0``), 20,000 lines,
   ``--concurrency 64``: batchq as it was before deployments (the merge base, run from a
   copy of its ``batchq/``), this batchq with ``--base-url``, and this batchq with a
   ``--deployments`` file of that one endpoint, runs alternating. Goal: ≥ 0.95×.
4. **Two paced endpoints.** ``--rpm`` 6,000 and 3,000 enforced by the servers, with
   OpenAI's headers; batchq is told nothing. Goal: ≥ 95% of 9,000 RPM, ≤ 0.1% 429s.

    python benchmarks/deployments.py [--cases 1,2,3,4] [--runs N] [--down S] [--base REV]
                                     [--lines N] [--latency S]

The tables are printed and appended to ``benchmarks/DEPLOYMENTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import harness
import orjson
from harness import Spread, table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BATCHQ = Path(sys.executable).parent / "batchq"
REPORT = HERE / "DEPLOYMENTS.md"
LATENCY = 0.2  # --latency changes it for case 1


def gpu() -> tuple[str, ...]:
    return ("--latency", str(LATENCY), "--no-rate-limit-headers")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def endpoint(tmp: Path, *options: str, port: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    """``batchq mock-server`` in its own process group; its URL is ``proc.url``."""
    log = (tmp / f"mock-{port or 'free'}.log").open("ab")
    cmd = [str(BATCHQ), "mock-server", "--port", str(port), *options]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log, env=harness.child_env(), start_new_session=True
    )
    try:
        proc.url = harness.read_url(proc)  # type: ignore[attr-defined]
        yield proc
    finally:
        harness.stop(proc)
        log.close()


def pool_file(path: Path, urls: dict[str, str]) -> Path:
    text = "".join(f'[[deployments]]\nname = "{n}"\nbase_url = "{u}"\n\n' for n, u in urls.items())
    path.write_text(text)
    return path


def run(tmp: Path, name: str, lines: int, *args: str | Path, cmd: Sequence[str | Path] = ()) -> Any:
    """One measured ``batchq run`` of a fresh job; (Run, its --json-summary)."""
    job = tmp / f"job-{name}"
    shutil.rmtree(job, ignore_errors=True)
    log = tmp / f"{name}.log"
    argv = [*(cmd or [BATCHQ]), "run", tmp / f"in-{lines}.jsonl", "--job", job, "--model", "m"]
    argv += ["--no-fsync", "-q", "--json-summary", *args]
    measured = harness.measure(argv, timeout=900, log=log, cwd=tmp)
    last = [x for x in log.read_text().splitlines() if x.startswith("{")][-1]
    return measured, orjson.loads(last)


def ensure_input(tmp: Path, lines: int) -> None:
    path = tmp / f"in-{lines}.jsonl"
    if not path.exists():
        harness.write_input(path, lines)


# --- 1. share of capacity ----------------------------------------------------------------


def share(tmp: Path, lines: int, alone_lines: dict[int, int]) -> str:
    slots = {"gpu16": 16, "gpu64": 64, "gpu256a": 256, "gpu256b": 256}
    rows, alone = [], {}
    for name, n in slots.items():
        ensure_input(tmp, alone_lines[n])
        with endpoint(tmp, "--slots", str(n), *gpu()) as proc:
            url = proc.url  # type: ignore[attr-defined]
            measured, _ = run(tmp, f"alone-{name}", alone_lines[n], "--base-url", url)
            alone[name] = alone_lines[n] / measured.wall
            say(f"{name} alone: {alone[name]:,.0f} req/s")
    split = split_by_hand(tmp, slots, lines)
    ensure_input(tmp, lines)
    with contextlib.ExitStack() as stack:
        procs = {
            n: stack.enter_context(endpoint(tmp, "--slots", str(s), *gpu()))
            for n, s in slots.items()
        }
        urls = {n: p.url for n, p in procs.items()}  # type: ignore[attr-defined]
        measured, figures = run(
            tmp, "pool", lines, "--deployments", pool_file(tmp / "pool.toml", urls)
        )
        stats = {n: harness.mock_call(u, "/_mock/stats") for n, u in urls.items()}
    rate = lines / measured.wall
    total = sum(alone.values())
    worst = 0.0
    for name, n in slots.items():
        served = figures["this_run"]["deployments"][name]["succeeded"]
        inflation = stats[name]["latency_p50"] / LATENCY
        worst = max(worst, inflation)
        rows.append(
            [
                name,
                f"{n}",
                f"{alone[name]:,.0f}",
                f"{served:,}",
                f"{served / lines:.0%}",
                f"{alone[name] / total:.0%}",
                f"{split[name]:,.0f}",
                f"{inflation:.2f}×",
            ]
        )
    split_total = sum(split.values())
    ok = rate / total >= 0.9 and worst <= 2
    headers = [
        "deployment",
        "slots",
        "alone req/s",
        "lines served",
        "share",
        "share of capacity",
        "split by hand req/s",
        "server p50 / unloaded",
    ]
    return (
        f"### 1. Four endpoints, 16/64/256/256 slots, {LATENCY:g} s ({lines:,} lines)\n\n"
        f"{table(headers, rows)}\n\n"
        f"Pool: **{rate:,.0f} req/s** against {total:,.0f} for the four alone summed: "
        f"**{rate / total:.0%}**; the fullest at {worst:.2f}× its unloaded latency "
        f"(goal ≥ 90% and ≤ 2×: {'PASS' if ok else 'MISS'}). Wall {measured.wall:.1f} s, "
        f"CPU {measured.cpu:.1f} s. The input split by hand into four jobs run side by side, "
        f"one per endpoint (the same four servers and four clients at once): "
        f"{split_total:,.0f} req/s; the pool gets **{rate / split_total:.0%}** of that."
    )


def split_by_hand(tmp: Path, slots: dict[str, int], lines: int) -> dict[str, float]:
    """What a user gets today: one job per endpoint, the input cut in proportion to its
    slots, all four at once (so the machine carries the same servers and more clients)."""
    whole = sum(slots.values())
    parts = {name: max(1, lines * n // whole) for name, n in slots.items()}
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(slots)) as pool:
        futures = {}
        for name, n in slots.items():
            ensure_input(tmp, parts[name])
            url = stack.enter_context(endpoint(tmp, "--slots", str(n), *gpu())).url  # type: ignore[attr-defined]
            futures[name] = pool.submit(run, tmp, f"split-{name}", parts[name], "--base-url", url)
        rates = {name: parts[name] / f.result()[0].wall for name, f in futures.items()}
    say(f"split by hand: {sum(rates.values()):,.0f} req/s")
    return rates


# --- 2. one of three killed and restarted --------------------------------------------------


def killed(tmp: Path, lines: int, down: float, kill_at: float) -> str:
    ensure_input(tmp, lines)
    options = ("--slots", "32", *gpu())
    port = harness.free_port()
    job = tmp / "job-kill"
    shutil.rmtree(job, ignore_errors=True)
    samples: list[tuple[float, dict[str, int]]] = []
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(endpoint(tmp, *options))
        b = stack.enter_context(endpoint(tmp, *options))
        c = stack.enter_context(endpoint(tmp, *options, port=port))
        urls = {"a": a.url, "b": b.url, "c": c.url}  # type: ignore[attr-defined]
        argv = [
            BATCHQ,
            "run",
            tmp / f"in-{lines}.jsonl",
            "--job",
            job,
            "--model",
            "m",
            "--no-fsync",
        ]
        argv += ["-q", "--json-summary", "--deployments", pool_file(tmp / "three.toml", urls)]
        log = (tmp / "kill.log").open("wb")
        proc = subprocess.Popen(
            [str(x) for x in argv],
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=tmp,
            env=harness.child_env(),
        )
        start = time.monotonic()
        counts: dict[str, int] = {}
        offset = 0
        killed_at = restarted_at = None
        restarted: contextlib.ExitStack | None = None
        while proc.poll() is None:
            time.sleep(0.25)
            now = time.monotonic() - start
            offset = _tally(job / "results.jsonl", offset, counts)
            samples.append((now, dict(counts)))
            if killed_at is None and now >= kill_at:
                os.killpg(c.pid, signal.SIGKILL)
                killed_at = now
                say(f"SIGKILL c at {now:.1f} s")
            elif killed_at is not None and restarted_at is None and now >= killed_at + down:
                restarted = contextlib.ExitStack()
                restarted.enter_context(endpoint(tmp, *options, port=port))
                stack.enter_context(restarted)
                restarted_at = time.monotonic() - start
                say(f"c restarted at {restarted_at:.1f} s")
        stdout, _ = proc.communicate()
        log.close()
    figures = orjson.loads(stdout.splitlines()[-1])
    once, missing, twice = harness.once_each([job / "results.jsonl", job / "errors.jsonl"], lines)
    assert killed_at is not None
    return _kill_report(
        samples, figures, lines, killed_at, restarted_at, (once, missing, twice), down
    )


def _tally(path: Path, offset: int, counts: dict[str, int]) -> int:
    """Count the whole lines added to ``path`` since ``offset`` by deployment; the new offset."""
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        f.seek(offset)
        data = f.read()
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            name = orjson.loads(line)["batchq"]["deployment"]
            counts[name] = counts.get(name, 0) + 1
        return offset + end
    return offset


def _rate(
    samples: list[tuple[float, dict[str, int]]], t0: float, t1: float, who: str | None = None
) -> float:
    def at(t: float) -> tuple[float, int]:
        best = min(samples, key=lambda s: abs(s[0] - t))
        return best[0], (sum(best[1].values()) if who is None else best[1].get(who, 0))

    (s0, n0), (s1, n1) = at(t0), at(t1)
    return (n1 - n0) / max(s1 - s0, 1e-9)


def _kill_report(
    samples: list[tuple[float, dict[str, int]]],
    figures: dict[str, Any],
    lines: int,
    killed_at: float,
    restarted_at: float | None,
    once: tuple[int, int, int],
    down: float,
) -> str:
    end = samples[-1][0]
    before = _rate(samples, killed_at - 2.0, killed_at)
    rows = []
    t = 0.0
    shown = end if restarted_at is None else min(end, restarted_at + 16)
    while t < shown:
        rows.append(
            [
                f"{t:.0f}–{t + 2:.0f} s",
                *(f"{_rate(samples, t, min(t + 2, end), w):,.0f}" for w in ("a", "b", "c", None)),
            ]
        )
        t += 2
    # The two left carry the load: the first 0.5 s window after the kill at >= 2/3 of before.
    recovered = next(
        (
            s[0] - killed_at
            for s in samples
            if s[0] > killed_at + 0.5 and _rate(samples, s[0] - 0.5, s[0]) >= 0.6 * before
        ),
        None,
    )
    back = None
    if restarted_at is not None:
        at_restart = next((s[1].get("c", 0) for s in samples if s[0] >= restarted_at), 0)
        back = next(
            (
                s[0] - restarted_at
                for s in samples
                if s[0] > restarted_at and s[1].get("c", 0) > at_restart
            ),
            None,
        )
    row_c = figures["this_run"]["deployments"]["c"]
    causes = figures["this_run"]["retries_by_cause"]
    return (
        f"### 2. Three endpoints (32 slots, {LATENCY:g} s), one SIGKILLed at {killed_at:.1f} s, "
        f"restarted {down:g} s later ({lines:,} lines)\n\n"
        f"{table(['window', 'a req/s', 'b req/s', 'c req/s', 'all req/s'], rows)}\n\n"
        f"(… to the end at {end:.0f} s.) "
        f"Before the kill {before:,.0f} req/s. The two left at ≥ 60% of that "
        f"{'never' if recovered is None else f'{recovered:.2f} s'} after the kill (goal ≤ 2 s); "
        f"c answered again {'never' if back is None else f'{back:.1f} s'} after its restart "
        f"(taken out {row_c['taken_out']}×, last: {row_c['why']}). Retries by cause: {causes}. "
        f"Exactly once: {once[0]:,} lines once, {once[1]:,} missing, {once[2]:,} twice."
    )


# --- 3. overhead of the pool ---------------------------------------------------------------


def base_command(tmp: Path, rev: str) -> list[str]:
    """A command running batchq as it was at ``rev`` (its batchq/ copied out, run with -S so
    that this checkout's editable install does not shadow it)."""
    src = tmp / "base"
    src.mkdir(exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "batchq"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive.stdout, check=True)
    site = next(Path(sys.prefix, "lib").glob("python3*/site-packages"))
    script = tmp / "batchq-base"
    script.write_text(
        f'#!/bin/sh\ncd "$PWD"\nPYTHONPATH={src}:{site} exec {sys.executable} -S -m batchq "$@"\n'
    )
    script.chmod(0o755)
    return [str(script)]


def overhead(tmp: Path, lines: int, runs: int, rev: str) -> str:
    ensure_input(tmp, lines)
    base = base_command(tmp, rev)
    found: dict[str, list[harness.Run]] = {
        "before (merge base)": [],
        "--base-url": [],
        "--deployments, one": [],
    }
    with endpoint(tmp, "--latency", "0") as proc:
        url = proc.url  # type: ignore[attr-defined]
        one = pool_file(tmp / "one.toml", {"only": url})
        fixed = ("--concurrency", "64")
        for i in range(runs):
            say(f"overhead run {i + 1}/{runs}")
            found["before (merge base)"].append(
                run(tmp, "before", lines, "--base-url", url, *fixed, cmd=base)[0]
            )
            found["--base-url"].append(run(tmp, "now", lines, "--base-url", url, *fixed)[0])
            found["--deployments, one"].append(
                run(tmp, "one", lines, "--deployments", one, *fixed)[0]
            )
    baseline = statistics.median(lines / r.wall for r in found["before (merge base)"])
    rows = []
    for label, measured in found.items():
        rates = Spread.of([lines / r.wall for r in measured])
        cpu = Spread.of([1000 * r.cpu / lines for r in measured])
        rows.append([label, rates.show(), f"{rates.median / baseline:.2f}", cpu.show(".3f")])
    now = [m for label, m in found.items() if not label.startswith("before")]
    worst = min(statistics.median(lines / r.wall for r in m) for m in now) / baseline
    return (
        f"### 3. One fast endpoint, {lines:,} lines, --concurrency 64 "
        f"(medians of {runs}, min–max)\n\n"
        f"{table(['batchq', 'req/s', '× before', 'CPU s per 1k requests'], rows)}\n\n"
        f"Worst against before: **{worst:.2f}×** "
        f"(goal ≥ 0.95: {'PASS' if worst >= 0.95 else 'MISS'})."
    )


# --- 4. two paced deployments -------------------------------------------------------------


def paced(tmp: Path, lines: int) -> str:
    """6,000 and 3,000 RPM, enforced by the servers, which send OpenAI's headers; batchq is
    told nothing and learns both paces from the headers."""
    ensure_input(tmp, lines)
    with endpoint(tmp, "--rpm", "6000") as fast, endpoint(tmp, "--rpm", "3000") as slow:
        urls = {"rpm6000": fast.url, "rpm3000": slow.url}  # type: ignore[attr-defined]
        measured, figures = run(
            tmp, "paced", lines, "--deployments", pool_file(tmp / "p.toml", urls)
        )
        stats = {n: harness.mock_call(u, "/_mock/stats") for n, u in urls.items()}
    rpm = lines / measured.wall * 60
    sent = sum(s["requests"] for s in stats.values())
    refused = sum(s["rate_limited"] for s in stats.values())
    rows = [
        [n, f"{s['requests']:,}", f"{s['rate_limited']:,}",
         f"{figures['this_run']['deployments'][n]['succeeded']:,}"]
        for n, s in stats.items()
    ]  # fmt: skip
    ok = rpm >= 0.95 * 9000 and refused <= 0.001 * sent
    return (
        f"### 4. Two paced endpoints, 6,000 and 3,000 RPM with headers ({lines:,} lines)\n\n"
        f"{table(['deployment', 'requests', '429s', 'lines served'], rows)}\n\n"
        f"**{rpm:,.0f} RPM** of 9,000 ({rpm / 9000:.0%}, wall {measured.wall:.1f} s from the "
        f"process start), 429s {refused / max(sent, 1):.2%} of requests "
        f"(goal ≥ 95%, ≤ 0.1%: {'PASS' if ok else 'MISS'})."
    )


def main(argv: Sequence[str] | None = None) -> int:
    global LATENCY
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="1,2,3,4")
    parser.add_argument("--runs", type=int, default=3, help="of case 3")
    parser.add_argument("--down", type=float, default=20.0, help="seconds the killed one is down")
    parser.add_argument(
        "--base", default="main", help="the batchq case 3 compares with (merge base with it)"
    )
    parser.add_argument("--lines", type=int, default=60_000, help="of cases 1 and 2")
    parser.add_argument("--latency", type=float, default=LATENCY, help="of case 1's endpoints")
    args = parser.parse_args(argv)
    cases = {int(c) for c in args.cases.split(",")}
    LATENCY = args.latency
    merge_base = subprocess.run(
        ["git", "-C", str(REPO), "merge-base", "HEAD", args.base],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    sections = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as name:
        tmp = Path(name)
        if 1 in cases:
            scale = 0.2 / LATENCY  # alone runs of ~15-20 s whatever the latency
            alone = {16: int(1_000 * scale), 64: int(3_000 * scale), 256: int(10_000 * scale)}
            sections.append(share(tmp, args.lines, alone))
            print(sections[-1], flush=True)
        if 2 in cases:
            sections.append(killed(tmp, args.lines, args.down, kill_at=6.0))
            print(sections[-1], flush=True)
        if 4 in cases:
            sections.append(paced(tmp, 9_000))
            print(sections[-1], flush=True)
        if 3 in cases:
            sections.append(overhead(tmp, 20_000, args.runs, merge_base))
            print(sections[-1], flush=True)
    head = (
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {harness.revision(REPO)} "
        f"(before: {merge_base[:7]}), {harness.machine()}, {time.monotonic() - started:.0f} s\n\n"
        f"`python benchmarks/deployments.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
    )
    with REPORT.open("a") as f:
        f.write(head + "\n\n".join(sections) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
