"""Issue 15's figures for shared limits (``--limits-store``).

1. **One account, four processes.** ``batchq mock-server --rpm 6000`` (with and without
   ``x-ratelimit-*`` headers) and four ``batchq run`` processes on four inputs, each given
   the account's whole ``--rpm 6000``: once all naming the same Redis, once without a store.
   Measured at the endpoint: utilisation (requests it accepted between its first and last
   arrival, per minute, over 6,000) and the 429s as a share of all it received.
2. **The same with tokens** (``--part tpm``). ``mock-server --tpm 600000`` and four
   processes each given ``--tpm 600000`` (no ``--rpm``), on prompts of seeded random
   length and ``max_tokens``; utilisation is the tokens the endpoint charged for the
   requests it accepted (its ``accepted_tokens``: prompt characters / 4 rounded up, plus
   ``max_tokens``), less the last one's, between its first and last arrival, per minute,
   over 600,000.
3. **Death** (``--part death``). Four processes on one store, each ``--rpm 6000``, against
   ``mock-server --rpm 6000 --record``; ``KILL_AFTER`` seconds after the endpoint's first
   arrival one of them gets ``SIGKILL``. From the endpoint's record of each accepted
   request's arrival (``time.time()``, as the kill's time here): the pace before the kill,
   the lowest count in a 1-second window starting within ``WATCH`` seconds after it, and
   the seconds from the kill to the first 1-second window at >= 95% of 6,000/min after
   which every window in that stretch stays there; median of ``--runs`` runs, without
   latency and with a lognormal one (p50 0.5 s, p99 2 s: the survivors must hold more
   requests in flight). The killed job is then run again to its end, and every line of all
   four jobs must be in their outputs exactly once.
4. **Overhead.** One process against nginx (no limits there), paced by a ``--rpm`` far above
   what it can send so that every request goes through the pacer: without a store, with a
   store on localhost (blocks of ``BLOCK_SECONDS``), and with one script call per
   acquisition (``BLOCK_SECONDS = 0``); median of ``--runs`` runs, as a share of the first.

Needs ``redis-server`` and ``nginx`` on the PATH (``make redis-server``; the nginx part is
skipped without it). Everything runs on 127.0.0.1 in child processes started and stopped
here.

    python benchmarks/shared_limits.py [--lines 500] [--tpm-seconds 25] [--death-lines 750]
        [--nginx-lines 20000] [--runs 3] [--part all|four|tpm|death|overhead]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness
import orjson

BATCHQ = Path(sys.executable).parent / "batchq"
RPM = 6000
TPM = 600_000
KILL_AFTER = 10.0  # seconds after the endpoint's first arrival
WATCH = 5.0  # seconds after the kill whose 1-second windows are judged
BUCKET = 0.25  # seconds: the grid of those windows
RECOVERED = 0.95  # of the full pace
LATENCY = ["--latency-p50", "0.5", "--latency-p99", "2"]
# batchq with the store's blocks shrunk to one unit: one script call per acquisition
PER_ACQUISITION = (
    "import sys, batchq.live.limits_store as s; s.BLOCK_SECONDS = 0.0; "
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


def token_lines(path: Path, tokens: int, tag: str, seed: int) -> int:
    """Chat lines of seeded random length and max_tokens until they total ``tokens``; the total.

    One user message each, so the endpoint's charge (characters / 4 rounded up, plus
    max_tokens) is batchq's estimate exactly.
    """
    rng = random.Random(seed)
    total = 0
    with path.open("wb") as f:
        while total < tokens:
            chars = min(int(rng.lognormvariate(6.5, 0.8)), 6_000)  # median ~660 characters
            content = " ".join(rng.choice(harness._WORDS) for _ in range(chars // 4 + 1))
            content = content[: max(chars, 1)]
            max_tokens = rng.choice((16, 64, 128, 256, 512))
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
            line = {"custom_id": f"{tag}-{total}", "body": body}
            f.write(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
            total += math.ceil(len(content) / 4) + max_tokens
    return total


def start_runs(
    inputs: list[Path], tmp: Path, url: str, limit: list[str], store: str | None
) -> tuple[list[list[str]], list[subprocess.Popen[bytes]]]:
    """One ``batchq run`` per input, all at once; their commands and processes."""
    cmds, runs = [], []
    for p, part in enumerate(inputs):
        cmd = [str(BATCHQ), "run", str(part), "--job", str(tmp / f"job{p}")]
        cmd += ["--base-url", url, "--model", "m", "-q", *limit]
        if store:
            cmd += ["--limits-store", store]
        cmds.append(cmd)
        runs.append(
            subprocess.Popen(cmd, env=harness.child_env(), stderr=subprocess.DEVNULL, cwd=tmp)
        )
    return cmds, runs


def four_processes(tmp: Path, lines: int, headers: bool, store: str | None) -> dict[str, float]:
    options = ["--rpm", str(RPM)]
    if not headers:
        options.append("--no-rate-limit-headers")
    inputs = [tmp / f"part{p}.jsonl" for p in range(4)]
    for p, part in enumerate(inputs):
        chat_lines(part, lines, f"p{p}")
    with harness.mock_server(BATCHQ, tmp, options=options) as url:
        _, runs = start_runs(inputs, tmp, url, ["--rpm", str(RPM)], store)
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


def four_processes_tpm(
    tmp: Path, seconds: float, headers: bool, store: str | None
) -> dict[str, float]:
    """As ``four_processes``, with ``--tpm`` instead of ``--rpm``; ``seconds`` of input."""
    options = ["--tpm", str(TPM), "--record"]
    if not headers:
        options.append("--no-rate-limit-headers")
    inputs = [tmp / f"part{p}.jsonl" for p in range(4)]
    total = sum(
        token_lines(part, round(TPM / 60 * seconds / 4), f"p{p}", seed=p)
        for p, part in enumerate(inputs)
    )
    with harness.mock_server(BATCHQ, tmp, options=options) as url:
        _, runs = start_runs(inputs, tmp, url, ["--tpm", str(TPM)], store)
        codes = [run.wait(timeout=600) for run in runs]
        stats = harness.mock_call(url, "/_mock/stats")
    if stats["accepted_tokens"] != total:
        raise harness.BenchError(f"accepted {stats['accepted_tokens']} tokens of {total}")
    span = stats["last_at"] - stats["first_at"]
    last = max(stats["accepted"])[1]  # sent at the end of the span, not during it
    return {
        "utilisation": (total - last) / span * 60 / TPM,
        "429": stats["rate_limited"] / stats["requests"],
        "wall": span,
        "floor": total / (TPM / 60),
        "failed": sum(code != 0 for code in codes),
    }


def children(pid: int) -> list[str]:
    """The processes ``pid`` started (Linux), so the one killed is batchq, not a wrapper."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return []


def once(job: Path, custom_ids: list[str]) -> bool:
    """Every custom_id of the input in the job's outputs, each exactly once."""
    written = b"".join((job / name).read_bytes() for name in ("results.jsonl", "errors.jsonl"))
    seen = Counter(orjson.loads(line)["custom_id"] for line in written.splitlines())
    return seen == Counter(custom_ids)


def death(tmp: Path, lines: int, latency: bool, store: str) -> dict[str, float]:
    """Four processes on one store; one killed with SIGKILL; what the endpoint accepted."""
    options = ["--rpm", str(RPM), "--record", *(LATENCY if latency else [])]
    inputs = [tmp / f"part{p}.jsonl" for p in range(4)]
    for p, part in enumerate(inputs):
        chat_lines(part, lines, f"p{p}")
    with harness.mock_server(BATCHQ, tmp, options=options) as url:
        cmds, runs = start_runs(inputs, tmp, url, ["--rpm", str(RPM)], store)
        while (first := harness.mock_call(url, "/_mock/stats")["first_at"]) is None:
            time.sleep(0.05)
        time.sleep(max(0.0, first + KILL_AFTER - time.time()))
        victim = runs[0]
        comm = Path(f"/proc/{victim.pid}/cmdline").read_bytes().split(b"\0")
        if b"run" not in comm or children(victim.pid):
            raise harness.BenchError(f"{victim.pid} is not batchq itself: {comm!r}")
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.time()
        codes = [run.wait(timeout=600) for run in runs]
        stats = harness.mock_call(url, "/_mock/stats")
        resumed = subprocess.run(
            cmds[0], env=harness.child_env(), stderr=subprocess.DEVNULL, cwd=tmp, check=False
        ).returncode
    ids = [[f"p{p}-{i}" for i in range(lines)] for p in range(4)]
    times = sorted(at for at, _ in stats["accepted"])
    if times[-1] < killed + WATCH + 1.0:
        raise harness.BenchError(f"the survivors ended {times[-1] - killed:.1f} s after the kill")

    def per_second(start: float, end: float) -> float:
        return (bisect.bisect_left(times, end) - bisect.bisect_left(times, start)) / (end - start)

    starts = [killed + BUCKET * i for i in range(round(WATCH / BUCKET) + 1)]
    window = [per_second(s, s + 1.0) for s in starts]
    back = len(window)
    while back > 0 and window[back - 1] >= RECOVERED * RPM / 60:
        back -= 1  # the first window from which every later one is at the pace
    return {
        "before": per_second(first + 2.0, killed) * 60,
        "lowest": min(window) * 60,
        "back": BUCKET * back if back < len(window) else math.inf,
        "429": stats["rate_limited"],
        "exits": sum(code != 0 for code in codes[1:]) + (codes[0] != -signal.SIGKILL),
        "resumed": resumed,
        "once": sum(once(tmp / f"job{p}", ids[p]) for p in range(4)),
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


def case_dir(tmp: Path, *name: Any) -> Path:
    case = tmp / "-".join(map(str, name))
    case.mkdir()
    return case


def print_four(tmp: Path, store: str, lines: int) -> None:
    print(f"## Four processes, each --rpm {RPM}, one endpoint enforcing {RPM} RPM")
    print(f"{lines:,} requests each, {4 * lines / (RPM / 60):.0f} s floor\n")
    print_cases(
        lambda case, headers, shared: four_processes(case, lines, headers, shared),
        tmp,
        "case",
        store,
    )


def print_tpm(tmp: Path, store: str, seconds: float) -> None:
    print(f"\n## Four processes, each --tpm {TPM:,}, one endpoint enforcing {TPM:,} TPM")
    print(f"{seconds:g} s of tokens in all, a quarter each\n")
    print_cases(
        lambda case, headers, shared: four_processes_tpm(case, seconds, headers, shared),
        tmp,
        "tpm",
        store,
    )


def print_cases(
    run: Callable[[Path, bool, str | None], dict[str, float]], tmp: Path, name: str, store: str
) -> None:
    """One row for each endpoint (headers or not) and each of store and none."""
    print("| endpoint | store | utilisation | 429s | wall s (floor) | failed runs |")
    print("|---|---|---:|---:|---:|---:|")
    for headers in (True, False):
        for shared in (store, None):
            f = run(case_dir(tmp, name, headers, bool(shared)), headers, shared)
            print(
                f"| {'headers' if headers else 'no headers'} | "
                f"{'Redis' if shared else 'none'} | {f['utilisation']:.1%} | "
                f"{f['429']:.2%} | {f['wall']:.1f} ({f['floor']:.1f}) | {f['failed']:.0f} |",
                flush=True,
            )


def print_death(tmp: Path, store: str, lines: int, runs: int) -> None:
    print(f"\n## Four processes on one store, each --rpm {RPM}; one SIGKILLed {KILL_AFTER:g} s in")
    print(f"{lines:,} requests each; median of {runs} runs (all runs in brackets)\n")
    print(
        "| endpoint latency | pace before /min | lowest 1 s after /min "
        f"| back at ≥ {RECOVERED:.0%} after s | 429s | other exits ≠ 0 | resumed exit "
        "| jobs with every line once |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for latency in (False, True):
        found = [
            death(case_dir(tmp, "death", latency, r), lines, latency, store) for r in range(runs)
        ]
        print(
            f"| {'p50 0.5 s, p99 2 s' if latency else 'none'} | {spread(found, 'before', ',.0f')} "
            f"| {spread(found, 'lowest', ',.0f')} | {spread(found, 'back', '.2f')} "
            f"| {spread(found, '429', '.0f')} | {sum(f['exits'] for f in found):.0f} "
            f"| {max(f['resumed'] for f in found):.0f} "
            f"| {sum(f['once'] for f in found):.0f} of {4 * runs} |",
            flush=True,
        )


def spread(found: list[dict[str, float]], key: str, fmt: str) -> str:
    """The median of ``key`` over the runs, and every run's value in brackets."""
    values = [f[key] for f in found]
    each = ", ".join(f"{v:{fmt}}" for v in values)
    return f"{statistics.median(values):{fmt}} ({each})"


def print_overhead(tmp: Path, store: str, lines: int, runs: int) -> None:
    rates = overhead(tmp, lines, runs, store)
    if rates:
        base = rates["no store"]
        print(f"\n## One process against nginx, {lines:,} lines, paced")
        print(f"median of {runs} runs, {os.cpu_count()} cores\n")
        print("| variant | req/s | vs no store |")
        print("|---|---:|---:|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500, help="per process (4 processes)")
    parser.add_argument("--tpm-seconds", type=float, default=25.0, help="of tokens, in all")
    parser.add_argument("--death-lines", type=int, default=750, help="per process")
    parser.add_argument("--nginx-lines", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parts = ("all", "four", "tpm", "death", "overhead")
    parser.add_argument("--part", choices=parts, default="all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batchq-shared-") as name:
        tmp = Path(name)
        with redis_server(tmp) as store:
            if args.part in ("all", "four"):
                print_four(tmp, store, args.lines)
            if args.part in ("all", "tpm"):
                print_tpm(tmp, store, args.tpm_seconds)
            if args.part in ("all", "death"):
                print_death(tmp, store, args.death_lines, args.runs)
            if args.part in ("all", "overhead"):
                print_overhead(tmp, store, args.nginx_lines, args.runs)


if __name__ == "__main__":
    main()
