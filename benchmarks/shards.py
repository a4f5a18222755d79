"""A job as N shards against one as a single process, and shards killed at random.

    .venv/bin/python benchmarks/shards.py [--lines 1000000] [--shards 4] [--kills 6]

Against nginx's fixed answer (harness.nginx), so the endpoint is never the
bottleneck. Three runs on one input: the job as one process; the job as N
shards started at the same instant; and N shards of which random ones are
SIGKILLed at random moments and started again until every shard has
finished, after which every input line must be in exactly one shard's
outputs (checked over every output line, not through the export's index).
Wall times are from the first start to the last exit. On a machine with
fewer cores than shards, the shards share the cores (nproc is printed).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent.parent
BATCHQ = Path(sys.executable).with_name("batchq")


def _cmd(url: str, job: Path, *extra: str) -> list[str]:
    return [str(BATCHQ), "run", "in.jsonl", "--job", str(job), "--base-url", url, "-q", *extra]


def _start(cwd: Path, cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, cwd=cwd, env=harness.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


def _wait_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        _, stderr = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"a run failed ({proc.returncode}): {stderr.decode()[-500:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs in the third run")
    parser.add_argument("--seed", type=int, default=15)
    args = parser.parse_args()
    n, rng = args.shards, random.Random(args.seed)
    print(f"machine: {harness.machine()}")
    with tempfile.TemporaryDirectory(prefix="batchq-shards-") as name:
        tmp = Path(name)
        harness.write_input(tmp / "in.jsonl", args.lines)
        size = (tmp / "in.jsonl").stat().st_size
        print(f"input: {args.lines:,} lines, {size / 2**20:,.0f} MiB; {n} shards")
        with harness.nginx(tmp) as url:
            started = time.perf_counter()
            _wait_all([_start(tmp, _cmd(url, tmp / "one"))])
            one = time.perf_counter() - started
            print(f"one process: {one:,.1f} s wall, {args.lines / one:,.0f} req/s")

            started = time.perf_counter()
            _wait_all(
                [_start(tmp, _cmd(url, tmp / "sharded", "--shard", f"{i}/{n}")) for i in range(n)]
            )
            sharded = time.perf_counter() - started
            print(f"{n} shards at once: {sharded:,.1f} s wall, {args.lines / sharded:,.0f} req/s")
            done, missing, twice = harness.once_each(
                sorted((tmp / "sharded").glob("shard-*/*.jsonl")), args.lines
            )
            print(f"  exactly once: {done:,} once, {missing:,} missing, {twice:,} twice")

            job = tmp / "killed"
            started = time.perf_counter()
            procs = {i: _start(tmp, _cmd(url, job, "--shard", f"{i}/{n}")) for i in range(n)}
            kills = 0
            while kills < args.kills:
                time.sleep(rng.uniform(0.2, 2.0) * args.lines / 1_000_000)
                running = [i for i, proc in procs.items() if proc.poll() is None]
                if not running:
                    break  # every shard finished first
                i = rng.choice(running)
                procs[i].kill()
                procs[i].communicate()
                kills += 1
                procs[i] = _start(tmp, _cmd(url, job, "--shard", f"{i}/{n}"))
            _wait_all(list(procs.values()))
            killed = time.perf_counter() - started
            done, missing, twice = harness.once_each(
                sorted(job.glob("shard-*/*.jsonl")), args.lines
            )
            print(f"{n} shards, {kills} SIGKILLed at random and rerun: {killed:,.1f} s wall")
            print(f"  exactly once: {done:,} once, {missing:,} missing, {twice:,} twice")
            status = subprocess.run(
                [str(BATCHQ), "status", str(job)], capture_output=True, text=True, check=True
            )
            print("  " + status.stdout.replace("\n", "\n  ").rstrip())


if __name__ == "__main__":
    main()
