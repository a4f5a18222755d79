"""What the progress display costs: the same batchq run with none, with plain lines, with the bar.

The display is drawn from counters by a timer, never per request, so it
should cost nothing measurable. This checks that claim against nginx (where
batchq, not the endpoint, is the bottleneck): 200,000 lines, three runs of
each variant in rotation, medians with min–max, and each variant's ratio to
the quiet run:

- ``-q``: no display at all;
- ``--progress-every 0.5``: a plain line every half second, as in a log;
- ``-q`` on a pseudo-terminal made by ``script(1)``: what ``script`` itself costs;
- the live tqdm bar on such a terminal, whose fair baseline is the line above.

On a shared machine those ratios move by ±10% from run to run, more than the
display can cost, so it also times what the display does, in-process: one
redraw of each kind, and the share of a core that is at its redraw rate.

Usage: ``python benchmarks/progress.py [--lines N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import io
import shlex
import shutil
import statistics
import sys
import tempfile
import time
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
            "-q on a terminal (script)": lambda job: _on_terminal([*_run(path, job, url), "-q"]),
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
    print("\nOne redraw, timed in-process (median of 20)")
    print(harness.table(["display", "µs per redraw", "redraws / s", "share of a core"], redraws()))
    return 0


def redraws(samples: int = 20) -> list[list[str]]:
    """What one ``show()`` of each display costs, each one a real redraw."""
    from batchq.show.progress import PlainProgress, Progress, TerminalProgress
    from batchq.stats import Stats

    kinds: list[tuple[str, Callable[[Stats], Progress], float]] = [
        ("plain line (in a log: every 10 s)", lambda s: PlainProgress(s, io.StringIO()), 0.1),
        ("live bar (on a terminal: every 0.5 s)", lambda s: TerminalProgress(s, io.StringIO()), 2),
    ]
    rows = []
    for name, make, per_second in kinds:
        stats = Stats(total=1_000_000)
        display, took = make(stats), []
        for _ in range(samples):
            time.sleep(0.25)  # past tqdm's mininterval (0.2 s), so that every show() redraws
            stats.ok += 5_000
            start = time.perf_counter()
            display.show()
            took.append(time.perf_counter() - start)
        display.close()
        cost = statistics.median(took)
        rows.append([name, f"{cost * 1e6:,.0f}", f"{per_second:g}", f"{cost * per_second:.4%}"])
    return rows


def _run(path: Path, job: Path, url: str) -> list[str]:
    return [str(BATCHQ), "run", str(path), "--job", str(job), "--base-url", url, "--model", "m"]


def _on_terminal(command: list[str]) -> list[str]:
    inner = "stty cols 120 rows 40; exec " + shlex.join(command)
    return ["script", "-q", "-e", "-c", inner, "/dev/null"]


if __name__ == "__main__":
    raise SystemExit(main())
