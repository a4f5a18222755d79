"""How close batchq runs to an endpoint's rate limits, and how it copes when they change.

batchq's promise is "as fast as the endpoint's limits allow": with ``--rpm``/``--tpm`` set
to the endpoint's limits it should use nearly all of them without provoking 429s (every 429
pauses the whole pool), and when the endpoint's limit drops and comes back it should follow
it down and back up. This measures both against ``batchq mock-server``, which enforces
OpenAI-like limits (a sliding 60-second window plus a 1-second window of 1.2× the per-second
share), answers 429 with ``retry-after``, and sends ``x-ratelimit-*`` headers.

1. **Matched limits.** For RPM limits of 600, 6,000 and 60,000, and for a 600,000 TPM limit,
   the mock and ``batchq run`` get the same limit and an input of ~20 s at that rate.
   Measured at the endpoint (``/_mock/stats``): requests it accepted between its first and
   last arrival, per minute, as a share of the limit (target ≥ 95%), and the 429s it sent as a
   share of all requests it received (target ≤ 0.5%). The CPU each process used is shown, so
   a machine limit (60,000 RPM is 1,000 req/s through two Python processes on 2 cores) is
   visible as one. Runs use the default, `--concurrency auto`; a limit it under-uses is run
   again at a fixed 256.
2. **Recovery.** Mock and batchq at 6,000 RPM with a ~60 s input; after 10 s the mock's limit
   drops to 600 (``POST /_mock/limits``), after 10 more seconds it is 6,000 again. Accepted
   requests and 429s are sampled every 0.5 s; reported are the 429s during the drop and the
   time from the restoration until batchq is back to ≥ 90% of 6,000/min sustained over 2 s.
   batchq is stopped (SIGTERM, exit 130) 40 s after the restoration if it has not finished.

Everything runs on 127.0.0.1 in child processes this script starts and stops. The tables are
printed and appended to ``benchmarks/RATELIMITS.md``. ``--quick`` runs ~5 s per case and only
prints, for smoke tests.

    python benchmarks/ratelimits.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import math
import os
import platform
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "RATELIMITS.md"

RPM_LIMITS = (600, 6_000, 60_000)
TPM_LIMIT = 600_000
CONCURRENCY = "auto"  # the default: sized to the pace
CONCURRENCY_HIGH = "256"  # the second try at a limit that misses at CONCURRENCY
MIN_UTILISATION = 95.0  # % of the limit
MAX_429_SHARE = 0.5  # % of requests received
RECOVERY_RPM, DROPPED_RPM = 6_000, 600
RECOVERED_SHARE = 0.9  # of RECOVERY_RPM ...
SUSTAINED = 2.0  # ... over this many seconds
SAMPLE_EVERY = 0.5  # seconds between /_mock/stats polls
ATTEMPTS = 3  # of a case that fails (the machine is shared: a stray signal can kill a mock)

T = TypeVar("T")

_WORDS = (
    *("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be"),
    *("model", "token", "batch", "request", "answer", "summarise", "translate", "explain"),
    *("rate", "limit", "endpoint", "retry", "json", "line", "window", "minute", "second"),
)


class BenchError(RuntimeError):
    """A case could not be run or measured."""


@dataclass(frozen=True, slots=True)
class Durations:
    case: float  # seconds of input per matched-limit case
    before_drop: float  # recovery: seconds at the full limit before the drop
    drop: float  # recovery: seconds at the dropped limit
    after: float  # recovery: seconds watched after the restoration, at most
    recovery_input: float  # recovery: seconds of input at the full limit


FULL = Durations(case=20, before_drop=10, drop=10, after=40, recovery_input=60)
QUICK = Durations(case=5, before_drop=3, drop=3, after=12, recovery_input=20)


# --- processes -----------------------------------------------------------------------------


def batchq_exe() -> Path:
    for candidate in (Path(sys.executable).with_name("batchq"), ROOT / ".venv" / "bin" / "batchq"):
        if candidate.exists():
            return candidate
    raise BenchError("no batchq executable beside this Python or in .venv/bin")


def child_env() -> dict[str, str]:
    """No API key or base URL of the user's reaches a child."""
    return {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}


def kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


@dataclass(slots=True)
class Mock:
    """A ``batchq mock-server`` child process."""

    proc: subprocess.Popen[bytes]
    url: str  # ends in /v1

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")

    def call(self, path: str, body: bytes | None = None) -> dict[str, Any]:
        """GET ``path`` of the mock's root, or POST ``body`` to it."""
        request = urllib.request.Request(self.root + path, data=body)
        try:
            with urllib.request.urlopen(request, timeout=10) as resp:
                result: dict[str, Any] = orjson.loads(resp.read())
        except OSError as exc:
            state = "running" if self.proc.poll() is None else f"exit {self.proc.returncode}"
            raise BenchError(f"{path} of the mock failed ({state}): {exc}") from exc
        return result

    def stats(self) -> dict[str, Any]:
        return self.call("/_mock/stats")

    def set_limits(self, rpm: int, tpm: int = 0) -> None:
        self.call("/_mock/limits", orjson.dumps({"rpm": rpm, "tpm": tpm}))


@contextlib.contextmanager
def mock_server(tmp: Path, *, rpm: int = 0, tpm: int = 0) -> Iterator[Mock]:
    cmd = [str(batchq_exe()), "mock-server", "--port", "0", "--rpm", str(rpm), "--tpm", str(tpm)]
    with (tmp / "mock.log").open("ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=child_env(),
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        url = proc.stdout.readline().decode().strip() if ready else ""
        if not url.startswith("http://127.0.0.1:"):
            raise BenchError(f"batchq mock-server did not print its URL (got {url!r})")
        yield Mock(proc, url)
    finally:
        stop_group(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it after 5 s."""
    if proc.poll() is None:
        kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


# --- inputs --------------------------------------------------------------------------------


def chat_line(content: str, max_tokens: int) -> bytes:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    return orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)


def write_rpm_input(path: Path, lines: int) -> None:
    """``lines`` short chat bodies with max_tokens 16."""
    with path.open("wb") as f:
        f.writelines(chat_line(f"Say hello to number {n}.", 16) for n in range(1, lines + 1))


def charged_tokens(content: str, max_tokens: int) -> int:
    """What the mock charges an accepted request to its TPM: ceil(chars / 4) + max_tokens."""
    return max(1, math.ceil(len(content) / 4)) + max_tokens


def write_tpm_input(path: Path, tokens: int, *, seed: int = 7) -> list[int]:
    """Chat bodies of seeded random length and max_tokens, until they total ``tokens``.

    Returns each line's charge (``charged_tokens``).
    """
    rng = random.Random(seed)
    charges: list[int] = []
    with path.open("wb") as f:
        while sum(charges) < tokens:
            chars = min(int(rng.lognormvariate(6.5, 0.8)), 6_000)  # median ~660 characters
            words: list[str] = []
            while sum(map(len, words)) + len(words) < chars:
                words.append(rng.choice(_WORDS))
            content = " ".join(words)[:chars] or "x"
            max_tokens = rng.choice((16, 64, 128, 256, 512))
            f.write(chat_line(content, max_tokens))
            charges.append(charged_tokens(content, max_tokens))
    return charges


# --- running batchq and watching the endpoint ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.time()
    accepted: int  # 200s so far
    rate_limited: int  # 429s so far


@dataclass(frozen=True, slots=True)
class Event:
    after: float  # seconds after the endpoint's first arrival
    rpm: int  # the mock's new request limit


@dataclass(slots=True)
class Watched:
    """One ``batchq run`` and what the endpoint saw meanwhile."""

    exit_code: int | None  # None: still running at the deadline, stopped with SIGTERM
    wall: float  # seconds from start to exit
    batchq_cpu: float  # user + sys seconds of batchq
    mock_cpu: float  # user + sys seconds of the mock during the run
    machine_busy: float  # share of all CPUs busy during the run, %
    stats: dict[str, Any]  # the mock's final counters
    stopped_at: float = 0.0  # time.time() batchq exited, or was told to stop at the deadline
    samples: list[Sample] = field(default_factory=list)
    events: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), new rpm)
    stderr: str = ""

    @property
    def span(self) -> float:
        """Seconds from the endpoint's first arrival to its last."""
        return float(self.stats["last_at"] - self.stats["first_at"])

    @property
    def accepted(self) -> int:
        return int(self.stats["by_status"].get("200", 0))


def batchq_cmd(data: Path, job: Path, url: str, *, rpm: int, tpm: int, conc: str) -> list[str]:
    cmd = [str(batchq_exe()), "run", str(data), "--job", str(job), "--base-url", url]
    cmd += ["--model", "m", "-q", "--concurrency", str(conc)]
    if rpm:
        cmd += ["--rpm", str(rpm)]
    if tpm:
        cmd += ["--tpm", str(tpm)]
    return cmd


def sample_of(stats: dict[str, Any]) -> Sample:
    return Sample(time.time(), int(stats["by_status"].get("200", 0)), int(stats["rate_limited"]))


def sample(mock: Mock) -> Sample:
    return sample_of(mock.stats())


def reap(proc: subprocess.Popen[bytes]) -> tuple[int, float] | None:
    """(exit code, CPU seconds) once the child has exited, else None; never blocks."""
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def watch(
    mock: Mock, cmd: Sequence[str], log: Path, *, deadline: float, events: Sequence[Event] = ()
) -> Watched:
    """Run ``cmd``, polling the mock every SAMPLE_EVERY s and applying ``events`` on time.

    After ``deadline`` seconds batchq gets SIGTERM (it drains and exits 130), then SIGKILL.
    """
    pending = sorted(events, key=lambda e: e.after)
    mock_cpu0, (busy0, total0) = cpu_seconds(mock.proc.pid), machine_ticks()
    started = time.monotonic()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=child_env(),
            start_new_session=True,
        )
    watched = Watched(None, 0.0, 0.0, 0.0, 0.0, {})
    done: tuple[int, float] | None = None
    try:
        next_at = started
        while (done := reap(proc)) is None:
            if time.monotonic() - started > deadline:
                watched.samples.append(sample(mock))  # what it did, not how it drained
                watched.stopped_at = watched.samples[-1].at
                done = terminate(proc)
                break
            stats = mock.stats()
            watched.samples.append(sample_of(stats))
            first_at = stats["first_at"]
            while pending and first_at is not None and time.time() - first_at >= pending[0].after:
                event = pending.pop(0)
                mock.set_limits(event.rpm)
                watched.events.append((time.time(), event.rpm))
                watched.samples.append(sample(mock))
            next_at += SAMPLE_EVERY
            time.sleep(max(0.0, next_at - time.monotonic()))
    finally:
        if done is None:  # interrupted: leave nothing behind
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    watched.wall = time.monotonic() - started
    watched.exit_code, watched.batchq_cpu = done
    if watched.exit_code == 130 and time.monotonic() - started > deadline:
        watched.exit_code = None
    if not watched.stopped_at:
        watched.samples.append(sample(mock))
        watched.stopped_at = watched.samples[-1].at
    watched.mock_cpu = cpu_seconds(mock.proc.pid) - mock_cpu0
    busy1, total1 = machine_ticks()
    watched.machine_busy = 100 * (busy1 - busy0) / max(1, total1 - total0)
    watched.stats = mock.stats()
    watched.stderr = log.read_text(errors="replace").strip()
    samples = [[x.at, x.accepted, x.rate_limited] for x in watched.samples]
    log.with_name("samples.json").write_bytes(orjson.dumps({"samples": samples, **watched.stats}))
    return watched


def terminate(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """SIGTERM batchq (it drains for --drain-timeout), SIGKILL after 15 s; its exit and CPU."""
    kill_group(proc.pid, signal.SIGTERM)
    until = time.monotonic() + 15
    while (done := reap(proc)) is None:
        if time.monotonic() > until:
            kill_group(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    return done


# --- the matched-limit cases ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matched:
    kind: str  # "RPM" or "TPM"
    limit: int
    concurrency: str
    lines: int
    achieved: float  # per minute, in the limit's unit
    requests: int  # received by the endpoint, 429s included
    rate_limited: int
    watched: Watched

    @property
    def utilisation(self) -> float:
        return 100 * self.achieved / self.limit

    @property
    def share_429(self) -> float:
        return 100 * self.rate_limited / max(1, self.requests)

    @property
    def passed(self) -> bool:
        return (
            self.watched.exit_code == 0
            and self.utilisation >= MIN_UTILISATION
            and self.share_429 <= MAX_429_SHARE
        )


def run_rpm_case(tmp: Path, rpm: int, seconds: float, conc: str) -> Matched:
    case = Path(tempfile.mkdtemp(prefix=f"rpm-{rpm}-c{conc}-", dir=tmp))
    lines = max(20, round(rpm / 60 * seconds))
    data = case / "input.jsonl"
    write_rpm_input(data, lines)
    with mock_server(case, rpm=rpm) as mock:
        cmd = batchq_cmd(data, case / "job", mock.url, rpm=rpm, tpm=0, conc=conc)
        watched = watch(mock, cmd, case / "batchq.log", deadline=3 * seconds + 60)
    # N arrivals paced 60/rpm apart span N - 1 intervals.
    achieved = (watched.accepted - 1) / watched.span * 60 if watched.span > 0 else 0.0
    stats = watched.stats
    return Matched(
        "RPM", rpm, conc, lines, achieved, stats["requests"], stats["rate_limited"], watched
    )


def run_tpm_case(tmp: Path, tpm: int, seconds: float, conc: str) -> Matched:
    case = Path(tempfile.mkdtemp(prefix=f"tpm-{tpm}-", dir=tmp))
    data = case / "input.jsonl"
    charges = write_tpm_input(data, round(tpm / 60 * seconds))
    with mock_server(case, tpm=tpm) as mock:
        cmd = batchq_cmd(data, case / "job", mock.url, rpm=0, tpm=tpm, conc=conc)
        watched = watch(mock, cmd, case / "batchq.log", deadline=3 * seconds + 60)
    stats = watched.stats
    prompt_part = sum(charges) - sum(_max_tokens(line) for line in data.read_bytes().splitlines())
    if watched.accepted == len(charges) and stats["prompt_tokens"] != prompt_part:
        raise BenchError(
            f"the mock counted {stats['prompt_tokens']} prompt tokens, the input {prompt_part}"
        )
    # Every line is accepted once. As with N - 1 intervals, the tokens of the last request to
    # arrive (the last result written) are sent at the end of the span, not during it.
    charged = sum(charges) if watched.accepted == len(charges) else 0
    last = charges[last_line(case / "job" / "results.jsonl") - 1] if charged else 0
    achieved = (charged - last) / watched.span * 60 if watched.span > 0 else 0.0
    return Matched(
        "TPM", tpm, conc, len(charges), achieved, stats["requests"], stats["rate_limited"], watched
    )


def _max_tokens(line: bytes) -> int:
    return int(orjson.loads(line)["max_tokens"])


def last_line(results: Path) -> int:
    """The input line number of the last result written (results are in completion order)."""
    last = results.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    return int(orjson.loads(last)["batchq"]["line"])


# --- the recovery case ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Recovery:
    watched: Watched
    drop_at: float  # time.time() of the drop
    restore_at: float  # time.time() of the restoration
    lines: int

    def _at(self, when: float) -> Sample:
        """The first sample taken at or after ``when`` (the last one if none)."""
        return next((s for s in self.watched.samples if s.at >= when), self.watched.samples[-1])

    def rate(self, start: float, end: float) -> float:
        """Accepted requests per minute between two instants, from the samples."""
        a, b = self._at(start), self._at(end)
        return (b.accepted - a.accepted) / (b.at - a.at) * 60 if b.at > a.at else 0.0

    def rate_limited(self, start: float, end: float) -> int:
        return self._at(end).rate_limited - self._at(start).rate_limited

    @property
    def end(self) -> float:
        return self.watched.stopped_at

    def recovered_after(self) -> float | None:
        """Seconds from the restoration to the start of the first SUSTAINED-second stretch
        with ≥ RECOVERED_SHARE of RECOVERY_RPM accepted; None if there was none."""
        samples = [s for s in self.watched.samples if s.at >= self.restore_at]
        for i, first in enumerate(samples):
            last = next((s for s in samples[i:] if s.at - first.at >= SUSTAINED), None)
            if last is None:
                return None
            rate = (last.accepted - first.accepted) / (last.at - first.at) * 60
            if rate >= RECOVERED_SHARE * RECOVERY_RPM:
                return first.at - self.restore_at
        return None

    def buckets(self, width: float = 2.0) -> list[tuple[float, float, int]]:
        """(seconds since the first arrival, accepted/min, 429s) per ``width`` seconds."""
        start = float(self.watched.stats["first_at"])
        out: list[tuple[float, float, int]] = []
        t = start
        while t < self.end:
            out.append((t - start, self.rate(t, t + width), self.rate_limited(t, t + width)))
            t += width
        return out


def run_recovery(tmp: Path, d: Durations, conc: str) -> Recovery:
    case = Path(tempfile.mkdtemp(prefix="recovery-", dir=tmp))
    lines = round(RECOVERY_RPM / 60 * d.recovery_input)
    data = case / "input.jsonl"
    write_rpm_input(data, lines)
    events = [Event(d.before_drop, DROPPED_RPM), Event(d.before_drop + d.drop, RECOVERY_RPM)]
    with mock_server(case, rpm=RECOVERY_RPM) as mock:
        cmd = batchq_cmd(data, case / "job", mock.url, rpm=RECOVERY_RPM, tpm=0, conc=conc)
        deadline = d.before_drop + d.drop + d.after + 5  # + start-up
        watched = watch(mock, cmd, case / "batchq.log", deadline=deadline, events=events)
    if len(watched.events) != 2:
        raise BenchError(f"the limit changes did not all happen (batchq exited early?): {watched}")
    return Recovery(watched, watched.events[0][0], watched.events[1][0], lines)


# --- reporting -----------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    align = ["---"] + ["---:"] * (len(headers) - 1)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, align, *rows])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def exit_text(code: int | None) -> str:
    return "stopped at deadline" if code is None else str(code)


def matched_table(cases: Sequence[Matched]) -> str:
    headers = [
        "limit",
        "conc.",
        "lines",
        "achieved /min",
        "utilisation",
        "429s",
        "429s / requests",
        "exit",
        "batchq CPU (cores)",
        "mock CPU (cores)",
        "machine busy",
        "≥ 95%, ≤ 0.5%",
    ]
    rows = []
    for c in cases:
        w = c.watched
        rows.append(
            [
                f"{c.limit:,} {c.kind}",
                str(c.concurrency),
                f"{c.lines:,}",
                f"{c.achieved:,.0f}",
                f"{c.utilisation:.1f}%",
                f"{c.rate_limited:,}",
                f"{c.share_429:.2f}%",
                exit_text(w.exit_code),
                f"{w.batchq_cpu:.1f} s ({w.batchq_cpu / w.wall:.2f})",
                f"{w.mock_cpu:.1f} s ({w.mock_cpu / w.wall:.2f})",
                f"{w.machine_busy:.0f}%",
                verdict(c.passed),
            ]
        )
    return table(headers, rows)


def recovery_summary(r: Recovery, d: Durations) -> tuple[str, str]:
    """The summary table and the timeline table."""
    first = float(r.watched.stats["first_at"])
    back = r.recovered_after()
    full = RECOVERY_RPM
    rows = [
        [
            f"at {full:,} RPM, from 2 s to the drop",
            f"{r.rate(first + 2, r.drop_at):,.0f}",
            str(r.rate_limited(first, r.drop_at)),
        ],
        [
            f"limit {DROPPED_RPM:,} RPM ({d.drop:g} s)",
            f"{r.rate(r.drop_at, r.restore_at):,.0f}",
            str(r.rate_limited(r.drop_at, r.restore_at)),
        ],
        [
            f"limit {full:,} RPM again (until {r.end - r.restore_at:.0f} s later)",
            f"{r.rate(r.restore_at, r.end):,.0f}",
            str(r.rate_limited(r.restore_at, r.end)),
        ],
        [
            f"last 5 s of the run (limit {full:,} RPM)",
            f"{r.rate(r.end - 5, r.end):,.0f}",
            str(r.rate_limited(r.end - 5, r.end)),
        ],
    ]
    summary = table(["phase", "accepted /min", "429s"], rows)
    goal = f"≥ {RECOVERED_SHARE:.0%} of {full:,}/min over {SUSTAINED:g} s"
    back_text = (
        f"{back:.1f} s"
        if back is not None
        else f"not within {r.end - r.restore_at:.0f} s (batchq then stopped)"
    )
    summary += (
        f"\n\nTime from restoring the limit to {goal}: **{back_text}**. "
        f"batchq exit: {exit_text(r.watched.exit_code)}; "
        f"{r.watched.stats['by_status'].get('200', 0):,} of {r.lines:,} lines done."
    )
    timeline = table(
        ["t (s)", "limit", "accepted /min", "429s"],
        [
            [f"{t:.0f}–{t + 2:.0f}", _limits(r, first + t, first + t + 2), f"{rate:,.0f}", str(n)]
            for t, rate, n in r.buckets()
        ],
    )
    return summary, timeline


def _limits(r: Recovery, start: float, end: float) -> str:
    """The mock's RPM limit from ``start`` to ``end``: "6,000", or "6,000 → 600" if it changed."""

    def at(when: float) -> int:
        return DROPPED_RPM if r.drop_at <= when < r.restore_at else RECOVERY_RPM

    first, last = at(start), at(end)
    return f"{first:,}" if first == last else f"{first:,} → {last:,}"


def notices(watched: Watched) -> str:
    lines = [line for line in watched.stderr.splitlines() if line.strip()]
    return "\n".join(f"    {line}" for line in lines[:12]) or "    (none)"


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"nproc {os.cpu_count()}, {model}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def report(
    matched: Sequence[Matched],
    recovery: Recovery,
    d: Durations,
    quick: bool,
    took: float,
    notes: Sequence[str],
) -> str:
    summary, timeline = recovery_summary(recovery, d)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/ratelimits.py" + (" --quick" if quick else "")
    parts = [
        f"## Rate limits{' (quick)' if quick else ''} — {now}",
        f"- machine: {machine()}\n- command: `{command}` ({took:.0f} s)",
        f"### Matched limits (~{d.case:g} s of input each; mock and batchq at the same limit)",
        matched_table(matched),
        "achieved: requests (tokens, for TPM) the endpoint accepted, over the time from its "
        "first arrival to its last, per minute: N − 1 intervals (for TPM, the tokens of all "
        "but the last request). TPM tokens are what the mock charges: ceil(prompt characters "
        "/ 4) + max_tokens per accepted request, summed from the input (the mock's "
        "`prompt_tokens` counter is checked equal to the prompt part). "
        "429s / requests: of all requests the endpoint received. CPU: user + system seconds "
        "during the run (cores = seconds / wall seconds); machine busy: all CPUs. Runs of "
        f"~{d.case:g} s exercise the mock's 1-second window (1.2× the per-second share), not "
        "its 60-second one.",
        f"### Recovery: {RECOVERY_RPM:,} RPM, dropped to {DROPPED_RPM:,} after "
        f"{d.before_drop:g} s, restored after {d.drop:g} s more",
        summary,
        "batchq's notices (stderr):\n\n" + notices(recovery.watched),
        "<details><summary>Timeline (2-second buckets, from the first arrival)</summary>\n\n"
        + timeline
        + "\n\n</details>",
    ]
    if notes:
        parts.append("Cases run again:\n\n" + "\n".join(f"- {note}" for note in notes))
    return "\n\n".join(parts) + "\n"


def append_report(text: str) -> None:
    if not REPORT.exists():
        REPORT.write_text(
            "# Rate-limit benchmark\n\nWritten by `benchmarks/ratelimits.py`; newest last.\n\n"
        )
    with REPORT.open("a") as f:
        f.write(text + "\n")


# --- main ----------------------------------------------------------------------------------


def attempt(label: str, run: Callable[[], T], notes: list[str]) -> T:
    """``run()``, once more (up to ATTEMPTS) when it fails, e.g. a mock killed from outside."""
    for n in range(1, ATTEMPTS + 1):
        print(f"… {label}", file=sys.stderr, flush=True)
        try:
            return run()
        except BenchError as exc:
            if n == ATTEMPTS:
                raise
            notes.append(f"{label}: attempt {n} failed, run again: {exc}")
            print(f"  failed, running it again: {exc}", file=sys.stderr, flush=True)
    raise AssertionError("unreachable")


def run_all(tmp: Path, d: Durations, notes: list[str]) -> tuple[list[Matched], Recovery]:
    matched: list[Matched] = []
    for rpm in RPM_LIMITS:
        for conc in (CONCURRENCY, CONCURRENCY_HIGH):
            label = f"{rpm:,} RPM, concurrency {conc}"
            case = attempt(label, functools.partial(run_rpm_case, tmp, rpm, d.case, conc), notes)
            matched.append(case)
            if case.passed or case.utilisation >= MIN_UTILISATION:
                break  # more concurrency is for a limit missed by under-utilisation only
    tpm = functools.partial(run_tpm_case, tmp, TPM_LIMIT, d.case, CONCURRENCY)
    matched.append(attempt(f"{TPM_LIMIT:,} TPM", tpm, notes))
    recovery = attempt("recovery", functools.partial(run_recovery, tmp, d, CONCURRENCY), notes)
    return matched, recovery


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~5 s per case, for smoke tests")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    d = QUICK if args.quick else FULL
    notes: list[str] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="batchq-ratelimits-") as name:
        tmp = Path(name)
        try:
            matched, recovery = run_all(tmp, d, notes)
        except BenchError as exc:
            print(f"ratelimits: {exc}", file=sys.stderr)
            return 1
        finally:
            if args.keep:
                kept = Path(tempfile.mkdtemp(prefix="batchq-ratelimits-kept-"))
                subprocess.run(["cp", "-a", f"{tmp}/.", str(kept)], check=False)
                print(f"kept: {kept}", file=sys.stderr)
    text = report(matched, recovery, d, args.quick, time.monotonic() - started, notes)
    print(text)
    if not args.quick:
        append_report(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
