"""What the progress display costs: the same batchq run with none, with plain lines, with the bar.

The display is drawn from counters by a timer, never per request, so it
should cost nothing measurable. This checks that claim against nginx (where
batchq, not the endpoint, is the bottleneck): 200,000 lines, three runs of
each variant in rotation, medians with min–max, and each variant's ratio to
the quiet run:

- ``-q``: no display at all;
- ``--progress-every 0.5``: a plain line every half second, as in a log;
- the live tqdm bar, on a pseudo-terminal made by ``script(1)``.

Usage: ``python benchmarks/progress.py [--lines N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # a sibling module, found through the line above

BATCHQ = Path(sys.executable).with_name("batchq")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    harness.ensure_nginx(print)
    if shutil.which("script") is None:
        raise SystemExit("needs script(1), from util-linux, for the terminal variant")
    with (
        tempfile.TemporaryDirectory(prefix="batchq-progress-") as name,
        harness.nginx(Path(name)) as url,
    ):
        tmp = Path(name)
        path = tmp / "input.jsonl"
        harness.write_input(path, args.lines)
        variants: dict[str, Callable[[Path], list[str]]] = {
            "-q (none)": lambda job: [*_run(path, job, url), "-q"],
            "plain line every 0.5 s": lambda job: [
                *_run(path, job, url),
                "--progress-every",
                "0.5",
            ],
            "live bar on a terminal": lambda job: _on_terminal(_run(path, job, url)),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for turn in range(args.runs):
            for variant, command in variants.items():
                job = tmp / f"job-{turn}-{len(rates[variant])}"
                log = tmp / "run.log"
                run = harness.measure(command(job), timeout=600, log=log, cwd=tmp)
                if harness.count_lines(job / "results.jsonl") != args.lines:
                    raise SystemExit(f"{variant}: not every line has a result:\n{log.read_text()}")
                rates[variant].append(args.lines / run.wall)
                shutil.rmtree(job)
    quiet = statistics.median(rates["-q (none)"])
    rows = [
        [
            variant,
            harness.Spread.of(found).show(),
            f"{statistics.median(found) / quiet:.3f}",
        ]
        for variant, found in rates.items()
    ]
    print(f"{args.lines:,} lines against nginx, --concurrency 64, median (min–max) of {args.runs}")
    print(harness.table(["display", "req/s", "ratio to -q"], rows))
    return 0


def _run(path: Path, job: Path, url: str) -> list[str]:
    return [str(BATCHQ), "run", str(path), "--job", str(job), "--base-url", url, "--model", "m"]


def _on_terminal(command: list[str]) -> list[str]:
    inner = "stty cols 120 rows 40; exec " + shlex.join(command)
    return ["script", "-q", "-e", "-c", inner, "/dev/null"]


if __name__ == "__main__":
    raise SystemExit(main())
