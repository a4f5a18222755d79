"""What ``history.jsonl`` costs a run: the same batchq run with the history and without it.

The history is appended by the runner's ticker every few seconds, never per
request, so it should cost nothing measurable. This checks that claim
against nginx (where batchq, not the endpoint, is the bottleneck): N lines,
runs of each variant in rotation, medians with min–max, the ratio of the
two. "without" is the same batchq with ``History.record`` made a no-op by
the launcher (no option of batchq turns the history off).

On a shared machine run-to-run noise (±5-10%) exceeds what a record every
2 s can cost, so it also times the writer in-process: one record, one
thinning of a full file (amortised over the records between two), and the
share of a core that is at the default interval.

Usage: ``python benchmarks/history.py [--lines N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # a sibling module, found through the line above

WITHOUT = (
    "import sys; from batchq.job import history; "
    "history.History.record = lambda *args, **kwargs: None; "
    "from batchq.cli import main; sys.argv[0] = 'batchq'; main()"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    harness.ensure_nginx(print)
    with (
        tempfile.TemporaryDirectory(prefix="batchq-history-") as name,
        harness.nginx(Path(name)) as url,
    ):
        tmp = Path(name)
        path = tmp / "input.jsonl"
        harness.write_input(path, args.lines)
        run = ["run", str(path), "--base-url", url, "--model", "m", "-q"]
        variants = {
            "with history.jsonl": [sys.executable, "-m", "batchq", *run],
            "without (record a no-op)": [sys.executable, "-c", WITHOUT, *run],
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for turn in range(args.runs):
            for variant, command in variants.items():
                job = tmp / f"job-{turn}-{len(rates[variant])}"
                log = tmp / "run.log"
                done = harness.measure([*command, "--job", str(job)], timeout=600, log=log, cwd=tmp)
                if harness.count_lines(job / "results.jsonl") != args.lines:
                    raise SystemExit(f"{variant}: not every line has a result:\n{log.read_text()}")
                rates[variant].append(args.lines / done.wall)
                shutil.rmtree(job)
    without = statistics.median(rates["without (record a no-op)"])
    rows = [
        [variant, harness.Spread.of(found).show(), f"{statistics.median(found) / without:.3f}"]
        for variant, found in rates.items()
    ]
    print(f"{args.lines:,} lines against nginx, median (min–max) of {args.runs}")
    print(harness.table(["run", "req/s", "ratio to without"], rows))
    print("\nThe writer, timed in-process")
    print(harness.table(["step", "µs", "how often", "share of a core"], writer_costs()))
    return 0


def writer_costs(samples: int = 200) -> list[list[str]]:
    """One record; one thinning of a full file, amortised; as shares of a core."""
    from batchq.job.history import EVERY, MAX_RECORDS, History
    from batchq.stats import Stats

    with tempfile.TemporaryDirectory(prefix="batchq-history-") as name:
        stats = Stats(total=10_000_000)
        for i in range(10_000):  # a histogram and causes as a long run has them
            stats.latency.add(0.05 + (i % 300) / 100)
            stats.retried(("429", "503", "timeout")[i % 3])
        history = History(Path(name), max_records=MAX_RECORDS + samples + 1)
        took = []
        for _ in range(samples):
            stats.ok += 5_000
            start = time.perf_counter()
            history.record(stats, 0.0, pace=50.0)
            took.append(time.perf_counter() - start)
        record = statistics.median(took)
        while history.records < MAX_RECORDS:  # a full file, as the bound leaves it
            history.record(stats, 0.0, pace=50.0)
        thin = []
        for _ in range(5):
            history.records = history.max_records = MAX_RECORDS
            start = time.perf_counter()
            history._thin()
            thin.append(time.perf_counter() - start)
            while history.records < MAX_RECORDS:
                history.record(stats, 0.0, pace=50.0)
        history.close()
    thinning = statistics.median(thin)
    per_record = record + thinning / (MAX_RECORDS // 2)
    return [
        ["one record", f"{record * 1e6:,.0f}", f"every {EVERY:g} s", f"{record / EVERY:.4%}"],
        [
            f"thinning {MAX_RECORDS:,} records to half",
            f"{thinning * 1e6:,.0f}",
            f"every {MAX_RECORDS // 2:,} records",
            f"{thinning / (MAX_RECORDS // 2) / EVERY:.4%}",
        ],
        ["both, per record", f"{per_record * 1e6:,.0f}", "", f"{per_record / EVERY:.4%}"],
    ]


if __name__ == "__main__":
    raise SystemExit(main())
