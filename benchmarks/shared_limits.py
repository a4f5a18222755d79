"""Issue 15's figures for shared limits (``--limits-store``).

1. **One account, four processes.** ``batchq mock-server --rpm 6000`` (with and without
   ``x-ratelimit-*`` headers) and four ``batchq run`` processes on four inputs, each given
   the account's whole ``--rpm 6000``: once all naming the same Redis, once without a store.
   Measured at the endpoint: utilisation (requests it accepted between its first and last
   arrival, per minute, over 6,000) and the 429s as a share of all it received.
2. **Overhead.** One process against nginx (no limits there), paced by a ``--rpm`` far above
   what it can send so that every request goes through the pacer: without a store, with a
   store on localhost (blocks of ``BLOCK_SECONDS``), and with one script call per
   acquisition (``BLOCK_SECONDS = 0``); median of ``--runs`` runs, as a share of the first.

Needs ``redis-server`` and ``nginx`` on the PATH (``make redis-server``; the nginx part is
skipped without it). Everything runs on 127.0.0.1 in child processes started and stopped
here.

    python benchmarks/shared_limits.py [--lines 500] [--nginx-lines 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import harness

BATCHQ = Path(sys.executable).parent / "batchq"
RPM = 6000
# batchq with the store's blocks shrunk to one unit: one script call per acquisition
PER_ACQUISITION = (
    "import sys, batchq.limits_store as s; s.BLOCK_SECONDS = 0.0; "
    "from batchq.cli import main; sys.argv[0] = 'batchq'; main()"
)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(tmp)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def chat_lines(path: Path, lines: int, tag: str) -> None:
    with path.open("w") as f:
        for i in range(lines):
            f.write(
                f'{{"custom_id": "{tag}-{i}", "body": {{"messages": [{{"role": "user", '
                f'"content": "question {tag} {i}"}}]}}}}\n'
            )


def four_processes(tmp: Path, lines: int, headers: bool, store: str | None) -> dict[str, float]:
    options = ["--rpm", str(RPM)]
    if not headers:
        options.append("--no-rate-limit-headers")
    with harness.mock_server(BATCHQ, tmp, options=options) as url:
        runs = []
        for p in range(4):
            part = tmp / f"part{p}.jsonl"
            chat_lines(part, lines, f"p{p}")
            cmd = [str(BATCHQ), "run", str(part), "--job", str(tmp / f"job{p}")]
            cmd += ["--base-url", url, "--model", "m", "-q", "--rpm", str(RPM)]
            if store:
                cmd += ["--limits-store", store]
            runs.append(
                subprocess.Popen(cmd, env=harness.child_env(), stderr=subprocess.DEVNULL, cwd=tmp)
            )
        codes = [run.wait(timeout=600) for run in runs]
        stats = harness.mock_call(url, "/_mock/stats")
    ok = stats["by_status"].get("200", 0)
    span = stats["last_at"] - stats["first_at"]
    return {
        "utilisation": (ok - 1) / span * 60 / RPM,
        "429": stats["rate_limited"] / stats["requests"],
        "wall": span,
        "floor": 4 * lines / (RPM / 60),
        "failed": sum(code != 0 for code in codes),
    }


def overhead(tmp: Path, lines: int, runs: int, store: str) -> dict[str, float]:
    if not shutil.which("nginx"):
        return {}
    source = tmp / "nginx.jsonl"
    chat_lines(source, lines, "n")
    variants: dict[str, tuple[list[str], list[str]]] = {
        "no store": ([str(BATCHQ)], []),
        "store, blocks": ([str(BATCHQ)], ["--limits-store", store]),
        "store, one call per request": (
            [sys.executable, "-c", PER_ACQUISITION],
            ["--limits-store", store],
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    with harness.nginx(tmp) as url:
        for r in range(runs):
            for name, (prefix, extra) in variants.items():
                job = tmp / f"nginx-{r}-{len(rates[name])}-{name.replace(' ', '')}"
                cmd = [*prefix, "run", str(source), "--job", str(job), "--base-url", url]
                cmd += ["--model", "m", "-q", "--rpm", "100000000", "--no-fsync", *extra]
                result = harness.measure(cmd, timeout=600, log=tmp / "nginx-run.log", cwd=tmp)
                rates[name].append(lines / result.wall)
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500, help="per process (4 processes)")
    parser.add_argument("--nginx-lines", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--part", choices=("all", "four", "overhead"), default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchq-shared-") as name:
        tmp = Path(name)
        with redis_server(tmp) as store:
            print(f"## Four processes, each --rpm {RPM}, one endpoint enforcing {RPM} RPM")
            print(f"{args.lines:,} requests each, {4 * args.lines / (RPM / 60):.0f} s floor\n")
            print("| endpoint | store | utilisation | 429s | wall s | failed runs |")
            print("|---|---|---:|---:|---:|---:|")
            for headers in (True, False) if args.part != "overhead" else ():
                for shared in (store, None):
                    case = tmp / f"case-{headers}-{bool(shared)}"
                    case.mkdir()
                    f = four_processes(case, args.lines, headers, shared)
                    print(
                        f"| {'headers' if headers else 'no headers'} | "
                        f"{'Redis' if shared else 'none'} | {f['utilisation']:.1%} | "
                        f"{f['429']:.2%} | {f['wall']:.1f} | {f['failed']:.0f} |",
                        flush=True,
                    )
            rates = overhead(tmp, args.nginx_lines, args.runs, store) if args.part != "four" else {}
            if rates:
                base = rates["no store"]
                print(f"\n## One process against nginx, {args.nginx_lines:,} lines, paced")
                print(f"median of {args.runs} runs, {os.cpu_count()} cores\n")
                print("| variant | req/s | vs no store |")
                print("|---|---:|---:|")
                for name, rate in rates.items():
                    print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
