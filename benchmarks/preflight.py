"""What ``validate --check-endpoint`` costs: the same file validated with and without it.

Against ``batchq mock-server --max-model-len 8192`` (vLLM's /v1/models and
/tokenize), every prompt is counted by the endpoint's tokenizer, one call a
line, at most 16 at once; the baseline is ``validate`` alone, which reads and
estimates the same file and sends nothing. Chat prompts of 50 to 2,000
characters, all within the context, so both exit 0. Runs alternate; medians
with min–max; wall time, CPU and peak RSS are the batchq child's own (the
mock server's CPU is not in them, but shares the machine's cores).

Usage: ``python benchmarks/preflight.py [--lines N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # a sibling module, found through the line above

BATCHQ = Path(sys.executable).with_name("batchq")


def write_chat(path: Path, lines: int) -> None:
    rng = random.Random(1)
    with path.open("wb") as out:
        for i in range(lines):
            turns = [
                {"role": "system", "content": "Label the sentiment: positive or negative."},
                {"role": "user", "content": "x" * rng.randrange(50, 2000)},
            ]
            line = {"custom_id": f"r{i}", "messages": turns, "max_tokens": 16}
            out.write(orjson.dumps(line) + b"\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchq-preflight-") as name:
        tmp = Path(name)
        path = tmp / "input.jsonl"
        write_chat(path, args.lines)
        options = ["--max-model-len", "8192"]
        with harness.mock_server(BATCHQ, tmp, options=options) as url:
            plain = [BATCHQ, "validate", path, "--model", "mock"]
            variants = {
                "`validate` (baseline)": plain,
                "`validate --check-endpoint`": [*plain, "--base-url", url, "--check-endpoint"],
            }
            runs: dict[str, list[harness.Run]] = {label: [] for label in variants}
            for _ in range(args.runs):
                for label, cmd in variants.items():
                    log = tmp / "validate.log"
                    runs[label].append(harness.measure(cmd, timeout=900, log=log, cwd=tmp))
            asked = harness.mock_call(url, "/_mock/stats")["by_path"].get("/tokenize", 0)
    base = harness.Spread.of([r.wall for r in runs["`validate` (baseline)"]]).median
    rows = []
    for label, measured in runs.items():
        wall = harness.Spread.of([r.wall for r in measured])
        rows.append(
            [
                label,
                wall.show(",.2f"),
                f"{args.lines / wall.median:,.0f}",
                harness.Spread.of([r.cpu for r in measured]).show(",.2f"),
                harness.Spread.of([r.rss_mib for r in measured]).show(),
                f"{wall.median / base:.1f}",
            ]
        )
    print(f"machine: {harness.machine()}; batchq {harness.revision(Path.cwd())}")
    print(f"{args.lines:,} chat lines, medians of {args.runs} runs (min–max)\n")
    headers = ["command", "wall s", "lines/s", "CPU s", "peak RSS MiB", "× baseline"]
    print(harness.table(headers, rows))
    print(f"\n/tokenize calls the endpoint answered: {asked:,} ({args.runs} runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
