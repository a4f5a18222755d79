"""What ``--metrics-port`` costs a run: the same batchq run without metrics, with the port
open, and scraped ten times a second (Prometheus scrapes every 15-60 s).

The metrics are rendered from the run's counters when scraped, on the run's
event loop, so they should cost nothing measurable. Three variants in
rotation against the built-in endpoint (no latency: batchq's own CPU is the
bottleneck), medians with min-max of ``--runs``, each variant's ratio to the
run without metrics; then one render, timed in-process, and the share of a
core that is at ten scrapes a second.

Usage: ``python benchmarks/metrics.py [--lines N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # a sibling module, found through the line above

BATCHQ = Path(sys.executable).with_name("batchq")
SCRAPES_PER_SECOND = 10.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="batchq-metrics-") as name,
        harness.mock_server(BATCHQ, Path(name)) as url,
    ):
        tmp = Path(name)
        path = tmp / "input.jsonl"
        harness.write_input(path, args.lines)
        variants = ("no metrics", "--metrics-port, not scraped", "scraped 10x a second")
        rates: dict[str, list[float]] = {v: [] for v in variants}
        scraped: list[int] = []
        for turn in range(args.runs):
            for variant in variants:
                job = tmp / f"job-{turn}-{len(rates[variant])}"
                port = harness.free_port()
                command = [
                    *(str(BATCHQ), "run", str(path), "--job", str(job), "--base-url", url),
                    *("--model", "m", "--concurrency", "64", "-q"),
                ]
                if variant != "no metrics":
                    command += ["--metrics-port", str(port)]
                with _scraping(port, variant.startswith("scraped")) as count:
                    run = harness.measure(command, timeout=600, log=tmp / "run.log", cwd=tmp)
                if variant.startswith("scraped"):
                    scraped.append(count[0])
                if harness.count_lines(job / "results.jsonl") != args.lines:
                    raise SystemExit(f"{variant}: not every line has a result")
                rates[variant].append(args.lines / run.wall)
                shutil.rmtree(job)
    base = statistics.median(rates["no metrics"])
    rows = [
        [v, harness.Spread.of(found).show(), f"{statistics.median(found) / base:.3f}"]
        for v, found in rates.items()
    ]
    print(
        f"{args.lines:,} lines against the built-in endpoint, --concurrency 64, "
        f"median (min-max) of {args.runs}; {statistics.median(scraped):.0f} scrapes a run"
    )
    print(harness.table(["metrics", "req/s", "ratio to none"], rows))
    took = render_time()
    print(
        f"\nOne render, timed in-process (median of 200): {took * 1e6:,.0f} µs; "
        f"at {SCRAPES_PER_SECOND:g} scrapes a second, {took * SCRAPES_PER_SECOND:.4%} of a core"
    )
    return 0


@contextlib.contextmanager
def _scraping(port: int, scrape: bool) -> Iterator[list[int]]:
    """While the block runs, GET /metrics ten times a second (once the port answers)."""
    count, stop = [0], threading.Event()

    def loop() -> None:
        while not stop.wait(1 / SCRAPES_PER_SECOND):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
                count[0] += 1

    thread = threading.Thread(target=loop, daemon=True)
    if scrape:
        thread.start()
    try:
        yield count
    finally:
        stop.set()
        if scrape:
            thread.join()


def render_time(samples: int = 200) -> float:
    """Seconds one render takes, for a run of two phases with every series present."""
    from batchq.config import Settings
    from batchq.job.folder import Job
    from batchq.show.metrics import Metrics
    from batchq.stats import Stats

    folder = Path("/tmp/jobs/nightly")
    settings = Settings(input="in.jsonl", metrics_port=0, price_in=1.0, price_out=2.0)
    job = Job(folder, settings, folder / "in.jsonl", folder / "r.jsonl", folder / "e.jsonl")
    metrics = Metrics(job)
    for _ in range(2):
        stats = Stats(total=10_000_000, batches_open=0)
        for i in range(100_000):
            stats.latency.add(0.05 + (i % 1000) / 100)
        for cause in ("429", "500", "503", "timeout", "connection_error"):
            stats.retried(cause)
        stats.pace_rates = {"requests": 100.0, "tokens": 30_000.0}
        stats.binding = "pace"
        metrics.watch(stats)
    took = []
    for _ in range(samples):
        start = time.perf_counter()
        metrics.render()
        took.append(time.perf_counter() - start)
    return statistics.median(took)


if __name__ == "__main__":
    raise SystemExit(main())
