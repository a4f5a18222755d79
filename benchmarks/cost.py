"""What counting cost, and keeping a budget, costs a run: priced runs against an unpriced one.

    .venv/bin/python benchmarks/cost.py [--lines 50000] [--runs 3]

Against nginx's fixed answer (harness.nginx), so the endpoint is never the
bottleneck and what is measured is batchq's own work. Three variants of the
same ``batchq run`` on the same input, alternating so that drift on a noisy
machine hits all of them: no price (the baseline), ``--price-in/--price-out``
(every answer's usage counted, spend.json saved with each commit), and the
same with a ``--max-cost`` that is never reached (every attempt also reserves
its worst cost at the budget's gate). Figures are medians (min–max) of
``--runs``; the ratio column is each variant's median throughput over the
baseline's, measured in the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import harness

BATCHQ = Path(sys.executable).with_name("batchq")
VARIANTS = {
    "no price (baseline)": [],
    "--price-in/--price-out": ["--price-in", "0.15", "--price-out", "0.6"],
    "... and --max-cost": ["--price-in", "0.15", "--price-out", "0.6", "--max-cost", "1e9"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {harness.machine()}")
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpus: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="batchq-cost-") as name:
        tmp = Path(name)
        harness.write_input(tmp / "in.jsonl", args.lines)
        with harness.nginx(tmp) as url:
            for run in range(args.runs):
                for i, (variant, extra) in enumerate(VARIANTS.items()):
                    job = tmp / f"job-{run}-{i}"
                    cmd = [BATCHQ, "run", "in.jsonl", "--job", job, "--base-url", url, "-q"]
                    measured = harness.measure(
                        [*cmd, "--model", "m", *extra],
                        timeout=600,
                        log=tmp / f"log-{run}-{i}",
                        cwd=tmp,
                    )
                    rates[variant].append(args.lines / measured.wall)
                    cpus[variant].append(measured.cpu / args.lines * 1000)
    base = harness.Spread.of(rates["no price (baseline)"]).median
    rows = [
        [
            variant,
            harness.Spread.of(rates[variant]).show(),
            harness.Spread.of(cpus[variant]).show(".3f"),
            f"{harness.Spread.of(rates[variant]).median / base:.2f}",
        ]
        for variant in VARIANTS
    ]
    print(f"{args.lines:,} lines, {args.runs} runs each, against nginx")
    print(harness.table(["variant", "req/s", "CPU s / 1k req", "ratio"], rows))


if __name__ == "__main__":
    main()
