"""Where capacity.py's case 1 makespan goes (issue 21: the hedged goal of 1.10x the floor).

The same run as case 1 (20,000 requests, ``--rpm 10000`` against a mock enforcing it, latency
lognormal p50 0.8 s / p99 10 s, 1% 500s and 1% 503s, seed 11), the mock recording when each
request arrived. The wall time is taken apart, in seconds after batchq's launch:

- **floor**: the lines at exactly the limit, lines / RPM;
- **margin**: batchq paces 2% under a stated or given limit (``limiter.MARGIN``: a sliding
  minute paced at its limit refuses whatever jitter pushes over it);
- **extra turns**: the retries and hedges sent before the last new request, each a turn of
  the pace like any request;
- **start**: how far the arrivals were behind that pace 10 s in (the process starting, the
  lone probe, the pool opening);
- **drift**: how much more behind the pace the last new request was;
- **tail**: the end of batchq after its last new request reached the endpoint.

    python benchmarks/makespan.py [--repeat N] [--lines N] [--batchq-args ARGS]
"""

from __future__ import annotations

import argparse
import bisect
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
from capacity import BATCHQ, PACED, RPM, SEED
from harness import table

from batchq.live.limiter import MARGIN

START_AT = 10.0  # seconds in: the start is over by then


def parts(lines: int, tmp: Path, extra: list[str]) -> dict[str, float]:
    """One run of case 1; its wall time taken apart (seconds)."""
    source = tmp / f"input-{lines}.jsonl"
    if not source.exists():
        harness.write_input(source, lines)
    mock = ["--rpm", str(RPM), *PACED, "--seed", str(SEED), "--record"]
    job = tmp / f"job-{time.time_ns()}"
    with harness.mock_server(BATCHQ, tmp, options=mock) as url:
        cmd = [BATCHQ, "run", source, "--job", job, "--base-url", url, "--model", "m", "-q"]
        cmd += ["--rpm", str(RPM), *extra]
        launched = time.time()
        run = harness.measure(cmd, timeout=20 * lines / RPM * 60, log=tmp / "log", cwd=tmp)
        arrivals = harness.mock_call(url, "/_mock/stats")["arrivals"]
    seen: set[str] = set()
    firsts = []  # when each line's first request arrived
    for at, prompt in arrivals:
        if prompt not in seen:
            seen.add(prompt)
            firsts.append(at - launched)
    times = sorted(at - launched for at, _ in arrivals)
    pace = RPM * MARGIN / 60
    last_new = max(firsts)
    sent_by_then = bisect.bisect_right(times, last_new)
    start = START_AT - bisect.bisect_right(times, START_AT) / pace
    floor = lines / RPM * 60
    return {
        "floor": floor,
        "margin": lines / pace - floor,
        "extra turns": (sent_by_then - lines) / pace,
        "start": start,
        "drift": last_new - sent_by_then / pace - start,
        "tail": run.wall - last_new,
        "wall": run.wall,
        "requests": len(arrivals),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--batchq-args", default="", help="more flags for batchq run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchq-makespan-") as tmp:
        runs = []
        for n in range(args.repeat):
            print(f"[makespan] run {n + 1} of {args.repeat}", file=sys.stderr, flush=True)
            runs.append(parts(args.lines, Path(tmp), shlex.split(args.batchq_args)))
    floor = runs[0]["floor"]
    rows = []
    for key in ("floor", "margin", "extra turns", "start", "drift", "tail", "wall"):
        values = [round(r[key], 2) + 0.0 for r in runs]  # (+ 0.0: no "-0.00")
        spread = f"{min(values):.2f}–{max(values):.2f}"
        median = statistics.median(values)
        rows.append([key, f"{median:.2f}", spread, f"{median / floor:.3f}×"])
    requests = statistics.median(r["requests"] for r in runs)
    print(f"{args.lines:,} lines, medians of {args.repeat} runs; {requests:,.0f} requests\n")
    print(table(["part of the makespan", "s", "spread", "of the floor"], rows))


if __name__ == "__main__":
    main()
